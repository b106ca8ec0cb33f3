"""Find the near-duplicates in a collection: the same picture resized, recompressed, cropped a little,
flipped or colour-shifted, or filed twice. Reads a gallery embedding file (gen_embeddings.py).

Byte-identical files are found by their hash; then every pair of gallery images closer than
--threshold (squared L2 between the embeddings, strictly less, as eval.py's distances) joins a
group. --group star (default): in --keep order, the best image not yet grouped keeps every
ungrouped image within the threshold of itself, so each member is close to its group's kept
image; --group chain: the connected components of the "closer than" graph (a chain A~B~C~D is
one group). Writes group,path,label,distance rows (distance to the kept image, 0 for it).

    python find_duplicates.py --images photos/ --out groups.csv      # embed, calibrate and group, one command
    python find_duplicates.py --gallery gallery.npy --threshold 0.05 --out groups.csv
    python find_duplicates.py --gallery train.npy --against val.npy --threshold 0.05 --out leaks.csv
    python find_duplicates.py --gallery gallery.npy --threshold 0.05 --model m.model --query new_photos/
    python find_duplicates.py --gallery gallery.npy --calibrate_copies 500 --model m.model --out groups.csv
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

from deeprank.calibration import calibration_pairs
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
from deeprank.copies import KINDS
from deeprank.datasets import class_of, images_in
from deeprank.duplicates import (
    CELL_PROBES,
    GROUP_CHOICES,
    KEEP_CHOICES,
    chain_groups,
    close_pairs,
    copy_threshold,
    file_sizes,
    identical_files,
    keep_order,
    pair_precision,
    recall_threshold,
    star_groups,
    weakest_pair,
)
from deeprank.embedders import PRETRAINED_USE, RUNTIMES, embed_to_file, open_embedder, pretrained_checkpoint
from deeprank.embedding_io import EmbeddingWriter, check_names, read_embeddings
from deeprank.images import BadImages
from deeprank.metrics import pair_scores
from deeprank.moving import move_one
from deeprank.pictures import save_captioned_grid
from deeprank.search.index import INDEX_KINDS, gallery_index, index_paths, read_rows

# ---------------------------------------------------------------- hyperparameters
OUT = "duplicates.csv"   # --out default
GROUP = "star"           # star | chain
KEEP = "largest"         # largest | first | pixels: which image of a group is kept
SHOWN = 10               # groups named in the summary (largest first)
RECALL = 0.95            # --calibrate_copies: the share of its synthetic copies the threshold keeps
MATCHES = 10             # --against / --query: the nearest gallery images checked for each image
MAX_GROUPS = 100         # --grid: groups drawn (largest first)
ROWS_PER_PICTURE = 20    # --grid: groups per PNG
CELLS = 12               # --grid: images shown of a group
FILES_SHOWN = 20         # files named one a line on stderr (unreadable, refused, failed), then a count
MOVE_BATCH = 256         # --move_to: moves between two atomic rewrites of the CSV's status column
RUNTIME = "torch"        # --model's runtime when it is a checkpoint: torch | onnx
CACHE = ".deeprank"      # --images: the folder inside DIR that holds its gallery and the pretrained checkpoint
IMAGES_COPIES = 500      # --images without a threshold: --calibrate_copies this many (at most half the images)
LOW_PRECISION = 0.5      # --calibrate_copies: warn below this precision of the copies' pairs (30% duplicates: 0.75)
# ----------------------------------------------------------------


def build_parser():
    """find_duplicates.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[device_flag(), workers_flag(), seed_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gallery", help="embedding file of the collection (gen_embeddings.py; .npy or .txt)")
    source.add_argument("--images", metavar="DIR",
                        help="a folder of images, any layout: every image below it is embedded (with --model, or the "
                             "ImageNet-pretrained efficientnet_lite0's features with flip) into --cache, and the "
                             "threshold calibrated on synthetic copies of its own images unless given")
    a("--cache", default=None, metavar="PATH",
      help=f"--images: the embedding file written (default: DIR/{CACHE}/gallery.npy; rewritten each run)")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, help="duplicates: squared L2 distance below this")
    threshold.add_argument("--threshold_from", metavar="JSON",
                           help="the pair_threshold of eval.py --pairs --calibrate --json JSON")
    threshold.add_argument("--calibrate_copies", type=positive_int, metavar="N",
                           help="make N synthetic copies of gallery images (resized, JPEG, cropped, mirrored, "
                                "colour-shifted), embed them with --model, and take the threshold that keeps --recall "
                                "of them (or the most of them at --precision)")
    a("--recall", type=fraction, default=RECALL,
      help="--calibrate_copies: the share of the synthetic copies the threshold keeps (default: %(default)s)")
    a("--precision", type=fraction, default=None,
      help="--calibrate_copies: instead of --recall, the threshold that keeps the most copies while this share of the "
           "pairs they form below it (with their originals, and with every other gallery image among their 50 "
           "nearest) are copy and original; a folder's own duplicates count against it here")
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
    a("--model", default=None, help="--query, --calibrate_copies: the checkpoint that wrote the gallery, or its "
                                    "export (.onnx, run by onnxruntime)")
    a("--runtime", default=RUNTIME, choices=RUNTIMES,
      help="--model's runtime when it is a checkpoint: torch, or onnx (its fp32 export, made once and kept beside "
           "it) (default: %(default)s)")
    a("--json", default=None, metavar="PATH", help="also write the result as JSON")
    a("--grid", default=None, metavar="DIR",
      help="draw the groups, one captioned row each (the kept image first), into DIR/groups_<n>.png")
    a("--move_to", default=None, metavar="DIR",
      help="move every non-kept member of a group into DIR, keeping its path below the gallery's images; nothing "
           "is deleted, nothing overwritten; the CSV's planned_to and status columns record each move once it is "
           "done (planned, moved, refused, failed; a rerun finishes an interrupted run)")
    a("--dry_run", action="store_true", help="--move_to: print what would move, move nothing (status: planned)")
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
    """Rows of the groups CSV ([group, path, label, distance]), a summary per group, and each pass's
    seconds (hash: byte-identical files; join: the pairs closer than the threshold; grouping)."""
    seconds, start = {}, time.perf_counter()
    sizes, unreadable = file_sizes(gallery.paths)
    identical, unhashed = identical_files(gallery.paths, sizes)
    report_unreadable(unreadable + unhashed)
    seconds["hash"], start = time.perf_counter() - start, time.perf_counter()
    index = gallery_index(gallery, args.gallery, args.index, args.nprobe)
    vectors = gallery.vectors
    if index.kind == "faiss" and index.ivf is not None:  # rows read at random below: all in memory, not mapped
        vectors = read_rows(gallery.vectors, args.gallery)
    pairs = close_pairs(vectors, threshold, index if index.kind == "faiss" else None, probes=args.nprobe)
    known = set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))
    extra = [(i, j) for i, j in identical if (i, j) not in known]
    if extra:  # byte-identical files whose embeddings are not closer than the threshold (another crop size?)
        i, j = np.array(extra).T
        d = pair_scores(vectors[i], vectors[j]).astype(np.float32)
        pairs = (np.concatenate([pairs[0], i]), np.concatenate([pairs[1], j]), np.concatenate([pairs[2], d]))
    seconds["join"], start = time.perf_counter() - start, time.perf_counter()
    order = keep_order(gallery.paths, args.keep, sizes)
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
                        "bytes_freed": int(sum(max(0, sizes[row]) for row, _ in members))})
    seconds["grouping"] = time.perf_counter() - start
    return rows, summary, seconds


def report_unreadable(unreadable):
    """Name the files that could not be read (left out of the byte-identical check; their embeddings
    still count)."""
    if not unreadable:
        return
    print(f"warning: {len(unreadable)} files could not be read and are left out of the byte-identical check "
          f"(their embeddings still count); check their permissions, or re-embed the folder:", file=sys.stderr)
    name_files([f"{path}: {reason}" for path, reason in unreadable])


def name_files(lines, what=""):
    """Print lines (one a file) on stderr, the first FILES_SHOWN of them, then how many more `what`."""
    for line in lines[:FILES_SHOWN]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > FILES_SHOWN:
        print(f"  ... and {len(lines) - FILES_SHOWN} more{what}", file=sys.stderr)


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


def images_gallery(args):
    """--images DIR: every image below DIR (its CACHE folder left out) embedded into --cache with
    --model, or with the ImageNet-pretrained efficientnet_lite0's pooled features and flip; files that
    cannot be decoded are named and left out. Without a threshold, --calibrate_copies follows.
    Returns the gallery file."""
    folder = os.path.join(os.path.abspath(args.images), CACHE)
    out = args.cache or os.path.join(folder, "gallery.npy")
    paths = [p for p in images_in([args.images], "--images") if not p.startswith(folder + os.sep)]
    labels = [class_of(p) for p in paths]
    check_names(paths, labels)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    check_output_path(out)
    asked = {"layer": None, "tta": None} if args.model else PRETRAINED_USE
    args.model = args.model or pretrained_checkpoint(folder)
    embedder = open_embedder(args.model, args.runtime, asked["layer"], asked["tta"], args.device,
                             num_workers=args.num_workers)
    skipped = BadImages("skip", None)
    count = embed_to_file(embedder, paths, labels, out, args.model, skipped)
    print(f"embedded {count} images of {args.images} into {out} ({args.model}, {embedder.layer}, tta {embedder.tta})")
    if skipped.found:
        print(f"warning: {len(skipped.found)} files below {args.images} could not be read as images and are left "
              f"out:", file=sys.stderr)
        name_files([f"{path}: {reason}" for path, reason in sorted(skipped.found.items())])
    if count < 2:
        raise PipelineError(f"--images {args.images} holds {count} readable image(s); duplicates need two or more")
    if args.threshold is None and args.threshold_from is None and not args.calibrate_copies:
        args.calibrate_copies = min(IMAGES_COPIES, max(1, count // 2))
    return out


def calibrate_copies(gallery, args):
    """The threshold from synthetic copies of gallery images: the one that keeps --recall of them
    (deeprank.duplicates.recall_threshold), or with --precision the one that keeps the most of them
    at that precision against their nearest non-copies (copy_threshold); printed with what it keeps
    of each kind of copy and the precision of the pairs the copies form below it."""
    copy_d, kinds, others = calibration_pairs(query_searcher(gallery, args), gallery, args.calibrate_copies,
                                              args.seed, args.gallery)
    if args.precision is not None:
        chosen = copy_threshold(copy_d, others[np.isfinite(others)], args.precision)
        if chosen is None:
            raise PipelineError(f"no threshold separates {len(copy_d)} synthetic copies from the other gallery "
                                f"images near them at precision {args.precision}: this embedding does not tell copies "
                                f"from look-alikes; embed the gallery with gen_embeddings.py --layer backbone --tta "
                                f"flip, or lower --precision")
        threshold, recall = chosen[:2]
    else:
        threshold, recall = recall_threshold(copy_d, args.recall)
    share, kept, joined = pair_precision(copy_d, others, threshold)
    per_kind = ", ".join(f"{kind} {np.mean(copy_d[kinds == kind] < threshold):.2f}" for kind in KINDS
                         if (kinds == kind).any())
    rule = f"at precision {args.precision}" if args.precision is not None else f"to keep {args.recall:.0%} of them"
    print(f"calibrated on {len(copy_d)} synthetic copies {rule}: threshold {threshold:.4g} keeps {recall:.1%} "
          f"({per_kind}); of the pairs the copies form below it, with their originals and with every other gallery "
          f"image near them, {kept} of {kept + joined} ({share:.1%}) are copy and original (a lower bound where the "
          f"folder holds duplicates of its own: they count as errors here)")
    if share < LOW_PRECISION:
        print(f"warning: only {share:.0%} of the pairs the copies form below the threshold are copy and original: "
              f"this embedding puts many images as close to each other as to a copy; check the groups (--grid) before "
              f"moving anything, or pass --threshold", file=sys.stderr)
    full = int((others[:, -1] < threshold).sum()) if others.shape[1] else 0
    if full:
        print(f"warning: {full} copies are closer than the threshold to all of their {others.shape[1]} nearest "
              f"other gallery images; the precision counts those {others.shape[1]} alone, so it may be lower",
              file=sys.stderr)
    return threshold


def query_searcher(gallery, args):
    """A Searcher that embeds new images as the gallery was (--model), over the gallery already read."""
    from deeprank.search.searcher import Searcher
    if not args.model:
        raise PipelineError(f"{'--query' if args.query else '--calibrate_copies'} needs --model, the checkpoint that "
                            f"wrote the gallery")
    searcher = Searcher(args.model, args.gallery, args.device, args.index, args.nprobe, num_workers=args.num_workers,
                        runtime=args.runtime)
    searcher.gallery = gallery  # read once: main has it already
    return searcher


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


def move(moves, rows, gallery, args):
    """Move the members (or, --dry_run, say what would move); a rerun finishes what an interrupted
    run left; never overwrites. The CSV gets planned_to and status columns, rewritten atomically
    every MOVE_BATCH moves and at the end (Ctrl-C too), each status written after the fact:
    planned (not tried yet), moved, refused, failed. Returns {path: status}."""
    status, reasons = dict.fromkeys(moves, "planned"), {}

    def record():
        write_csv(args.out, ["group", "path", "label", "distance", "planned_to", "status"],
                  [row + ((moves[row[1]], status[row[1]]) if row[1] in moves else ("", "")) for row in rows])

    if args.dry_run:
        for src, dst in moves.items():
            print(f"would move {src} -> {dst}")
        record()
        print(f"would move {len(moves)} images to {args.move_to}")
        return status
    earlier = sum(not os.path.lexists(src) and os.path.exists(dst) for src, dst in moves.items())
    try:
        for number, (src, dst) in enumerate(moves.items(), start=1):
            status[src], reasons[src] = move_one(src, dst)
            if number % MOVE_BATCH == 0:
                record()
    finally:
        record()
    moved = sum(value == "moved" for value in status.values())
    print(f"moved {moved - earlier} images to {args.move_to}" +
          (f" ({earlier} moved by an earlier run)" if earlier else ""))
    for kind in ("refused", "failed"):
        name_files([f"{kind}: {src}: {reasons[src]}" for src, value in status.items() if value == kind], f" {kind}")
    done = {src for src, value in status.items() if value == "moved"}
    if args.update_gallery:
        drop_from_gallery(gallery, args.gallery, done)
    elif done:
        print(f"note: {args.gallery} still lists the {len(done)} moved images; rerun with --update_gallery to "
              f"drop them")
    return status


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
    check_output_path(args.out)  # every output checked before the embedding of --images starts
    if args.json:
        check_output_path(args.json)
    if args.images:
        args.gallery = images_gallery(args)
    elif args.threshold is None and args.threshold_from is None and not args.calibrate_copies:
        raise PipelineError("give --threshold T, --threshold_from JSON or --calibrate_copies N (with --model) to say "
                            "how close duplicates are")
    threshold = read_threshold(args)
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
        rows, summary, seconds = find_groups(gallery, args, threshold)
        print("passes: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
        status = {}
        if args.move_to:
            status = move(planned_moves(rows, gallery, args.move_to), rows, gallery, args)
        else:
            write_csv(args.out, ["group", "path", "label", "distance"], rows)
        report(rows, summary, len(gallery))
        if args.grid:
            print(f"drew {draw_groups(rows, summary, args.grid, args.max_groups)} group pictures into {args.grid}/")
        print(f"wrote {args.out}{'' if rows else ' (the header alone)'}")
        result = summary
        left = sum(value in ("refused", "failed") for value in status.values())
        if left:
            write_json(args.json, result)
            raise PipelineError(f"{left} of {len(status)} moves were refused or failed (named above; the status column "
                                f"of {args.out} says which); free their destinations and run again to finish")
    write_json(args.json, result)
    return 0


def write_json(path, result):
    """--json: the result, atomically (nothing without the flag)."""
    if path:
        with atomic_write(path) as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
