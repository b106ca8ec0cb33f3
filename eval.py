"""Stage 4: score embeddings. Reads train/test embedding files (and triplet CSVs), prints
the metrics, and optionally writes them as JSON and saves query grids as PNGs.

Metrics (test images are the queries, train images the references; D = squared L2):
  test_triplet_accuracy / train_triplet_accuracy  share of CSV triplets with D(q,p) < D(q,n)
  score_at_k      share of queries with at least one same-class image among their k nearest
  precision_at_1  same-class share of the nearest reference
  precision_at_k  same-class share of the k nearest references
  r_precision     same-class share of the R nearest, R = same-class references of the query
  map_at_r        mean average precision at R (Musgrave et al., "A Metric Learning Reality Check")
A query never retrieves itself (same path in both sets). Exact ties in distance are
broken by reference order (earlier rows of the train file first).

    python eval.py --train_embeddings train_embedding.txt --test_embeddings test_embedding.txt --json metrics.json
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from datasets import (PipelineError, atomic_write, check_output_path, read_embeddings, read_triplet_csv,
                      run_cli)

# ---------------------------------------------------------------- hyperparameters
K = 30                       # neighbours for score_at_k / precision_at_k (the original's top-30)
TRAIN_EMBEDDINGS = "train_embedding.txt"
TEST_EMBEDDINGS = "test_embedding.txt"
TRAIN_TRIPLETS = "training_triplet_sample.csv"   # used when present
TEST_TRIPLETS = "val_triplet_sample.csv"         # used when present
SHOW = 0                     # query grids to save (0: none)
SHOW_DIR = "ranked_imgs"     # where --show writes its PNGs
CHUNK_ELEMENTS = 1 << 25     # distance-matrix block size in floats (128 MB of float32)
KNN_PRECISION = "fp32"       # fp32: exact search | bf16: bf16 products, fp32 sums (~2x faster kNN with AMX;
                             # neighbours closer than ~1e-3 in squared distance may swap places)
# ----------------------------------------------------------------

KNN_PRECISIONS = ("fp32", "bf16")
METRIC_KEYS = ("train_triplet_accuracy", "test_triplet_accuracy", "score_at_k", "precision_at_1",
               "precision_at_k", "r_precision", "map_at_r")


# ----------------------------------------------------------------------------- pure metrics

def squared_distances(queries, refs, ref_sq=None):
    """(Q, M) squared L2 distances between rows, via |q|^2 - 2 q.r + |r|^2 (clamped at 0)."""
    if ref_sq is None:
        ref_sq = (refs * refs).sum(1)
    d = torch.addmm(ref_sq[None, :], queries, refs.T, beta=1, alpha=-2)
    d += (queries * queries).sum(1, keepdim=True)
    return d.clamp_(min=0)


def triplet_accuracy(vectors, q, p, n, chunk=1024):
    """Share of triplets (row indices q, p, n into vectors) with D(q,p) < D(q,n) strictly."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    q, p, n = (torch.as_tensor(np.asarray(a), dtype=torch.long) for a in (q, p, n))
    if len(q) == 0:
        return float("nan")
    correct = 0
    for s in range(0, len(q), chunk):
        vq, vp, vn = vectors[q[s:s + chunk]], vectors[p[s:s + chunk]], vectors[n[s:s + chunk]]
        correct += int(((vq - vp).pow(2).sum(1) < (vq - vn).pow(2).sum(1)).sum())
    return correct / len(q)


def _stable_topk(d, k):
    """k smallest per row of d, ordered by (distance, column): exact ties by column order."""
    extra = int(k < d.shape[1])  # one more: a (k+1)-th equal to the k-th means a tie at the cut
    vals, idx = torch.topk(d, k + extra, dim=1, largest=False, sorted=True)
    straddle = (vals[:, k] == vals[:, k - 1]).nonzero().flatten().tolist() if extra else []
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    for row in straddle:  # topk may have kept any of the tied columns: keep the first ones
        cand = (d[row] <= vals[row, -1]).nonzero().flatten()  # column order
        order = torch.sort(d[row, cand], stable=True).indices[:k]
        idx[row], vals[row] = cand[order], d[row, cand[order]]
    # within the kept k, order equal distances by column (only rows that have equal distances)
    tied = (vals[:, 1:] == vals[:, :-1]).any(1).nonzero().flatten()
    if len(tied):
        order = torch.from_numpy(np.lexsort((idx[tied].numpy(), vals[tied].numpy())))
        vals[tied], idx[tied] = torch.gather(vals[tied], 1, order), torch.gather(idx[tied], 1, order)
    return vals, idx


@contextlib.contextmanager
def matmul_precision(precision):
    """fp32 matrix products inside: exact ('fp32') or with bf16 products ('bf16', oneDNN on CPU)."""
    if precision not in KNN_PRECISIONS:
        raise PipelineError(f"unknown kNN precision {precision!r}; choose fp32 or bf16")
    settings = torch.backends.mkldnn.matmul
    saved = settings.fp32_precision
    settings.fp32_precision = "bf16" if precision == "bf16" else "ieee"
    try:
        yield
    finally:
        settings.fp32_precision = saved


def knn(queries, refs, k, exclude=None, chunk_elements=CHUNK_ELEMENTS, precision="fp32"):
    """k nearest references of each query by squared L2: (distances, indices), (Q, k).

    Exact (brute force, fp32) unless precision='bf16'. Chunked over queries so at most
    chunk_elements distances exist at once. exclude[i] is a reference row query i must not
    retrieve (itself), or -1. Ties: lower row first.
    """
    queries = torch.as_tensor(queries, dtype=torch.float32)
    refs = torch.as_tensor(refs, dtype=torch.float32)
    k = min(k, len(refs) - (1 if exclude is not None and (np.asarray(exclude) >= 0).any() else 0))
    if k < 1:
        raise ValueError("need at least one reference to search")
    ref_sq = (refs * refs).sum(1)
    step = max(1, chunk_elements // max(1, len(refs)))
    out_d = torch.empty(len(queries), k)
    out_i = torch.empty(len(queries), k, dtype=torch.long)
    with matmul_precision(precision):
        for s in range(0, len(queries), step):
            d = squared_distances(queries[s:s + step], refs, ref_sq)
            if exclude is not None:
                ex = torch.as_tensor(np.asarray(exclude[s:s + step]), dtype=torch.long)
                rows = (ex >= 0).nonzero().flatten()
                d[rows, ex[rows]] = float("inf")
            out_d[s:s + step], out_i[s:s + step] = _stable_topk(d, k)
    return out_d, out_i


def retrieval_metrics(neighbor_labels, query_labels, r_counts, k):
    """Retrieval metrics from ranked neighbour labels (Q, >= max(k, R)) as integer codes.

    r_counts[i]: number of same-class references of query i (itself excluded). Queries
    with R = 0 count as misses for score/precision and are left out of R-based metrics.
    """
    neighbor_labels = np.asarray(neighbor_labels)
    query_labels = np.asarray(query_labels)
    r_counts = np.asarray(r_counts)
    rel = neighbor_labels == query_labels[:, None]  # (Q, L) same class?
    k = min(k, rel.shape[1])
    out = {
        "k": int(k),
        "score_at_k": float(rel[:, :k].any(1).mean()),
        "precision_at_1": float(rel[:, 0].mean()),
        "precision_at_k": float(rel[:, :k].mean()),
    }
    has = r_counts > 0
    if has.any():
        if rel.shape[1] < r_counts.max():
            raise ValueError("need at least max(R) neighbours for R-based metrics")
        ranks = np.arange(1, rel.shape[1] + 1)
        within = ranks[None, :] <= r_counts[:, None]  # (Q, L) position < R
        hits = rel & within
        r = np.maximum(r_counts, 1)
        out["r_precision"] = float((hits.sum(1) / r)[has].mean())
        precision_at_i = np.cumsum(rel, axis=1) / ranks[None, :]
        out["map_at_r"] = float(((precision_at_i * hits).sum(1) / r)[has].mean())
    else:
        out["r_precision"] = out["map_at_r"] = float("nan")
    return out


def knn_scores(train, test, k=K, precision="fp32"):
    """All retrieval metrics of test (queries) against train (references): Embeddings objects."""
    names = {label: code for code, label in enumerate(sorted(set(train.labels) | set(test.labels)))}
    ref_codes = np.array([names[x] for x in train.labels])
    query_codes = np.array([names[x] for x in test.labels])
    exclude = np.array([train.index_of(p) for p in test.paths])
    counts = np.bincount(ref_codes, minlength=len(names))
    r_counts = counts[query_codes].copy()
    has_self = exclude >= 0  # the query is itself a reference: it is not its own match
    r_counts[has_self] -= ref_codes[exclude[has_self]] == query_codes[has_self]
    depth = int(max(k, r_counts.max(initial=0)))
    _, idx = knn(test.vectors, train.vectors, depth, exclude, precision=precision)
    metrics = retrieval_metrics(ref_codes[idx.numpy()], query_codes, r_counts, k)
    metrics["queries"] = len(test)
    metrics["references"] = len(train)
    return metrics


def triplet_rows(embeddings, csv_path):
    """Row indices (q, p, n) of a triplet CSV's images in an embedding file; missing -> error."""
    columns = read_triplet_csv(csv_path)
    rows = []
    for column in columns:
        index = np.array([embeddings.index_of(p) for p in column])
        if (index < 0).any():
            missing = column[np.flatnonzero(index < 0)[0]]
            raise PipelineError(f"{csv_path} names {missing}, which the embedding file lacks; rerun "
                                f"gen_embeddings.py with this CSV")
        rows.append(index)
    return rows


# ----------------------------------------------------------------------------- pictures

def save_query_grid(path, query_path, query_label, ranked, caption_count=10):
    """PNG: the query, then its nearest and farthest references, captioned with class and distance.

    ranked: {"nearest": [(path, label, distance)], "farthest": [...]}.
    """
    from PIL import Image, ImageDraw

    from datasets import load_rgb

    cell, pad, text_h = 96, 4, 26
    cols = caption_count + 1
    rows = [("nearest", ranked["nearest"]), ("farthest", ranked["farthest"])]
    canvas = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, items) in enumerate(rows):
        y = pad + r * (cell + text_h + pad)
        cells = [(query_path, query_label, f"query ({title})")] + [
            (p, lab, f"{lab}\nd={dist:.3f}") for p, lab, dist in items]
        for c, (p, lab, text) in enumerate(cells):
            x = pad + c * (cell + pad)
            image = load_rgb(p).resize((cell, cell))
            canvas.paste(image, (x, y))
            colour = "black" if c == 0 else ("green" if lab == query_label else "red")
            draw.multiline_text((x + 2, y + cell + 1), text, fill=colour, spacing=1)
    with atomic_write(path, mode="wb") as handle:
        canvas.save(handle, format="PNG")


def show_queries(train, test, count, folder, seed=0):
    """Save grids for `count` test queries spread over the file; returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    picks = np.random.default_rng(seed).choice(len(test), size=min(count, len(test)), replace=False)
    refs = torch.as_tensor(train.vectors)
    written = []
    for i in sorted(picks.tolist()):
        d = squared_distances(torch.as_tensor(test.vectors[i:i + 1]), refs)[0]
        self_row = train.index_of(test.paths[i])
        if self_row >= 0:
            d[self_row] = float("nan")
        valid = (~torch.isnan(d)).nonzero().flatten()
        order = valid[torch.sort(d[valid], stable=True).indices]
        pick = lambda rows: [(train.paths[j], train.labels[j], float(d[j])) for j in rows.tolist()]  # noqa: E731
        ranked = {"nearest": pick(order[:10]), "farthest": pick(order.flip(0)[:10])}
        name = f"{i:05d}_{test.labels[i]}_{Path(test.paths[i]).stem}.png"
        save_query_grid(folder / name, test.paths[i], test.labels[i], ranked)
        written.append(folder / name)
    return written


# ----------------------------------------------------------------------------- main

def format_metrics(metrics):
    """The printout: one metric per line, shares as percentages."""
    lines = []
    for key in METRIC_KEYS:
        if key in metrics and metrics[key] is not None:
            name = key.replace("_at_k", f"_at_{metrics['k']}") if key.endswith("_at_k") else key
            value = metrics[key]
            lines.append(f"{name:<24} {'n/a' if value != value else f'{100 * value:6.2f}%'}")
    return "\n".join(lines)


def _optional_csv(given, default):
    """An explicit CSV must exist; the default is used only when present."""
    if given is not None:
        return given
    return default if os.path.isfile(default) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_embeddings", default=TRAIN_EMBEDDINGS, help="references (default: %(default)s)")
    parser.add_argument("--test_embeddings", default=TEST_EMBEDDINGS, help="queries (default: %(default)s)")
    parser.add_argument("--train_triplets", default=None,
                        help=f"train triplet CSV for train_triplet_accuracy (default: {TRAIN_TRIPLETS} if present)")
    parser.add_argument("--test_triplets", default=None,
                        help=f"test triplet CSV for test_triplet_accuracy (default: {TEST_TRIPLETS} if present)")
    parser.add_argument("--k", type=int, default=K, help="neighbours for score/precision at k (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the metrics here (fractions in [0, 1])")
    parser.add_argument("--show", type=int, default=SHOW, help="save N query grids (default: %(default)s)")
    parser.add_argument("--show_dir", default=SHOW_DIR, help="folder for --show PNGs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="which queries --show picks (default: %(default)s)")
    parser.add_argument("--knn_precision", default=KNN_PRECISION, choices=KNN_PRECISIONS,
                        help="fp32: exact kNN; bf16: bf16 products with fp32 sums, about 2x faster kNN on CPUs "
                             "with AMX, near-ties may swap (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise PipelineError("--k must be at least 1")
    if args.json:
        check_output_path(args.json)

    train = read_embeddings(args.train_embeddings)
    test = read_embeddings(args.test_embeddings)
    if train.vectors.shape[1] != test.vectors.shape[1]:
        raise PipelineError(f"{args.train_embeddings} has dim={train.vectors.shape[1]} but {args.test_embeddings} "
                            f"has dim={test.vectors.shape[1]}; rerun gen_embeddings.py with one checkpoint for both")
    if len(train) == 0 or len(test) == 0:
        raise PipelineError("an embedding file has no rows; rerun gen_embeddings.py")
    metrics = {}
    for key, given, default, emb in (("train_triplet_accuracy", args.train_triplets, TRAIN_TRIPLETS, train),
                                     ("test_triplet_accuracy", args.test_triplets, TEST_TRIPLETS, test)):
        csv = _optional_csv(given, default)
        if csv is not None:
            q, p, n = triplet_rows(emb, csv)
            metrics[key] = triplet_accuracy(emb.vectors, q, p, n)
            metrics[key.replace("accuracy", "count")] = len(q)
    metrics.update(knn_scores(train, test, args.k, args.knn_precision))
    metrics["knn_precision"] = args.knn_precision
    metrics["train_embeddings"] = str(args.train_embeddings)
    metrics["test_embeddings"] = str(args.test_embeddings)
    metrics["model"] = test.header["model"]

    print(f"{len(test)} test queries against {len(train)} train images, dim={train.vectors.shape[1]}")
    print(format_metrics(metrics))
    if args.json:
        with atomic_write(args.json) as handle:
            clean = {key: (None if isinstance(v, float) and v != v else v) for key, v in metrics.items()}
            json.dump(clean, handle, indent=2, sort_keys=True)
            handle.write("\n")
        print(f"wrote {args.json}")
    if args.show > 0:
        written = show_queries(train, test, args.show, args.show_dir, args.seed)
        print(f"saved {len(written)} query grids to {args.show_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
