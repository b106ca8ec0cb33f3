"""Checkpoints: plain data only (loadable with torch.load(weights_only=True)), written atomically,
read back with one-line errors, and the model's own errors (deep_rank_net.ModelError) turned into
the pipeline's one-line ones.

    save_checkpoint("deepranknet.model", model, optimizer=None, epoch=0, config={}, metrics={})
    model, ckpt = load_model("deepranknet.model")
    with model_errors():                 # a bad --backbone / --weights / --image_size: one 'error:' line
        model = DeepRank(backbone=args.backbone, weights=args.weights)
"""

import contextlib
from pathlib import Path

import torch

from deep_rank_net import DeepRank, ModelError, load_state, state_dict_mismatch, unwrap
from deeprank.common import PipelineError, atomic_write

CHECKPOINT_VERSION = 1


@contextlib.contextmanager
def model_errors():
    """Inside: a ModelError of the model (bad arguments, weights that do not fit) becomes a
    PipelineError with the same message (one 'error:' line, exit status 1)."""
    try:
        yield
    except ModelError as err:
        raise PipelineError(str(err)) from None


def save_checkpoint(path, model, optimizer=None, epoch=0, config=None, metrics=None, extra=None):
    """Write a checkpoint of plain data only (loadable with weights_only=True), atomically."""
    model = unwrap(model)
    ckpt = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "model_args": dict(model.model_args),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
    }
    if extra:
        ckpt.update(extra)
    with atomic_write(path, mode="wb") as handle:
        torch.save(ckpt, handle)


def torch_load(path, what="file"):
    """deep_rank_net.load_state (plain data only, every way of failing one line) with its errors as
    PipelineErrors."""
    with model_errors():
        return load_state(path, what)


def load_checkpoint(path):
    """Read a checkpoint dict (weights_only) and check it is one of ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; run train_net.py first or pass --model")
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        bare = isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        kind = "a bare state_dict (tensors by layer name)" if bare else f"a torch file holding a {type(ckpt).__name__}"
        raise PipelineError(f"{path} is {kind}, not a DeepRank checkpoint (no 'model' / 'model_args'); pass a "
                            f"checkpoint written by train_net.py")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild DeepRank(**model_args) and load its weights strictly; no backbone download."""
    try:
        with model_errors():
            model = DeepRank(**ckpt["model_args"], weights="none")
    except TypeError as err:
        raise PipelineError(f"{path} has model_args this version cannot build ({err}); rerun train_net.py") from None
    problem = state_dict_mismatch(model, ckpt["model"])
    if problem:
        raise PipelineError(f"{path} does not match the architecture its model_args describe ({problem}); "
                            f"rerun train_net.py")
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def load_model(path):
    """(model, checkpoint dict) from a .model file, on the CPU, in eval mode."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return model.eval(), ckpt
