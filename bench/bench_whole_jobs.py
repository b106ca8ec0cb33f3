"""Benchmark: whole jobs as a user waits for them, each a separate process, against plain processes.

On a copy of the mini TinyImageNet set (../shared/data/tiny-imagenet-mini, or --data), with a
DeepRank resnet101 at 224 px (--backbone, --image_size; random weights: speed does not depend on their values):

  embed  ours       python gen_embeddings.py --data COPY --split both (every train/ and val/ image;
                    its defaults: --compile auto, --batch_size, 2 loader workers)
         reference  a plain eager process (this file, --reference embed): the same network,
                    torchvision transforms in a DataLoader with the same 2 workers, bf16 autocast
                    where the CPU runs it (as ours), each batch through the network, vectors
                    written as text; at its own best batch size and memory format, found by a
                    probe of bare forwards (--ref_batch / --ref_format to fix them)
  train  ours       python train_net.py on the first --triplets rows of the set's triplet CSV
                    (conv5 trainable, batch 25, one epoch, --weights none)
         reference  a naive process (this file, --reference train): fp32, query, positive and
                    negative as three forward passes, the same rows, batch, trainable layers and
                    SGD, a DataLoader with the same 2 workers, the state_dict saved at the end

Each pair of processes is run --repeats times, alternated so both see the same machine state,
after one untimed run of ours (inductor's on-disk cache then serves later runs; --no-warmup times
the first run, compiling cold).
Prints the medians and ratios.

    python -m bench.bench_whole_jobs                          # both jobs, the whole mini set
    python -m bench.bench_whole_jobs --jobs embed --classes 4 --repeats 3
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "tiny-imagenet-mini"
BATCHES = (8, 16, 32, 64)
FORMATS = ("contiguous", "channels_last")


# ----------------------------------------------------------------------------- the plain processes

def plain_transform(size):
    import torchvision.transforms as T
    return T.Compose([T.Resize((size, size)), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


class PlainImages:
    """Items of paths (one path, or a tuple of them) -> normalised tensors, the way a plain PyTorch
    script loads them: PIL and torchvision in DataLoader workers."""

    def __init__(self, items, size):
        self.items, self.transform = items, plain_transform(size)

    def __len__(self):
        return len(self.items)

    def load(self, path):
        from PIL import Image
        with Image.open(path) as image:
            return self.transform(image.convert("RGB"))

    def __getitem__(self, i):
        item = self.items[i]
        return self.load(item) if isinstance(item, str) else tuple(self.load(path) for path in item)


def memory_format_of(name):
    import torch
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def plain_precision():
    """bf16 autocast where the CPU runs it fast (the same rule as ours), else fp32."""
    import torch

    from deeprank.runtime import autocast
    return autocast(torch.device("cpu"))


def reference_embed(model_path, list_path, out_path, batch, memory_format):
    """The bare eager process: every listed image through the network once, vectors as text."""
    import numpy as np
    import torch

    from deeprank.checkpoints import load_model
    fmt = memory_format_of(memory_format)
    model = load_model(model_path)[0].eval().to(memory_format=fmt)
    paths = Path(list_path).read_text().splitlines()
    loader = torch.utils.data.DataLoader(PlainImages(paths, model.image_size), batch_size=batch, num_workers=2)
    with open(out_path, "w") as out, torch.inference_mode(), plain_precision():
        for images in loader:
            np.savetxt(out, model(images.contiguous(memory_format=fmt)).float().numpy(), fmt="%.6g")


def reference_train(csv_path, out_path, batch, image_size, backbone):
    """The naive training process: fp32, three forward passes per step, the original's loss and SGD."""
    import torch

    from deep_rank_net import DeepRank
    from deeprank.sample_csv import read_triplet_csv
    rows = list(zip(*(column.tolist() for column in read_triplet_csv(csv_path)), strict=True))
    torch.manual_seed(0)
    model = DeepRank(backbone=backbone, image_size=image_size, weights="none", trainable="conv5").train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9, nesterov=True)
    loader = torch.utils.data.DataLoader(PlainImages(rows, image_size), batch_size=batch, num_workers=2, shuffle=True)
    for q, p, n in loader:
        opt.zero_grad()
        loss = torch.nn.functional.triplet_margin_loss(model(q), model(p), model(n))  # the original's loss
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), out_path)


# ----------------------------------------------------------------------------- the benchmark

def quietly(function, *args):
    """Run a stage's main() with its printout discarded."""
    import contextlib
    import os
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return function(*args)


def make_inputs(folder, data, classes, image_size, backbone):
    """A copy of the mini set (the first `classes` wnids), its train triplet CSV and a checkpoint."""
    import torch

    import transform_validation
    import triplet_sampler
    from deep_rank_net import DeepRank
    from deeprank.checkpoints import save_checkpoint
    copy = folder / "data"
    wnids = (data / "wnids.txt").read_text().split()[:classes]
    (copy / "train").mkdir(parents=True)
    for wnid in wnids:
        shutil.copytree(data / "train" / wnid, copy / "train" / wnid)
    (copy / "val" / "images").mkdir(parents=True)
    kept = [line for line in (data / "val" / "val_annotations.txt").read_text().splitlines()
            if line.split("\t")[1] in wnids]
    for line in kept:
        shutil.copy(data / "val" / "images" / line.split("\t")[0], copy / "val" / "images")
    (copy / "val" / "val_annotations.txt").write_text("\n".join(kept) + "\n")
    (copy / "wnids.txt").write_text("\n".join(wnids) + "\n")
    shutil.copy(data / "words.txt", copy / "words.txt")
    quietly(transform_validation.main, ["--data", str(copy)])
    csv = folder / "triplets.csv"
    quietly(triplet_sampler.main, ["--data", str(copy), "--training", "1", "--out", str(csv)])
    torch.manual_seed(0)
    model_path = folder / "network.model"
    save_checkpoint(model_path, DeepRank(backbone=backbone, image_size=image_size, weights="none"))
    images = sorted(str(p) for split in ("train", "val") for p in (copy / split).glob("*/images/*"))
    return copy, csv, model_path, images


def best_plain_forward(model_path, repeats=3):
    """(batch, memory format) at which a bare eager forward runs fastest here, and every img/s."""
    import torch

    from deeprank.checkpoints import load_model
    model = load_model(model_path)[0].eval()
    speeds = {}
    with torch.inference_mode(), plain_precision():
        for fmt in FORMATS:
            model = model.to(memory_format=memory_format_of(fmt))
            for batch in BATCHES:
                x = torch.randn(batch, 3, model.image_size, model.image_size).contiguous(
                    memory_format=memory_format_of(fmt))
                model(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
                speeds[f"{fmt} {batch}"] = round(batch / statistics.median(times), 2)
    best = max(speeds, key=speeds.get)
    fmt, batch = best.split()
    return int(batch), fmt, speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=MINI, help="a TinyImageNet-layout set (default: the mini set)")
    parser.add_argument("--classes", type=int, default=21, help="its first N classes (default: all of the mini set)")
    parser.add_argument("--jobs", nargs="+", choices=("embed", "train"), default=["embed", "train"])
    parser.add_argument("--triplets", type=int, default=250, help="training triplets of the train job")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="an untimed first run of ours (--no-warmup: its first run is timed, compiling cold)")
    parser.add_argument("--ref_batch", type=int, help="the reference's embedding batch (default: probed)")
    parser.add_argument("--ref_format", choices=FORMATS, help="the reference's memory format (default: probed)")
    parser.add_argument("--reference", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        kind, *rest = args.reference
        if kind == "embed":
            return reference_embed(rest[0], rest[1], rest[2], int(rest[3]), rest[4])
        return reference_train(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
    import torch

    from bench.bench_whole_eval import alternate
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "backbone": args.backbone,
              "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data, csv, model_path, images = make_inputs(folder, args.data, args.classes, args.image_size, args.backbone)
        me = [sys.executable, "-m", "bench.bench_whole_jobs", "--reference"]
        if "embed" in args.jobs:
            batch, fmt, speeds = best_plain_forward(model_path)
            batch, fmt = args.ref_batch or batch, args.ref_format or fmt
            listing = folder / "images.txt"
            listing.write_text("\n".join(images))
            ours = [sys.executable, str(ROOT / "gen_embeddings.py"), "--model", str(model_path), "--data", str(data),
                    "--split", "both", "--train_out", str(folder / "train.txt"), "--test_out", str(folder / "val.txt")]
            ref = me + ["embed", str(model_path), str(listing), str(folder / "ref.txt"), str(batch), fmt]
            result["embed"] = {"images": len(images), "bare_forward_img_s": speeds,
                               "reference_batch": batch, "reference_format": fmt,
                               **alternate(ours, ref, args.repeats, args.warmup)}
            result["embed"]["ours_img_s"] = round(len(images) / result["embed"]["ours_median_s"], 2)
            result["embed"]["reference_img_s"] = round(len(images) / result["embed"]["reference_median_s"], 2)
            print(json.dumps({"embed": result["embed"]}), flush=True)
        if "train" in args.jobs:
            rows = csv.read_text().splitlines()
            short = folder / "triplets_short.csv"
            short.write_text("\n".join(rows[:args.triplets + 1]) + "\n")  # the header and the first rows
            ours = [sys.executable, str(ROOT / "train_net.py"), "--triplets", str(short), "--backbone", args.backbone,
                    "--weights", "none", "--image_size", str(args.image_size), "--trainable", "conv5",
                    "--batch_size", "25", "--epochs", "1", "--out", str(folder / "ours.model")]
            ref = me + ["train", str(short), str(folder / "ref.model"), "25", str(args.image_size), args.backbone]
            result["train"] = {"triplets": args.triplets, **alternate(ours, ref, args.repeats, args.warmup)}
            print(json.dumps({"train": result["train"]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
