"""Benchmark: eval.py as a whole process against a plain Python-parse + scikit-learn process.

Writes --train x --dim train and --test x --dim test text embedding files (bench_eval.py's
clustered unit vectors), then times each whole process (start-up, imports, parsing, search,
metrics), --repeats times, and prints the medians, after one timed first run of eval.py with numba's
cache empty (NUMBA_CACHE_DIR, a fresh folder: what the first run in a fresh clone costs, compiling
the parser and writing the cache); every later run loads the parser from that cache, which must not
grow:
  ours       python eval.py --train_embeddings ... --test_embeddings ... (exact kNN, every metric)
  reference  python -m bench.bench_whole_eval --reference TRAIN TEST: the lines split and the
             floats read by Python, scikit-learn NearestNeighbors(brute), score@k, P@1 and P@k
             with numpy (fewer metrics than eval.py computes)

    python -m bench.bench_whole_eval                   # 10,000 x 1,000 x 4,096 (about 0.5 GB of text)
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

ROOT = Path(__file__).resolve().parents[1]


def reference(train_path, test_path, k=30):
    """The plain way: Python parsing, scikit-learn's brute-force kNN, numpy metrics."""
    from sklearn.neighbors import NearestNeighbors

    def load(path):
        labels, rows = [], []
        with open(path, encoding="utf-8") as handle:
            handle.readline()  # the header
            for line in handle:
                _, label, values = line.rstrip("\n").split("\t")
                labels.append(label)
                rows.append([float(v) for v in values.split()])
        return np.array(labels), np.array(rows, dtype=np.float32)

    train_labels, train = load(train_path)
    test_labels, test = load(test_path)
    _, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train).kneighbors(test)
    same = train_labels[idx] == test_labels[:, None]
    print(f"score_at_k {same.any(1).mean():.4f} precision_at_1 {same[:, 0].mean():.4f} "
          f"precision_at_k {same.mean():.4f}")


def wall(command, env=None):
    """Seconds one whole process takes (its output discarded; its stderr in the error if it fails)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,  # -m bench.X
                   env=env)
    return time.perf_counter() - start


def alternate(ours_command, ref_command, repeats, warmup=True, env=None):
    """Whole-process seconds of both commands, alternated so both see the same machine state, after
    one untimed run of ours if warmup (a first run fills numba's and inductor's disk caches, as any
    first use does); their medians and the ratio reference / ours."""
    if warmup:
        wall(ours_command, env)
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(wall(ours_command, env))
        ref.append(wall(ref_command, env))
    return {"ours_s": [round(t, 2) for t in ours], "reference_s": [round(t, 2) for t in ref],
            "ours_median_s": round(statistics.median(ours), 2),
            "reference_median_s": round(statistics.median(ref), 2),
            "ratio": round(statistics.median(ref) / statistics.median(ours), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", nargs=2, metavar=("TRAIN", "TEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        return reference(*args.reference)
    from bench.bench_eval import write_files
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        train = write_files(folder, args.train, args.dim, 200, "train", seed=0)[0]
        test = write_files(folder, args.test, args.dim, 200, "test", seed=1)[0]
        size = (train.stat().st_size + test.stat().st_size) / 1e6
        ours_command = [sys.executable, str(ROOT / "eval.py"), "--train_embeddings", str(train),
                        "--test_embeddings", str(test)]
        ref_command = [sys.executable, "-m", "bench.bench_whole_eval", "--reference", str(train), str(test)]
        cache = folder / "numba_cache"
        env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
        first = wall(ours_command, env)  # a fresh clone's first run: numba compiles and writes its cache
        files = sorted(p.name for p in cache.rglob("*") if p.is_file())
        times = alternate(ours_command, ref_command, args.repeats, warmup=False, env=env)
        grown = sorted(p.name for p in cache.rglob("*") if p.is_file()) != files
    print(f"{args.train:,} x {args.test:,} x {args.dim} text embeddings ({size:.0f} MB); whole processes, "
          f"medians of {args.repeats}")
    print(f"first run of eval.py with numba's cache empty (a fresh clone): {first:.2f} s; the cache then holds "
          f"{len(files)} files and {'grew' if grown else 'did not grow'} over the {args.repeats} runs after it")
    print(f"eval.py {times['ours_median_s']:.2f} s; Python parse + scikit-learn {times['reference_median_s']:.2f} s; "
          f"{times['ratio']:.2f}x")


if __name__ == "__main__":
    main()
