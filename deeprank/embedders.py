"""Which runtime embeds a stage's images: an exported model (.onnx) always runs in onnxruntime; a
checkpoint runs in PyTorch, or with --runtime onnx in onnxruntime through its fp32 export (made
once, checked against PyTorch, kept beside the checkpoint). Torch is imported only when a
checkpoint is used, so a process given an exported model never loads it.

    embedder = open_embedder("deepranknet.model", runtime="onnx", layer="embedding", tta="flip")
    for vectors, rows in embedder.batches(paths):        # (G, D) float32 numpy, rows of paths
        ...
"""

from deeprank.common import PipelineError
from deeprank.onnx_model import OnnxEmbedder, is_onnx

RUNTIMES = ("torch", "onnx")


def open_embedder(model, runtime="torch", layer=None, tta=None, device="auto", amp=True, batch_size=None,
                  num_workers=None, compile="auto", preprocess="auto", log=print):
    """The embedder for --model / --runtime: an OnnxEmbedder or a runtime.TorchEmbedder (num_workers:
    its image-loading processes; onnxruntime's decoding threads, by default one per core). layer and
    tta: what the stage asks for (None: the exported model's, or embedding / none for a checkpoint);
    an exported model that computes something else is refused in one line."""
    if runtime not in RUNTIMES:
        raise PipelineError(f"unknown --runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
    if is_onnx(model):
        embedder = OnnxEmbedder(model, batch_size=batch_size, device=device, workers=num_workers)
        for flag, asked, made in (("--layer", layer, embedder.layer), ("--tta", tta, embedder.tta)):
            if asked is not None and asked != made:
                raise PipelineError(f"{model} was exported with {flag} {made}, not {asked}; pass {flag} {made}, or "
                                    f"export the checkpoint again with export_model.py {flag} {asked}")
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
