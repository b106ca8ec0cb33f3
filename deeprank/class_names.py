"""Human-readable class names beside the ids that labels hold: TinyImageNet's words.txt (the first
name of each line: "walking stick, walkingstick, stick insect" -> "walking stick"), found beside
wnids.txt from the image paths themselves (<root>/<split>/<wnid>/images/<file>), or a
--class_names FILE of `id<TAB>name` lines. Where no names are known (ImageFolder trees and label
CSVs, whose labels already are names), a label stands for itself.

    names = ClassNames.for_paths(gallery.paths)          # or ClassNames.from_file("names.tsv")
    names.show("n02231487")                              # 'walking stick (n02231487)'
"""

import os

from deeprank.common import PipelineError


class ClassNames:
    """{label: name}; show(label) puts the name before its id, or gives the label alone."""

    def __init__(self, names=None):
        self.names = dict(names or {})

    def name(self, label):
        """The label's name, or None."""
        name = self.names.get(label)
        return name if name and name != label else None

    def show(self, label):
        name = self.name(label)
        return f"{name} ({label})" if name else str(label)

    @classmethod
    def from_file(cls, path, wanted=None, required=True):
        """Names from an id<TAB>name file (each name cut at its first comma); wanted: keep only these
        ids. A missing or unreadable file is refused when required, else gives no names."""
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except OSError as err:
            if not required:
                return cls()
            raise PipelineError(f"cannot read --class_names {path} ({err.strerror}); give a file of "
                                f"id<TAB>name lines") from None
        names = {}
        for line in lines:
            key, tab, name = line.partition("\t")
            if tab and (wanted is None or key in wanted):
                names[key] = name.split(",")[0].strip()
        return cls(names)

    @classmethod
    def for_paths(cls, paths, names_file=None):
        """The names of the dataset these images come from: names_file if given, else every
        TinyImageNet root's words.txt (beside wnids.txt) that the paths lie under."""
        if names_file:
            return cls.from_file(names_file)
        names = {}
        for root in tinyimagenet_roots(paths):
            wnids = os.path.join(root, "wnids.txt")
            with open(wnids, encoding="utf-8", errors="replace") as handle:
                wanted = {line.strip() for line in handle if line.strip()}
            names.update(cls.from_file(os.path.join(root, "words.txt"), wanted, required=False).names)
        return cls(names)


def tinyimagenet_roots(paths):
    """The TinyImageNet roots (a folder with wnids.txt and words.txt) that image paths of the form
    <root>/<split>/<wnid>/images/<file> lie under; one look per distinct folder."""
    roots = set()
    for folder in {os.path.dirname(str(path)) for path in paths}:
        if os.path.basename(folder) != "images":
            continue
        root = os.path.dirname(os.path.dirname(os.path.dirname(folder)))
        if root not in roots and os.path.isfile(os.path.join(root, "wnids.txt")) \
                and os.path.isfile(os.path.join(root, "words.txt")):
            roots.add(root)
    return sorted(roots)
