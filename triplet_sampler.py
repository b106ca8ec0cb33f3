"""Stage 1: sample (query, positive, negative) triplets from a dataset split.

Reads <data>/train/ (--training 1) or <data>/val/ (--training 0, after
transform_validation.py); writes a CSV with header query,positive,negative. For every
image of every class (the query) it draws NUM_POS_IMAGES distinct positives of the same
class (never the query itself) and, for each positive, NUM_NEG_IMAGES distinct negatives
from the other classes, as the original project did, vectorised with numpy (no loop per
triplet, no quadratic search). Paths in the CSV are relative to the CSV's own folder.

    python triplet_sampler.py --training 1 --num_pos_images 1 --num_neg_images 1
"""

import argparse
import sys
import time

import numpy as np

from common import (TRAIN_TRIPLETS, VAL_TRIPLETS, PipelineError, check_output_path, data_flag, positive_int,
                    print_args, run_cli, seed_flag)
from datasets import list_split, need_classes, split_root, write_triplet_csv

# ---------------------------------------------------------------- hyperparameters
NUM_POS_IMAGES = 1   # positives per query image
NUM_NEG_IMAGES = 1   # negatives per (query, positive) pair
# ----------------------------------------------------------------


def sample_distinct(rng, high, k):
    """(Q, k) ints, row i a uniform random k-subset of [0, high[i]) (needs high >= k).

    Robert Floyd's algorithm, vectorised over rows: k passes, each O(Q * k).
    """
    high = np.asarray(high, dtype=np.int64)
    picked = np.empty((len(high), k), dtype=np.int64)
    for step in range(k):
        top = high - k + step  # candidates are [0, top]
        draw = rng.integers(0, top + 1)
        taken = (picked[:, :step] == draw[:, None]).any(axis=1)
        picked[:, step] = np.where(taken, top, draw)
    return picked


def class_ranges(codes):
    """For class codes sorted ascending: (start, size) arrays indexed by class code."""
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts, sizes


def sample_triplets(labels, num_pos, num_neg, seed=0):
    """Index triplets (q, p, n) for images grouped by label: rows query-major.

    labels: sequence of class names, equal names contiguous (list_split's order).
    Returns (triplets (T, 3) int64, short_classes {name: positives per query}).
    """
    if num_pos < 1 or num_neg < 1:
        raise PipelineError("--num_pos_images and --num_neg_images must be at least 1")
    names, codes = np.unique(np.asarray(labels), return_inverse=True)
    if len(names) < 2:
        raise PipelineError(f"found {len(names)} class; negatives need at least two classes")
    order = np.argsort(codes, kind="stable")
    if not np.array_equal(order, np.arange(len(codes))):
        raise ValueError("labels must be grouped by class (sorted)")
    rng = np.random.default_rng(seed)
    starts, sizes = class_ranges(codes)
    total = len(codes)

    queries, positives, short = [], [], {}
    for n_pos in np.unique(np.minimum(sizes - 1, num_pos)):
        # queries whose class allows n_pos positives (all of them unless a class is small)
        members = np.flatnonzero(np.minimum(sizes - 1, num_pos)[codes] == n_pos)
        if n_pos <= 0:
            short.update({names[c]: 0 for c in np.unique(codes[members])})
            continue
        if n_pos < num_pos:
            short.update({names[c]: int(n_pos) for c in np.unique(codes[members])})
        cls = codes[members]
        own = members - starts[cls]  # the query's offset inside its class
        offsets = sample_distinct(rng, sizes[cls] - 1, int(n_pos))  # (Q, n_pos) among the others
        offsets += offsets >= own[:, None]  # skip the query itself
        queries.append(np.repeat(members, n_pos))
        positives.append((starts[cls][:, None] + offsets).ravel())
    if not queries:
        raise PipelineError("every class has a single image; positives need at least two per class")
    query = np.concatenate(queries)
    positive = np.concatenate(positives)
    keep = np.argsort(query, kind="stable")  # query-major rows, whatever the size groups
    query, positive = query[keep], positive[keep]

    # negatives: uniform over images of other classes, distinct per (query, positive) pair
    cls = codes[query]
    others = total - sizes[cls]
    if (others < num_neg).any():
        raise PipelineError(f"the other classes have fewer than --num_neg_images {num_neg} images")
    picks = sample_distinct(rng, others, num_neg)  # (P, M) in [0, others)
    picks += (picks >= starts[cls][:, None]) * sizes[cls][:, None]  # jump over the query's class
    triplets = np.stack([np.repeat(query, num_neg), np.repeat(positive, num_neg), picks.ravel()], axis=1)
    return triplets, short


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[data_flag(), seed_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", type=int, choices=(0, 1), default=1,
                        help="1: sample train/ into training_triplet_sample.csv; 0: val/ into "
                             "val_triplet_sample.csv (default: %(default)s)")
    parser.add_argument("--num_pos_images", type=positive_int, default=NUM_POS_IMAGES,
                        help="positives per query image (default: %(default)s)")
    parser.add_argument("--num_neg_images", type=positive_int, default=NUM_NEG_IMAGES,
                        help="negatives per (query, positive) pair (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help=f"output CSV (default: {TRAIN_TRIPLETS} or {VAL_TRIPLETS} by --training)")
    args = parser.parse_args(argv)
    print_args("triplet_sampler.py", args)
    out = args.out or (TRAIN_TRIPLETS if args.training else VAL_TRIPLETS)
    check_output_path(out)
    split = "train" if args.training else "val"

    start = time.perf_counter()
    paths, labels = list_split(args.data, split)
    need_classes(labels, split_root(args.data, split))
    triplets, short = sample_triplets(labels, args.num_pos_images, args.num_neg_images, args.seed)
    for name, count in sorted(short.items()):
        print(f"warning: class {name} has too few images for {args.num_pos_images} positives per query; "
              f"using {count}", file=sys.stderr)
    write_triplet_csv(out, paths, triplets)
    classes = len(set(labels))
    print(f"wrote {len(triplets)} triplets from {len(paths)} {split} images in {classes} classes "
          f"to {out} ({time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
