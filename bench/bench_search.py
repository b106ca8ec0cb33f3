"""Benchmark: gallery search at scale, faiss index against exact search (search_index.py).

Writes a synthetic clustered gallery (default 1,000,000 x 512 float32, unit vectors around
--clusters centres) as .npy to a temporary folder, then runs each phase in its own process so
that each reports its own peak memory (VmHWM):
  build   faiss index built from the .npy (read block by block) and saved beside it
  faiss   the saved index loaded; one query at a time (median latency) and batches of --batch
  exact   the gallery loaded whole; the same queries by exact search (metrics.knn, as eval.py)
recall@10: share of each query's exact 10 nearest that the index returns in its 10.

    python -m bench.bench_search                       # docs/search.md's table (about 5 minutes here)
    python -m bench.bench_search --rows 200000 --nprobe 32
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deeprank import embedding_io
from deeprank.search import index as search_index


def peak_mb():
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered(rows, dim, clusters, seed, spread=0.6, block=50_000):
    """Blocks of unit vectors: a random centre each, plus Gaussian noise of norm ~spread."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), dtype=np.float32) * (
            spread / np.sqrt(dim))
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_gallery(path, rows, dim, clusters):
    """The .npy and its .paths.tsv (made-up names), as gen_embeddings.py writes them."""
    with open(embedding_io.paths_file_of(path), "w") as handle:
        handle.write(embedding_io.embedding_header(dim, True, "bench"))
        handle.writelines(f"{i:07d}.jpg\tsynthetic\n" for i in range(rows))
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for block in clustered(rows, dim, clusters, seed=1):
            handle.write(block.tobytes())


def phase_build(args):
    vectors = np.load(args.gallery, mmap_mode="r")
    start = time.perf_counter()
    search_index.CELLS_PER_SQRT = args.cells_per_sqrt
    rows = search_index.row_source(vectors, args.gallery)
    sample = lambda count, seed: search_index.random_rows(rows, count, seed)  # noqa: E731 - a one-line helper, named for the lines below
    index = search_index.build_faiss(search_index.row_blocks(vectors, args.gallery), len(vectors),
                                     vectors.shape[1], sample)
    built = time.perf_counter() - start
    search_index.save_faiss(index, args.gallery, len(vectors))
    return {"build_s": built, "save_s": time.perf_counter() - start - built, "peak_mb": peak_mb(),
            "index": search_index.FaissIndex(index, vectors, args.nprobe).description}


def timed_searches(index, queries, args):
    """Median single-query latency over --singles queries; median time of --repeats batches."""
    singles = []
    for i in range(args.singles if args.phase == "faiss" else min(args.singles, 10)):
        start = time.perf_counter()
        index.search(queries[i:i + 1], 10)
        singles.append(time.perf_counter() - start)
    batches = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, rows = index.search(queries[:args.batch], 10)
        batches.append(time.perf_counter() - start)
    return {"one_query_ms": 1000 * statistics.median(singles), "batch_s": statistics.median(batches)}, rows


def phase_search(args):
    queries = np.concatenate(list(clustered(args.batch, args.dim, args.clusters, seed=2)))
    start = time.perf_counter()
    if args.phase == "faiss":
        raw = search_index.load_fresh_faiss(args.gallery, args.rows)
        if raw is None:
            raise SystemExit("the saved index is missing or stale")
        index = search_index.FaissIndex(raw, search_index.NpyRows(args.gallery), args.nprobe)
    else:
        index = search_index.ExactIndex(np.load(args.gallery))
    loaded = time.perf_counter() - start
    figures, rows = timed_searches(index, queries, args)
    np.save(Path(args.gallery).with_name(f"{args.phase}_rows.npy"), rows)
    return {"load_s": loaded, **figures, "peak_mb": peak_mb()}


def run_phase(args, phase):
    command = [sys.executable, __file__, "--phase", phase] + [f"--{k}={v}" for k, v in vars(args).items()
                                                              if k not in ("phase", "keep") and v is not None]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"phase {phase} failed:\n{result.stderr[-3000:]}")
    out = result.stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, default=search_index.NPROBE)
    parser.add_argument("--cells_per_sqrt", type=float, default=search_index.CELLS_PER_SQRT)
    parser.add_argument("--batch", type=int, default=1000, help="queries in a batch")
    parser.add_argument("--singles", type=int, default=50, help="single queries timed")
    parser.add_argument("--repeats", type=int, default=3, help="batches timed (median)")
    parser.add_argument("--dir", default=None, help="folder for the gallery (default: a temporary one)")
    parser.add_argument("--gallery", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default=None, choices=("build", "faiss", "exact"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase_build(args) if args.phase == "build" else phase_search(args)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        args.gallery = os.path.join(folder, "gallery.npy")
        start = time.perf_counter()
        write_gallery(args.gallery, args.rows, args.dim, args.clusters)
        print(f"gallery: {args.rows:,} x {args.dim} float32, {args.clusters} clusters "
              f"({time.perf_counter() - start:.1f} s to write); {os.cpu_count()} CPU cores", flush=True)
        build = run_phase(args, "build")
        print(f"build: {build}", flush=True)
        fast = run_phase(args, "faiss")
        print(f"faiss: {fast}", flush=True)
        exact = run_phase(args, "exact")
        print(f"exact: {exact}", flush=True)
        found = np.load(os.path.join(folder, "faiss_rows.npy"))
        truth = np.load(os.path.join(folder, "exact_rows.npy"))
        recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist(), strict=True)])
    print()
    print(f"| {build['index']} | build {build['build_s']:.1f} s (+{build['save_s']:.1f} s save), "
          f"peak {build['peak_mb']:.0f} MB |")
    print(f"| search | load | 1 query | batch of {args.batch} | peak memory |")
    print("|---|---|---|---|---|")
    for name, r in (("faiss", fast), ("exact", exact)):
        print(f"| {name} | {r['load_s']:.1f} s | {r['one_query_ms']:.1f} ms | {r['batch_s']:.2f} s | "
              f"{r['peak_mb']:.0f} MB |")
    print(f"recall@10 {recall:.4f}; batch speed-up {exact['batch_s'] / fast['batch_s']:.1f}x; "
          f"one-query speed-up {exact['one_query_ms'] / fast['one_query_ms']:.1f}x")


if __name__ == "__main__":
    main()
