"""Running models: the device, bf16 autocast, the compile policy, frozen (compiled) inference,
and the loop that embeds image files in batches.

    device = resolve_device("auto")
    model = prepare(model, device)
    for vectors in embed_batches(model, paths, device, tta="flip"):   # (B, D) float32 on the CPU
        ...
"""

import contextlib
import math
import os
import shutil
import sys

import torch

from deep_rank_net import PooledFeatures, l2n, unwrap
from deeprank.checkpoints import load_model
from deeprank.common import COMPILE, COMPILE_CHOICES, NUM_WORKERS, TTA_CHOICES, PipelineError, file_digest
from deeprank.images import BadImages
from deeprank.loaders import ImageList, Normalize, image_batch, load_size, make_loader

# --compile auto: images (in 224-px equivalents) through frozen layers that repay compiling, per device type:
# on a CPU about the break-even measured for resnet101; on CUDA an estimate, not a measurement
# (docs/benchmarks.md, "Whole jobs on this CPU"; docs/distributed.md, "A busy GPU").
COMPILE_MIN_WORK = {"cpu": 3000, "cuda": 300_000}
# Images per forward pass where no flag chooses: a CPU pass holds CPU_PASS_PIXELS (16 images of 224 px, more of
# smaller ones, at most BATCH), also through frozen layers when a training batch is larger, the sizes measured
# fastest there (docs/benchmarks.md, "Whole jobs on this CPU"); CUDA passes BATCH (not measured).
BATCH = 64
CPU_PASS_PIXELS = 16 * 224 * 224
TTA_PASSES = {"none": 1, "flip": 2}  # test-time augmentation (common.TTA_CHOICES) -> forward passes per image
# DEEPRANK_FP32=1 in the environment: every stage of the process runs fp32, as if each were given --no_amp
# (so a CPU or GPU with bf16 can run the whole test suite, or a whole pipeline, both ways).
FP32_ENV = "DEEPRANK_FP32"


# ----------------------------------------------------------------------------- device and precision

def resolve_device(name):
    """Turn --device into a torch.device: 'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(f"--device {name!r} is not a device ({err}); use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return device


def prepare(model, device):
    """Move a model to its device in channels_last (faster convolutions with oneDNN / cuDNN)."""
    return model.to(device).to(memory_format=torch.channels_last)


def fp32_forced():
    """Whether the environment asks every stage for fp32 (FP32_ENV=1), as --no_amp does for one."""
    return os.environ.get(FP32_ENV, "").strip() not in ("", "0")


def precision(device, amp=True):
    """The precision a stage runs its network in: 'bf16' (autocast) when amp is asked for, the device
    runs bf16 fast and FP32_ENV does not force fp32; else 'fp32'."""
    return "bf16" if amp and not fp32_forced() and bf16_supported(device) else "fp32"


def autocast(device, enabled=True):
    """bf16 autocast where precision() says bf16 (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if precision(device, enabled) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_supported(device):
    """Whether bf16 autocast is worth turning on for this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def default_batch(device, image_size):
    """Images per forward pass on this device when no --batch_size says otherwise (see BATCH)."""
    if device.type != "cpu":
        return BATCH
    return max(1, min(BATCH, CPU_PASS_PIXELS // image_size ** 2))


def frozen_rows(device, rows, image_size):
    """Rows per pass through frozen layers for training batches of `rows` images: on a CPU at most
    default_batch's, in passes of equal size (rows are independent there, smaller passes run faster,
    and a compiled pass pads no rows), elsewhere all."""
    if device.type != "cpu":
        return rows
    passes = math.ceil(rows / default_batch(device, image_size))
    return math.ceil(rows / passes)


# ----------------------------------------------------------------------------- compiling

def compiler_available(device):
    """Whether torch.compile can generate code here: a C++ compiler (CPU) or Triton (CUDA)."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        return has_triton()
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


def want_compile(mode, images, image_size, device):
    """--compile: 'on', 'off', or 'auto' (when enough work passes through the frozen layers to
    repay compiling on this kind of device, and a compiler is available)."""
    if mode not in COMPILE_CHOICES:
        raise PipelineError(f"unknown --compile {mode!r}; choose {', '.join(COMPILE_CHOICES)}")
    if mode != "auto":
        return mode == "on"
    return compile_pays(images, image_size, device) and compiler_available(device)


def compile_pays(images, image_size, device):
    """Whether this many images at this size are enough work to repay compiling on the device."""
    return images * (image_size / 224) ** 2 >= COMPILE_MIN_WORK.get(device.type, COMPILE_MIN_WORK["cuda"])


def freeze_when_compiling(device, amp):
    """Compile with the weights frozen as constants (inductor's freezing) only for bf16 on a CPU,
    where packing the weights once for oneDNN pays. Elsewhere compile without freezing: inductor
    then caches the compiled code on disk and a later run with the same network reuses it
    (freezing bypasses that cache); fp32 on this project's CPU ran as fast either way."""
    return device.type == "cpu" and precision(device, amp) == "bf16"


class FrozenRunner:
    """Run a module with fixed weights (eval mode, no autograd), compiled if asked.

    Compiled with freeze (see freeze_when_compiling), torch.compile's inductor freezes the weights
    as constants: BatchNorm folds into the convolutions, weights are packed once for oneDNN, and
    element-wise ops fuse (ResNet-101, 224 px, bf16: see docs/benchmarks.md's speed table); without
    freeze the compiled code is cached on disk for later runs. Larger batches pass in chunks of
    batch_size rows, and compiled, smaller ones are zero-padded to batch_size rows (rows are
    independent in eval mode), so one graph serves every batch. If compiling fails (no
    compiler, unsupported op) a one-line warning follows and the module runs eagerly.
    """

    def __init__(self, module, batch_size, compile=False, freeze=True):
        self.module, self.batch_size, self.freeze = module, int(batch_size), freeze
        if compile:  # forget graphs of earlier runners: torch.compile stops compiling after a few per function
            torch._dynamo.reset()
        self._compiled = torch.compile(module, dynamic=False) if compile else None
        self._tried = False

    @property
    def compiled(self):
        return self._compiled is not None

    def __call__(self, x):
        self.module.eval()  # its layers are all frozen; containers may have been flipped by model.train()
        with torch.no_grad():
            n, size = len(x), self.batch_size
            if n > size:
                return torch.cat([self(x[i:i + size]) for i in range(0, n, size)])
            if self._compiled is None:
                return self.module(x)
            if n < size:
                pad = x.new_zeros((size - n,) + tuple(x.shape[1:]))
                x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
            try:
                import torch._inductor.config as inductor_config  # freezing must be on while it compiles:
                with inductor_config.patch(freezing=self.freeze):  # options={"freezing": True} is not enough
                    out = self._compiled(x)
            except Exception as err:  # noqa: BLE001 - any compile failure: fall back, once
                if self._tried:
                    raise
                print(f"warning: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                      f"running uncompiled (pass --compile off to skip the attempt)", file=sys.stderr)
                self._compiled = None
                return self.module(x[:n])
            self._tried = True
            return out[:n]


# ----------------------------------------------------------------------------- embedding image files

@torch.inference_mode()
def embed_batches(model, paths, device, batch_size=64, num_workers=NUM_WORKERS, amp=True, progress=None,
                  layer="embedding", compile=False, tta="none", bad_images=None, preprocess=False):
    """Yield (vectors, rows): (G, D) float32 CPU embeddings of a batch's readable images and their
    indices into paths, in order, each image once.

    model must already be on device, in eval mode. layer: 'embedding' (DeepRank's output) or
    'backbone' (the backbone's pooled features, L2-normalised). progress: optional tqdm bar.
    compile: run the network compiled with its weights frozen (see FrozenRunner).
    tta: 'none', or 'flip': the normalised sum of the image's and its mirror image's embeddings
    (two forward passes per image). bad_images: the images.BadImages that decides about images
    that cannot be decoded (default: stop at the first). preprocess: the workers decode to the
    load size and the device resizes the batch (--preprocess device).
    """
    if tta not in TTA_CHOICES:
        raise PipelineError(f"unknown --tta {tta!r}; choose {', '.join(TTA_CHOICES)}")
    bad_images = bad_images or BadImages("error", None)
    size = unwrap(model).image_size
    loader = make_loader(ImageList(paths, load_size(paths, size) if preprocess else size), batch_size, num_workers,
                         device, collate_fn=image_batch)
    normalize = Normalize(device, size) if preprocess else Normalize(device)
    network = model if layer == "embedding" else PooledFeatures(unwrap(model).features)
    forward = FrozenRunner(network, batch_size, compile, freeze_when_compiling(device, amp))
    start = 0
    for images, kept, unreadable in loader:
        bad_images.add(unreadable)
        if images is not None:
            batch = normalize(images)
            with autocast(device, amp):
                out = forward(batch).float()
                if tta == "flip":
                    out = l2n(out + forward(batch.flip(3)).float())
            yield out.cpu(), [start + row for row in kept]
        if progress is not None:
            progress.update(len(kept) + len(unreadable))
        start += len(kept) + len(unreadable)


class TorchEmbedder:
    """A checkpoint's network in PyTorch, embedding image files as a stage asks (layer, test-time
    augmentation, precision, compile policy, where images are resized); the same interface as
    onnx_model.OnnxEmbedder: dim, image_size, checkpoint, precision, source(), batches()."""

    runtime = "torch"

    def __init__(self, model_path, device, layer="embedding", tta="none", amp=True, batch_size=None,
                 num_workers=NUM_WORKERS, compile=COMPILE, preprocess=False):
        model, _ = load_model(model_path)
        self.path, self.device, self.layer, self.tta = str(model_path), device, layer, tta
        self.dim = model.model_args["embed_dim"] if layer == "embedding" else model.conv_fc.in_features
        self.image_size, self.checkpoint = model.image_size, file_digest(model_path)
        self.precision = precision(device, amp)
        self.batch_size = batch_size or default_batch(device, model.image_size)
        self.num_workers, self.compile, self.preprocess = num_workers, compile, preprocess
        self.model = prepare(model, device)

    def source(self):
        """The embedding file header's fields for vectors this network makes."""
        return {"checkpoint": self.checkpoint, "layer": self.layer, "tta": self.tta, "amp": self.precision,
                "preprocess": "device" if self.preprocess else "cpu"}

    def batches(self, paths, bad_images=None, progress=None):
        """Yield (vectors (G, D) float32 numpy, rows of paths) per batch of readable images, in order."""
        compile = want_compile(self.compile, TTA_PASSES[self.tta] * len(paths), self.image_size, self.device)
        for vectors, rows in embed_batches(self.model, paths, self.device, self.batch_size, self.num_workers,
                                           self.precision == "bf16", progress, self.layer, compile, self.tta,
                                           bad_images, self.preprocess):
            yield vectors.numpy(), rows
