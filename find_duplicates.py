"""Find the near-duplicates in a collection: the same picture resized, recompressed, cropped a little,
flipped or colour-shifted, or filed twice. Reads a gallery embedding file (gen_embeddings.py).

Byte-identical files are found by their hash; then every pair of gallery images closer than
--threshold (squared L2 between the embeddings, strictly less, as eval.py's distances) joins a
group. --group star (default): in --keep order, the best image not yet grouped keeps every
ungrouped image within the threshold of itself, so each member is close to its group's kept
image; --group chain: the connected components of the "closer than" graph (a chain A~B~C~D is
one group). Writes group,path,label,distance rows (distance to the kept image, 0 for it).

    python find_duplicates.py --gallery gallery.npy --threshold 0.05 --out groups.csv
    python find_duplicates.py --gallery train.npy --against val.npy --threshold 0.05 --out leaks.csv
    python find_duplicates.py --gallery gallery.npy --threshold 0.05 --model m.model --query new_photos/
    python find_duplicates.py --gallery gallery.npy --calibrate_copies 500 --model m.model --out groups.csv
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd

from deeprank.class_names import ClassNames
from deeprank.common import (
    PipelineError,
    atomic_write,
    check_output_path,
    device_flag,
    fraction,
    pair_threshold_from,
    positive_int,
    print_args,
    run_cli,
    seed_flag,
    workers_flag,
)
from deeprank.copies import KINDS, save_copy
from deeprank.datasets import images_in
from deeprank.duplicates import (
    CELL_PROBES,
    GROUP_CHOICES,
    KEEP_CHOICES,
    chain_groups,
    close_pairs,
    copy_threshold,
    identical_files,
    keep_order,
    star_groups,
    weakest_pair,
)
from deeprank.embedding_io import EmbeddingWriter, read_embeddings
from deeprank.metrics import pair_scores
from deeprank.pictures import save_captioned_grid
from deeprank.search.index import INDEX_KINDS, gallery_index, index_paths, read_rows

# ---------------------------------------------------------------- hyperparameters
OUT = "duplicates.csv"   # --out default
GROUP = "star"           # star | chain
KEEP = "largest"         # largest | first | pixels: which image of a group is kept
SHOWN = 10               # groups named in the summary (largest first)
PRECISION = 0.99         # --calibrate_copies: copies' share of the calibration pairs below the threshold
MATCHES = 10             # --against / --query: the nearest gallery images checked for each image
MAX_GROUPS = 100         # --grid: groups drawn (largest first)
ROWS_PER_PICTURE = 20    # --grid: groups per PNG
CELLS = 12               # --grid: images shown of a group
# ----------------------------------------------------------------


def build_parser():
    """find_duplicates.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[device_flag(), workers_flag(), seed_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--gallery", required=True, help="embedding file of the collection (gen_embeddings.py; .npy or .txt)")
    threshold = parser.add_mutually_exclusive_group(required=True)
    threshold.add_argument("--threshold", type=float, help="duplicates: squared L2 distance below this")
    threshold.add_argument("--threshold_from", metavar="JSON",
                           help="the pair_threshold of eval.py --pairs --calibrate --json JSON")
    threshold.add_argument("--calibrate_copies", type=positive_int, metavar="N",
                           help="make N synthetic copies of gallery images (resized, JPEG, cropped, mirrored, "
                                "colour-shifted), embed them with --model, and take the threshold that separates them "
                                "from each copy's nearest non-copy at --precision")
    a("--precision", type=fraction, default=PRECISION,
      help="--calibrate_copies: the share of copies among the pairs below the threshold (default: %(default)s)")
    a("--out", default=OUT, help="the CSV to write (default: %(default)s)")
    a("--group", default=GROUP, choices=GROUP_CHOICES, help="star or chain groups (default: %(default)s)")
    a("--keep", default=KEEP, choices=KEEP_CHOICES, help="the image each group keeps (default: %(default)s)")
    a("--index", default="auto", choices=INDEX_KINDS,
      help="exact: a chunked self-join; faiss: a self-join inside the saved IVF index's cells (HNSW, below 100,000 "
           "rows: its neighbours), re-checked exactly; auto: exact below 200,000 rows (default: %(default)s)")
    a("--nprobe", type=positive_int, default=CELL_PROBES,
      help="faiss IVF: the nearest cells each image is compared in (and --against / --query search); more finds "
           "more pairs, in proportion slower (default: %(default)s)")
    a("--against", default=None, metavar="EMBEDDINGS",
      help="leaks: each image of this embedding file (val, test) that near-duplicates a --gallery (train) image")
    a("--query", nargs="+", default=None, metavar="IMAGE",
      help="new images (or folders): embed them with --model and list the gallery images each duplicates")
    a("--model", default=None, help="--query: the checkpoint that wrote the gallery")
    a("--json", default=None, metavar="PATH", help="also write the result as JSON")
    a("--grid", default=None, metavar="DIR",
      help="draw the groups, one captioned row each (the kept image first), into DIR/groups_<n>.png")
    a("--move_to", default=None, metavar="DIR",
      help="move every non-kept member of a group into DIR, keeping its path below the gallery's images; nothing "
           "is deleted, nothing overwritten, and the CSV's moved_to column records each move (a rerun finishes an "
           "interrupted one)")
    a("--dry_run", action="store_true", help="--move_to: print what would move, and move nothing")
    a("--update_gallery", action="store_true",
      help="--move_to: rewrite --gallery without the moved images (atomically; its faiss index is rebuilt when "
           "next used)")
    a("--max_groups", type=positive_int, default=MAX_GROUPS,
      help="--grid: draw at most this many groups, the largest first (default: %(default)s)")
    return parser


def read_threshold(args):
    """--threshold, or the pair_threshold of eval.py's JSON; a positive number (None: --calibrate_copies
    chooses it once the gallery is read)."""
    if args.calibrate_copies:
        return None
    value = pair_threshold_from(args.threshold_from) if args.threshold_from else args.threshold
    if not value or value != value or value <= 0 or value == float("inf"):
        raise PipelineError(f"the threshold must be a positive squared distance, not {value}; see eval.py --pairs "
                            f"--calibrate, or pass --threshold T")
    return float(value)


# ----------------------------------------------------------------------------- the three modes

def find_groups(gallery, args, threshold):
    """Rows of the groups CSV ([group, path, label, distance]) and a summary per group."""
    index = gallery_index(gallery, args.gallery, args.index, args.nprobe)
    vectors = gallery.vectors
    if index.kind == "faiss" and index.ivf is not None:  # rows read at random below: all in memory, not mapped
        vectors = read_rows(gallery.vectors, args.gallery)
    pairs = close_pairs(vectors, threshold, index if index.kind == "faiss" else None, probes=args.nprobe)
    known = set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))
    extra = [(i, j) for i, j in identical_files(gallery.paths) if (i, j) not in known]
    if extra:  # byte-identical files whose embeddings are not closer than the threshold (another crop size?)
        i, j = np.array(extra).T
        d = pair_scores(vectors[i], vectors[j]).astype(np.float32)
        pairs = (np.concatenate([pairs[0], i]), np.concatenate([pairs[1], j]), np.concatenate([pairs[2], d]))
    order = keep_order(gallery.paths, args.keep)
    groups = (star_groups(len(gallery), pairs, order) if args.group == "star"
              else chain_groups(len(gallery), pairs, order, vectors))
    rows, summary = [], []
    for number, (kept, members) in enumerate(groups, start=1):
        rows.append((number, gallery.paths[kept], gallery.labels[kept], 0.0))
        rows += [(number, gallery.paths[row], gallery.labels[row], d) for row, d in members]
        every = [kept] + [row for row, _ in members]
        summary.append({"group": number, "kept": gallery.paths[kept], "size": len(every),
                        "weakest_pair": weakest_pair(vectors, every),
                        "labels": sorted({gallery.labels[row] for row in every}),
                        "bytes_freed": sum(_size(gallery.paths[row]) for row, _ in members)})
    return rows, summary


def find_leaks(gallery, args, threshold):
    """[path, duplicates, distance] of each --against image closer than the threshold to a gallery image."""
    other = read_embeddings(args.against, mmap=True)
    if other.vectors.shape[1] != gallery.vectors.shape[1]:
        raise PipelineError(f"--against {args.against} has dim={other.vectors.shape[1]} but --gallery has "
                            f"dim={gallery.vectors.shape[1]}; embed both with one checkpoint")
    index = gallery_index(gallery, args.gallery, args.index, args.nprobe)
    rows = []
    for start in range(0, len(other), 4096):
        block = np.array(other.vectors[start:start + 4096], dtype=np.float32)  # a writable copy of a mapped block
        distances, found = index.search(block, min(MATCHES, len(gallery)))
        for offset, (dist, hits) in enumerate(zip(distances.tolist(), found.tolist(), strict=True)):
            rows += [(other.paths[start + offset], gallery.paths[row], d) for d, row in zip(dist, hits, strict=True)
                     if row >= 0 and d < threshold]
    return rows


def find_query_duplicates(gallery, args, threshold):
    """[query, duplicates, distance] of new images: each embedded as the gallery was, then searched."""
    searcher = query_searcher(gallery, args)
    vectors, kept = searcher.embed(images_in(args.query, "--query"))
    found = searcher.search(vectors, min(MATCHES, len(gallery)))
    return [(query, hit["path"], hit["distance"]) for query, hits in zip(kept, found, strict=True) for hit in hits
            if hit["distance"] < threshold]


def calibrate_copies(gallery, args):
    """The threshold that separates synthetic copies of gallery images from their nearest non-copies
    (deeprank.duplicates.copy_threshold), printed with what it keeps of each kind of copy."""
    searcher = query_searcher(gallery, args)
    rng = random.Random(args.seed)
    present = [row for row in range(len(gallery)) if os.path.isfile(gallery.paths[row])]
    if len(present) < args.calibrate_copies:
        raise PipelineError(f"--calibrate_copies {args.calibrate_copies}: {args.gallery} lists {len(present)} images "
                            f"that are on disk; ask for {len(present)} or fewer")
    rows = sorted(rng.sample(present, args.calibrate_copies))
    with tempfile.TemporaryDirectory(prefix="calibrate_copies_") as folder:
        made = {}
        for number, row in enumerate(rows):
            kind = KINDS[number % len(KINDS)]
            target = os.path.join(folder, f"copy_{number:05d}_{kind}.jpg")
            save_copy(gallery.paths[row], kind, target, rng)
            made[target] = (row, kind)
        vectors, kept = searcher.embed(list(made))
    originals = np.array([made[path][0] for path in kept])
    kinds = np.array([made[path][1] for path in kept])
    copy_d = pair_scores(vectors, np.asarray(gallery.vectors[originals], dtype=np.float32))
    distances, _ = searcher.index.search(vectors, 1, exclude=originals)  # each copy's nearest non-copy
    chosen = copy_threshold(copy_d, distances[:, 0], args.precision)
    if chosen is None:
        raise PipelineError(f"no threshold separates {len(kept)} synthetic copies from their nearest non-copies at "
                            f"precision {args.precision}: this embedding does not tell copies from look-alikes; embed "
                            f"the gallery with gen_embeddings.py --layer backbone --tta flip, or lower --precision")
    threshold, recall, share = chosen
    per_kind = ", ".join(f"{kind} {np.mean(copy_d[kinds == kind] < threshold):.2f}" for kind in KINDS
                         if (kinds == kind).any())
    print(f"calibrated on {len(kept)} synthetic copies: threshold {threshold:.4g} keeps {recall:.1%} of them "
          f"({per_kind}) at precision {share:.1%} against each copy's nearest non-copy")
    return threshold


def query_searcher(gallery, args):
    """A Searcher that embeds new images as the gallery was (--model), over the gallery already read."""
    from deeprank.search.searcher import Searcher
    if not args.model:
        raise PipelineError(f"{'--query' if args.query else '--calibrate_copies'} needs --model, the checkpoint that "
                            f"wrote the gallery")
    searcher = Searcher(args.model, args.gallery, args.device, args.index, args.nprobe, num_workers=args.num_workers)
    searcher.gallery = gallery  # read once: main has it already
    return searcher


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


# ----------------------------------------------------------------------------- main

def write_csv(path, columns, rows):
    """The CSV, atomically; paths as they are in the gallery (absolute)."""
    with atomic_write(path, newline="") as handle:
        pd.DataFrame(rows, columns=columns).to_csv(handle, index=False, lineterminator="\n")


def planned_moves(rows, gallery, folder):
    """{path: destination} of every non-kept member: its path below the gallery's images' common
    folder, under `folder`."""
    root = os.path.commonpath([os.path.dirname(p) for p in gallery.paths])
    kept = {number: path for number, path, _, _ in reversed(rows)}  # each group's first row is its kept image
    return {path: os.path.join(os.path.abspath(folder), os.path.relpath(path, root))
            for number, path, _, _ in rows if kept[number] != path}


def move(moves, gallery, args):
    """Move the members (or, --dry_run, say what would move); a rerun skips what an interrupted run
    already moved; never overwrites. Then --update_gallery, or a note that the gallery is stale."""
    done = [src for src, dst in moves.items() if not os.path.exists(src) and os.path.exists(dst)]
    todo = [(src, dst) for src, dst in moves.items() if src not in done]
    clash = [dst for src, dst in todo if os.path.exists(dst)]
    if clash:
        raise PipelineError(f"{clash[0]} exists already (and {len(clash) - 1} more); move_to never overwrites: "
                            f"pick an empty --move_to folder")
    missing = [src for src, _ in todo if not os.path.exists(src)]
    if missing:
        raise PipelineError(f"{missing[0]} is gone and not in --move_to (and {len(missing) - 1} more); the gallery "
                            f"no longer matches the folders: re-embed it with gen_embeddings.py")
    for src, dst in todo:
        if args.dry_run:
            print(f"would move {src} -> {dst}")
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {len(todo)} images to {args.move_to}" + (f" ({len(done)} moved by an earlier run)" if done else ""))
    if args.dry_run:
        return
    if args.update_gallery:
        drop_from_gallery(gallery, args.gallery, set(moves))
    elif moves:
        print(f"note: {args.gallery} still lists the {len(moves)} moved images; rerun with --update_gallery to "
              f"drop them")


def drop_from_gallery(gallery, path, moved):
    """Rewrite the gallery file without the moved rows (atomically), and remove its faiss index."""
    keep = np.array([p not in moved for p in gallery.paths])
    with EmbeddingWriter.like(path, gallery.header) as writer:
        for start in range(0, len(keep), 4096):
            rows = np.flatnonzero(keep[start:start + 4096]) + start
            writer.write([gallery.paths[r] for r in rows], [gallery.labels[r] for r in rows],
                         np.asarray(gallery.vectors[rows], dtype=np.float32))
    for stale in index_paths(path):
        stale.unlink(missing_ok=True)
    print(f"rewrote {path} without the {int((~keep).sum())} moved images ({writer.count} rows now)")


def draw_groups(rows, summary, folder, most):
    """The largest `most` groups as captioned rows (the kept image, then its members with their
    distance; class names where the dataset has them), ROWS_PER_PICTURE groups a PNG; returns how
    many PNGs."""
    os.makedirs(folder, exist_ok=True)
    names = ClassNames.for_paths([path for _, path, _, _ in rows])
    members = {}
    for number, path, label, distance in rows:
        members.setdefault(number, []).append((path, label, distance))
    chosen = sorted(summary, key=lambda g: (-g["size"], g["group"]))[:most]
    pictures = 0
    for start in range(0, len(chosen), ROWS_PER_PICTURE):
        grid = [[(path, f"{'kept' if i == 0 else f'd={distance:.4f}'}\n{names.name(label) or label}",
                  "black" if i == 0 else "green")
                 for i, (path, label, distance) in enumerate(members[group["group"]][:CELLS])]
                for group in chosen[start:start + ROWS_PER_PICTURE]]
        pictures += 1
        save_captioned_grid(os.path.join(folder, f"groups_{pictures:03d}.png"), grid)
    return pictures


def report(rows, summary, total):
    """The printed summary of find_groups' result."""
    if not summary:
        print(f"{total} images, no duplicates closer than the threshold")
        return
    in_groups = sum(group["size"] for group in summary)
    mixed = sum(len(group["labels"]) > 1 for group in summary)
    print(f"{total} images, {len(summary)} groups holding {in_groups} images, the largest of "
          f"{max(group['size'] for group in summary)}; removing the non-kept members would free "
          f"{sum(group['bytes_freed'] for group in summary):,} bytes; {mixed} groups mix labels (label noise or "
          f"false matches)")
    for group in sorted(summary, key=lambda g: (-g["size"], g["group"]))[:SHOWN]:
        print(f"  group {group['group']}: {group['size']} images, weakest pair {group['weakest_pair']:.4f}, kept "
              f"{group['kept']}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.against and args.query:
        raise PipelineError("--against and --query are two questions; ask one at a time")
    if (args.dry_run or args.update_gallery) and not args.move_to:
        raise PipelineError("--dry_run and --update_gallery go with --move_to DIR")
    if args.move_to and (args.against or args.query):
        raise PipelineError("--move_to moves the members of a gallery's groups; leave out --against / --query")
    threshold = read_threshold(args)
    check_output_path(args.out)
    if args.json:
        check_output_path(args.json)
    print_args("find_duplicates.py", args, threshold_used=threshold)
    gallery = read_embeddings(args.gallery, mmap=True)
    if len(gallery) == 0:
        raise PipelineError(f"{args.gallery} has no rows; embed a collection with gen_embeddings.py first")
    if threshold is None:
        threshold = calibrate_copies(gallery, args)
    if args.against or args.query:
        rows = find_leaks(gallery, args, threshold) if args.against else find_query_duplicates(gallery, args, threshold)
        write_csv(args.out, ["path", "duplicates", "distance"], rows)
        what = "images of --against" if args.against else "queries"
        print(f"{len({row[0] for row in rows})} {what} near-duplicate gallery images ({len(rows)} pairs); wrote "
              f"{args.out}")
        result = [dict(zip(("path", "duplicates", "distance"), row, strict=True)) for row in rows]
    else:
        rows, summary = find_groups(gallery, args, threshold)
        moves = planned_moves(rows, gallery, args.move_to) if args.move_to else {}
        columns = ["group", "path", "label", "distance"] + (["moved_to"] if args.move_to else [])
        write_csv(args.out, columns, [row + ((moves.get(row[1], ""),) if args.move_to else ()) for row in rows])
        if args.move_to:
            move(moves, gallery, args)
        report(rows, summary, len(gallery))
        if args.grid:
            print(f"drew {draw_groups(rows, summary, args.grid, args.max_groups)} group pictures into {args.grid}/")
        print(f"wrote {args.out}{'' if rows else ' (the header alone)'}")
        result = summary
    if args.json:
        with atomic_write(args.json) as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
