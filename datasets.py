"""Datasets as files: the TinyImageNet layout (splits, classes, image listing) and the triplet
CSVs between stages (read, write, and their paths as rows of an embedding array). torch-free,
so the data stages start fast; the torch Datasets that load the images are in loaders.py.

    from datasets import list_split, read_triplet_csv, write_triplet_csv
"""

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common import PipelineError, RelativeTo, atomic_write, resolve_in

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
TRIPLET_COLUMNS = ("query", "positive", "negative")
PAIR_COLUMNS = ("image1", "image2")          # + "same": 1 when both show one class
TRIPLE_COLUMNS = ("image1", "image2", "image3")  # + "label": 1 when at least two share a class
FLAG_COLUMN = {"pairs": "same", "triples": "label"}


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
    paths, labels = [], []
    for name in class_dirs:
        images = _walk_images(os.path.join(root, name))
        paths.extend(images)
        labels.extend([name] * len(images))
    if not paths:
        raise PipelineError(f"no images found under {root}/<class>/; check --data")
    return paths, labels


def need_classes(labels, root, count=2):
    """Refuse a split with fewer than `count` classes, naming its folder."""
    found = sorted(set(labels))
    if len(found) < count:
        raise PipelineError(f"{root} has {len(found)} class folder(s) with images ({', '.join(found)}); "
                            f"triplets need at least {count} classes: check --data")


def read_wnids(data):
    """The class ids listed in <data>/wnids.txt, in file order."""
    path = Path(data) / "wnids.txt"
    if not path.is_file():
        raise PipelineError(f"{path} is missing; --data must be a TinyImageNet-layout root with wnids.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- triplet CSVs

def read_triplet_csv(path):
    """Read a triplet CSV as three arrays of absolute paths (query, positive, negative)."""
    return read_image_csv(path, TRIPLET_COLUMNS)


def read_pair_csv(path):
    """(image1, image2 arrays of absolute paths, same (N,) int 0/1) of a pair CSV."""
    *images, flags = read_image_csv(path, PAIR_COLUMNS, FLAG_COLUMN["pairs"])
    return images[0], images[1], flags


def read_triple_csv(path):
    """(image1, image2, image3 arrays of absolute paths, label (N,) int 0/1) of a triple CSV."""
    *images, flags = read_image_csv(path, TRIPLE_COLUMNS, FLAG_COLUMN["triples"])
    return images[0], images[1], images[2], flags


def csv_kind(path):
    """'triplets', 'pairs' or 'triples', from a CSV's header; a clear error for anything else."""
    try:
        header = set(pd.read_csv(path, nrows=0, dtype=str).columns)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not a readable CSV ({str(err).splitlines()[0]})") from None
    for kind, columns in (("triplets", TRIPLET_COLUMNS), ("pairs", PAIR_COLUMNS + ("same",)),
                          ("triples", TRIPLE_COLUMNS + ("label",))):
        if set(columns) <= header:
            return kind
    raise PipelineError(f"{path} is not a triplet, pair or triple CSV (its header: {', '.join(sorted(header))}); "
                        f"write one with triplet_sampler.py --kind triplets|pairs|triples")


def read_image_csv(path, columns, flag=None):
    """Arrays of absolute paths, one per image column, (and the 0/1 flag column as ints) of a CSV
    written by triplet_sampler.py; paths are relative to the CSV's folder."""
    path = Path(path).expanduser()
    kind = {TRIPLET_COLUMNS: "triplet", PAIR_COLUMNS: "pair", TRIPLE_COLUMNS: "triple"}.get(tuple(columns), "image")
    fix = f"rerun triplet_sampler.py{'' if kind == 'triplet' else f' --kind {kind}s'}"
    if not path.is_file():
        raise PipelineError(f"{kind} file {path} does not exist; run triplet_sampler.py first")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not a readable CSV ({str(err).splitlines()[0]}); {fix}") from None
    wanted = list(columns) + ([flag] if flag else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path} lacks the column(s) {', '.join(missing)}: a {kind} CSV has the header "
                            f"{','.join(wanted)}; {fix}")
    if len(frame) == 0:
        raise PipelineError(f"{path} has no rows; {fix}")
    empty = (frame[wanted] == "").any(axis=1).to_numpy()
    if flag:
        empty = empty | ~frame[flag].isin(["0", "1"]).to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise PipelineError(f"{path} line {_line_of_row(path, row)} has an empty field or fewer than {len(wanted)} "
                            f"columns{' or a ' + flag + ' other than 0/1' if flag else ''}; a row is "
                            f"{','.join(wanted)}; {fix}")
    folder = str(path.resolve().parent)
    cache = {}

    def resolve(p):
        if p not in cache:
            cache[p] = resolve_in(p, folder)
        return cache[p]

    arrays = tuple(np.array([resolve(p) for p in frame[c].tolist()], dtype=object) for c in columns)
    return arrays + ((frame[flag].astype(np.int64).to_numpy(),) if flag else ())


def _line_of_row(path, row):
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
    """Fail with up to `limit` missing (or, unless empty_ok, empty) image files listed, before any
    training or embedding starts: one stat per file, no decoding."""
    missing, empty = [], []
    for path in paths:
        try:
            if os.stat(path).st_size == 0:
                empty.append(path)
        except OSError:
            missing.append(path)
    for found, what, fix in ((missing, "do not exist", "fix --data or rerun triplet_sampler.py"),
                             ([] if empty_ok else empty, "are empty files",
                              "replace them, or pass --on_bad_image skip to leave them out")):
        if found:
            shown = ", ".join(found[:limit])
            more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
            raise PipelineError(f"{len(found)} image(s) named by {source} {what}: {shown}{more}; {fix}")


def write_triplet_csv(path, paths, triplets):
    """Write triplets of indices into paths as query,positive,negative rows (see write_image_csv)."""
    write_image_csv(path, TRIPLET_COLUMNS, paths, triplets)


def write_image_csv(path, columns, paths, rows, flag=None):
    """Write rows of indices into paths (R, len(columns)) as CSV rows of image paths relative to
    the CSV's folder, plus an optional (name, (R,) 0/1 values) column, atomically. The bytes are
    pandas' (a path holding a comma, a quote or a line break is quoted); when no path needs
    quoting they are joined directly, which is several times faster."""
    relative_to = RelativeTo(path)
    relative = np.array([relative_to(p) for p in paths], dtype=object)
    table = relative[rows]  # (R, k) of str
    header = list(columns) + ([flag[0]] if flag else [])
    if flag:
        table = np.concatenate([table, np.asarray(flag[1]).astype(str).astype(object)[:, None]], axis=1)
    joined = "\0".join(relative)
    with atomic_write(path, newline="") as handle:
        if any(c in joined for c in ',"\r\n'):
            pd.DataFrame(table, columns=header).to_csv(handle, index=False, lineterminator="\n")
            return
        handle.write(",".join(header) + "\n")
        for start in range(0, len(table), 100_000):
            handle.write("".join(",".join(row) + "\n" for row in table[start:start + 100_000].tolist()))


def readable_triplets(columns, embedded):
    """(the triplets whose three images are all in `embedded` (a dict or set of paths), how many
    were left out): a triplet naming a skipped image cannot be scored."""
    keep = np.array([q in embedded and p in embedded and n in embedded for q, p, n in zip(*columns)], dtype=bool)
    return tuple(column[keep] for column in columns), int((~keep).sum())


def triplet_rows(columns, row_of, source, missing_fix):
    """Row indices (q, p, n), int64 arrays, of a triplet CSV's columns: row_of maps an image path
    to its row (a dict, or a callable giving -1 for an unknown path); an unknown path is refused
    naming source and missing_fix."""
    lookup = (lambda p: row_of.get(p, -1)) if isinstance(row_of, dict) else row_of
    rows = []
    for column in columns:
        index = np.array([lookup(p) for p in column], dtype=np.int64)
        if (index < 0).any():
            missing = column[np.flatnonzero(index < 0)[0]]
            raise PipelineError(f"{source} names {missing}, which {missing_fix}")
        rows.append(index)
    return rows
