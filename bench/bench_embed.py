"""Benchmark gen_embeddings.py against a bare forward pass and the original's naive approach.

In one run, on the same model (DeepRank, --backbone resnet101 at 224 px by default, random
weights: speed does not depend on their values) and the same images:

  ours    gen_embeddings.main() end to end on a triplet CSV: JPEG decoding, resizing,
          normalising, bf16 autocast + channels_last forward (compiled with frozen weights,
          as --compile auto does for a large gallery; --compile off to compare), each image
          once, text output; steady state: (images of a big run - images of a small run) /
          (time difference), which removes checkpoint loading and compiling
  bare    the same network's plain eager forward alone on a ready-made batch, same precision
          (bf16 autocast, channels_last) and batch size
  bare_compiled  the same, compiled like ours: the forward pass ours wraps
  naive   the original's way: every triplet row's query, positive and negative through the
          network in fp32, three passes per row (measured on --naive_rows rows)

Prints images/s of each (median of --repeats runs), ours/bare, ours/bare_compiled, and
ours/naive in triplet rows per second; then the peak memory of gen_embeddings with 1x and 16x
the images (small model) to show that it does not grow with the number of images.

    python -m bench.bench_embed --images 2048 --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gen_embeddings
import synthetic_data
import transform_validation
import triplet_sampler
from deep_rank_net import DeepRank
from deeprank.checkpoints import save_checkpoint
from deeprank.datasets import unique_in_order
from deeprank.loaders import Normalize
from deeprank.runtime import FrozenRunner, autocast, prepare
from deeprank.sample_csv import read_triplet_csv

ROOT = Path(__file__).resolve().parents[1]


def make_data(root, images, classes=8):
    """A synthetic TinyImageNet-layout tree (64 px JPEGs) and its N = M = 1 train triplet CSV."""
    synthetic_data.generate(root / "data", classes=classes, train_per_class=images // classes, val_per_class=2,
                            test_images=1)
    with open(os.devnull, "w") as null:
        sys.stdout, saved = null, sys.stdout
        try:
            transform_validation.main(["--data", str(root / "data")])
            triplet_sampler.main(["--data", str(root / "data"), "--training", "1", "--out", str(root / "train.csv")])
            triplet_sampler.main(["--data", str(root / "data"), "--training", "0", "--out", str(root / "val.csv")])
        finally:
            sys.stdout = saved
    return root / "train.csv", root / "val.csv"


def time_ours(model_path, train_csv, val_csv, out_dir, batch, workers, compile):
    """Seconds for gen_embeddings.main() to embed every image of both CSVs, end to end."""
    args = ["--model", str(model_path), "--train_triplets", str(train_csv), "--test_triplets", str(val_csv),
            "--train_out", str(out_dir / "train.txt"), "--test_out", str(out_dir / "test.txt"),
            "--batch_size", str(batch), "--num_workers", str(workers), "--compile", compile]
    with open(os.devnull, "w") as null:
        sys.stdout, saved = null, sys.stdout
        try:
            start = time.perf_counter()
            gen_embeddings.main(args)
            return time.perf_counter() - start
        finally:
            sys.stdout = saved


@torch.inference_mode()
def time_bare(model, images, batch, size):
    """Seconds for the forward pass alone over `images` images (bf16 autocast, channels_last)."""
    device = torch.device("cpu")
    x = Normalize(device)(torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8))
    with autocast(device):
        model(x)  # warm-up (oneDNN primitive creation; compiling, for a compiled model)
        start = time.perf_counter()
        for _ in range(images // batch):
            model(x)
    return time.perf_counter() - start


@torch.inference_mode()
def time_naive(model, rows, size):
    """Seconds for the original's approach: fp32, query / positive / negative as three passes per row."""
    model = model.to(memory_format=torch.contiguous_format)
    x = torch.randn(rows, 3, size, size)  # one batch of rows, as the original's loader gave them
    model(x[:1])
    start = time.perf_counter()
    model(x)  # queries
    model(x)  # positives
    model(x)  # negatives
    return time.perf_counter() - start


def peak_memory(model_path, train_csv, val_csv, out_dir):
    """Peak RSS (MB) of a separate gen_embeddings.py process (Linux: /proc/self/status)."""
    # VmHWM is this process's own peak (ru_maxrss would start from the parent's peak at fork)
    code = ("import sys, gen_embeddings; gen_embeddings.main(sys.argv[1:]); "  # python -c: the cwd (ROOT) on sys.path
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code, "--model", str(model_path), "--train_triplets",
                             str(train_csv), "--test_triplets", str(val_csv), "--train_out",
                             str(out_dir / "m_train.txt"), "--test_out", str(out_dir / "m_test.txt"),
                             "--num_workers", "0"], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def measure_speed(tmp, args):
    """ours / bare / bare compiled / naive images per second (medians) and their ratios."""
    train_csv, val_csv = make_data(tmp, args.images)
    model = DeepRank(backbone=args.backbone, image_size=args.image_size, weights="none").eval()
    model_path = tmp / "m.model"
    save_checkpoint(model_path, model)
    model = prepare(model, torch.device("cpu"))
    n_images = sum(len(unique_in_order(*read_triplet_csv(csv))) for csv in (train_csv, val_csv))
    # a second, small dataset: its run measures the fixed costs (checkpoint load, oneDNN warm-up),
    # so the difference of the two runs is the steady-state rate a large gallery sees
    (tmp / "small").mkdir()
    small_csvs = make_data(tmp / "small", args.batch_size)
    n_small = sum(len(unique_in_order(*read_triplet_csv(csv))) for csv in small_csvs)
    ours, bare, bare_compiled, naive = [], [], [], []
    bare_images = (args.bare_images // args.batch_size) * args.batch_size
    for _ in range(args.repeats):
        fixed = time_ours(model_path, *small_csvs, tmp, args.batch_size, args.num_workers, args.compile)
        full = time_ours(model_path, train_csv, val_csv, tmp, args.batch_size, args.num_workers, args.compile)
        ours.append((n_images - n_small) / (full - fixed))
        bare.append(bare_images / time_bare(model, bare_images, args.batch_size, args.image_size))
        compiled = FrozenRunner(model, args.batch_size, compile=True)
        bare_compiled.append(bare_images / time_bare(compiled, bare_images, args.batch_size, args.image_size))
        naive.append(3 * args.naive_rows / time_naive(model, args.naive_rows, args.image_size))
        model = model.to(memory_format=torch.channels_last)
    result = {
        "model": f"DeepRank {args.backbone} {args.image_size}px", "batch_size": args.batch_size,
        "num_workers": args.num_workers, "threads": torch.get_num_threads(), "images": n_images,
        "ours_compile": args.compile,
        "ours_img_s": round(statistics.median(ours), 2), "bare_forward_img_s": round(statistics.median(bare), 2),
        "bare_compiled_img_s": round(statistics.median(bare_compiled), 2),
        "naive_fp32_img_s": round(statistics.median(naive), 2),
    }
    result["ours_vs_bare"] = round(result["ours_img_s"] / result["bare_forward_img_s"], 3)
    result["ours_vs_bare_compiled"] = round(result["ours_img_s"] / result["bare_compiled_img_s"], 3)
    # naive spends 3 passes per triplet row; ours embeds each distinct image once (about one per row at N = M = 1)
    rows = len(open(train_csv).read().splitlines()) - 1
    ours_rows_s = rows / (n_images / result["ours_img_s"])
    result["ours_vs_naive_rows_per_s"] = round(ours_rows_s / (result["naive_fp32_img_s"] / 3), 2)
    return result


def measure_memory(tmp):
    """Peak RSS of gen_embeddings (resnet18, 64 px, 4096-d) on 500 and 8,000 images."""
    small = DeepRank(backbone="resnet18", image_size=64, embed_dim=4096, weights="none")
    save_checkpoint(tmp / "small.model", small)
    peaks = {}
    for scale in (1, 16):
        data = tmp / f"mem{scale}"
        data.mkdir()
        csvs = make_data(data, 500 * scale)
        peaks[f"peak_rss_mb_{500 * scale}_images"] = round(peak_memory(tmp / "small.model", *csvs, data), 1)
    return peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048, help="train images embedded per run")
    parser.add_argument("--bare_images", type=int, default=512, help="images per bare forward measurement")
    parser.add_argument("--compile", default="on", choices=("on", "off"), help="ours: gen_embeddings --compile")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--naive_rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_speed", action="store_true", help="only the peak-memory measurement")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {} if args.skip_speed else measure_speed(tmp, args)
        if not args.skip_memory:
            result.update(measure_memory(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
