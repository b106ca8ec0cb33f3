"""The embedding file format: header, writer (.txt or .npy) and readers.

Text (`*_embedding.txt`): a header line
`# deep-ranking embeddings v1 dim=<D> normalized=<0|1> model=<checkpoint>`, then one line per
image, `<path>\t<label>\t<v1> ... <vD>` (7 significant digits), paths relative to the file.
`.npy`: a float32 (N, D) array, with `<stem>.paths.tsv` beside it (the same header, then
`<path>\t<label>` lines). Readers check the header, every line and every value, and name the
stage to rerun. Large text files are parsed by the compiled parser of fastparse.py (private to
this module) or, failing that, by numpy's C parser on every core.

    with EmbeddingWriter("train_embedding.txt", dim=512, normalized=True, model="m.model") as out:
        out.write(paths, labels, vectors)
    embeddings = read_embeddings("train_embedding.txt")   # .paths, .labels, .vectors (N, D)
"""

import itertools
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from deeprank import fastparse
from deeprank.common import PipelineError, RelativeTo, atomic_write, resolve_in

EMBEDDING_MAGIC = "# deep-ranking embeddings v1"
OLD_SOURCE_SUFFIX = re.compile(r" (layer|tta)=(\w+)$")


class Embeddings:
    """An embedding file in memory: paths (absolute), labels, vectors (N, D) float32."""

    def __init__(self, paths, labels, vectors, header):
        self.paths = paths
        self.labels = labels
        self.vectors = vectors
        self.header = header  # dict: dim, normalized, model
        self._index = None

    def __len__(self):
        return len(self.paths)

    def _rows(self):
        """{path: row}, built once."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths)}
        return self._index

    def index_of(self, path):
        """Row of an image path, or -1."""
        return self._rows().get(path, -1)

    def rows_of(self, paths):
        """int64 rows of many image paths (-1: not here), one look-up per path given."""
        rows = self._rows()
        return np.fromiter((rows.get(p, -1) for p in paths), dtype=np.int64, count=len(paths))


def embedding_header(dim, normalized, model, source=None):
    """The first line of an embedding text file. source: more key=value fields (values without
    spaces) describing how the vectors were made, written before model=."""
    model = str(model).replace("\n", " ")
    extra = "".join(f" {key}={str(value).replace(' ', '_')}" for key, value in (source or {}).items())
    return f"{EMBEDDING_MAGIC} dim={int(dim)} normalized={int(bool(normalized))}{extra} model={model}\n"


def parse_embedding_header(line, path):
    """Parse and check the header line; returns dict(dim, normalized, model)."""
    rerun = "rerun gen_embeddings.py to write it"
    if not line.strip():
        raise PipelineError(f"{path} is empty (no header line); {rerun}")
    if not line.startswith(EMBEDDING_MAGIC + " "):
        raise PipelineError(f"{path} line 1 is not a deep-ranking embeddings v1 header; {rerun}")
    fields = {}
    rest = line[len(EMBEDDING_MAGIC) + 1:].rstrip("\r\n")
    model_at = rest.find("model=")
    if model_at >= 0:
        model = rest[model_at + len("model="):]
        while OLD_SOURCE_SUFFIX.search(model):  # files before the source fields: "model=<path> tta=flip"
            tail = OLD_SOURCE_SUFFIX.search(model)
            fields[tail.group(1)] = tail.group(2)
            model = model[:tail.start()]
        fields["model"] = model
        rest = rest[:model_at]
    for token in rest.split():
        key, _, value = token.partition("=")
        fields[key] = value
    try:
        dim = int(fields["dim"])
        normalized = int(fields.get("normalized", "0"))
    except (KeyError, ValueError):
        raise PipelineError(f"{path} line 1 lacks a valid dim=<D>; {rerun}") from None
    if dim < 1:
        raise PipelineError(f"{path} line 1 has dim={dim}; {rerun}")
    return {**fields, "dim": dim, "normalized": bool(normalized), "model": fields.get("model", "")}


def check_names(paths, labels):
    """Refuse a path or label that the format cannot hold (a tab or a line break in it), before
    anything is embedded."""
    for path, label in zip(paths, labels, strict=True):
        for kind, text in (("image path", path), ("label", label)):
            if "\t" in text or "\n" in text or "\r" in text:
                raise PipelineError(f"the {kind} {text!r} holds a tab or a line break, which an embedding file "
                                    f"cannot hold; rename it")


def read_npy_header(handle):
    """(shape, dtype) of the .npy file open in binary handle, leaving it at the first data byte."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(handle)
    return shape, dtype


def paths_file_of(npy_path):
    """The text file that holds the paths and labels of a .npy embedding file."""
    npy_path = Path(npy_path)
    return npy_path.with_name(npy_path.stem + ".paths.tsv")


class EmbeddingWriter:
    """Stream embeddings to disk atomically; the format follows the file's extension.

    .txt (default): header, then path<TAB>label<TAB>vector lines (7 significant digits).
    .npy: a float32 (N, D) array, with paths and labels in <stem>.paths.tsv beside it
    (same header line, then path<TAB>label lines): smaller and much faster to load.
    """

    def __init__(self, path, dim, normalized, model, source=None):
        self.path = Path(path)
        self.dim = int(dim)
        self.binary = self.path.suffix.lower() == ".npy"
        self._relative = RelativeTo(self.path)
        # a checkpoint path is written relative to this file, like every other path in it
        model = self._relative(model) if model and os.path.isabs(str(model)) else model
        self._header = embedding_header(dim, normalized, model, source)
        self._text = atomic_write(paths_file_of(self.path) if self.binary else self.path)
        self._row = " ".join(["%.7g"] * self.dim)  # 7 significant digits: < 1e-6 error on unit vectors
        self.count = 0

    @classmethod
    def like(cls, path, header):
        """A writer of path whose header says what a read file's header says (dim, normalization,
        checkpoint and how the vectors were made): a gallery rewritten or grown."""
        source = {key: value for key, value in header.items() if key not in ("dim", "normalized", "model")}
        return cls(path, header["dim"], header["normalized"], header["model"], source)

    def __enter__(self):
        self._handle = self._text.__enter__()
        self._handle.write(self._header)
        if self.binary:  # rows stream to an anonymous file: it vanishes on close, even after a crash
            self._raw = tempfile.TemporaryFile(dir=self.path.resolve().parent)
        return self

    def __exit__(self, *exc):
        try:
            if self.binary:
                with self._raw:
                    if exc[0] is None:
                        self._finish_npy()
        except BaseException:
            self._text.__exit__(*sys.exc_info())
            raise
        return self._text.__exit__(*exc)

    def _finish_npy(self):
        """Write the .npy file (header, then the streamed rows) atomically."""
        self._raw.seek(0)
        with atomic_write(self.path, mode="wb") as out:
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.count, self.dim)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(self._raw, out, 1 << 24)

    def copy_rows(self, existing, rows):
        """Copy the rows of an existing embedding file of this format and dim (byte for byte,
        after its header) before the rows written next: how a gallery grows."""
        existing = Path(existing)
        names = paths_file_of(existing) if self.binary else existing
        with open(names, encoding="utf-8", newline="\n") as handle:
            handle.readline()
            shutil.copyfileobj(handle, self._handle, 1 << 24)  # every row our writer wrote ends in a newline
        if self.binary:
            with open(existing, "rb") as handle:
                read_npy_header(handle)
                shutil.copyfileobj(handle, self._raw, 1 << 24)
        self.count += int(rows)

    def write(self, paths, labels, vectors):
        """Append rows; vectors (B, D) float array, one row per path."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(paths):
            raise ValueError(f"expected ({len(paths)}, {self.dim}) vectors, got {vectors.shape}")
        names = [f"{self._relative(p)}\t{label}" for p, label in zip(paths, labels, strict=True)]
        if self.binary:
            self._raw.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            self._handle.write("".join(f"{name}\n" for name in names))
        else:
            row = self._row
            lines = zip(names, vectors.tolist(), strict=True)
            self._handle.write("".join(f"{name}\t{row % tuple(v)}\n" for name, v in lines))
        self.count += len(names)


PARALLEL_PARSE_BYTES = 1 << 27  # text embedding files with more than this per process are parsed in parallel
FAST_PARSE_BYTES = 1 << 28  # text embedding files this large use the compiled parser (fastparse): loading it takes ~1 s


def read_embeddings(path, chunk_bytes=1 << 25, workers=None, fast=None, mmap=False):
    """Read an embedding file (.txt or .npy + .paths.tsv), checking header, labels and dimensions.

    A text file of FAST_PARSE_BYTES or more (or any size with fast=True) is parsed by the
    compiled parser on every core when numba is installed (fast=False: never). Otherwise, or
    when that parser meets a line it does not handle, numpy's C parser reads it: a large file
    in `workers` processes (default: one per CPU core, at least PARALLEL_PARSE_BYTES each),
    each taking a contiguous range of whole lines; bad lines are named by number.
    """
    path = Path(path).expanduser()
    rerun = "rerun gen_embeddings.py"
    if not path.is_file():
        raise PipelineError(f"embedding file {path} does not exist; {rerun} first")
    if path.suffix.lower() == ".npy":
        return _read_npy_embeddings(path, mmap)
    with open(path, "rb") as handle:
        first = handle.readline()
        begin, end = handle.tell(), os.fstat(handle.fileno()).st_size
    header = parse_embedding_header(first.decode("utf-8", "replace"), path)
    if workers is None:
        workers = min(os.cpu_count() or 1, max(1, (end - begin) // PARALLEL_PARSE_BYTES))
    if fast is None:
        fast = end - begin >= FAST_PARSE_BYTES
    parts = None
    if fast and fastparse.available():
        parts = _parse_compiled(path, begin, end, header["dim"], chunk_bytes)
    if parts is None and workers > 1:
        parts = _parse_parallel(path, _line_ranges(path, begin, end, workers), header["dim"], chunk_bytes)
    if parts is None:  # serial, or a worker met a bad line: this pass names it with its line number
        parts = [_parse_range(path, begin, end, header["dim"], chunk_bytes, first_line=2)]
    paths = [p for part in parts for p in part[0]]
    labels = [x for part in parts for x in part[1]]
    blocks = [part[2] for part in parts if len(part[2])]
    if len(blocks) == 1:
        vectors = blocks[0]
    else:
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, header["dim"]), np.float32)
    folder = str(path.resolve().parent)
    return _checked(Embeddings([resolve_in(p, folder) for p in paths], labels, vectors, header), path, not mmap)


def _parse_compiled(path, begin, end, dim, chunk_bytes):
    """[(paths, labels, vectors)] of bytes [begin, end) by fastparse, a block of whole lines at
    a time (read into one reused buffer); None if a line is not handled there."""
    paths, labels, buf, held = [], [], bytearray(chunk_bytes), 0  # buf[:held]: a line not yet parsed
    rows = _GrowingRows(dim, end - begin)
    with open(path, "rb") as handle:
        handle.seek(begin)
        left = end - begin
        while left > 0:
            if held == len(buf):  # a line longer than the buffer
                buf.extend(bytearray(len(buf)))
            with memoryview(buf) as view:
                got = handle.readinto(view[held:held + min(len(buf) - held, left)])
            left = left - got if got else 0
            size = held + got
            cut = buf.rfind(b"\n", 0, size) + 1 if left > 0 else size  # a line may run past the block
            if left <= 0 and size and buf[size - 1] != 10:  # the last line has no newline
                if size == len(buf):
                    buf.append(10)
                else:
                    buf[size] = 10
                cut = size = size + 1
            if cut:
                part = fastparse.parse_block(buf, cut, dim, lambda n, cut=cut: rows.take(n, cut))
                if part is None:
                    return None
                paths += part[0]
                labels += part[1]
            buf[:size - cut] = buf[cut:size]
            held = size - cut
    return [(paths, labels, rows.filled())]


class _GrowingRows:
    """A float32 (rows, dim) array filled a block at a time, sized from the bytes per row seen so
    far (grown by copying if that falls short), so no block list is concatenated at the end."""

    def __init__(self, dim, total_bytes):
        self.array, self.count, self.seen, self.total = np.empty((0, dim), np.float32), 0, 0, total_bytes

    def take(self, n, block_bytes):
        """The next n rows to fill, for a block of block_bytes bytes."""
        self.seen += block_bytes
        if self.count + n > len(self.array):
            expected = int((self.count + n) * self.total / max(self.seen, 1) * 1.02) + 1
            grown = np.empty((max(self.count + n, expected), self.array.shape[1]), np.float32)
            grown[:self.count] = self.array[:self.count]
            self.array = grown
        self.count += n
        return self.array[self.count - n:self.count]

    def filled(self):
        return self.array[:self.count]


def _line_ranges(path, begin, end, pieces):
    """Split bytes [begin, end) of a file into up to `pieces` ranges that start at line starts."""
    cuts = [begin]
    with open(path, "rb") as handle:
        for i in range(1, pieces):
            handle.seek(max(cuts[-1], begin + (end - begin) * i // pieces))
            handle.readline()  # to the start of the next line
            cuts.append(min(handle.tell(), end))
    cuts.append(end)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _parse_parallel(path, ranges, dim, chunk_bytes):
    """[(paths, labels, vectors)] of each range: the first parsed here, the rest in worker
    processes at the same time. None if any range has a bad line (the caller re-reads serially)."""
    import concurrent.futures
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with concurrent.futures.ProcessPoolExecutor(len(ranges) - 1, mp_context=context) as pool:
        futures = [pool.submit(_parse_range, path, a, b, dim, chunk_bytes) for a, b in ranges[1:]]
        try:
            parts = [_parse_range(path, *ranges[0], dim, chunk_bytes)]
            parts += [future.result() for future in futures]
        except PipelineError:
            for future in futures:
                future.cancel()
            return None
    return parts


def _parse_range(path, begin, end, dim, chunk_bytes, first_line=None):
    """(paths, labels, float32 (N, dim) vectors) of the lines in bytes [begin, end) of a text
    embedding file. Error messages give line numbers when first_line (begin's line) is known."""
    paths, labels, blocks = [], [], []
    number = (first_line or 1) - 1
    with open(path, "rb") as handle:
        handle.seek(begin)
        left = end - begin
        while left > 0:
            lines = handle.readlines(min(chunk_bytes, left))  # whole lines; may run one line past `end`
            if not lines:
                break
            taken = 0
            for count, line in enumerate(lines):
                if taken >= left:
                    lines = lines[:count]
                    break
                taken += len(line)
            left -= taken
            texts = []
            for line in lines:
                number += 1
                where = number if first_line else None
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise PipelineError(f"{path} line {where} is not UTF-8 text; rerun gen_embeddings.py") from None
                parts = _split_row(line.rstrip("\r\n"), 3, path, where)
                paths.append(parts[0])
                labels.append(parts[1])
                texts.append(parts[2])
            blocks.append(_parse_vectors(texts, dim, path, number - len(lines) + 1 if first_line else None))
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    return paths, labels, vectors


def _split_row(line, fields, path, number):
    """Split a path<TAB>label[<TAB>vector] line, refusing a wrong shape or an empty label."""
    parts = line.split("\t")
    if len(parts) != fields or not parts[0]:
        layout = "path<TAB>label<TAB>vector" if fields == 3 else "path<TAB>label"
        raise PipelineError(f"{path} line {number} is not {layout}; rerun gen_embeddings.py")
    if not parts[1]:
        raise PipelineError(f"{path} line {number} has no label; rerun gen_embeddings.py")
    return parts


def read_header(path):
    """The header fields of an embedding file (.txt, or a .npy's .paths.tsv), without its rows."""
    path = Path(path).expanduser()
    names = paths_file_of(path) if path.suffix.lower() == ".npy" else path
    if not names.is_file():
        raise PipelineError(f"embedding file {names} does not exist; rerun gen_embeddings.py first")
    with open(names, encoding="utf-8", errors="replace", newline="\n") as handle:
        return parse_embedding_header(handle.readline(), names)


def _read_npy_embeddings(path, mmap=False):
    """A .npy embedding file and its .paths.tsv; mmap: the vectors stay on disk, memory-mapped
    (read-only, and not checked for non-finite values here: the reader checks what it reads)."""
    rerun = "rerun gen_embeddings.py"
    names = paths_file_of(path)
    if not names.is_file():
        raise PipelineError(f"{names} (the paths and labels of {path}) does not exist; {rerun}")
    with open(names, encoding="utf-8", newline="\n") as handle:
        header = parse_embedding_header(handle.readline(), names)
        rows = handle.read().splitlines()
    paths, labels = [], []
    for number, line in enumerate(rows, start=2):
        parts = _split_row(line, 2, names, number)
        paths.append(parts[0])
        labels.append(parts[1])
    try:
        vectors = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as err:
        raise PipelineError(f"{path} is not a readable .npy file ({err}); {rerun}") from None
    if vectors.dtype != np.float32 or vectors.shape != (len(paths), header["dim"]):
        raise PipelineError(f"{path} holds a {vectors.dtype} array of shape {vectors.shape}, but {names} lists "
                            f"{len(paths)} images of dim={header['dim']}; {rerun}")
    folder = str(path.resolve().parent)
    return _checked(Embeddings([resolve_in(p, folder) for p in paths], labels, vectors, header), path, not mmap)


def _row_blocks(array, rows=4096):
    """Row slices of an array (views), so a whole-array temporary is never made."""
    return [array[s:s + rows] for s in range(0, len(array), rows)] or [array]


def _checked(embeddings, path, finite=True):
    """Refuse non-finite values (unless finite=False), naming the first bad row, and a path listed
    twice (it would count twice in every metric), naming both lines."""
    if finite:
        check_finite(embeddings, path)
    index = {}
    for row, image in enumerate(embeddings.paths):
        first = index.setdefault(image, row)
        if first != row:  # lines count from the header (line 1)
            raise PipelineError(f"{path} lists {image} twice (lines {first + 2} and {row + 2}); "
                                f"rerun gen_embeddings.py")
    embeddings._index = index
    return embeddings


def check_finite(embeddings, path):
    """Refuse a non-finite value, naming the image whose vector holds it."""
    finite = np.concatenate([np.isfinite(block).all(axis=1) for block in _row_blocks(embeddings.vectors)])
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise PipelineError(f"{path}: the vector of {embeddings.paths[row]} has a non-finite value; "
                            f"rerun gen_embeddings.py")


def _parse_vectors(texts, dim, path, first_line):
    """Parse vector texts into (len(texts), dim) float32, naming the first bad line."""
    for delimiter in (" ", None):  # single spaces as written (fast), then any whitespace (hand-edited files)
        try:
            values = np.loadtxt(texts, dtype=np.float32, delimiter=delimiter, ndmin=2, comments=None)  # C parser
            if values.shape == (len(texts), dim):
                return values
        except ValueError:
            pass
    for offset, text in enumerate(texts):
        tokens = text.split()
        where = first_line + offset if first_line else None
        if len(tokens) != dim:
            raise PipelineError(f"{path} line {where} has {len(tokens)} values, the header says "
                                f"dim={dim}; rerun gen_embeddings.py")
        try:
            np.array(tokens, dtype=np.float32)
        except ValueError:
            raise PipelineError(f"{path} line {where} has a value that is not a number; "
                                f"rerun gen_embeddings.py") from None
    raise AssertionError("unreachable: a block failed but no line did")
