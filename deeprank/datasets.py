"""Datasets as files: the three layouts --data may point at (TinyImageNet, an ImageFolder tree,
a CSV of image paths and labels), read into the same (paths, labels) per split, and the CSVs
between stages (triplets, pairs, triples: read, written, and their paths as rows of an
embedding array). torch-free, so the data stages start fast, and pandas is imported only by the
functions that read or write CSVs, so the search page (which lists image folders) runs without
it; the torch Datasets that load the images are in loaders.py.

    dataset = ImageSource.from_args(args)            # --data, --layout, --val_fraction, ...
    paths, labels = dataset.split("train")       # sorted by label, then path
"""

import contextlib
import os
import stat
import sys
import zlib
from pathlib import Path

import numpy as np

from deeprank.common import PipelineError, RelativeTo, atomic_write, resolve_in

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
LAYOUTS = ("tinyimagenet", "imagefolder", "csv")
SPLITS = ("train", "val", "test")
SELECTION_COLUMNS = ("filename", "label", "split")


# ----------------------------------------------------------------------------- dataset layout

def class_of(path):
    """Class of an image: the folder directly under the split root.

    TinyImageNet keeps images in <split>/<wnid>/images/x.JPEG; flatter trees use
    <split>/<class>/x.jpg. Both give the class folder's name.
    """
    parent = Path(path).parent
    if parent.name == "images":
        parent = parent.parent
    return parent.name


def is_image(name):
    """True for file names with a known image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder):
    """All image files below folder, as sorted absolute path strings (os.scandir; a stat only for
    folders, so a symbolic link back up the tree is walked once, not forever)."""
    found, seen = [], set()
    stack = [folder]
    while stack:
        current = stack.pop()
        info = os.stat(current)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                elif is_image(entry.name):
                    found.append(_checked_name(entry.path))
    found.sort()
    return found


def images_in(items, flag):
    """Image files named on a command line: a file as given, a folder as every image below it
    (sorted); absolute paths, each once. A name that is neither is refused naming the flag."""
    found = []
    for item in items:
        if os.path.isdir(item):
            inside = _walk_images(os.path.abspath(item))
            if not inside:
                raise PipelineError(f"{flag} folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(inside)
        elif os.path.isfile(item):
            found.append(_checked_name(os.path.abspath(item)))
        else:
            raise PipelineError(f"{flag} {item} does not exist; give an image file or a folder of images")
    return unique_in_order(found)


def _checked_name(path):
    """A listed file's path, refused when it cannot be written into the pipeline's UTF-8 files."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{path.encode('utf-8', 'surrogateescape')!r}: the file name is not valid UTF-8; "
                            f"rename it") from None
    return path


def split_root(data, split):
    """The folder of one split ('train', 'val', 'test') under a dataset root, checked."""
    data = Path(data).expanduser().resolve()
    if not data.is_dir():
        raise PipelineError(f"dataset folder {data} does not exist; pass --data DIR "
                            f"(run synthetic_data.py to generate a small one)")
    root = data / split
    if not root.is_dir():
        raise PipelineError(f"{data} has no {split}/ folder; is --data a TinyImageNet-layout root?")
    return root


def list_split(data, split):
    """Every image of a labelled split as (paths, labels), sorted by class then file name.

    Classes are the folders directly under the split root. For val this needs the layout
    that transform_validation.py produces (val/<wnid>/images/); the flat original layout
    is refused with the command that fixes it.
    """
    root = split_root(data, split)
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if split == "val" and "images" in class_dirs:
        if class_dirs == ["images"]:
            raise PipelineError(f"{root} still has the original flat layout (val/images/); "
                                f"run: python transform_validation.py --data {root.parent}")
        # leftovers that transform_validation.py reported (no annotation): not a class
        print(f"warning: ignoring {root / 'images'} (images without annotation)", file=sys.stderr)
        class_dirs.remove("images")
    return _images_by_class(root, class_dirs)


def _images_by_class(root, class_dirs):
    """(paths, labels) of every image below root/<class> for each class folder, in that order."""
    paths, labels = [], []
    for name in class_dirs:
        images = _walk_images(os.path.join(root, name))
        paths.extend(images)
        labels.extend([name] * len(images))
    if not paths:
        raise PipelineError(f"no images found under {root}/<class>/; check --data")
    return paths, labels


def need_classes(labels, root, count=2, kind="triplets"):
    """Refuse a split with fewer than `count` classes for `kind` (triplets, pairs, triples), naming its folder."""
    found = sorted(set(labels))
    if len(found) < count:
        raise PipelineError(f"{root} has {len(found)} class folder(s) with images ({', '.join(found)}); "
                            f"{kind} need at least {count} classes: check --data")


def read_wnids(data):
    """The class ids listed in <data>/wnids.txt, in file order."""
    path = Path(data) / "wnids.txt"
    if not path.is_file():
        raise PipelineError(f"{path} is missing; --data must be a TinyImageNet-layout root with wnids.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- layouts

def detect_layout(data):
    """The layout --data points at: a .csv file, a TinyImageNet root (wnids.txt or
    val/val_annotations.txt), or an ImageFolder tree; a clear error for anything else."""
    path = Path(data).expanduser()
    if not path.exists():
        raise PipelineError(f"dataset {path} does not exist; pass --data DIR or --data LABELS.csv "
                            f"(run synthetic_data.py to generate a small one)")
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if not path.is_dir():
        raise PipelineError(f"--data {data} is neither a folder nor a .csv file; pass a dataset root or a label CSV "
                            f"(run synthetic_data.py to generate a small one)")
    if (path / "wnids.txt").is_file() or (path / "val" / "val_annotations.txt").is_file():
        return "tinyimagenet"
    if any(entry.is_dir() for entry in os.scandir(path)):
        return "imagefolder"
    raise PipelineError(f"--data {data} has no class folders, no wnids.txt and is no CSV: it is none of the layouts "
                        f"{', '.join(LAYOUTS)}")


def split_by_fraction(paths, labels, val_fraction, seed):
    """{'train': [...], 'val': [...]} indices of a per-class split: in each class, a share
    val_fraction (at least one image when the class has two) goes to val, drawn by (seed, class)."""
    chosen = {"train": [], "val": []}
    by_class = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label, members in by_class.items():
        members = sorted(members, key=lambda i: paths[i])
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(members))
        count = int(round(val_fraction * len(members)))
        count = max(count, 1) if len(members) >= 2 and val_fraction > 0 else count
        chosen["val"] += [members[i] for i in order[:count]]
        chosen["train"] += [members[i] for i in order[count:]]
    return chosen


class ImageSource:
    """A dataset of any layout as (paths, labels) per split ('train', 'val', 'test'), each sorted
    by label, then path (the order the samplers need). Build it with ImageSource.from_args(args)."""

    def __init__(self, data, layout=None, val_fraction=0.2, split_seed=0, path_column="filename",
                 label_column="label", image_root=None, top_classes=0, per_class=0):
        if not 0 <= val_fraction < 1:
            raise PipelineError(f"--val_fraction {val_fraction} must be in [0, 1)")
        self.data, self.layout = Path(data).expanduser(), layout or detect_layout(data)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.columns, self.image_root = (path_column, label_column), image_root
        self.top_classes, self.per_class = top_classes, per_class
        self._splits = None

    @classmethod
    def from_args(cls, args):
        """The dataset the common.dataset_flags() describe."""
        return cls(args.data, args.layout, args.val_fraction, args.split_seed, args.path_column, args.label_column,
                   args.image_root, args.top_classes, args.per_class)

    def root(self, split):
        """Where a split's images live (for messages)."""
        return self.data if self.layout == "csv" or not (self.data / split).is_dir() else self.data / split

    def split(self, name):
        """(paths, labels) of one split, sorted by label then path; an error when it is empty."""
        if self._split_folders():
            return self._split_folder(name)
        if self._splits is None:
            self._splits = self._read_csv() if self.layout == "csv" else self._read_flat_folder()
        paths, labels = self._splits.get(name, ([], []))
        if not paths:
            raise PipelineError(f"{self.data} has no {name} images (layout {self.layout}, --val_fraction "
                                f"{self.val_fraction}); check --data")
        return paths, labels

    def _split_folders(self):
        """Whether the splits are folders (TinyImageNet, ImageFolder with train/ and val/)."""
        return self.layout == "tinyimagenet" or (self.layout == "imagefolder" and (self.data / "train").is_dir())

    def _split_folder(self, name):
        """A split folder's images (TinyImageNet, ImageFolder with train/ and val/), selected by
        --top_classes (the train split's most frequent labels, for every split) and --per_class."""
        self._splits = self._splits or {}
        if name not in self._splits:
            paths, labels = list_split(self.data, name)
            if self.top_classes and name != "train":
                top = set(self.split("train")[1])
                keep = [i for i, label in enumerate(labels) if label in top]
                paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
            keep = self._selected(paths, labels, self.top_classes if name == "train" else 0)
            self._splits[name] = ([paths[i] for i in keep], [labels[i] for i in keep])
        return self._splits[name]

    def _read_flat_folder(self):
        """ROOT/<class>/... without split folders: split per class by --val_fraction."""
        class_dirs = sorted(entry.name for entry in os.scandir(self.data) if entry.is_dir())
        paths, labels = _images_by_class(self.data, class_dirs)
        keep = self._selected(paths, labels)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        return self._grouped(paths, labels, split_by_fraction(paths, labels, self.val_fraction, self.split_seed))

    def _read_csv(self):
        """A label CSV: path and label columns, a split column if present, else --val_fraction."""
        import pandas as pd  # imported where used: see the module's docstring
        path_column, label_column = self.columns
        try:
            frame = pd.read_csv(self.data, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise PipelineError(f"{self.data} is not a readable CSV ({str(err).splitlines()[0]})") from None
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise PipelineError(f"{self.data} has no column {', '.join(missing)} (its columns: "
                                f"{', '.join(frame.columns)}); pass --path_column / --label_column")
        empty = (frame[list(self.columns)] == "").any(axis=1).to_numpy()
        if empty.any():
            line = line_of_row(self.data, int(np.flatnonzero(empty)[0]))
            raise PipelineError(f"{self.data} line {line} has an empty {path_column} or {label_column}")
        folder = str(Path(self.image_root).expanduser().resolve() if self.image_root else self.data.resolve().parent)
        paths = [resolve_in(p, folder) for p in frame[path_column].tolist()]
        labels = frame[label_column].tolist()
        keep = self._selected(paths, labels)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        frame = frame.iloc[keep]
        if "split" in frame.columns:
            column = frame["split"].str.strip().str.lower().tolist()
            bad = sorted(set(column) - set(SPLITS))
            if bad:
                raise PipelineError(f"{self.data}'s split column holds {', '.join(map(repr, bad[:3]))}; use "
                                    f"train, val or test")
            chosen = {name: [i for i, value in enumerate(column) if value == name] for name in SPLITS}
        else:
            chosen = split_by_fraction(paths, labels, self.val_fraction, self.split_seed)
        return self._grouped(paths, labels, chosen)

    def _selected(self, paths, labels, top_classes=None):
        """Indices kept by --top_classes N (the N most frequent labels) and --per_class K (the
        first K images of each, in path order); all when neither is given."""
        import pandas as pd  # imported where used: see the module's docstring
        top_classes = self.top_classes if top_classes is None else top_classes
        keep = list(range(len(paths)))
        if top_classes:
            counts = pd.Series(labels).value_counts()
            top = sorted(counts.index, key=lambda label: (-counts[label], label))[:top_classes]
            top = set(top)
            keep = [i for i in keep if labels[i] in top]
        if self.per_class:
            taken, limited = {}, []
            for i in sorted(keep, key=lambda i: (labels[i], paths[i])):
                if taken.get(labels[i], 0) < self.per_class:
                    taken[labels[i]] = taken.get(labels[i], 0) + 1
                    limited.append(i)
            keep = sorted(limited)
        return keep

    @staticmethod
    def _grouped(paths, labels, chosen):
        """{split: (paths, labels)} sorted by label, then path."""
        out = {}
        for name, indices in chosen.items():
            rows = sorted((labels[i], paths[i]) for i in indices)
            out[name] = ([_checked_name(p) for _, p in rows], [label for label, _ in rows])
        return out

    def write_selection(self, path):
        """Write the images this dataset uses (after --top_classes / --per_class) with their split
        as a CSV that --data can take again; returns its path, or None when nothing was selected."""
        import pandas as pd  # imported where used: see the module's docstring
        if not (self.top_classes or self.per_class) or not self._splits:
            return None
        if self._split_folders():  # every split folder, not only the ones this run read
            for name in SPLITS:
                if (self.data / name).is_dir():
                    with contextlib.suppress(PipelineError):  # e.g. a val/ not yet transformed: left out
                        self._split_folder(name)
        relative_to = RelativeTo(path)
        rows = [(relative_to(p), label, name) for name in SPLITS if name in self._splits
                for p, label in zip(*self._splits[name], strict=True)]
        with atomic_write(path, newline="") as handle:
            pd.DataFrame(rows, columns=list(SELECTION_COLUMNS)).to_csv(handle, index=False, lineterminator="\n")
        return path


# ----------------------------------------------------------------------------- image files

def line_of_row(path, row):
    """The line number (from 1, the header) of data row `row` of a CSV, blank lines skipped as pandas does."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        seen = -1
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if seen == row:
                    return number
                seen += 1
    return row + 2


def unique_in_order(*arrays):
    """The distinct values of several arrays, in order of first appearance."""
    return list(dict.fromkeys(v for array in arrays for v in array))


def check_images_exist(paths, source, limit=10, empty_ok=False):
    """Fail with up to `limit` missing, not-a-file (a folder) or, unless empty_ok, empty image files
    listed, before any model loads, training or embedding starts: one stat per file, no decoding."""
    missing, folders, empty = [], [], []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            missing.append(path)
            continue
        if not stat.S_ISREG(status.st_mode):
            folders.append(path)
        elif status.st_size == 0:
            empty.append(path)
    for found, what, fix in ((missing, "do not exist", "fix --data or rerun triplet_sampler.py"),
                             (folders, "are not files (folders?)", "name image files, not folders"),
                             ([] if empty_ok else empty, "are empty files",
                              "replace them, or pass --on_bad_image skip to leave them out")):
        if found:
            shown = ", ".join(found[:limit])
            more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
            raise PipelineError(f"{len(found)} image(s) named by {source} {what}: {shown}{more}; {fix}")


