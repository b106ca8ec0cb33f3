"""Benchmark: find_duplicates.py --index faiss on a synthetic 1,000,000 x 512 gallery with 10,000
planted near-copies, as a whole process: wall time, peak memory and recall of the planted pairs.

The gallery models the real distances that bench_duplicates.py measured on the mini set
(--distances, its --distances_out JSON; bench/copy_distances.json holds the run in docs/duplicates.md):
- images come in clusters of about --cluster_size; each cluster's spread is drawn so that the
  distance between two of its members follows the measured distance of a real image to its
  nearest non-copy (unit vectors c + noise, noise of squared norm s^2 = t / (2 - t) for a drawn t);
- each planted copy sits at a distance drawn from the measured copy distances (every kind of
  modification, the ones beyond the threshold too) from a random original, in a random direction
  orthogonal to it, so its squared L2 distance is exactly the drawn one.

find_duplicates.py runs twice with --group chain (a planted pair counts as found when original
and copy end up in one group): first building the IVF-SQ8 index (saved beside the gallery), then
with the saved index. Recall is given over every planted pair and over those closer than the
threshold (the ones an exact search would find), so the loss to the approximate search shows.

    python -m bench.bench_duplicates_scale                 # 1,000,000 x 512, threshold 0.37
    python -m bench.bench_duplicates_scale --rows 100000 --copies 1000   # a quicker look
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from deeprank.embedding_io import EmbeddingWriter

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 100_000  # rows generated and written at a time


def synthetic_gallery(path, rows, dim, copies, distances, cluster_size, seed=0):
    """Write the gallery (see the docstring) and return the planted (original, copy, distance) rows."""
    rng = np.random.default_rng(seed)
    nearest, copy_d = np.asarray(distances["nearest_other"]), np.asarray(distances["copy"])
    base = rows - copies
    clusters = max(1, base // cluster_size)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    t = np.clip(rng.choice(nearest, clusters), 1e-4, 1.9)
    noise = np.sqrt(t / (2 - t) / dim).astype(np.float32)  # per coordinate: |noise|^2 = t / (2 - t)
    originals = np.sort(rng.choice(base, copies, replace=False))
    drawn = rng.choice(copy_d, copies).astype(np.float32)
    kept = {}
    with EmbeddingWriter(path, dim, True, "synthetic") as out:
        for start in range(0, base, BLOCK):
            count = min(BLOCK, base - start)
            cluster = rng.integers(0, clusters, count)
            v = centers[cluster] + rng.standard_normal((count, dim), dtype=np.float32) * noise[cluster, None]
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            mine = originals[(originals >= start) & (originals < start + count)]
            kept.update(zip(mine.tolist(), v[mine - start], strict=True))
            out.write([f"synthetic/{r:07d}.jpg" for r in range(start, start + count)],
                      [f"c{c}" for c in cluster.tolist()], v)
        x = np.stack([kept[o] for o in originals.tolist()])
        u = rng.standard_normal(x.shape, dtype=np.float32)
        u -= (u * x).sum(1, keepdims=True) * x
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = 1 - drawn / 2  # |x - y|^2 = 2 - 2 cos for unit vectors
        planted = cos[:, None] * x + np.sqrt(1 - cos ** 2)[:, None] * u
        out.write([f"synthetic/copy_{r:06d}.jpg" for r in range(copies)], ["copy"] * copies, planted)
    return pd.DataFrame({"original": [f"synthetic/{r:07d}.jpg" for r in originals.tolist()],
                         "copy": [f"synthetic/copy_{r:06d}.jpg" for r in range(copies)], "distance": drawn})


def run_stage(argv):
    """(wall seconds, peak RSS bytes, output) of find_duplicates.py as its own process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "find_duplicates.py"), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"find_duplicates.py failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def recall(groups_csv, planted, threshold):
    """(share of planted pairs in one group, the same among those closer than the threshold)."""
    frame = pd.read_csv(groups_csv)
    group = dict(zip(frame["path"].map(lambda p: "synthetic/" + Path(p).name), frame["group"], strict=True))
    same = np.array([o in group and group.get(c) == group[o] for o, c in zip(planted["original"], planted["copy"],
                                                                             strict=True)])
    close = planted["distance"].to_numpy() < threshold
    return same.mean(), same[close].mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--copies", type=int, default=10_000)
    parser.add_argument("--threshold", type=float, default=0.37, help="the planted-set benchmark's threshold")
    parser.add_argument("--cluster_size", type=int, default=20)
    parser.add_argument("--distances", default=str(ROOT / "bench" / "copy_distances.json"),
                        help="bench_duplicates.py --distances_out JSON")
    parser.add_argument("--nprobe", type=int, default=None, help="find_duplicates.py --nprobe (default: its own)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    distances = json.loads(Path(args.distances).read_text())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        gallery = Path(tmp) / "gallery.npy"
        start = time.perf_counter()
        planted = synthetic_gallery(gallery, args.rows, args.dim, args.copies, distances, args.cluster_size)
        print(f"{args.rows:,} x {args.dim} gallery with {args.copies:,} planted copies (median distance "
              f"{planted['distance'].median():.3f}; {(planted['distance'] < args.threshold).mean():.3f} of them "
              f"closer than {args.threshold}) written in {time.perf_counter() - start:.0f} s", flush=True)
        print("| run | wall | peak RSS | groups | recall, all planted | recall, planted closer than the threshold |")
        print("|---|---|---|---|---|---|")
        for run in ("first (builds and saves the index)", "again (the saved index)"):
            out = Path(tmp) / "groups.csv"
            argv = ["--gallery", str(gallery), "--threshold", str(args.threshold), "--index", "faiss", "--group",
                    "chain", "--keep", "first", "--out", str(out)]
            seconds, peak, output = run_stage(argv + (["--nprobe", str(args.nprobe)] if args.nprobe else []))
            groups = next((line.split(" groups")[0].split(", ")[-1] for line in output.splitlines()
                           if " groups holding " in line), "0")
            everything, close = recall(out, planted, args.threshold)
            print(f"| {run} | {seconds:.1f} s | {peak / 2 ** 30:.2f} GiB | {groups} | {everything:.4f} | "
                  f"{close:.4f} |", flush=True)
    cpu = "bf16" if "bf16" in open("/proc/cpuinfo").read() else "fp32 only"
    print(f"({os.cpu_count()} cores, {cpu} CPU)")


if __name__ == "__main__":
    main()
