"""Nearest neighbours of query vectors in a gallery of embeddings, by squared L2 distance: exact
(numpy, chunked over queries, ties broken by gallery row; no torch, so the search page can run
without it) or a faiss index saved beside the gallery (faiss-cpu: requirements-faiss.txt).

The faiss index is `<gallery>.faiss`, with `<gallery>.faiss.json` beside it recording the
gallery files' sizes and modification times when it was built: a gallery that changed since
is indexed again; rows appended by image_search.py --add are added to the index in place.
Which faiss index depends on the gallery's size: HNSW (a graph; no training) below IVF_MIN_ROWS
rows, IVF-SQ8 (k-means cells, `nprobe` of them searched, vectors stored in 8 bits: a quarter of
the memory and of the bytes scanned) from there. Either way the candidates are re-ranked by
their exact distances to the gallery's vectors (a .npy gallery's stay on disk: the index is
built from it block by block, and each candidate's row is read on its own).

    index = open_index("gallery.npy", gallery.vectors, kind="auto")   # ExactIndex or FaissIndex
    distances, rows = index.search(queries, k=10)                      # (Q, k) each; rows -1: none
"""

import json
import os
from pathlib import Path

import numpy as np

from deeprank.common import PipelineError, atomic_write
from deeprank.embedding_io import check_finite, read_npy_header

INDEX_KINDS = ("auto", "exact", "faiss")
AUTO_EXACT_ROWS = 200_000  # --index auto: exact search below this many gallery rows, faiss from there
IVF_MIN_ROWS = 100_000     # faiss: HNSW below this many rows (too few to train IVF cells well), IVF-SQ8 from it
NPROBE = 8                 # IVF cells searched per query (--nprobe): more is slower and finds more true neighbours
CELLS_PER_SQRT = 2         # IVF cells: this many times sqrt(rows)
TRAIN_PER_CELL = 64        # k-means training rows per IVF cell (a random sample)
KMEANS_ITERATIONS = 10
HNSW_M = 32                # HNSW graph degree
HNSW_EF_SEARCH = 128       # HNSW candidate list while searching (at least k)
RERANK = 4                 # IVF: k * RERANK candidates (8-bit codes) re-ranked by their exact distances
ADD_ROWS = 65_536          # rows handed to faiss at a time while building
EXACT_CHUNK = 1 << 24      # exact search: at most this many query-to-gallery distances at once
EXACT_SLACK = 64           # exact search: candidates within this many float32 epsilons (of the distances' scale)
                           # of the k-th are re-ranked by exact distance


def ivf_cells(rows):
    """IVF cells for a gallery: CELLS_PER_SQRT * sqrt(rows), at least 1."""
    return max(1, int(round(CELLS_PER_SQRT * np.sqrt(rows))))


def faiss_available():
    """Whether faiss-cpu can be imported."""
    try:
        faiss_module()
    except PipelineError:
        return False
    return True


def faiss_module():
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise PipelineError("--index faiss needs faiss-cpu: pip install -r requirements-faiss.txt "
                            "(or use --index exact)") from None
    return faiss


class ExactIndex:
    """Brute-force search over the vectors in memory: each query's distances to every row (as
    |g|^2 - 2 q.g, a matrix product); the rows up to its k-th smallest (and its near-ties) are
    re-ranked by exact distance, ties by row."""

    kind = "exact"

    def __init__(self, vectors):
        self.vectors = vectors
        self._squared = None  # each row's squared norm, on the first search

    def __len__(self):
        return len(self.vectors)

    def search(self, queries, k, exclude=None):
        """(distances, rows), (Q, min(k, usable rows)); exclude[i]: a row query i must not get, or -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        exclude = None if exclude is None else np.asarray(exclude)
        k = min(k, len(self) - int(exclude is not None and (exclude >= 0).any()))
        if k < 1:
            raise PipelineError("the gallery has no row left to return; add images to it")
        if self._squared is None:
            self._squared = np.einsum("ij,ij->i", self.vectors, self.vectors)
        step = max(1, EXACT_CHUNK // len(self))
        blocks = [self._candidates(queries[s:s + step], k, None if exclude is None else exclude[s:s + step])
                  for s in range(0, len(queries), step)]
        width = max((b.shape[1] for b in blocks), default=k)
        rows = np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=-1) for b in blocks]) \
            if blocks else np.zeros((0, k), dtype=np.int64)
        distances, rows = _rerank(queries, rows, self.vectors)
        return distances[:, :k], rows[:, :k]

    def _candidates(self, queries, k, exclude):
        """Each query's rows whose distance by the matrix product is within float32 rounding of its
        k-th smallest (ties and near-ties all kept, -1 padded), for the exact re-ranking."""
        d = self._squared[None, :] - 2 * (queries @ self.vectors.T)
        if exclude is not None:
            valid = np.flatnonzero(exclude >= 0)
            d[valid, exclude[valid]] = np.inf
        kth = np.partition(d, k - 1, axis=1)[:, k - 1]
        scale = (queries * queries).sum(1) + self._squared.max()
        mask = d <= (kth + EXACT_SLACK * np.finfo(np.float32).eps * scale)[:, None]
        counts = mask.sum(1)
        hit, column = np.nonzero(mask)  # in row order within each query
        rows = np.full((len(queries), int(counts.max(initial=k))), -1, dtype=np.int64)
        rows[hit, np.arange(len(hit)) - np.repeat(np.cumsum(counts) - counts, counts)] = column
        return rows


class FaissIndex:
    """A faiss index over the gallery rows (ids are row numbers), its candidates re-ranked by
    exact distance to the gallery's own vectors: distances are exact squared L2, ties broken by
    row as in exact search; only which rows are candidates is approximate."""

    kind = "faiss"

    def __init__(self, index, vectors, nprobe=NPROBE):
        self.index, self.vectors = index, vectors
        self.ivf = index if isinstance(index, faiss_module().IndexIVF) else None
        if self.ivf is not None:
            self.ivf.nprobe = min(int(nprobe), self.ivf.nlist)

    def __len__(self):
        return self.index.ntotal

    def nearest_cells(self, vectors, count):
        """An IVF index's `count` cells nearest to each vector (its coarse quantizer): (N, count) int64,
        the nearest first."""
        return self.ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), count)[1]

    @property
    def description(self):
        if self.ivf is not None:
            return (f"faiss IVF-SQ8, {self.ivf.nlist} cells, nprobe {self.ivf.nprobe}, "
                    f"{RERANK}k candidates re-ranked exactly")
        return f"faiss HNSW-Flat, M={HNSW_M}, efSearch {max(HNSW_EF_SEARCH, self.index.hnsw.efSearch)}"

    def search(self, queries, k, exclude=None):
        """As ExactIndex.search. Rows the index could not fill are -1 (distance inf)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        extra = int(exclude is not None and (np.asarray(exclude) >= 0).any())
        k = min(k, len(self) - extra)
        want = min(len(self), (k + extra) * (RERANK if self.ivf is not None else 1))
        if self.ivf is None:
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, want)
        _, rows = self.index.search(queries, want)
        if extra:
            rows[rows == np.asarray(exclude)[:, None]] = -1
        distances, rows = _rerank(queries, rows, self.vectors)
        return distances[:, :k], rows[:, :k]


def _rerank(queries, rows, vectors, chunk=256):
    """Candidates (Q, C) (-1: none) ordered by exact squared L2 distance, then row."""
    out = np.full(rows.shape, np.inf, dtype=np.float32)
    for s in range(0, len(rows), chunk):
        block = rows[s:s + chunk]
        valid = block >= 0
        found = np.zeros(block.shape + (vectors.shape[1],), dtype=np.float32)
        wanted = np.unique(block[valid])
        lookup = np.searchsorted(wanted, block[valid])
        found[valid] = vectors[wanted][lookup]  # each gallery row read once per chunk
        out[s:s + chunk][valid] = ((found - queries[s:s + chunk, None, :]) ** 2).sum(-1)[valid]
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), out), axis=-1)
    rows = np.take_along_axis(rows, order, 1)
    out = np.take_along_axis(out, order, 1)
    rows[~np.isfinite(out)] = -1
    return out, rows


# ----------------------------------------------------------------------------- building and saving

def choose_kind(kind, rows):
    """--index auto|exact|faiss for a gallery of this many rows: 'exact' or 'faiss'."""
    if kind not in INDEX_KINDS:
        raise PipelineError(f"unknown --index {kind!r}; choose {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        return "exact" if rows < AUTO_EXACT_ROWS else "faiss"
    return kind


def new_faiss_index(dim, rows, structure=None):
    """An empty faiss index for a gallery of this many rows (IVF still to be trained).
    structure: 'hnsw' or 'ivf'; default by size (HNSW below IVF_MIN_ROWS rows)."""
    faiss = faiss_module()
    if (structure or ("hnsw" if rows < IVF_MIN_ROWS else "ivf")) == "hnsw":
        return faiss.IndexHNSWFlat(dim, HNSW_M)
    return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, ivf_cells(rows), faiss.ScalarQuantizer.QT_8bit,
                                         faiss.METRIC_L2)


def build_faiss(blocks, rows, dim, sample, seed=0, structure=None):
    """A faiss index of `rows` vectors given as blocks (float32 arrays, in row order).

    sample(count, seed) returns `count` rows drawn at random to train IVF cells (k-means on
    TRAIN_PER_CELL rows per cell); HNSW needs no training. structure: as new_faiss_index.
    """
    index = new_faiss_index(dim, rows, structure)
    if isinstance(index, faiss_module().IndexIVF):
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.max_points_per_centroid = TRAIN_PER_CELL
        index.train(np.ascontiguousarray(sample(min(rows, TRAIN_PER_CELL * index.nlist), seed), dtype=np.float32))
    added = 0
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if not np.isfinite(block).all():
            raise PipelineError(f"the gallery has a non-finite value near row {added + 1}; rerun gen_embeddings.py")
        index.add(block)
        added += len(block)
    return index


def gallery_files(gallery):
    """The files whose change makes a gallery's index stale: the file, and a .npy's .paths.tsv."""
    gallery = Path(gallery)
    files = [gallery]
    if gallery.suffix.lower() == ".npy":
        files.append(gallery.with_name(gallery.stem + ".paths.tsv"))
    return files


def index_paths(gallery):
    """(<gallery>.faiss, <gallery>.faiss.json)."""
    gallery = Path(gallery)
    return gallery.with_name(gallery.name + ".faiss"), gallery.with_name(gallery.name + ".faiss.json")


def gallery_stamp(gallery, rows):
    """What the side file records: each gallery file's size and modification time, and the rows."""
    stats = [os.stat(f) for f in gallery_files(gallery)]
    files = zip(gallery_files(gallery), stats, strict=True)
    return {"files": [[Path(f).name, s.st_size, s.st_mtime_ns] for f, s in files], "rows": int(rows)}


def save_faiss(index, gallery, rows):
    """Write <gallery>.faiss and its side file atomically (the index first: a side file never
    vouches for an index that is not there)."""
    faiss = faiss_module()
    index_file, side_file = index_paths(gallery)
    with atomic_write(index_file, mode="wb") as handle:  # streamed: never a second copy in memory
        writer = faiss.PyCallbackIOWriter(handle.write)
        faiss.write_index(index, writer)
        del writer  # flushes
    with atomic_write(side_file) as handle:
        json.dump(gallery_stamp(gallery, rows), handle)
        handle.write("\n")


def load_fresh_faiss(gallery, rows):
    """The saved index when its side file matches the gallery as it is now, else None."""
    index_file, side_file = index_paths(gallery)
    try:
        with open(side_file, encoding="utf-8") as handle:
            stamp = json.load(handle)
    except (OSError, ValueError):
        return None
    if stamp != json.loads(json.dumps(gallery_stamp(gallery, rows))) or not index_file.is_file():
        return None
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError:
        return None
    return index if index.ntotal == rows else None


def row_blocks(vectors, gallery=None, rows=ADD_ROWS):
    """Row blocks of the gallery's vectors, one at a time. A .npy gallery is read from its file
    block by block (a memory map would keep every page it read resident)."""
    if not is_npy(gallery):
        for start in range(0, len(vectors), rows):
            yield np.asarray(vectors[start:start + rows])
        return
    source = NpyRows(gallery)
    with open(gallery, "rb") as handle:
        handle.seek(source.offset)
        for start in range(0, len(source), rows):
            count = min(rows, len(source) - start)
            yield np.fromfile(handle, dtype=source.dtype, count=count * source.shape[1]).reshape(count, -1)


def read_rows(vectors, gallery=None):
    """The gallery's vectors as one float32 array in memory, filled block by block (row_blocks): a
    copy of a memory map would leave the map's pages resident beside it."""
    out = np.empty(vectors.shape, dtype=np.float32)
    start = 0
    for block in row_blocks(vectors, gallery):
        out[start:start + len(block)] = block
        start += len(block)
    return out


def is_npy(gallery):
    return gallery is not None and Path(gallery).suffix.lower() == ".npy"


def row_source(vectors, gallery):
    """What to read single gallery rows from: the .npy file row by row, or the array in memory."""
    return NpyRows(gallery) if is_npy(gallery) else vectors


class NpyRows:
    """Rows of a .npy gallery read on demand with one pread each. A memory map would do, but the
    kernel maps the pages around each row read too, and a million scattered reads end up holding
    the whole file resident."""

    def __init__(self, path):
        with open(path, "rb") as handle:
            self.shape, self.dtype = read_npy_header(handle)
            self.offset = handle.tell()
        self.path, self.row_bytes = str(path), self.shape[1] * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.atleast_1d(np.asarray(rows))
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows.tolist()):
                out[i] = np.frombuffer(os.pread(fd, self.row_bytes, self.offset + row * self.row_bytes), self.dtype)
        finally:
            os.close(fd)
        return out


def random_rows(vectors, count, seed):
    """count distinct rows drawn at random, in row order."""
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size=count, replace=False))]


def open_index(gallery, vectors, kind="auto", nprobe=NPROBE, log=print):
    """The index to search gallery (its path) with: exact, or faiss (loaded when fresh, built and
    saved beside the gallery otherwise). vectors: the gallery's (N, D) rows (may be memory-mapped)."""
    if choose_kind(kind, len(vectors)) == "exact":
        return ExactIndex(vectors)
    index = load_fresh_faiss(gallery, len(vectors))
    if index is None:
        log(f"indexing {len(vectors)} gallery rows with faiss (saved to {index_paths(gallery)[0]})")
        sample = lambda count, seed: random_rows(row_source(vectors, gallery), count, seed)  # noqa: E731 - a one-line helper, named for the lines below
        index = build_faiss(row_blocks(vectors, gallery), len(vectors), vectors.shape[1], sample)
        save_faiss(index, gallery, len(vectors))
    return FaissIndex(index, row_source(vectors, gallery), nprobe)


def gallery_index(gallery, gallery_path, kind="auto", nprobe=NPROBE, log=print):
    """The index of a read gallery (embedding_io.Embeddings, perhaps memory-mapped): exact search on
    its vectors read into memory and checked finite, or faiss (open_index)."""
    if choose_kind(kind, len(gallery)) == "exact":
        if isinstance(gallery.vectors, np.memmap):
            gallery.vectors = read_rows(gallery.vectors, gallery_path)
        check_finite(gallery, gallery_path)
        return ExactIndex(gallery.vectors)
    return open_index(gallery_path, gallery.vectors, "faiss", nprobe, log)


def extend_faiss(index, gallery, new_vectors):
    """Add rows just appended to gallery to its index (loaded by load_fresh_faiss before the
    gallery changed) and save both, so the index stays fresh without a rebuild."""
    index.add(np.ascontiguousarray(new_vectors, dtype=np.float32))
    save_faiss(index, gallery, index.ntotal)
