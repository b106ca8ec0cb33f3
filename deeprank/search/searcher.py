"""A gallery to search by image: the checkpoint, its embedding file, and an index over it
(image_search.py searches from the shell, search_web.py from a web page).

Queries are embedded exactly as gen_embeddings.py embedded the gallery: the header of the
gallery file says which checkpoint (its SHA-256), which layer, which test-time augmentation,
which precision and where images were resized (--preprocess); a gallery that another
checkpoint wrote is refused unless force=True. The model is a checkpoint or its export (.onnx,
run by onnxruntime; an export counts as its source checkpoint, and a process given one never
imports torch).

    searcher = Searcher("deepranknet.model", "train_embedding.txt")
    vectors, paths = searcher.embed(["query.jpg"])
    [results] = searcher.search(vectors, k=10)   # [{"rank", "distance", "label", "path", "row"}, ...]
"""

import os
import sys
import threading

import numpy as np

from deeprank.class_names import ClassNames
from deeprank.common import TTA_CHOICES, PipelineError, resolve_in
from deeprank.embedders import open_embedder
from deeprank.embedding_io import read_embeddings, read_header
from deeprank.images import BadImages
from deeprank.search.index import NPROBE, gallery_index

# gen_embeddings.py's defaults, for headers written before these fields
DEFAULT_SOURCE = {"layer": "embedding", "tta": "none", "amp": "bf16", "preprocess": "cpu"}


def gallery_source(header):
    """How a gallery's vectors were made: layer, tta, amp (bf16 | fp32 | int8), preprocess (cpu | device),
    checkpoint digest or None."""
    source = {key: header.get(key, default) for key, default in DEFAULT_SOURCE.items()}
    source["checkpoint"] = header.get("checkpoint")
    if (source["tta"] not in TTA_CHOICES or source["layer"] not in ("embedding", "backbone")
            or source["preprocess"] not in ("cpu", "device")):
        raise PipelineError(f"the gallery header has layer={source['layer']} tta={source['tta']} preprocess="
                            f"{source['preprocess']}, which this version cannot embed queries with; rerun "
                            f"gen_embeddings.py")
    return source


def check_source(header, model_path, gallery_path, force, checkpoint):
    """Refuse (unless force) a gallery that another checkpoint wrote: by its digest when the
    header has one (checkpoint: the digest of --model's checkpoint, or of an export's source), else
    by the checkpoint path the header names."""
    digest = header.get("checkpoint")
    if digest:
        same, written_by = digest == checkpoint, f"checkpoint sha256 {digest}"
    else:
        written = resolve_in(header["model"], os.path.dirname(os.path.abspath(gallery_path)))  # relative to the file
        same, written_by = os.path.abspath(model_path) == written, header["model"] or "an unnamed model"
    if not same and not force:
        raise PipelineError(f"{gallery_path} was written by {written_by} ({header['model']}), not by --model "
                            f"{model_path}; search with that checkpoint, re-embed the gallery with gen_embeddings.py, "
                            f"or pass --force")


class Searcher:
    """A model (a checkpoint or its export, loaded once) and, optionally, a gallery with its index
    (built on first use). runtime: a checkpoint's (torch | onnx, see embedders.open_embedder)."""

    def __init__(self, model_path, gallery_path=None, device="auto", index="auto", nprobe=NPROBE, force=False,
                 batch_size=None, num_workers=0, on_bad_image="error", log=print, names_file=None, runtime="torch"):
        self.model_path, self.gallery_path, self.log, self.names_file = model_path, gallery_path, log, names_file
        self._names = None
        self.index_kind, self.nprobe = index, nprobe
        self.num_workers, self.on_bad_image = num_workers, on_bad_image
        header = read_header(gallery_path) if gallery_path and os.path.exists(gallery_path) else {}
        self.header, self.source = header, gallery_source(header)
        # the model and the dimension first: neither can be forced, so their messages do not offer --force;
        # queries are embedded as the gallery was (an export computing something else is refused), in its
        # precision where this device runs it (DEEPRANK_FP32=1: fp32)
        asked = self.source if header else {"layer": None, "tta": None}
        self.embedder = open_embedder(model_path, runtime, asked["layer"], asked["tta"], device,
                                      self.source["amp"] == "bf16", batch_size, num_workers, "auto",
                                      self.source["preprocess"], log, gallery=gallery_path)
        dim = self.embedder.dim
        if header and header["dim"] != dim:
            raise PipelineError(f"{gallery_path} holds dim={header['dim']} vectors but {model_path} makes dim={dim}; "
                                f"search it with the checkpoint that wrote it, or re-embed it with this one "
                                f"(gen_embeddings.py)")
        if header:
            check_source(header, model_path, gallery_path, force, self.embedder.checkpoint)
            if (self.source["amp"] == "int8") != (self.embedder.precision == "int8"):
                print(f"warning: {gallery_path} holds {self.source['amp']} vectors and the queries are embedded in "
                      f"{self.embedder.precision} ({model_path}); distances are comparable but not identical",
                      file=sys.stderr)
        self.dim, self.precision = dim, self.embedder.precision
        self.gallery, self._index = None, None
        self._lock = threading.Lock()  # one forward pass at a time (the web server is threaded)

    # ------------------------------------------------------------------ the gallery

    def load_gallery(self):
        """Read the gallery file (a .npy stays memory-mapped until exact search needs it whole)."""
        if self.gallery is None:
            if not self.gallery_path:
                raise PipelineError("no --gallery to search; give one written by gen_embeddings.py")
            self.gallery = read_embeddings(self.gallery_path, mmap=True)
            if len(self.gallery) == 0:
                raise PipelineError(f"{self.gallery_path} has no rows; embed some images into it first")
        return self.gallery

    @property
    def names(self):
        """The gallery's class names (deeprank.class_names: words.txt found from its paths, or names_file)."""
        if self._names is None:
            self._names = ClassNames.for_paths(self.load_gallery().paths, self.names_file)
        return self._names

    @property
    def index(self):
        """ExactIndex or FaissIndex over the gallery, chosen by --index and the gallery's size."""
        if self._index is None:
            self._index = gallery_index(self.load_gallery(), self.gallery_path, self.index_kind, self.nprobe, self.log)
        return self._index

    # ------------------------------------------------------------------ embedding and searching

    def embed(self, paths, bad_images=None):
        """(vectors (n, D) float32, the n paths embedded): unreadable images go to bad_images
        (default: this searcher's --on_bad_image policy, without a report file)."""
        blocks, kept = [], []
        for vectors, done in self.embed_chunks(paths, bad_images):
            blocks.append(vectors)
            kept.extend(done)
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)
        return vectors, kept

    def embed_chunks(self, paths, bad_images=None, rows=None):
        """As embed, in pieces: yield (vectors, paths) of about `rows` images at a time (default: one
        forward pass's), from one loader over all the paths, so memory holds one piece. The model is
        locked for each forward pass alone, never across a yield: a caller that stops early (or
        pauses) holds nothing."""
        bad_images = bad_images or BadImages(self.on_bad_image, None)
        batches = self.embedder.batches(paths, bad_images)
        blocks, kept = [], []
        while True:
            with self._lock:
                batch = next(batches, None)
            if batch is None:
                break
            vectors, found = batch
            blocks.append(vectors)
            kept.extend(paths[i] for i in found)
            if len(kept) >= (rows or 1):
                yield np.concatenate(blocks), kept
                blocks, kept = [], []
        if kept:
            yield np.concatenate(blocks), kept

    def search(self, vectors, k, exclude=None):
        """Per query vector, its k nearest gallery rows: [{"rank", "distance", "label", "name", "path",
        "row"}] (name: the label's class name, or None). exclude[i]: a gallery row query i must not return, or -1."""
        gallery, names = self.load_gallery(), self.names
        distances, rows = self.index.search(vectors, k, exclude=exclude)
        results = []
        for dist, found in zip(distances.tolist(), rows.tolist(), strict=True):
            hits = enumerate(zip(dist, found, strict=True), start=1)
            results.append([{"rank": rank, "distance": d, "label": gallery.labels[row],
                             "name": names.name(gallery.labels[row]), "path": gallery.paths[row], "row": row}
                            for rank, (d, row) in hits if row >= 0])
        return results

    def row_vector(self, row):
        """The gallery's stored vector of one row, as a (1, D) query."""
        gallery = self.load_gallery()
        if not 0 <= row < len(gallery):
            raise PipelineError(f"row {row} is not in the gallery (0..{len(gallery) - 1})")
        return np.array(gallery.vectors[row:row + 1], dtype=np.float32)
