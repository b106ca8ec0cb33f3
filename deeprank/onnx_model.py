"""Exported embedders run by onnxruntime, without torch: the metadata an exported model carries,
the checks that it is an embedder, and the loop that embeds image files with it.

An export (export_model.py) is an ONNX graph from float32 images (batch, 3, S, S), normalised
with the metadata's mean and std after a bilinear resize to S x S, to unit-norm vectors (batch,
D). Its metadata says how to feed it (image_size, mean, std, resize), what it computes (layer:
embedding | backbone; tta: none | flip, the mirror image's pass inside the graph), where it came
from (checkpoint: the source checkpoint's SHA-256) and its precision (fp32 | int8).

    embedder = OnnxEmbedder("deepranknet.onnx", batch_size=32)
    for vectors, rows in embedder.batches(paths):   # (G, D) float32, rows of paths
        ...
"""

import hashlib
import json
import os

from deeprank.common import TTA_CHOICES, PipelineError, file_digest, first_line
from deeprank.images import BadImages, decoded_batches, normalized

FORMAT = "deep-ranking-embedder-1"
# metadata every export carries (values are strings; mean and std are JSON lists)
REQUIRED = ("format", "image_size", "mean", "std", "resize", "layer", "tta", "checkpoint", "precision")
RESIZE = "bilinear to image_size x image_size, no crop; RGB, EXIF orientation applied"
INPUT, OUTPUT = "images", "embeddings"
LAYERS, PRECISIONS = ("embedding", "backbone"), ("fp32", "int8")
BATCH = 32  # images per onnxruntime call where no --batch_size says otherwise (docs/export.md)


def is_onnx(path):
    """Whether --model names an exported model (by its suffix) rather than a checkpoint."""
    return str(path).lower().endswith(".onnx")


def cpu_threads():
    """The cores this process may run on (its affinity where the OS tells, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def ort_module():
    """onnxruntime, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise PipelineError("running an exported model needs onnxruntime; pip install -r requirements-onnx.txt") \
            from None
    return onnxruntime


def session_options(threads=None):
    """onnxruntime's options: `threads` for each operator (default: one per core), one operator at a time."""
    ort = ort_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or cpu_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    return options


def providers(device="auto"):
    """--device as onnxruntime providers: CUDA where this onnxruntime has it (unless --device cpu),
    then the CPU."""
    wanted = ("CPUExecutionProvider",) if str(device) == "cpu" else ("CUDAExecutionProvider", "CPUExecutionProvider")
    available = ort_module().get_available_providers()
    return [p for p in wanted if p in available]


class OnnxEmbedder:
    """An exported embedder in an onnxruntime session (model: a path or the serialised bytes).

    Refuses, one line each, a file that is not ONNX, a graph that is not an embedder (one input of
    rank 4, an output of rank 2) and metadata without the preprocessing."""

    runtime = "onnx"

    def __init__(self, model, threads=None, name=None, batch_size=BATCH, device="auto", workers=None):
        ort = ort_module()
        self.path = name or str(model)
        self.threads, self.batch_size = int(threads or cpu_threads()), int(batch_size or BATCH)
        self.workers = self.threads if workers is None else int(workers)  # decoding threads (0: the caller's)
        try:
            self.session = ort.InferenceSession(model, sess_options=session_options(self.threads),
                                                providers=providers(device))
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types for every failure
            if isinstance(model, str) and not os.path.isfile(model):
                raise PipelineError(f"model {model} does not exist; export one with export_model.py") from None
            raise PipelineError(f"{self.path} is not an ONNX model onnxruntime can load ({first_line(err)}); "
                                f"export it again with export_model.py") from None
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self._check_graph()
        missing = [key for key in REQUIRED if key not in self.meta]
        if missing or self.meta.get("format") != FORMAT:
            lacking = ", ".join(missing) or "format"
            raise PipelineError(f"{self.path} lacks the preprocessing metadata of an export ({lacking}); export it "
                                f"with export_model.py")
        try:
            self.image_size = int(self.meta["image_size"])
            self.mean, self.std = json.loads(self.meta["mean"]), json.loads(self.meta["std"])
            readable = (len(self.mean) == 3 and len(self.std) == 3 and self.image_size > 0
                        and self.meta["layer"] in LAYERS and self.meta["tta"] in TTA_CHOICES
                        and self.meta["precision"] in PRECISIONS)
        except (ValueError, TypeError):
            readable = False
        if not readable:
            shown = ", ".join(f"{key}={self.meta[key]}" for key in ("image_size", "mean", "std", "layer", "tta",
                                                                    "precision"))
            raise PipelineError(f"{self.path} has metadata this version cannot use ({shown}); export it again with "
                                f"export_model.py") from None
        self.layer, self.tta = self.meta["layer"], self.meta["tta"]
        self.checkpoint, self.precision = self.meta["checkpoint"], self.meta["precision"]
        self.digest = file_digest(model) if isinstance(model, str) else hashlib.sha256(model).hexdigest()[:16]

    def _check_graph(self):
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or not outputs or len(outputs[0].shape) != 2:
            shapes = ", ".join(str(x.shape) for x in inputs) + " -> " + ", ".join(str(x.shape) for x in outputs)
            raise PipelineError(f"{self.path} is not an image embedder (its graph maps {shapes}; an embedder maps "
                                f"one (batch, 3, S, S) input to (batch, D)); export one with export_model.py")
        self.input, self.output = inputs[0].name, outputs[0].name
        self.dim = outputs[0].shape[1]
        if not isinstance(self.dim, int):
            raise PipelineError(f"{self.path} does not say its vectors' length (its output is {outputs[0].shape}); "
                                f"export it with export_model.py")

    def source(self):
        """The embedding file header's fields for vectors this model makes."""
        return {"checkpoint": self.checkpoint, "layer": self.layer, "tta": self.tta, "amp": self.precision,
                "preprocess": "cpu", "runtime": "onnx", "onnx": self.digest}

    def run(self, images):
        """(n, 3, S, S) float32 normalised images -> (n, D) float32 vectors."""
        return self.session.run([self.output], {self.input: images})[0]

    def batches(self, paths, bad_images=None, progress=None):
        """Yield (vectors (G, D) float32, rows of paths) per batch of the readable images, in order;
        unreadable ones go to bad_images (default: stop at the first). Images are decoded on
        self.workers threads beside the network's (0: in this thread, between batches)."""
        bad_images = bad_images or BadImages("error", None)
        for images, kept, unreadable in decoded_batches(paths, self.image_size, self.batch_size, self.workers):
            bad_images.add(unreadable)
            if images is not None:
                yield self.run(normalized(images, self.mean, self.std)), kept
            if progress is not None:
                progress.update(len(kept) + len(unreadable))
