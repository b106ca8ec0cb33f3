"""Stage 1: sample (query, positive, negative) triplets, or pairs, or triples, from a dataset split.

Reads <data>/train/ (--training 1) or <data>/val/ (--training 0, after
transform_validation.py); writes a CSV with header query,positive,negative. For every
image of every class (the query) it draws NUM_POS_IMAGES distinct positives of the same
class (never the query itself) and, for each positive, NUM_NEG_IMAGES distinct negatives
from the other classes, as the original project did, vectorised with numpy (no loop per
triplet, no quadratic search). Paths in the CSV are relative to the CSV's own folder.

--kind pairs writes image1,image2,same (same: 1 when both show one class): --count pairs, half
of each kind, no self-pairs, no pair twice, every image drawn as the first of a pair once per
round. --kind triples writes image1,image2,image3,label (label: 1 when at least two share a
class): half positive (two of one class, a third of any other), half three distinct classes.

    python triplet_sampler.py --training 1 --num_pos_images 1 --num_neg_images 1
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from deeprank.common import (
    SAMPLE_FILES,
    PipelineError,
    check_output_path,
    dataset_flags,
    positive_int,
    print_args,
    run_cli,
    seed_flag,
)
from deeprank.datasets import ImageSource, check_images_exist, need_classes
from deeprank.sample_csv import FLAG_COLUMN, PAIR_COLUMNS, TRIPLE_COLUMNS, write_image_csv, write_triplet_csv

# ---------------------------------------------------------------- hyperparameters
NUM_POS_IMAGES = 1   # positives per query image
NUM_NEG_IMAGES = 1   # negatives per (query, positive) pair
KIND = "triplets"    # triplets | pairs | triples
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
    names, codes, starts, sizes = _codes(labels)
    if len(names) < 2:
        raise PipelineError(f"found {len(names)} class; negatives need at least two classes")
    rng = np.random.default_rng(seed)
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



def _codes(labels):
    """(class names, codes, starts, sizes) of labels grouped by class (list_split's order)."""
    names, codes = np.unique(np.asarray(labels), return_inverse=True)
    if not np.array_equal(np.argsort(codes, kind="stable"), np.arange(len(codes))):
        raise ValueError("labels must be grouped by class (sorted)")
    return (names, codes) + class_ranges(codes)


def _same_class_partner(rng, first, codes, starts, sizes):
    """A uniform random other image of each first image's class (classes of >= 2 images)."""
    cls = codes[first]
    offset = rng.integers(0, sizes[cls] - 1)
    offset += offset >= first - starts[cls]  # skip the image itself
    return starts[cls] + offset


def _other_class_image(rng, cls_a, starts, sizes, total, cls_b=None):
    """A uniform random image of a class other than cls_a (and cls_b when given)."""
    blocks = [cls_a] if cls_b is None else [cls_a, cls_b]
    left = total - sum(sizes[c] for c in blocks)
    pick = rng.integers(0, left)
    if cls_b is not None:  # jump over the two blocks in order of their starts
        low = np.where(starts[cls_a] <= starts[cls_b], cls_a, cls_b)
        high = np.where(starts[cls_a] <= starts[cls_b], cls_b, cls_a)
        pick += (pick >= starts[low]) * sizes[low]
        pick += (pick >= starts[high]) * sizes[high]
        return pick
    return pick + (pick >= starts[cls_a]) * sizes[cls_a]


def _collect(rng, wanted, draw_round, what, max_idle=20):
    """Rows from repeated rounds of draw_round(rng) -> (R, k) index rows, keeping the first
    occurrence of each unordered row, until `wanted` rows are found."""
    found, rows, idle = set(), [], 0
    while len(rows) < wanted:
        before = len(rows)
        for row in draw_round(rng).tolist():
            key = tuple(sorted(row))
            if key not in found:
                found.add(key)
                rows.append(row)
                if len(rows) == wanted:
                    break
        idle = idle + 1 if len(rows) == before else 0
        if idle >= max_idle:
            raise PipelineError(f"found only {len(rows)} distinct {what} of the {wanted} wanted; lower --count")
    return np.array(rows, dtype=np.int64).reshape(len(rows), -1)


def sample_pairs(labels, count, seed=0):
    """(pairs (count, 2) int64, same (count,) 0/1): half same-class, half different-class pairs,
    no self-pairs, no pair twice (in either order), every image drawn as the first of a pair once
    per round, rows shuffled."""
    _, codes, starts, sizes = _codes(labels)
    total, same_wanted = len(codes), count // 2
    if len(sizes) < 2 or sizes.max() < 2:
        raise PipelineError("pairs need at least two classes and a class with two images")
    available = int((sizes * (sizes - 1) // 2).sum())
    if same_wanted > available:
        raise PipelineError(f"--count {count} asks for {same_wanted} same-class pairs (half of the pairs); the split "
                            f"has {available}; pass --count {2 * available} or less")
    eligible = np.flatnonzero(sizes[codes] >= 2)

    def same_round(rng):
        first = rng.permutation(eligible)
        return np.stack([first, _same_class_partner(rng, first, codes, starts, sizes)], axis=1)

    def different_round(rng):
        first = rng.permutation(total)
        return np.stack([first, _other_class_image(rng, codes[first], starts, sizes, total)], axis=1)

    rng = np.random.default_rng(seed)
    same = _collect(rng, same_wanted, same_round, "same-class pairs")
    different = _collect(rng, count - same_wanted, different_round, "different-class pairs")
    pairs = np.concatenate([same, different])
    flags = np.concatenate([np.ones(len(same), np.int64), np.zeros(len(different), np.int64)])
    order = rng.permutation(len(pairs))
    return pairs[order], flags[order]


def sample_triples(labels, count, seed=0):
    """(triples (count, 3) int64, label (count,) 0/1): half positive (two images of one class and
    a third image of any other), half negative (three distinct classes); no triple twice; the
    order inside each triple shuffled, rows shuffled."""
    _, codes, starts, sizes = _codes(labels)
    total = len(codes)
    if len(sizes) < 3 or sizes.max() < 2:
        raise PipelineError("triples need at least three classes and a class with two images")
    eligible = np.flatnonzero(sizes[codes] >= 2)

    def positive_round(rng):
        first = rng.permutation(eligible)
        second = _same_class_partner(rng, first, codes, starts, sizes)
        third = rng.integers(0, total - 2, size=len(first))  # any image but those two
        low, high = np.minimum(first, second), np.maximum(first, second)
        third += third >= low
        third += third >= high
        return np.stack([first, second, third], axis=1)

    def negative_round(rng):
        first = rng.permutation(total)
        second = _other_class_image(rng, codes[first], starts, sizes, total)
        third = _other_class_image(rng, codes[first], starts, sizes, total, codes[second])
        return np.stack([first, second, third], axis=1)

    rng = np.random.default_rng(seed)
    positive = _collect(rng, count // 2, positive_round, "positive triples")
    negative = _collect(rng, count - count // 2, negative_round, "negative triples")
    triples = rng.permuted(np.concatenate([positive, negative]), axis=1)
    flags = np.concatenate([np.ones(len(positive), np.int64), np.zeros(len(negative), np.int64)])
    order = rng.permutation(len(triples))
    return triples[order], flags[order]

def build_parser():
    """triplet_sampler.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[dataset_flags(), seed_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", type=int, choices=(0, 1), default=1,
                        help="1: sample train/ into training_<kind>_sample.csv; 0: val/ into "
                             "val_<kind>_sample.csv (default: %(default)s)")
    parser.add_argument("--kind", default=KIND, choices=("triplets", "pairs", "triples"),
                        help="what to sample (default: %(default)s)")
    parser.add_argument("--num_pos_images", type=positive_int, default=None,
                        help=f"triplets: positives per query image (default: {NUM_POS_IMAGES})")
    parser.add_argument("--num_neg_images", type=positive_int, default=None,
                        help=f"triplets: negatives per (query, positive) pair (default: {NUM_NEG_IMAGES})")
    parser.add_argument("--count", type=positive_int, default=None,
                        help="pairs and triples: how many, half of each label (default: one per image of the split)")
    parser.add_argument("--out", default=None,
                        help="output CSV (default: training_<kind>_sample.csv or val_<kind>_sample.csv by --training, "
                             "<kind> triplet, pair or triple)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.kind == "triplets" and args.count is not None:
        raise PipelineError("--count is for --kind pairs and triples; triplets take --num_pos_images and "
                            "--num_neg_images")
    if args.kind != "triplets" and (args.num_pos_images or args.num_neg_images):
        raise PipelineError(f"--num_pos_images / --num_neg_images are for triplets; --kind {args.kind} takes --count")
    print_args("triplet_sampler.py", args)
    out = args.out or SAMPLE_FILES[args.kind, args.training]
    check_output_path(out)
    split = "train" if args.training else "val"

    start = time.perf_counter()
    dataset = ImageSource.from_args(args)
    paths, labels = dataset.split(split)
    # a listed image must be a file (an empty one is the later stages' --on_bad_image to decide)
    check_images_exist(paths, f"--data {args.data} ({split})", empty_ok=True)
    need_classes(labels, dataset.root(split), count=3 if args.kind == "triples" else 2, kind=args.kind)
    if args.kind == "triplets":
        num_pos, num_neg = args.num_pos_images or NUM_POS_IMAGES, args.num_neg_images or NUM_NEG_IMAGES
        rows, short = sample_triplets(labels, num_pos, num_neg, args.seed)
        for name, count in sorted(short.items()):
            print(f"warning: class {name} has too few images for {num_pos} positives per query; "
                  f"using {count}", file=sys.stderr)
        write_triplet_csv(out, paths, rows)
    else:
        sample, columns = (sample_pairs, PAIR_COLUMNS) if args.kind == "pairs" else (sample_triples, TRIPLE_COLUMNS)
        rows, flags = sample(labels, args.count or len(paths), args.seed)
        write_image_csv(out, columns, paths, rows, (FLAG_COLUMN[args.kind], flags))
    print(f"wrote {len(rows)} {args.kind} from {len(paths)} {split} images in {len(set(labels))} classes "
          f"to {out} ({time.perf_counter() - start:.2f} s)")
    selection = dataset.write_selection(Path(out).with_name(f"{Path(out).stem}_selection.csv"))
    if selection:
        print(f"wrote the --top_classes / --per_class selection to {selection} (reuse it as --data)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
