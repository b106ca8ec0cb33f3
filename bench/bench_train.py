"""Benchmark train_net.py's step against a naive reference step, and profile where the time goes.

In one run, on the same model (DeepRank, resnet101 at 224 px by default, conv5 + head
trainable as the original's best run), the same batch size (25 triplets) and optimiser:

  ours    train_net.main() end to end (JPEG loading, bf16 autocast, channels_last, the
          batch's 75 images in one forward pass, the frozen layers without autograd and
          compiled with their weights frozen as --compile auto does for a long run; set-up
          and compiling removed by subtracting a 1-step run)
  naive   fp32, query / positive / negative as three separate forward passes, on
          ready-made tensors (which favours it: no loading cost)

Prints training triplets/s of each (median of --repeats runs) and their ratio, then the
top operators of one profiled step of ours (torch.profiler, self CPU time).

    python -m bench.bench_train --steps 6 --repeats 3
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import train_net
from bench.bench_embed import make_data
from deep_rank_net import DeepRank
from deeprank import training
from deeprank.loaders import Normalize
from deeprank.losses import ranking_loss
from deeprank.runtime import FrozenRunner, autocast, prepare

ROOT = Path(__file__).resolve().parents[1]


def ours_triplets_per_s(csv, out_dir, args):
    """Triplets/s of train_net.main() over --steps steps (the first, warm-up step excluded)."""
    flags = ["--triplets", str(csv), "--backbone", args.backbone, "--weights", "none", "--image_size",
             str(args.image_size), "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
             "--epochs", "1", "--out", str(out_dir / "m.model"), "--compile", args.compile]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        train_net.main(flags + ["--max_steps", "1"])  # warm-up run: oneDNN primitives, page cache
        start = time.perf_counter()
        train_net.main(flags + ["--max_steps", str(args.steps)])
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        train_net.main(flags + ["--max_steps", "1"])
        fixed = time.perf_counter() - start  # model build + one step + checkpoint: remove set-up costs
    return args.batch_size * (args.steps - 1) / max(elapsed - fixed, 1e-9)


def naive_triplets_per_s(args):
    """Triplets/s of the naive reference: fp32, three forward passes, same trainable layers."""
    torch.manual_seed(0)
    model = DeepRank(backbone=args.backbone, image_size=args.image_size, weights="none", trainable="conv5").train()
    opt = training.make_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.001, 0.0)
    q, p, n = (torch.randn(args.batch_size, 3, args.image_size, args.image_size) for _ in range(3))

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.triplet_margin_loss(model(q), model(p), model(n))  # the original's loss
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(args.naive_steps):
        step()
    return args.batch_size * args.naive_steps / (time.perf_counter() - start)


def profile_step(args):
    """Top operators by self CPU time in one of our training steps (bf16, one forward of 3B images,
    the frozen trunk as train_net runs it)."""
    device = torch.device("cpu")
    model = prepare(DeepRank(backbone=args.backbone, image_size=args.image_size, weights="none"), device).train()
    opt = training.make_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.001, 0.0)
    batch = torch.randint(0, 255, (3 * args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    normalize = Normalize(device)
    trunk, tail = model.frozen_split()
    trunk = FrozenRunner(trunk, 3 * args.batch_size, compile=args.compile == "on")

    def forward():
        images = normalize(batch)
        with autocast(device):
            return model.head(tail(trunk(images)), images).float()

    def step():
        emb = forward()
        loss = ranking_loss(emb, None, "none", margin=1.0, distance="euclidean")[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    phases = {}
    start = time.perf_counter()
    with autocast(device):
        trunk(normalize(batch))
    phases["frozen_trunk_forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    emb = forward()
    phases["forward_s"] = time.perf_counter() - start
    loss = ranking_loss(emb, None, "none", margin=1.0, distance="euclidean")[0]
    start = time.perf_counter()
    loss.backward()
    phases["backward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    phases["optimizer_s"] = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {key: round(value, 3) for key, value in phases.items()}, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=25)
    parser.add_argument("--steps", type=int, default=6, help="steps of ours per run (the first is excluded)")
    parser.add_argument("--naive_steps", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_profile", action="store_true")
    parser.add_argument("--compile", default="on", choices=("on", "off"), help="ours: train_net --compile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv, _ = make_data(tmp, args.batch_size * args.steps * 2)
        ours, naive = [], []
        for _ in range(args.repeats):
            ours.append(ours_triplets_per_s(csv, tmp, args))
            naive.append(naive_triplets_per_s(args))
    result = {"model": f"DeepRank {args.backbone} {args.image_size}px, conv5 trainable", "compile": args.compile,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "ours_triplets_s": round(statistics.median(ours), 3),
              "naive_fp32_triplets_s": round(statistics.median(naive), 3)}
    result["ours_vs_naive"] = round(result["ours_triplets_s"] / result["naive_fp32_triplets_s"], 2)
    if not args.no_profile:
        phases, table = profile_step(args)
        result.update(phases)
    print(json.dumps(result))
    if not args.no_profile:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
