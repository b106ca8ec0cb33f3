"""Benchmark: finding planted copies, this project's find_duplicates.py against imagededup's PHash.

A collection of every image of --data (TinyImageNet layout) plus --copies modified copies of
randomly chosen ones (deeprank/copies.py). --recipe combined (the default): each copy gets two kinds
of modification, in turn resize+crop, jpeg+flip, crop+colour, flip+resize, colour+jpeg, at other
strengths than find_duplicates.py --calibrate_copies makes (resize to 35-60% of the side, JPEG
quality 40-60, crop up to 15% off each side, brightness / contrast / saturation 0.7-1.3), so that a
calibrated threshold (--calibrated T) is scored on copies it was not made from. --recipe
calibration: one kind each, the calibration's own recipe:
- resize: 50-90% of the side;
- jpeg: re-encoded at quality 60-90;
- crop: up to 10% off each side;
- flip: mirrored;
- colour: brightness, contrast and saturation each 0.8-1.2.

The images are split in two halves, each original with its copy. Each method's threshold is the
F1-best one on half A, and it is scored on half B, never on the pairs it was chosen on.
- Pair precision and recall: pairs called duplicates vs the planted (original, copy) pairs of the
  half, counted over every pair of the half, so that look-alikes count as false positives.
- Recall per kind of modification.
- Wall time as whole processes:
  - ours: gen_embeddings.py over the collection, then find_duplicates.py on half B;
  - PHash: encoding the collection, then imagededup's find_duplicates on half B.

imagededup pulls in its own dependencies; install it into a separate folder (not this project's
virtualenv) and name it with --imagededup_path:

    pip install --no-deps --target /tmp/idd imagededup PyWavelets scikit-learn scipy joblib threadpoolctl \\
        cloudpickle narwhals
    python -m bench.bench_duplicates --data ../shared/data/tiny-imagenet-mini --model recommended.model \\
        --imagededup_path /tmp/idd

--distances_out JSON keeps the measured copy distances for bench_duplicates_scale.py (the file in
bench/copy_distances.json came from a model written by train_net.py --epochs 0 --backbone
efficientnet_lite0 --weights imagenet --image_size 160, with --embed_flags "--layer backbone --tta
flip"); --grid DIR draws half B's 20 largest groups (docs/duplicates.md's picture is its first eight rows).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from deeprank import metrics
from deeprank.copies import CALIBRATION, KINDS, OTHER, combined_kinds, save_copy
from deeprank.datasets import list_split
from deeprank.duplicates import close_pairs
from deeprank.embedding_io import EmbeddingWriter, read_embeddings

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = 1.0  # ours: pairs closer than this are the candidates whose best threshold is sought

PHASH = """
import json, sys, time
from imagededup.methods import PHash
folder, half, threshold, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3]), sys.argv[4]
phash = PHash(verbose=False)
hashes = phash.encode_images(image_dir=folder, recursive=True)
json.dump(hashes, open(out, "w"))
if threshold >= 0:  # the search the timing is about: imagededup's own, on half B
    phash.find_duplicates(encoding_map={name: hashes[name] for name in half}, max_distance_threshold=threshold)
"""


def make_collection(data, folder, copies, recipe, seed=0):
    """(label CSV of every image, truth frame: original, copy, kind, half); images copied into folder.
    recipe: "combined" (two kinds a copy at copies.OTHER strengths) or "calibration" (one kind a copy,
    --calibrate_copies' own recipe)."""
    rng = random.Random(seed)
    rows = []
    for split in ("train", "val"):
        for path, label in zip(*list_split(data, split), strict=True):
            target = folder / "images" / label / f"{split}_{Path(path).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(path).read_bytes())
            rows.append((str(target), label))
    originals = rng.sample(range(len(rows)), copies)
    truth = []
    for number, row in enumerate(originals):
        kinds = combined_kinds(number) if recipe == "combined" else (KINDS[number % len(KINDS)],)
        kind = "+".join(kinds)
        target = folder / "images" / rows[row][1] / f"copy_{number:04d}_{kind}.jpg"
        save_copy(rows[row][0], kinds, target, rng, OTHER if recipe == "combined" else CALIBRATION)
        truth.append((rows[row][0], str(target), kind))
    paths = [path for path, _ in rows] + [copy for _, copy, _ in truth]
    labels = [label for _, label in rows] + [Path(copy).parent.name for _, copy, _ in truth]
    half = {path: rng.random() < 0.5 for path, _ in rows}  # each original with its copy
    half.update({copy: half[original] for original, copy, _ in truth})
    csv = folder / "labels.csv"
    pd.DataFrame({"filename": paths, "label": labels, "split": "train"}).to_csv(csv, index=False)
    truth = pd.DataFrame(truth, columns=["original", "copy", "kind"])
    truth["half"] = ["B" if half[o] else "A" for o in truth["original"]]
    return csv, truth, {path: "B" if b else "A" for path, b in half.items()}


def pair_scores(pairs, distances, truth_pairs, thresholds):
    """(precision, recall, F1) of 'duplicates when distance < t' (pairs: sets of two paths) for each t."""
    order = np.argsort(distances, kind="stable")
    hits = np.array([pairs[i] in truth_pairs for i in order], dtype=np.int64)
    d = np.asarray(distances)[order]
    out = []
    for t in thresholds:
        called = int(np.searchsorted(d, t, side="left"))
        tp = int(hits[:called].sum())
        precision, recall = tp / max(called, 1), tp / max(len(truth_pairs), 1)
        out.append((precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)))
    return out


def best_threshold(pairs, distances, truth_pairs):
    """The candidate threshold (between two sorted distances) with the best F1."""
    d = np.unique(np.asarray(distances))
    candidates = np.concatenate([(d[:-1] + d[1:]) / 2, [d[-1] + 1e-9]]) if len(d) else np.array([1e-9])
    scores = pair_scores(pairs, distances, truth_pairs, candidates)
    return float(candidates[int(np.argmax([f1 for _, _, f1 in scores]))])


def truth_pairs_of(truth, half):
    return {frozenset((o, c)) for o, c, h in zip(truth["original"], truth["copy"], truth["half"], strict=True)
            if h == half}


def evaluate(name, by_half, truth, seconds, threshold=None):
    """One row of the table: the threshold from half A (or the one given), scores on half B, recall
    per kind; returns the threshold. by_half: {half: (pairs, distances)}."""
    if threshold is None:
        threshold = best_threshold(*by_half["A"], truth_pairs_of(truth, "A"))
    pairs, distances = by_half["B"]
    truth_pairs = truth_pairs_of(truth, "B")
    precision, recall, f1 = pair_scores(pairs, distances, truth_pairs, [threshold])[0]
    found = {pairs[i] for i in np.flatnonzero(np.asarray(distances) < threshold)}
    per_kind = {kind: np.mean([frozenset((o, c)) in found for o, c, k, h in truth.itertuples(index=False)
                               if h == "B" and k == kind]) for kind in kinds_of(truth)}
    print(f"| {name} | {threshold:.4g} | {precision:.3f} | {recall:.3f} | {f1:.3f} | "
          + " | ".join(f"{per_kind[kind]:.2f}" for kind in kinds_of(truth)) + f" | {seconds} |", flush=True)
    return threshold


def kinds_of(truth):
    """The kinds of copy planted, in the order first planted."""
    return list(dict.fromkeys(truth["kind"]))


def write_distances(path, gallery, rows, truth):
    """JSON: each planted copy's squared distance to its original (with its kind), and each image's
    squared distance to its nearest image that is neither itself nor its copy / original."""
    copy = metrics.pair_scores(gallery.vectors[[rows[o] for o in truth["original"]]],
                               gallery.vectors[[rows[c] for c in truth["copy"]]])
    partner = np.full(len(gallery), -1)
    for o, c in zip(truth["original"], truth["copy"], strict=True):
        partner[rows[o]], partner[rows[c]] = rows[c], rows[o]
    vectors = np.asarray(gallery.vectors)
    d, found = metrics.knn(vectors, vectors, 2, exclude=np.arange(len(gallery)))  # the nearest two others
    nearest = np.where(found[:, 0].numpy() == partner, d[:, 1].numpy(), d[:, 0].numpy())
    Path(path).write_text(json.dumps({"dim": int(gallery.vectors.shape[1]), "copy": copy.tolist(),
                                      "kind": truth["kind"].tolist(), "nearest_other": nearest.tolist()}) + "\n")
    print(f"wrote {path}: copy distances median {np.median(copy):.3f}, nearest non-copy median "
          f"{np.median(nearest):.3f}", flush=True)


def timed(command, env=None):
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a TinyImageNet-layout set (val transformed or not)")
    parser.add_argument("--model", required=True, help="the checkpoint whose embeddings find_duplicates uses")
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--embed_flags", default="",
                        help="more gen_embeddings.py flags, e.g. '--layer backbone --tta flip'")
    parser.add_argument("--imagededup_path", default=None, help="folder imagededup was installed into (--target)")
    parser.add_argument("--distances_out", default=None, metavar="JSON",
                        help="write each planted copy's distance to its original and each image's distance to its "
                             "nearest non-copy (the scale benchmark's model of real distances: bench_duplicates_scale)")
    parser.add_argument("--grid", default=None, metavar="DIR", help="also draw half B's groups into DIR (untimed)")
    parser.add_argument("--recipe", default="combined", choices=("combined", "calibration"),
                        help="the planted copies: two kinds each at other strengths than --calibrate_copies' "
                             "(combined), or its own recipe, one kind each (calibration) (default: %(default)s)")
    parser.add_argument("--calibrated", type=float, default=None, metavar="T",
                        help="also score find_duplicates.py at this threshold (find_duplicates.py "
                             "--calibrate_copies' choice) on half B")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "data"
        subprocess.run(["cp", "-r", str(Path(args.data).resolve()), str(data)], check=True)
        subprocess.run([sys.executable, str(ROOT / "transform_validation.py"), "--data", str(data)],
                       capture_output=True, cwd=ROOT)  # a no-op when val/ is already in class folders
        csv, truth, half_of = make_collection(data, folder / "collection", args.copies, args.recipe)
        print(f"{len(half_of)} images ({args.copies} planted copies, {args.recipe} recipe); halves: "
              f"{sum(h == 'A' for h in half_of.values())} / {sum(h == 'B' for h in half_of.values())}", flush=True)
        print("| method | threshold (from half A) | pair precision (B) | pair recall (B) | F1 (B) | "
              + " | ".join(f"recall: {kind}" for kind in kinds_of(truth)) + " | wall time, whole processes |")
        print("|---" * (6 + len(kinds_of(truth))) + "|")

        # ours: embed the collection, then the stage on half B (its threshold chosen on half A)
        embeddings = folder / "collection.npy"
        embed_s = timed([sys.executable, str(ROOT / "gen_embeddings.py"), "--model", args.model, "--data", str(csv),
                         "--split", "train", "--train_out", str(embeddings), "--val_fraction", "0",
                         *args.embed_flags.split()])
        gallery = read_embeddings(embeddings)
        rows = {path: row for row, path in enumerate(gallery.paths)}

        def ours(half):
            members = [p for p in gallery.paths if half_of[p] == half]
            i, j, d = close_pairs(gallery.vectors[[rows[p] for p in members]], CANDIDATES)
            return [frozenset((members[a], members[b])) for a, b in zip(i, j, strict=True)], d

        by_half = {half: ours(half) for half in ("A", "B")}
        threshold_a = best_threshold(*by_half["A"], truth_pairs_of(truth, "A"))
        half_b = folder / "half_b.txt"
        b_rows = [rows[p] for p in gallery.paths if half_of[p] == "B"]
        with EmbeddingWriter(half_b, gallery.vectors.shape[1], True, "bench") as out:
            out.write([gallery.paths[r] for r in b_rows], [gallery.labels[r] for r in b_rows], gallery.vectors[b_rows])
        find_s = timed([sys.executable, str(ROOT / "find_duplicates.py"), "--gallery", str(half_b), "--threshold",
                        str(threshold_a), "--out", str(folder / "groups.csv")])
        evaluate(f"find_duplicates.py, {Path(args.model).name} {args.embed_flags}".strip(), by_half, truth,
                 f"{embed_s:.1f} s embedding + {find_s:.1f} s finding")
        if args.calibrated is not None:
            evaluate("find_duplicates.py at the --calibrate_copies threshold", by_half, truth, "", args.calibrated)
        if args.distances_out:
            write_distances(args.distances_out, gallery, rows, truth)
        if args.grid:
            timed([sys.executable, str(ROOT / "find_duplicates.py"), "--gallery", str(half_b), "--threshold",
                   str(threshold_a), "--out", str(folder / "grid.csv"), "--grid", args.grid, "--max_groups", "20"])

        if args.imagededup_path:
            env = {**os.environ, "PYTHONPATH": args.imagededup_path}
            hashes_file, half_file = folder / "phash.json", folder / "half_b.json"
            half_file.write_text(json.dumps([Path(p).relative_to(folder / "collection" / "images").as_posix()
                                             for p in half_of if half_of[p] == "B"]))
            encode_s = timed([sys.executable, "-c", PHASH, str(folder / "collection" / "images"), str(half_file),
                              "-1", str(hashes_file)], env)
            hashes = json.loads(hashes_file.read_text())
            base = folder / "collection" / "images"
            bits = {str(base / name): np.unpackbits(np.frombuffer(bytes.fromhex(value), dtype=np.uint8))
                    for name, value in hashes.items()}

            def phash(half):
                members = [p for p in half_of if half_of[p] == half and p in bits]
                codes = np.array([bits[p] for p in members], dtype=np.uint8)
                pairs, distances = [], []
                for a in range(len(members)):
                    hamming = (codes[a + 1:] != codes[a]).sum(1)
                    close = np.flatnonzero(hamming <= 16) + a + 1
                    pairs += [frozenset((members[a], members[b])) for b in close]
                    distances += hamming[close - a - 1].tolist()
                return pairs, np.asarray(distances, dtype=np.float64)

            by_half = {half: phash(half) for half in ("A", "B")}
            threshold_p = best_threshold(*by_half["A"], truth_pairs_of(truth, "A"))
            search_s = timed([sys.executable, "-c", PHASH, str(base), str(half_file), str(int(threshold_p)),
                              str(folder / "again.json")], env)
            evaluate("imagededup PHash (Hamming distance of 64-bit hashes)", by_half, truth,
                     f"{encode_s:.1f} s encoding; {search_s:.1f} s encoding and finding in half B")
    cpu = "bf16" if "bf16" in open("/proc/cpuinfo").read() else "fp32 only"
    print(f"({os.cpu_count()} cores, {cpu} CPU)")


if __name__ == "__main__":
    main()
