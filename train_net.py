"""Stage 2: train DeepRank with the triplet hinge loss.

Reads a triplet CSV (query,positive,negative) from triplet_sampler.py; writes
temp_net<epoch>.model after each epoch and deepranknet.model at the end (plain-data
checkpoints, written atomically, next to --out), plus <out stem>_log.jsonl with one JSON
line per epoch. Each batch's query, positive and negative images go through the network
in one forward pass. --resume continues a run with the same result as an uninterrupted one.

    python train_net.py --epochs 1 --optim sgd
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import (ImageList, Normalize, PipelineError, autocast, bf16_supported, check_images_exist,
                      check_output_path, common_parser, make_loader, print_args, read_triplet_csv, resolve_device, run_cli,
                      unique_in_order)
from deep_rank_net import (BACKBONES, TRAINABLE_CHOICES, DeepRank, embed_batches, load_checkpoint,
                           model_from_checkpoint, prepare, save_checkpoint, trainable_parameters)

# ---------------------------------------------------------------- hyperparameters
EPOCHS = 1                 # passes over the triplet CSV
OPTIM = "sgd"              # sgd (Nesterov, momentum 0.9) | adam | rms, as the original
BATCH_SIZE = 25            # triplets per step (75 images per forward pass)
LEARNING_RATE = 0.001      # the original's
MOMENTUM = 0.9             # SGD / RMSprop momentum
WEIGHT_DECAY = 0.0         # L2 weight regularisation (the paper's); 0 as the original
SCHEDULE = "constant"      # constant | cosine (after WARMUP_EPOCHS of linear warm-up)
WARMUP_EPOCHS = 0.0        # linear warm-up length, in epochs (fractions allowed)
MARGIN = 1.0               # hinge margin (the original's F.triplet_margin_loss default)
DISTANCE = "euclidean"     # euclidean (the original's) | squared (the paper's) inside the loss
BACKBONE = "resnet101"
WEIGHTS = "imagenet"       # imagenet | none | PATH to a local backbone state_dict
TRAINABLE = "conv5"        # conv5 (original's best) | all | head
IMAGE_SIZE = 224           # TinyImageNet's 64 px images are resized to this
EMBED_DIM = 4096
AUGMENT = "flip"           # none | flip (the original's) | standard (crop + flip + colour)
TRIPLETS = "training_triplet_sample.csv"
OUT = "deepranknet.model"
# ----------------------------------------------------------------


# ----------------------------------------------------------------------------- pure pieces

def pairwise_sq(a, b):
    """Row-wise squared L2 distance between a and b: (B, D), (B, D) -> (B,)."""
    return (a - b).pow(2).sum(1)


def triplet_hinge(q, p, n, margin=MARGIN, distance=DISTANCE):
    """Per-triplet hinge loss max(0, margin + D(q,p) - D(q,n)): (B,) for (B, D) inputs."""
    d_pos, d_neg = pairwise_sq(q, p), pairwise_sq(q, n)
    if distance == "euclidean":
        d_pos, d_neg = (d_pos + 1e-12).sqrt(), (d_neg + 1e-12).sqrt()
    return F.relu(margin + d_pos - d_neg)


def lr_factor(step, total_steps, warmup_steps, schedule):
    """Learning-rate multiplier at a global step: linear warm-up, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(name, params, lr, weight_decay, momentum=MOMENTUM):
    """The original's three optimisers; weight decay is the paper's L2 regularisation."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rms":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise PipelineError(f"unknown --optim {name}; choose sgd, adam or rms")


def make_augment(name, image_size):
    """Train-only augmentation on PIL images (None for 'none')."""
    import torchvision.transforms as T

    if name == "none":
        return None
    if name == "flip":
        return T.RandomHorizontalFlip()
    if name == "standard":
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
                          T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2)])
    raise PipelineError(f"unknown --augment {name}; choose none, flip or standard")


class TripletImages(torch.utils.data.Dataset):
    """Row i of a triplet CSV -> (3, 3, S, S) uint8: query, positive, negative."""

    def __init__(self, q, p, n, image_size, augment=None):
        self.images = ImageList([], image_size, augment)
        self.rows = list(zip(q, p, n))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return torch.stack([self.images.load(path) for path in self.rows[index]])


# ----------------------------------------------------------------------------- parser

def build_parser():
    """train_net.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--epochs", type=int, default=EPOCHS, help="epochs (default: %(default)s)")
    a("--optim", default=OPTIM, choices=("sgd", "adam", "rms"), help="optimiser (default: %(default)s)")
    a("--batch_size", type=int, default=BATCH_SIZE, help="triplets per step (default: %(default)s)")
    a("--lr", type=float, default=LEARNING_RATE, help="learning rate (default: %(default)s)")
    a("--weight_decay", type=float, default=WEIGHT_DECAY, help="L2 weight decay (default: %(default)s)")
    a("--schedule", default=SCHEDULE, choices=("constant", "cosine"), help="LR schedule (default: %(default)s)")
    a("--warmup_epochs", type=float, default=WARMUP_EPOCHS, help="linear LR warm-up (default: %(default)s)")
    a("--margin", type=float, default=MARGIN, help="hinge margin (default: %(default)s)")
    a("--distance", default=DISTANCE, choices=("euclidean", "squared"),
      help="distance inside the loss (default: %(default)s)")
    a("--backbone", default=BACKBONE, choices=BACKBONES, help="backbone ConvNet (default: %(default)s)")
    a("--weights", default=WEIGHTS, help="imagenet | none | PATH to a backbone state_dict (default: %(default)s)")
    a("--trainable", default=TRAINABLE, choices=TRAINABLE_CHOICES, help="layers to train (default: %(default)s)")
    a("--image_size", type=int, default=IMAGE_SIZE, help="input side in pixels (default: %(default)s)")
    a("--embed_dim", type=int, default=EMBED_DIM, help="embedding size (default: %(default)s)")
    a("--augment", default=AUGMENT, choices=("none", "flip", "standard"),
      help="train-only augmentation (default: %(default)s)")
    a("--triplets", default=TRIPLETS, help="training triplet CSV (default: %(default)s)")
    a("--val_triplets", default=None, help="validation triplet CSV: report its accuracy each epoch")
    a("--out", default=OUT, help="final checkpoint; temp_net<epoch>.model go beside it (default: %(default)s)")
    a("--resume", default=None, help="continue from this checkpoint (same seed: same result)")
    a("--no_amp", action="store_true", help="train in fp32 even where bf16 autocast is available")
    a("--max_steps", type=int, default=0, help="stop each epoch after this many steps (0: all; for smoke tests)")
    return parser


# ----------------------------------------------------------------------------- training

def evaluate_triplets(model, csv_path, device, args):
    """Share of a CSV's triplets ranked correctly, embedding each distinct image once."""
    from eval import triplet_accuracy

    q, p, n = read_triplet_csv(csv_path)
    paths = unique_in_order(q, p, n)
    row = {path: i for i, path in enumerate(paths)}
    model.eval()
    vectors = torch.cat(list(embed_batches(model, paths, device, max(args.batch_size * 3, 64),
                                           args.num_workers, not args.no_amp)))
    model.train()
    index = [np.array([row[x] for x in column]) for column in (q, p, n)]
    return triplet_accuracy(vectors, *index)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise PipelineError("--epochs and --batch_size must be >= 1 and --lr > 0")
    out = check_output_path(args.out)
    folder = out.resolve().parent
    log_path = folder / f"{out.stem}_log.jsonl"
    device = resolve_device(args.device)

    # --- inputs, all checked before anything is written
    q, p, n = read_triplet_csv(args.triplets)
    check_images_exist(unique_in_order(q, p, n), args.triplets)
    if args.val_triplets:
        vq, vp, vn = read_triplet_csv(args.val_triplets)
        check_images_exist(unique_in_order(vq, vp, vn), args.val_triplets)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, args.resume)
        if model.trainable != args.trainable:
            model.set_trainable(args.trainable)
        start_epoch = int(ckpt["epoch"])
        if start_epoch >= args.epochs:
            raise PipelineError(f"{args.resume} already finished epoch {start_epoch}; pass --epochs > {start_epoch}")
    else:
        torch.manual_seed(args.seed)  # random init (heads, branches, --weights none) follows --seed
        model = DeepRank(backbone=args.backbone, embed_dim=args.embed_dim, image_size=args.image_size,
                         trainable=args.trainable, weights=args.weights)
        start_epoch = 0
    image_size = model.image_size
    model = prepare(model, device)
    optimizer = make_optimizer(args.optim, trainable_parameters(model), args.lr, args.weight_decay)
    if ckpt is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise PipelineError(f"{args.resume}'s optimizer state does not fit --optim {args.optim} "
                                f"--trainable {args.trainable} ({err}); resume with the run's flags") from None
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = args.lr

    print("train_net.py arguments:")
    print_args(args)
    amp = not args.no_amp
    print(f"device {device}, bf16 autocast {'on' if amp and bf16_supported(device) else 'off'}, {len(q)} triplets, "
          f"{sum(p.numel() for p in trainable_parameters(model)):,} trainable parameters")

    dataset = TripletImages(q, p, n, image_size, make_augment(args.augment, image_size))
    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    normalize = Normalize(device)
    config = {key: value for key, value in vars(args).items()}
    metrics = {}
    last_good = args.resume
    if start_epoch == 0:
        log_path.unlink(missing_ok=True)

    model.train()
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness derives from (seed, epoch): --resume replays it exactly
        torch.manual_seed(args.seed * 100003 + epoch)
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        loader = make_loader(dataset, args.batch_size, args.num_workers, device, shuffle=True, generator=generator)
        losses, zero, seen = [], 0, 0
        start = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                   dynamic_ncols=True, leave=False, disable=None)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            global_step = epoch * steps_per_epoch + step
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(global_step, total_steps, warmup_steps, args.schedule)
            b = batch.shape[0]
            images = normalize(batch.transpose(0, 1).reshape(3 * b, *batch.shape[2:]))  # (3B, 3, S, S): q | p | n
            with autocast(device, amp):
                emb = model(images)
            eq, ep, en = emb.float().split(b)
            per_triplet = triplet_hinge(eq, ep, en, args.margin, args.distance)
            loss = per_triplet.mean()
            if not torch.isfinite(loss):
                raise PipelineError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; training "
                                    f"stopped, last good checkpoint: {last_good or 'none'}; lower --lr or use --no_amp")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            zero += int((per_triplet == 0).sum())
            seen += b
            rate = 3 * seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", img_s=f"{rate:.1f}")
        bar.close()
        elapsed = time.perf_counter() - start
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "zero_loss_share": zero / max(1, seen),
                   "triplets": seen, "seconds": round(elapsed, 2), "images_per_s": round(3 * seen / elapsed, 2),
                   "lr": optimizer.param_groups[0]["lr"]}
        if args.val_triplets:
            metrics["val_triplet_accuracy"] = evaluate_triplets(model, args.val_triplets, device, args)
        temp = folder / f"temp_net{epoch + 1}.model"
        save_checkpoint(temp, model, optimizer, epoch + 1, config, metrics)
        last_good = str(temp)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")
        val = f", val triplet accuracy {100 * metrics['val_triplet_accuracy']:.2f}%" if args.val_triplets else ""
        print(f"epoch {epoch + 1}/{args.epochs}: loss {metrics['loss']:.4f}, zero-loss triplets "
              f"{100 * metrics['zero_loss_share']:.1f}%{val}, {metrics['images_per_s']:.1f} img/s, {elapsed:.0f} s")

    save_checkpoint(out, model, optimizer, args.epochs, config, metrics)
    print(f"wrote {out} (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
