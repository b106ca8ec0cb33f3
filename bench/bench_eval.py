"""Benchmark eval.py on large embedding files against pandas + scikit-learn.

Generates --train x --dim train and --test x --dim test embedding files (random unit
vectors in --classes classes, written with gen_embeddings' writer, text and .npy), then
in one run measures:

  parse     read_embeddings() on the train text file: MB/s (median of --repeats, after one
            warm-up read that compiles the parser), and once with fast=False (numpy's parser
            in one process per core, the fallback)
  npy       read_embeddings() on the .npy files: seconds, and both formats' sizes
  matmul    this machine's fp32 matrix-multiply rate (torch.mm, one query chunk x all references)
  knn       eval.knn() (exact, chunked) as a share of that rate
  ours      eval.main() end to end on the text files (parse + kNN + metrics), exact (fp32)
            and with --knn_precision bf16
  reference pandas.read_csv + sklearn NearestNeighbors(algorithm="brute") on the same files,
            then the same metric function (scikit-learn: requirements-bench.txt)

Prints one JSON line. The default size is the issue's (100,000 x 4,096 train, 10,000 test):
about 5.4 GB of text; --train/--test/--dim scale it down.

    python -m bench.bench_eval --train 100000 --test 10000 --dim 4096
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import eval as evaluation
from deeprank import metrics
from deeprank.embedding_io import EmbeddingWriter, read_embeddings

ROOT = Path(__file__).resolve().parents[1]


def write_files(folder, count, dim, classes, name, seed):
    """Random unit vectors (classes as clusters) as <name>.txt and <name>.npy; returns their paths."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    outs = [folder / f"{name}.txt", folder / f"{name}.npy"]
    writers = [EmbeddingWriter(out, dim, True, "bench") for out in outs]
    for writer in writers:
        writer.__enter__()
    for start in range(0, count, 2000):
        n = min(2000, count - start)
        labels = rng.integers(0, classes, size=n)
        vectors = centres[labels] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        paths = [str(folder / f"n{label:08d}" / f"{name}_{start + i}.JPEG") for i, label in enumerate(labels)]
        names = [f"n{label:08d}" for label in labels]
        for writer in writers:
            writer.write(paths, names, vectors)
    for writer in writers:
        writer.__exit__(None, None, None)
    return outs


def reference(train_txt, test_txt, k, timings):
    """pandas + scikit-learn: parse both files, brute-force kNN, the same metrics (phase seconds
    go into timings)."""
    import pandas as pd
    from sklearn.neighbors import NearestNeighbors

    def load(path):
        # space-separated floats after "path<TAB>label<TAB>": the C parser reads the floats,
        # the first column holds "path\tlabel\tv1"
        frame = pd.read_csv(path, sep=" ", header=None, skiprows=1, engine="c", dtype={0: str})
        first = frame[0].str.split("\t", expand=True)
        vectors = np.concatenate([first[2].astype(np.float32).to_numpy()[:, None],
                                  frame.iloc[:, 1:].to_numpy(dtype=np.float32)], axis=1)
        return first[0].tolist(), first[1].to_numpy(), vectors

    start = time.perf_counter()
    _, train_labels, train = load(train_txt)
    _, test_labels, test = load(test_txt)
    timings["reference_parse_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    names = {x: i for i, x in enumerate(sorted(set(train_labels) | set(test_labels)))}
    ref_codes = np.array([names[x] for x in train_labels])
    query_codes = np.array([names[x] for x in test_labels])
    r_counts = np.bincount(ref_codes, minlength=len(names))[query_codes]
    depth = int(max(k, r_counts.max()))
    index = NearestNeighbors(n_neighbors=depth, algorithm="brute").fit(train)
    _, idx = index.kneighbors(test)
    timings["reference_knn_s"] = round(time.perf_counter() - start, 1)
    return metrics.retrieval_metrics(ref_codes[idx], query_codes, r_counts, k)


def matmul_rate(dim, refs, chunk_rows):
    """GFLOP/s of fp32 torch.mm for a (chunk_rows, dim) x (dim, refs) product (median of 3)."""
    a, b = torch.randn(chunk_rows, dim), torch.randn(refs, dim)
    a @ b.T
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b.T
        times.append(time.perf_counter() - start)
    return 2 * chunk_rows * refs * dim / statistics.median(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the parse / npy-load measurements")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--folder", default=None, help="where to write the files (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        train_txt, train_npy = write_files(tmp, args.train, args.dim, args.classes, "train", 0)
        test_txt, test_npy = write_files(tmp, args.test, args.dim, args.classes, "test", 1)
        result = {"train": args.train, "test": args.test, "dim": args.dim, "threads": torch.get_num_threads(),
                  "write_s": round(time.perf_counter() - start, 1),
                  "text_bytes": train_txt.stat().st_size + test_txt.stat().st_size,
                  "npy_bytes": sum(p.stat().st_size for p in (train_npy, test_npy, tmp / "train.paths.tsv",
                                                               tmp / "test.paths.tsv"))}
        read_embeddings(test_txt, fast=True)  # warm-up: compiles (or loads from numba's cache) the text parser
        parse, npy = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            train = read_embeddings(train_txt)
            parse.append(time.perf_counter() - start)
            del train
            start = time.perf_counter()
            read_embeddings(train_npy)
            npy.append(time.perf_counter() - start)
        result["text_load_s"] = round(statistics.median(parse), 2)
        result["parse_mb_s"] = round(train_txt.stat().st_size / statistics.median(parse) / 1e6, 1)
        start = time.perf_counter()
        read_embeddings(train_txt, fast=False)  # numpy's C parser, one process per core: the fallback path
        result["numpy_parse_mb_s"] = round(train_txt.stat().st_size / (time.perf_counter() - start) / 1e6, 1)
        result["npy_load_s"] = round(statistics.median(npy), 2)

        train, test = read_embeddings(train_npy), read_embeddings(test_npy)
        chunk = max(1, metrics.CHUNK_ELEMENTS // args.train)
        result["matmul_gflop_s"] = round(matmul_rate(args.dim, args.train, chunk), 1)
        start = time.perf_counter()
        metrics.knn(test.vectors, train.vectors, args.k)
        knn_s = time.perf_counter() - start
        result["knn_s"] = round(knn_s, 2)
        result["knn_gflop_s"] = round(2 * args.test * args.train * args.dim / knn_s / 1e9, 1)
        result["knn_share_of_matmul"] = round(result["knn_gflop_s"] / result["matmul_gflop_s"], 3)
        start = time.perf_counter()
        metrics.knn(test.vectors, train.vectors, args.k, precision="bf16")
        result["knn_bf16_s"] = round(time.perf_counter() - start, 2)
        del train, test

        start = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            evaluation.main(["--train_embeddings", str(train_txt), "--test_embeddings", str(test_txt),
                             "--k", str(args.k), "--json", str(tmp / "ours.json")])
        result["ours_end_to_end_s"] = round(time.perf_counter() - start, 1)
        result["ours_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        ours = json.loads((tmp / "ours.json").read_text())
        start = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            evaluation.main(["--train_embeddings", str(train_txt), "--test_embeddings", str(test_txt),
                             "--k", str(args.k), "--json", str(tmp / "bf16.json"), "--knn_precision", "bf16"])
        result["ours_bf16_end_to_end_s"] = round(time.perf_counter() - start, 1)
        fast = json.loads((tmp / "bf16.json").read_text())
        result["bf16_max_metric_change"] = max(abs(fast[key] - ours[key]) for key in evaluation.METRIC_KEYS[2:])
        if not args.skip_reference:
            start = time.perf_counter()
            ref = reference(train_txt, test_txt, args.k, result)
            result["reference_end_to_end_s"] = round(time.perf_counter() - start, 1)
            result["ours_vs_reference"] = round(result["reference_end_to_end_s"] / result["ours_end_to_end_s"], 2)
            result["ours_bf16_vs_reference"] = round(result["reference_end_to_end_s"] /
                                                     result["ours_bf16_end_to_end_s"], 2)
            result["same_metrics"] = all(abs(ours[key] - ref[key]) < 1e-9 for key in
                                         ("score_at_k", "precision_at_1", "precision_at_k", "r_precision", "map_at_r"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
