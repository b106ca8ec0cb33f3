"""Export a TinyImageNet-layout root (val already transformed) as another layout, to try the
pipeline's other --data readers on real images: an ImageFolder tree (OUT/train|val/<class>/*),
a flat ImageFolder tree (OUT/<class>/*, no split folders), or a label CSV (OUT/labels.csv with
filename,label,split and the images in OUT/images/). Images are hard-linked where the file
system allows (no copy), else copied. Labels are the words.txt names when present.

    python -m tools.export_dataset --data tiny-imagenet-mini --out mini-imagefolder --to imagefolder
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from deeprank.common import PipelineError, run_cli
from deeprank.datasets import list_split

ROOT = Path(__file__).resolve().parents[1]


def link(source, target):
    """Hard-link source to target (copy when linking is not possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def class_names(data):
    """wnid -> readable name from words.txt (first synonym), or the wnid itself."""
    words = Path(data) / "words.txt"
    if not words.is_file():
        return {}
    names = {}
    for line in words.read_text(encoding="utf-8").splitlines():
        wnid, _, text = line.partition("\t")
        names[wnid] = text.split(",")[0].strip() or wnid
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="TinyImageNet-layout root, val transformed")
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--to", choices=("imagefolder", "flat", "csv"), default="imagefolder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise PipelineError(f"{out} exists; pick a new --out")
    names = class_names(args.data)
    rows = []
    for split in ("train", "val"):
        for path, wnid in zip(*list_split(args.data, split), strict=True):
            label = names.get(wnid, wnid)
            name = f"{split}_{Path(path).name}"
            if args.to == "csv":
                link(path, out / "images" / name)
                rows.append((f"images/{name}", label, split))
            else:
                link(path, (out / split / label if args.to == "imagefolder" else out / label) / name)
    if args.to == "csv":
        pd.DataFrame(rows, columns=["filename", "label", "split"]).to_csv(out / "labels.csv", index=False)
    print(f"wrote {args.to} export of {args.data} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
