"""Scoring embeddings: pure functions of vectors and labels (imports torch and numpy only).

Triplet accuracy, exact k-nearest-neighbour search in chunks (never a whole distance matrix in
memory; exact ties broken by reference order), and the retrieval metrics of "A Metric Learning
Reality Check" (Musgrave et al. 2020). D is the squared L2 distance throughout.

    metrics = knn_scores(train, test, k=30)   # Embeddings-like objects: paths, labels, vectors, index_of
"""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from deeprank.common import PipelineError

CHUNK_ELEMENTS = 1 << 25     # distance-matrix block size in floats (128 MB of float32)
KNN_PRECISIONS = ("fp32", "bf16")  # fp32: exact search | bf16: bf16 products, fp32 sums
# pair / triple scores: vector values gathered per block of rows (128 rows a column at 4096-d, in float64
# 4 MB: the block stays in cache; bench/bench_pairs.py)
DECISION_CHUNK_ELEMENTS = 1 << 19


def squared_norms(rows, block=65536):
    """|r|^2 of each row, in blocks of rows (never a temporary the size of the whole array)."""
    return torch.cat([(part * part).sum(1) for part in rows.split(block)]) if len(rows) else rows.new_zeros(0)


def squared_distances(queries, refs, ref_sq=None, query_sq=None, out=None):
    """(Q, M) squared L2 distances between rows, via |q|^2 - 2 q.r + |r|^2 (clamped at 0); the
    squared norms when known, and `out`, a (Q, M) tensor to write into (no allocation per call)."""
    if ref_sq is None:
        ref_sq = squared_norms(refs)
    d = torch.addmm(ref_sq[None, :], queries, refs.T, beta=1, alpha=-2, out=out)
    d += (queries * queries).sum(1, keepdim=True) if query_sq is None else query_sq[:, None]
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
    ref_sq = squared_norms(refs)
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
    per_query = retrieval_per_query(neighbor_labels, query_labels, r_counts, k)
    out = {"k": per_query.pop("k")}
    for key, values in per_query.items():
        kept = values[~np.isnan(values)] if key in R_BASED else values
        out[key] = float(kept.mean()) if len(kept) else float("nan")
    return out


R_BASED = ("r_precision", "map_at_r")  # metrics of the queries with R > 0 only


def retrieval_per_query(neighbor_labels, query_labels, r_counts, k):
    """Each query's retrieval metrics: {"k": k used, metric: (Q,) float array}; the R-based ones
    are NaN for queries with R = 0."""
    neighbor_labels = np.asarray(neighbor_labels)
    query_labels = np.asarray(query_labels)
    r_counts = np.asarray(r_counts)
    rel = neighbor_labels == query_labels[:, None]  # (Q, L) same class?
    k = min(k, rel.shape[1])
    out = {
        "k": int(k),
        "score_at_k": rel[:, :k].any(1).astype(np.float64),
        "precision_at_1": rel[:, 0].astype(np.float64),
        "precision_at_k": rel[:, :k].mean(1),
    }
    has = r_counts > 0
    out["r_precision"] = out["map_at_r"] = np.full(len(rel), np.nan)
    if has.any():
        if rel.shape[1] < r_counts.max():
            raise ValueError("need at least max(R) neighbours for R-based metrics")
        ranks = np.arange(1, rel.shape[1] + 1)
        within = ranks[None, :] <= r_counts[:, None]  # (Q, L) position < R
        hits = rel & within
        r = np.maximum(r_counts, 1)
        out["r_precision"] = np.where(has, hits.sum(1) / r, np.nan)
        precision_at_i = np.cumsum(rel, axis=1) / ranks[None, :]
        out["map_at_r"] = np.where(has, (precision_at_i * hits).sum(1) / r, np.nan)
    return out


def bootstrap_interval(values, resamples=1000, level=0.95, seed=0, block=100):
    """The percentile bootstrap interval (low, high) of the mean of per-query values (NaN left
    out): queries resampled with replacement `resamples` times, `block` resamples at a time."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, len(values), (min(block, resamples - s), len(values)))].mean(1)
                            for s in range(0, resamples, block)])
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def knn_scores(train, test, k, precision="fp32", intervals=False):
    """All retrieval metrics of test (queries) against train (references): Embeddings objects;
    intervals: each with its 95% bootstrap interval over queries (<metric>_ci_low / _ci_high)."""
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
    if intervals:  # 95% bootstrap intervals over queries, flat keys beside each metric
        for key, values in retrieval_per_query(ref_codes[idx.numpy()], query_codes, r_counts, k).items():
            if key != "k":
                metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = bootstrap_interval(values)
    return metrics


# ----------------------------------------------------------------------------- same / different decisions
# A pair (or triple) is called positive when its distance score is below a threshold: for a pair
# the squared L2 distance, for a triple the smallest of its three pairwise distances ("at least
# two of the three are of one class").

def best_threshold(scores, labels):
    """The threshold T maximising the accuracy of 'positive when score < T' on (scores, 1/0
    labels): the midpoint of the gap where the accuracy peaks (the first such gap on ties)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    # accuracy when the first i scores (i = 0..n) are called positive: positives among them + negatives after
    correct = np.concatenate([[0], np.cumsum(y)]) + np.concatenate([[(~y).sum()], (~y).sum() - np.cumsum(~y)])
    cuts = np.concatenate([[True], s[1:] > s[:-1], [True]])  # a cut only between distinct scores
    i = int(np.argmax(np.where(cuts, correct, -1)))
    if i == 0:
        return float(s[0])
    if i == len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[i - 1] + s[i]) / 2)


def decision_metrics(scores, labels, threshold):
    """accuracy, precision, recall, f1 of 'positive when score < threshold' (shares in [0, 1])."""
    predicted = np.asarray(scores) < threshold
    labels = np.asarray(labels).astype(bool)
    tp = int((predicted & labels).sum())
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    return {"accuracy": float((predicted == labels).mean()), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def roc_curve(scores, labels):
    """(fpr, tpr, cuts) of 'positive when score < t' at every cut between distinct scores, from (0, 0)
    to (1, 1): point i calls the scores up to cuts[i - 1] positive; tied scores move together (one
    diagonal step). The ROC of eval's pair decisions and of the report's picture."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.append(s[1:] != s[:-1], True)  # the last of each run of tied scores
    tpr = np.concatenate([[0.0], np.cumsum(y)[last] / max(1, int(y.sum()))])
    fpr = np.concatenate([[0.0], np.cumsum(~y)[last] / max(1, int((~y).sum()))])
    return fpr, tpr, s[last]


def roc_auc(scores, labels):
    """Area under roc_curve (trapezoids): the chance that a random positive scores below a random
    negative, ties counting half (Mann-Whitney)."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pair_scores(vectors_a, vectors_b):
    """Squared L2 distance of each row pair, in float64: (N, D), (N, D) -> (N,). The difference of
    two float32 values is exact in float64, so no float64 copy of the inputs is made."""
    d = np.subtract(vectors_a, vectors_b, dtype=np.float64)
    np.square(d, out=d)
    return d.sum(1)


def triple_scores(vectors_a, vectors_b, vectors_c):
    """The smallest of the three pairwise squared L2 distances of each row triple: (N,)."""
    return np.minimum.reduce([pair_scores(vectors_a, vectors_b), pair_scores(vectors_a, vectors_c),
                              pair_scores(vectors_b, vectors_c)])


def gathered_scores(score, take, ids, dim, chunk_elements=DECISION_CHUNK_ELEMENTS, workers=None):
    """score(*vectors) of every row of ids (N, C) ints, C vector ids a row: take(ids of a column's
    block) gives their (n, dim) vectors. A block of rows at a time, so that at most about
    chunk_elements vector values are gathered per block (they stay in cache): memory grows with N,
    not with N x dim. Blocks run on `workers` threads (default: one per core; numpy releases the
    GIL). Each row's score is that of one whole call (row-wise sums)."""
    ids = np.asarray(ids)
    step = max(1, chunk_elements // (dim * ids.shape[1]))
    out = np.empty(len(ids))

    def block(start):
        rows = ids[start:start + step]
        out[start:start + step] = score(*(take(rows[:, column]) for column in range(ids.shape[1])))

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for _ in pool.map(block, range(0, len(ids), step)):  # re-raises a block's error
            pass
    return out
