"""Benchmark: eval.py --pairs at the same-artist seed's size, as a whole process: wall time and peak RSS.

Writes --images x --dim float32 unit vectors (a .npy with its .paths.tsv, --classes labels, like
the painter set's ~24,000 paintings) and a --pairs-row pair CSV (image1,image2,same; half of the
rows same-class) over them, then times each whole process (start-up, reading, scoring, metrics)
--repeats times and prints the medians, with the process's own peak resident memory (wait4's
ru_maxrss). The embedding file is both --train_embeddings and --test_embeddings, as for a test
CSV over one set of images.

  pairs     python eval.py ... --pairs P.csv --threshold T --no_knn (the pair decisions alone)
  full      the same without --no_knn: kNN retrieval metrics of every image against the others too
  --before COMMIT  runs that commit's eval.py (git archive into a temp folder) the same way as
            'full' (it has no --no_knn): the before / after row

    python -m bench.bench_pairs                                  # 24,000 x 4,096, 1,048,576 pairs
    python -m bench.bench_pairs --dim 512 --runs full --before 4bdf823
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deeprank.embedding_io import embedding_header
from deeprank.sample_csv import write_image_csv

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder, images, dim, classes, pairs, seed=0):
    """(embedding .npy, pair CSV) in folder: clustered unit vectors, half the pairs same-class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images) % classes
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    vectors = np.empty((images, dim), dtype=np.float32)
    for start in range(0, images, 4096):  # no images x dim float64 temporary
        block = centres[labels[start:start + 4096]] + rng.standard_normal((len(labels[start:start + 4096]), dim),
                                                                           dtype=np.float32)
        vectors[start:start + 4096] = block / np.linalg.norm(block, axis=1, keepdims=True)
    paths = [str(folder / "images" / f"artist_{labels[i]:04d}" / f"{i:06d}.jpg") for i in range(images)]
    npy = folder / f"embeddings_{dim}.npy"
    np.save(npy, vectors)
    with open(folder / f"embeddings_{dim}.paths.tsv", "w", encoding="utf-8") as handle:
        handle.write(embedding_header(dim, True, "synthetic"))
        handle.writelines(f"images/artist_{labels[i]:04d}/{i:06d}.jpg\tartist_{labels[i]:04d}\n"
                          for i in range(images))
    first = rng.integers(0, images, pairs)
    same = rng.random(pairs) < 0.5
    per_class = images // classes  # images i, i + classes, i + 2 classes, ... share a class
    partner = (first % classes) + classes * rng.integers(0, per_class, pairs)
    other = rng.integers(0, images, pairs)
    second = np.where(same, partner, other)
    rows = np.stack([first, second], axis=1)
    csv = folder / "pairs.csv"
    write_image_csv(csv, ("image1", "image2"), paths, rows, ("same", (labels[first] == labels[second]).astype(int)))
    return npy, csv


def measure(command):
    """(seconds, peak RSS in MB) of one whole process (its output discarded)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    error = process.stderr.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{error[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1_500)
    parser.add_argument("--pairs", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default="pairs", help="comma-separated: pairs, full (default: %(default)s)")
    parser.add_argument("--before", default=None, metavar="COMMIT", help="also time this commit's eval.py (full)")
    parser.add_argument("--threshold", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        npy, csv = make_inputs(folder, args.images, args.dim, args.classes, args.pairs)
        print(f"{args.images:,} x {args.dim} float32 embeddings ({npy.stat().st_size / 1e6:.0f} MB .npy), "
              f"{args.pairs:,} pairs ({csv.stat().st_size / 1e6:.0f} MB CSV), written in "
              f"{time.perf_counter() - start:.1f} s")
        common = ["--train_embeddings", npy, "--test_embeddings", npy, "--pairs", csv, "--threshold",
                  args.threshold, "--json", folder / "metrics.json"]
        commands = {}
        for run in args.runs.split(","):
            commands[run] = [sys.executable, ROOT / "eval.py", *common] + (["--no_knn"] if run == "pairs" else [])
        if args.before:
            old = folder / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.before], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
            commands[f"full, {args.before}"] = [sys.executable, old / "eval.py", *common]
        results = {name: [] for name in commands}
        for _ in range(args.repeats):  # alternated, so every command sees the same machine state
            for name, command in commands.items():
                results[name].append(measure([str(part) for part in command]))
        cpu = "bf16" if "bf16" in open("/proc/cpuinfo").read() else "fp32 only"
        print(f"medians of {args.repeats}, {os.cpu_count()} cores ({cpu} CPU):")
        for name, runs in results.items():
            seconds, rss = zip(*runs, strict=True)
            print(f"  {name:<24} {statistics.median(seconds):7.2f} s  peak RSS {statistics.median(rss):8.0f} MB  "
                  f"(runs: {', '.join(f'{s:.2f}' for s in seconds)} s)")


if __name__ == "__main__":
    main()
