"""A checkpoint's network as ONNX: the graph (torch.export-based exporter, a dynamic batch axis),
the metadata that says how to feed it, and the checks run before anything is written: onnx's
full checker, then onnxruntime against PyTorch in fp32 on two batches of different sizes.

    model_bytes = export_bytes(model, checkpoint_digest, layer="embedding", tta="none")
    path = cached_export("deepranknet.model", layer="embedding", tta="none")   # exported once, reused
"""

import contextlib
import io
import json
import logging
import os
import warnings

import numpy as np
import torch

from deep_rank_net import PooledFeatures, l2n
from deeprank.checkpoints import load_model
from deeprank.common import PipelineError, atomic_write, file_digest, first_line
from deeprank.images import IMAGENET_MEAN, IMAGENET_STD
from deeprank.onnx_model import FORMAT, INPUT, OUTPUT, RESIZE, OnnxEmbedder

OPSET = 18
PARITY_BATCHES = (2, 5)      # the two batch sizes onnxruntime is checked on against PyTorch
RTOL, ATOL = 1e-3, 1e-5      # ... and how closely their fp32 vectors must agree


class ExportedNet(torch.nn.Module):
    """What the graph computes: the embedding (or the backbone's pooled, normalised features), and
    with tta='flip' the normalised sum of the image's and its mirror image's vectors."""

    def __init__(self, model, layer="embedding", tta="none"):
        super().__init__()
        self.net = model if layer == "embedding" else PooledFeatures(model.features)
        self.flip = tta == "flip"

    def forward(self, images):
        out = self.net(images)
        return l2n(out + self.net(images.flip(3))) if self.flip else out


def metadata(model, checkpoint, layer, tta, name):
    """The strings stored in the graph: how to feed it and where it came from."""
    return {"format": FORMAT, "image_size": str(model.image_size), "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)), "resize": RESIZE, "layer": layer, "tta": tta,
            "checkpoint": checkpoint, "checkpoint_name": os.path.basename(str(name)), "precision": "fp32",
            "model_args": json.dumps(model.model_args, sort_keys=True)}


def export_bytes(model, checkpoint, layer="embedding", tta="none", name="checkpoint"):
    """The checked ONNX model (bytes) of a DeepRank in eval mode; PipelineError if the exporter
    fails, the checker objects, or onnxruntime disagrees with PyTorch."""
    import onnx
    net = ExportedNet(model.float().eval(), layer, tta).eval()
    size = model.image_size
    example = torch.randn(PARITY_BATCHES[0], 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with quiet_exporter():
            program = torch.onnx.export(net, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                        verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; any of them means no export
        raise PipelineError(f"cannot export {name} to ONNX ({type(err).__name__}: {first_line(err)})") from None
    proto = program.model_proto
    for key, value in metadata(model, checkpoint, layer, tta, name).items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as err:
        raise PipelineError(f"the ONNX export of {name} fails onnx's checker ({first_line(err)})") from None
    check_parity(net, data, size, name)
    return data


def check_parity(net, data, size, name):
    """onnxruntime (fp32) against PyTorch (fp32) on batches of PARITY_BATCHES images."""
    embedder = OnnxEmbedder(data, name=f"the export of {name}")
    generator = torch.Generator().manual_seed(0)
    for rows in PARITY_BATCHES:
        images = torch.rand(rows, 3, size, size, generator=generator) * 4 - 2  # about the normalised range
        with torch.no_grad():
            expected = net(images).numpy()
        got = embedder.run(images.numpy())
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
            worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
            raise PipelineError(f"onnxruntime's output of the export of {name} differs from PyTorch's on a batch of "
                                f"{rows} (largest difference {worst:.3g}; allowed rtol {RTOL}, atol {ATOL}); "
                                f"nothing written")


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's progress lines, warnings and logging are not the stage's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def cache_path(checkpoint_path, layer, tta):
    """Where an embedding stage keeps the fp32 export of a checkpoint: beside it."""
    suffix = "" if (layer, tta) == ("embedding", "none") else f".{layer}" + (".flip" if tta == "flip" else "")
    return f"{checkpoint_path}{suffix}.onnx"


def cached_export(checkpoint_path, layer="embedding", tta="none", log=print):
    """The path of a checked fp32 export of a checkpoint, exported now (and kept beside it) unless a
    kept one was exported from these exact weights."""
    digest = file_digest(checkpoint_path)
    path = cache_path(checkpoint_path, layer, tta)
    if os.path.isfile(path):
        try:
            kept = OnnxEmbedder(path)
            if (kept.checkpoint, kept.layer, kept.tta, kept.precision) == (digest, layer, tta, "fp32"):
                return path
        except PipelineError:
            pass  # damaged or foreign: exported again below
    model, _ = load_model(checkpoint_path)
    data = export_bytes(model, digest, layer, tta, checkpoint_path)
    with atomic_write(path, mode="wb") as handle:
        handle.write(data)
    log(f"exported {checkpoint_path} to {path} (fp32, checked against PyTorch)")
    return path
