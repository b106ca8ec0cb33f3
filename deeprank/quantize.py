"""Static int8 quantisation of an exported embedder with onnxruntime's quantisation tools (QDQ,
per-channel weights), calibrated on images of the user's data, and the check that it still
finds the same neighbours: the top-k overlap with the fp32 model on held-out images.

    int8 = quantize_int8(OnnxEmbedder(fp32_path), calibration_paths)        # the int8 model's bytes
    overlap = neighbour_overlap(fp32_vectors, int8_vectors, k=10)            # 1.0: the same neighbours
"""

import os
import tempfile

import numpy as np

from deeprank.common import PipelineError, first_line
from deeprank.images import BadImages, decoded_batches, normalized

# layers export_model.py --keep_fp32 may leave in fp32: the first convolution fed by the images, the graph's
# last two linear layers. None by default: on the recommended model either made the int8 model's
# neighbours agree less with fp32's, not more (docs/export.md, "int8")
KEEP_FP32 = ("first_conv", "last_linear")
METHODS = ("minmax", "percentile", "entropy")


def nodes_kept_fp32(model_path, keep=()):
    """Names of the nodes `keep` (of KEEP_FP32) names: the first Conv fed by the graph's input, and
    the last two MatMul / Gemm nodes (the embedding layer and the layer before it)."""
    import onnx
    graph = onnx.load(model_path).graph
    names = []
    if "first_conv" in keep:
        first = next((n for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input), None)
        names += [first.name] if first is not None else []
    if "last_linear" in keep:
        names += [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")][-2:]
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader over image files: one normalised batch per call."""

    def __init__(self, embedder, paths, batch_size):
        self.batches = (normalized(images, embedder.mean, embedder.std) for images, _, _ in
                        decoded_batches(paths, embedder.image_size, batch_size, embedder.threads)
                        if images is not None)
        self.input = embedder.input

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input: batch}

    def __iter__(self):  # the quantisation debugger iterates over a reader
        return iter(self.get_next, None)


def quantize_int8(embedder, paths, batch_size=16, method="minmax", keep=()):
    """The bytes of a static int8 (QDQ, per-channel, signed weights, unsigned activations) model of
    the fp32 export an OnnxEmbedder runs (from its file, embedder.path), calibrated on the images at
    paths (fed by that embedder); the metadata carried over with precision=int8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    fp32_path = embedder.path
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory(prefix="deeprank-int8-") as work:
        prepared, out = os.path.join(work, "prepared.onnx"), os.path.join(work, "int8.onnx")
        try:
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
            quantize_static(prepared, out, _Reader(embedder, paths, batch_size), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], nodes_to_exclude=nodes_kept_fp32(prepared, keep),
                            extra_options={"CalibTensorRangeSymmetric": False})
        except PipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - the quantisation tools raise many types
            raise PipelineError(f"cannot quantise {fp32_path} ({type(err).__name__}: {first_line(err)})") from None
        return with_metadata(out, {**embedder.meta, "precision": "int8", "calibration": method,
                                   "calibration_images": str(len(paths)), "fp32": ",".join(keep)})


def with_metadata(path, meta):
    """The model at path serialised with its metadata replaced by meta."""
    import onnx
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=str(value))
    return model.SerializeToString()


def embed_all(embedder, paths):
    """(vectors (n, D), paths embedded) of the readable images among paths."""
    bad = BadImages("skip", None)
    blocks, kept = [], []
    for vectors, rows in embedder.batches(paths, bad):
        blocks.append(vectors)
        kept += [paths[i] for i in rows]
    return (np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)), kept


def nearest(queries, k, references=None):
    """Each query's k nearest references by squared L2 (ties: lower row first), (n, k); without
    references, each row's k nearest other rows."""
    own = references is None
    references = queries if own else references
    distances = ((queries * queries).sum(1)[:, None] + (references * references).sum(1)[None, :]
                 - 2 * queries @ references.T)
    if own:
        np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def neighbour_overlap(reference, other, k=10, reference_gallery=None, other_gallery=None):
    """The mean share of each image's k nearest images (by the reference vectors) that the other
    vectors also put among its k nearest: among the images themselves, or (galleries given) among
    each one's gallery vectors, the same images embedded the two ways."""
    k = min(k, len(reference) - 1 if reference_gallery is None else len(reference_gallery))
    if k < 1:
        raise PipelineError("the neighbour overlap needs at least two held-out images")
    a, b = nearest(reference, k, reference_gallery), nearest(other, k, other_gallery)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist(), strict=True)]))
