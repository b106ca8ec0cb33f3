"""The CSVs between stages: triplet (query,positive,negative), pair (image1,image2,same) and triple
(image1,image2,image3,label) files that triplet_sampler.py writes, with paths relative to the CSV's
folder, read back as arrays of absolute paths or as codes of distinct paths.

    q, p, n = read_triplet_csv("training_triplet_sample.csv")
    paths, codes, same = read_decision_codes("val_pair_sample.csv", "pairs")   # each distinct path once
"""

from pathlib import Path

import numpy as np
import pandas as pd

from deeprank.common import PipelineError, RelativeTo, atomic_write, resolve_in
from deeprank.datasets import line_of_row

TRIPLET_COLUMNS = ("query", "positive", "negative")
PAIR_COLUMNS = ("image1", "image2")          # + "same": 1 when both show one class
TRIPLE_COLUMNS = ("image1", "image2", "image3")  # + "label": 1 when at least two share a class
FLAG_COLUMN = {"pairs": "same", "triples": "label"}


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


def read_decision_codes(path, kind):
    """read_image_codes of a pair ('pairs') or triple ('triples') CSV: (distinct paths, codes (N, 2 or 3),
    0/1 flags)."""
    return read_image_codes(path, PAIR_COLUMNS if kind == "pairs" else TRIPLE_COLUMNS, FLAG_COLUMN[kind])


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
    paths, codes, flags = read_image_codes(path, columns, flag)
    arrays = tuple(paths[codes[:, column]] for column in range(len(columns)))
    return arrays + ((flags,) if flag else ())


def read_image_codes(path, columns, flag=None):
    """(paths, codes, flags) of a CSV written by triplet_sampler.py: its distinct image paths
    (absolute, an object array in order of first appearance, row by row), codes (N, len(columns))
    int64 rows of paths, and the 0/1 flag column as ints (None without flag). Each distinct path
    is resolved once (relative to the CSV's folder), however many rows name it."""
    path = Path(path).expanduser()
    kind = {TRIPLET_COLUMNS: "triplet", PAIR_COLUMNS: "pair", TRIPLE_COLUMNS: "triple"}.get(tuple(columns), "image")
    fix = f"rerun triplet_sampler.py{'' if kind == 'triplet' else f' --kind {kind}s'}"
    if not path.is_file():
        raise PipelineError(f"{kind} file {path} does not exist; run triplet_sampler.py first")
    wanted = list(columns) + ([flag] if flag else [])
    try:  # only the columns it needs: a million-row CSV's other columns never become Python strings
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda name: name in wanted)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not a readable CSV ({str(err).splitlines()[0]}); {fix}") from None
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
        raise PipelineError(f"{path} line {line_of_row(path, row)} has an empty field or fewer than {len(wanted)} "
                            f"columns{' or a ' + flag + ' other than 0/1' if flag else ''}; a row is "
                            f"{','.join(wanted)}; {fix}")
    codes, distinct = pd.factorize(frame[list(columns)].to_numpy().ravel())
    folder = str(path.resolve().parent)
    paths = np.array([resolve_in(p, folder) for p in distinct], dtype=object)
    flags = frame[flag].astype(np.int64).to_numpy() if flag else None
    return paths, codes.astype(np.int64).reshape(len(frame), len(columns)), flags


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
    keep = np.array([q in embedded and p in embedded and n in embedded for q, p, n in zip(*columns, strict=True)],
                    dtype=bool)
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
