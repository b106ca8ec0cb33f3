"""Stage 0: give the validation split the same layout as train.

Reads <data>/val/val_annotations.txt (file<TAB>wnid<TAB>box...) and moves each
<data>/val/images/<file> to <data>/val/<wnid>/images/<file>. Idempotent: a second run
changes nothing and says so. It never overwrites or loses a file: an annotation whose
image is missing, an image without annotation, or a file already at its destination is
reported and left where it is (exit status 1 when there was any such problem).

    python transform_validation.py --data tiny-imagenet-200
"""

import argparse
import os
import sys

from deeprank.common import PipelineError, data_flag, print_args, run_cli
from deeprank.datasets import is_image, read_wnids, split_root

MAX_LISTED = 10  # problems listed by name; the rest are counted


def read_annotations(path, known_wnids):
    """Parse val_annotations.txt into [(file, wnid)], refusing the whole file on a bad line."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing; the val split of TinyImageNet ships it next to val/images/")
    pairs = []
    seen = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PipelineError(f"{path} is not UTF-8 text; restore it from the dataset archive") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        name = fields[0].strip()
        wnid = fields[1].strip() if len(fields) > 1 else ""
        if len(fields) < 2 or not name or not wnid or "/" in name or "/" in wnid:
            raise PipelineError(f"{path} line {number} is not 'file<TAB>wnid<TAB>box': {line[:80]!r}; "
                                f"restore the file from the dataset archive")
        if wnid not in known_wnids:
            raise PipelineError(f"{path} line {number} names class {wnid}, which wnids.txt does not list; "
                                f"restore the file from the dataset archive")
        if name in seen and seen[name] != wnid:
            raise PipelineError(f"{path} line {number} gives {name} a second class ({seen[name]} and {wnid}); "
                                f"restore the file from the dataset archive")
        if name not in seen:
            seen[name] = wnid
            pairs.append((name, wnid))
    return pairs


def plan_moves(val_root, annotations):
    """Decide each annotation's fate: (moves, already_done, missing, conflicts) as path lists."""
    images = val_root / "images"
    moves, done, missing, conflicts = [], [], [], []
    for name, wnid in annotations:
        src = images / name
        dst = val_root / wnid / "images" / name
        if src.is_file() and dst.exists():
            conflicts.append((src, dst))
        elif src.is_file():
            moves.append((src, dst))
        elif dst.is_file():
            done.append(dst)
        else:
            missing.append(src)
    return moves, done, missing, conflicts


def _report(title, items):
    """Print a problem list to stderr, at most MAX_LISTED entries by name."""
    if not items:
        return
    stream = sys.stderr
    print(f"warning: {len(items)} {title}:", file=stream)
    for item in items[:MAX_LISTED]:
        print(f"  {item}", file=stream)
    if len(items) > MAX_LISTED:
        print(f"  ... and {len(items) - MAX_LISTED} more", file=stream)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[data_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    print_args("transform_validation.py", args)
    val_root = split_root(args.data, "val")
    wnids = set(read_wnids(val_root.parent))
    annotations = read_annotations(val_root / "val_annotations.txt", wnids)
    moves, done, missing, conflicts = plan_moves(val_root, annotations)

    for src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)  # same file system: atomic, never copies half a file

    images = val_root / "images"
    annotated = {name for name, _ in annotations}
    unannotated = []
    if images.is_dir():
        unannotated = sorted(str(images / n) for n in os.listdir(images) if is_image(n) and n not in annotated)
        if not os.listdir(images):
            images.rmdir()  # the flat folder is empty now: the layout is train's

    if moves:
        classes = len({dst.parent.parent.name for _, dst in moves})
        print(f"moved {len(moves)} images into {val_root}/<wnid>/images/ ({classes} classes)")
    else:
        print(f"nothing to do: {val_root} is already in the <wnid>/images/ layout "
              f"({len(done)} annotated images in place)")
    _report("annotations name an image that does not exist (left alone)", [str(p) for p in missing])
    _report("images have no annotation (left in val/images/)", unannotated)
    _report("images already exist at their destination (nothing overwritten)",
            [f"{src} -> {dst}" for src, dst in conflicts])
    return 1 if (missing or unannotated or conflicts) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
