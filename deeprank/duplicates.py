"""Near-duplicates in an embedding gallery: the pairs closer than a threshold (an exact chunked
self-join, or a faiss index's neighbours re-checked exactly), byte-identical files, and the groups
they form: star groups (each member within the threshold of its group's kept image, so a chain
A~B~C~D cannot pull D into A's group) or chains (connected components, with a union-find).

    pairs = close_pairs(vectors, threshold)                    # (i, j, d): i < j, d < threshold
    groups = star_groups(len(vectors), pairs, keep_order(paths, "largest"))
"""

import os
from collections import defaultdict

import numpy as np
import torch

from deeprank.common import PipelineError, sha256_of
from deeprank.metrics import CHUNK_ELEMENTS, pair_scores, squared_distances, squared_norms

KEEP_CHOICES = ("largest", "first", "pixels")  # which image of a group is kept
GROUP_CHOICES = ("star", "chain")
NEIGHBOURS = 32  # faiss HNSW: candidates per image (each re-checked exactly); a group larger than this is cut
CELL_PROBES = 16  # faiss IVF: the cells each image is compared in (its own and the nearest others); see cell_pairs
CELL_CHUNK = 1 << 22  # faiss IVF: distances computed at a time in the cell join (16 MB of float32)
MARGIN = 1e-3     # candidates from float32 products within this (+ float32_slack) of the threshold: re-checked
RECHECK = 65536   # candidate pairs re-checked at a time
HEAD_BYTES = 1 << 16  # byte-identical files: the hash of this many first bytes before the full hash


def close_pairs(vectors, threshold, index=None, chunk_elements=CHUNK_ELEMENTS, probes=CELL_PROBES):
    """(i, j, d) int64, int64, float32 arrays: every pair of rows i < j with squared L2 distance
    d < threshold. Exact: blocks of rows against all rows (never an N x N matrix). With a faiss
    search index (search.index.FaissIndex): an IVF index's cells joined exactly (cell_pairs: vectors
    in memory), or an HNSW index's NEIGHBOURS nearest of each row. One rule decides every path:
    candidates from float32 arithmetic within float32_slack of the threshold are re-checked in
    float64 (rechecked), so a pair near the threshold is decided the same way by each."""
    if index is not None and index.ivf is not None:
        return cell_pairs(vectors, threshold, index, probes)
    found_i, found_j = [], []
    if index is not None:
        limit = threshold + float32_slack(vectors)
        for start in range(0, len(vectors), 4096):
            block = np.array(vectors[start:start + 4096], dtype=np.float32)  # a writable copy of a mapped block
            distances, rows = index.search(block, min(NEIGHBOURS, len(vectors)))
            mine = np.arange(start, start + len(block))[:, None]
            keep = (rows > mine) & (distances < limit)  # i < j: self matches and mirrors left out
            found_i.append(np.broadcast_to(mine, rows.shape)[keep])
            found_j.append(rows[keep])
        refs = vectors
    else:
        refs = torch.from_numpy(np.array(vectors, dtype=np.float32))  # in memory (a .npy may be mapped read-only)
        ref_sq = squared_norms(refs)
        limit = threshold + float32_slack(refs.numpy(), ref_sq)
        step = max(1, chunk_elements // max(1, len(refs)))
        for start in range(0, len(refs), step):
            d = squared_distances(refs[start:start + step], refs, ref_sq)
            rows, cols = torch.nonzero(d < limit, as_tuple=True)
            rows = rows + start
            keep = cols > rows
            found_i.append(rows[keep].numpy())
            found_j.append(cols[keep].numpy())
        refs = refs.numpy()
    return rechecked(refs, _joined(found_i, np.int64), _joined(found_j, np.int64), threshold)


def float32_slack(vectors, sq_norms=None):
    """How far below the true squared distance float32's |a|^2 + |b|^2 - 2ab can come out, at most:
    MARGIN plus 4 x dim x float32's epsilon x the largest squared norm (the rounding of dim-term sums
    of products that size). Candidates are taken up to threshold + this, then re-checked in float64."""
    if len(vectors) == 0:
        return MARGIN
    largest = float(sq_norms.max()) if sq_norms is not None else max(
        float(np.square(np.asarray(vectors[s:s + 65536], dtype=np.float32)).sum(1).max())
        for s in range(0, len(vectors), 65536))
    return MARGIN + 4 * vectors.shape[1] * float(np.finfo(np.float32).eps) * largest


def rechecked(vectors, i, j, threshold):
    """The candidate pairs (i, j) whose float64 squared distance (metrics.pair_scores) is below the
    threshold, as (i, j, d float32): the one rule every join decides by. Blocks of RECHECK pairs: the
    rows of a few million pairs are never copied at once."""
    d = np.concatenate([pair_scores(np.asarray(vectors[i[s:s + RECHECK]], dtype=np.float32),
                                    np.asarray(vectors[j[s:s + RECHECK]], dtype=np.float32))
                        for s in range(0, len(i), RECHECK)] or [np.zeros(0)])
    keep = d < threshold
    return i[keep], j[keep], d[keep].astype(np.float32)


def cell_pairs(vectors, threshold, index, probes=CELL_PROBES, chunk_elements=CELL_CHUNK):
    """close_pairs for a large gallery: a self-join inside the cells of its IVF index (FaissIndex).

    Each row lives in the cell of its nearest centroid and is compared, by one matrix product a
    block, with every row of its `probes` nearest cells. A pair is found when either row probes
    the other's cell, so a pair is missed only when its two rows fall in cells far apart (which
    close rows seldom do); probing every cell is the exact self-join. Candidates within float32_slack
    of the threshold are re-checked in float64 (metrics.pair_scores) and kept when d < threshold.
    Cost: about probes x N^2 / cells products, against N^2 for the exact join."""
    refs = torch.from_numpy(np.require(vectors, np.float32, ["C", "W"]))  # (N, D), in memory
    cells = index.ivf.nlist
    probes = min(int(probes), cells)
    probed = np.concatenate([index.nearest_cells(refs[s:s + 65536].numpy(), probes)
                             for s in range(0, len(refs), 65536)])  # (N, probes), the nearest first
    members, member_start = _grouped(probed[:, 0], cells)       # rows by their own cell
    askers, asker_start = _grouped(probed.ravel(), cells)       # (row, probe) slots by the cell probed
    askers //= probes                                           # ... as rows
    del probed
    ref_sq = squared_norms(refs)
    limit = threshold + float32_slack(refs.numpy(), ref_sq)
    largest = int(np.diff(member_start).max())
    step = max(1, chunk_elements // max(1, largest))
    # buffers reused by every block: a loop of fresh allocations fragments the heap by gigabytes
    member_rows, asker_rows = torch.empty(largest, refs.shape[1]), torch.empty(step, refs.shape[1])
    block = torch.empty(step * largest)
    found_i, found_j = [], []
    for cell in range(cells):
        inside = torch.from_numpy(members[member_start[cell]:member_start[cell + 1]])
        asking = askers[asker_start[cell]:asker_start[cell + 1]]
        if len(inside) == 0 or len(asking) == 0:
            continue
        there = torch.index_select(refs, 0, inside, out=member_rows[:len(inside)])
        there_sq = ref_sq[inside]
        for start in range(0, len(asking), step):
            rows = torch.from_numpy(asking[start:start + step])
            here = torch.index_select(refs, 0, rows, out=asker_rows[:len(rows)])
            d = squared_distances(here, there, there_sq, ref_sq[rows],
                                  out=block[:len(rows) * len(inside)].view(len(rows), len(inside)))
            r, c = torch.nonzero(d < limit, as_tuple=True)
            i, j = rows[r], inside[c]
            keep = i != j
            found_i.append(torch.minimum(i, j)[keep].numpy())
            found_j.append(torch.maximum(i, j)[keep].numpy())
    i, j = _joined(found_i, np.int64), _joined(found_j, np.int64)
    unique = np.unique(i * len(refs) + j)  # a pair found from both of its rows counts once, ordered by (i, j)
    return rechecked(refs.numpy(), unique // len(refs), unique % len(refs), threshold)


def _grouped(keys, count):
    """(rows sorted by key, start of each key's run): rows[start[k]:start[k + 1]] have key k."""
    rows = np.argsort(keys, kind="stable")
    return rows, np.searchsorted(keys[rows], np.arange(count + 1))


def _joined(parts, kind):
    return np.concatenate(parts).astype(kind) if parts else np.zeros(0, kind)


def file_sizes(paths):
    """(sizes, unreadable): each file's size in bytes (-1 where it cannot be read), and
    [(path, reason)] of the files that cannot (gone, no permission, not a file)."""
    sizes, unreadable = np.full(len(paths), -1, dtype=np.int64), []
    for row, path in enumerate(paths):
        try:
            sizes[row] = os.stat(path).st_size
            if not os.access(path, os.R_OK):
                raise PermissionError("permission denied")
        except OSError as err:
            sizes[row] = -1
            unreadable.append((path, err.strerror or str(err)))
    return sizes, unreadable


def identical_files(paths, sizes, head=HEAD_BYTES):
    """((i, j) row pairs, i < j, of byte-identical files, [(path, reason)] of files that could not be
    read): the usual duplicate-file finder's order, each step only where the last one collides:
    sizes (sizes, from file_sizes; -1 left out), then the SHA-256 of the first `head` bytes, then
    the full SHA-256 (files no longer than `head` are done after the first hash)."""
    pairs, unreadable = [], []

    def split(rows, limit):
        """rows grouped by the hash of their first `limit` bytes (None: whole files)."""
        by_hash = defaultdict(list)
        for row in rows:
            try:
                by_hash[sha256_of(paths[row], limit).digest()].append(row)
            except OSError as err:
                unreadable.append((paths[row], err.strerror or str(err)))
        return [same for same in by_hash.values() if len(same) > 1]

    by_size = defaultdict(list)
    for row in np.flatnonzero(sizes >= 0).tolist():
        by_size[int(sizes[row])].append(row)
    for size, rows in by_size.items():
        if len(rows) < 2:
            continue
        for same in split(rows, head):
            for whole in (split(same, None) if size > head else [same]):
                pairs += [(whole[0], other) for other in whole[1:]]
    return sorted(pairs), unreadable


def keep_order(paths, keep, sizes=None):
    """Rows in order of preference to be kept: the largest file (sizes: file_sizes', when read
    already), the first listed, or the most pixels (ties: the earlier row)."""
    if keep not in KEEP_CHOICES:
        raise PipelineError(f"unknown --keep {keep!r}; choose {', '.join(KEEP_CHOICES)}")
    if keep == "first":
        return np.arange(len(paths))
    if keep == "largest":
        sizes = file_sizes(paths)[0] if sizes is None else sizes
    else:
        from PIL import Image

        def pixels(path):
            try:
                with Image.open(path) as picture:  # the header only: no decoding
                    return picture.width * picture.height
            except (OSError, ValueError):
                return -1
        sizes = np.array([pixels(p) for p in paths], dtype=np.int64)
    return np.lexsort((np.arange(len(paths)), -sizes))


def star_groups(count, pairs, order):
    """[(kept row, [(member row, distance to the kept row)])]: in `order`, each image not yet grouped
    takes every ungrouped image it is close to (pairs: (i, j, d) arrays)."""
    near = defaultdict(list)
    for i, j, d in zip(*pairs, strict=True):
        near[int(i)].append((int(j), float(d)))
        near[int(j)].append((int(i), float(d)))
    grouped = np.zeros(count, dtype=bool)
    groups = []
    for keeper in order:
        keeper = int(keeper)
        if grouped[keeper] or keeper not in near:
            continue
        members = sorted(((other, d) for other, d in near[keeper] if not grouped[other]), key=lambda m: (m[1], m[0]))
        if members:
            grouped[keeper] = True
            grouped[[other for other, _ in members]] = True
            groups.append((keeper, members))
    return groups


def chain_groups(count, pairs, order, vectors):
    """[(kept row, [(member row, distance to the kept row)])]: the connected components of the
    'closer than the threshold' graph (a union-find), each kept by its first row in `order`."""
    parent = np.arange(count)

    def root(row):
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for i, j in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    components = defaultdict(list)
    for row in sorted({int(r) for pair in pairs[:2] for r in pair.tolist()}):
        components[root(row)].append(row)
    rank = np.empty(count, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(count)
    groups = []
    for rows in components.values():
        keeper = min(rows, key=lambda row: rank[row])
        members = [row for row in rows if row != keeper]
        d = pair_scores(vectors[members], vectors[[keeper] * len(members)])
        groups.append((keeper, list(zip(members, d.tolist(), strict=True))))
    return sorted(groups, key=lambda group: rank[group[0]])


def weakest_pair(vectors, rows, block=1024):
    """The largest squared distance between two images of a group (how tight it is), `block` rows
    at a time: a mega-group of chained near matches needs no group x group matrix."""
    members = np.asarray(vectors[sorted(rows)], dtype=np.float64)
    norms = (members * members).sum(1)
    largest = 0.0
    for start in range(0, len(members), block):
        part = members[start:start + block]
        d = norms[start:start + block, None] + norms[None, :] - 2 * part @ members.T
        largest = max(largest, float(d.max()))
    return largest


def recall_threshold(copy_d, recall):
    """(threshold, the share of copies it keeps) that keeps `recall` of the synthetic copies (copy_d:
    each one's distance to its original): halfway between the distance of the last copy it keeps
    and the next. It reads nothing of the other gallery images, so the folder's own duplicates
    cannot make it stricter."""
    d = np.sort(np.asarray(copy_d, np.float64))
    keep = min(len(d), max(1, int(np.ceil(recall * len(d) - 1e-9))))
    threshold = (d[keep - 1] + d[keep]) / 2 if keep < len(d) else np.nextafter(d[-1], np.inf)
    if keep < len(d) and d[keep] == d[keep - 1]:  # a threshold cannot split copies at one distance
        threshold = np.nextafter(d[keep - 1], np.inf)
    return float(threshold), float(np.mean(d < threshold))


def pair_precision(copy_d, other_d, threshold):
    """The share of the calibration pairs below threshold that are copy and original (other_d: every
    other pair the copies form, inf where none; the folder's own duplicates count as errors here, so
    in a folder that holds many this is a lower bound)."""
    copies = int((np.asarray(copy_d) < threshold).sum())
    others = int((np.asarray(other_d)[np.isfinite(other_d)] < threshold).sum())
    return copies / max(copies + others, 1), copies, others


def copy_threshold(copy_d, other_d, precision):
    """(threshold, recall, precision at it) from calibration pairs: copy_d, each synthetic copy's
    distance to its original; other_d, the distances of the other pairs (each copy with the gallery
    images near it that are not its original). The threshold keeps the most copies (d < threshold)
    while at least `precision` of all the pairs below it are copies; it lies
    halfway between the last pair it keeps and the next. None when no threshold reaches `precision`."""
    d = np.concatenate([np.asarray(copy_d, np.float64), np.asarray(other_d, np.float64)])
    is_copy = np.concatenate([np.ones(len(copy_d), bool), np.zeros(len(other_d), bool)])
    order = np.argsort(d, kind="stable")
    d, is_copy = d[order], is_copy[order]
    hits = np.cumsum(is_copy)
    share = hits / np.arange(1, len(d) + 1)
    run_end = np.append(d[1:] != d[:-1], True)  # a threshold cannot split pairs at one distance
    ok = np.flatnonzero(run_end & (share >= precision))
    if len(ok) == 0 or hits[ok].max() == 0:
        return None
    last = ok[np.argmax(hits[ok])]  # the most copies kept; of equals, the lowest threshold
    threshold = (d[last] + d[last + 1]) / 2 if last + 1 < len(d) else np.nextafter(d[last], np.inf)
    return float(threshold), float(hits[last] / len(copy_d)), float(share[last])
