"""Training, shared by train_net.py's parts: the three modes a run trains in (CSV triplets, CSV
pairs, P x K batches with online mining), the optimiser and learning-rate schedule, the layers
that train, and an epoch's running statistics.

    mode = training_mode(args)          # its dataset, batch layout and loss, decided once
    loss, stats = mode.loss(embeddings, labels, args, state, memory)   # state: deeprank.loss_state.LossState
"""

import math
import time
from functools import partial

import numpy as np
import torch

from deeprank.common import PipelineError
from deeprank.datasets import ImageSource, check_images_exist, unique_in_order
from deeprank.distributed import Cluster
from deeprank.loaders import (
    LabelledImages,
    PairImages,
    PKBatchSampler,
    TripletImages,
    labelled_batch,
    pair_batch,
    triplet_batch,
)
from deeprank.loss_flags import EVERY_LOSS_FLAG, LOSS_FLAGS
from deeprank.losses import multi_similarity_loss, pair_loss, proxy_anchor_loss, ranking_loss
from deeprank.sample_csv import read_pair_csv, read_triplet_csv

MOMENTUM = 0.9             # SGD / RMSprop momentum
OPTIMS = ("sgd", "adam", "rms")


# ----------------------------------------------------------------------------- modes
# the dataset flags (common.dataset_flags) that the CSV modes do not read
DATASET_FLAGS = ("data", "layout", "val_fraction", "split_seed", "path_column", "label_column", "image_root",
                 "top_classes", "per_class")

class CsvTriplets:
    """--mining none, --loss triplet: rows of a triplet CSV; a batch is B queries | B positives |
    B negatives (columns first), and the loss takes the rows' own triplets."""

    unit, columns, label_columns, classes = "triplets", 3, 1, 0  # classes: none (no proxies without labels)
    unused = ("pairs", "classes_per_batch", "images_per_class") + DATASET_FLAGS  # flags it does not read

    def __init__(self, args, empty_ok):
        self.rows = read_triplet_csv(args.triplets)
        check_images_exist(unique_in_order(*self.rows), args.triplets, empty_ok=empty_ok)
        self.images_per_batch, self.collate, self.sampler, self.source = 3 * args.batch_size, triplet_batch, None, None

    def dataset(self, size, augment):
        q, p, n = self.rows
        return TripletImages(q, p, n, size(q), augment)

    def loss(self, emb, labels, args, state, memory=None):
        return ranking_loss(emb, None, args.mining, args.margin, args.distance, args.soft_margin)


class CsvPairs:
    """--mining none, --loss contrastive: rows of a pair CSV; a batch is B first | B second images,
    and its labels are the rows' same flags."""

    unit, columns, label_columns, classes = "pairs", 2, 1, 0
    unused = ("triplets", "classes_per_batch", "images_per_class", "distance", "soft_margin") + DATASET_FLAGS

    def __init__(self, args, empty_ok):
        self.rows = read_pair_csv(args.pairs)
        check_images_exist(unique_in_order(*self.rows[:2]), args.pairs, empty_ok=empty_ok)
        self.images_per_batch, self.collate, self.sampler, self.source = 2 * args.batch_size, pair_batch, None, None

    def dataset(self, size, augment):
        first, second, same = self.rows
        return PairImages(first, second, same, size(first), augment)

    def loss(self, emb, same, args, state, memory=None):
        return pair_loss(emb, None, same, args.margin)


class PKBatches:
    """--batches pk (or --mining batch_*): P classes x K images of --data's train split a batch, labelled by class
    0..classes-1; the loss mines its triplets inside the batch (contrastive: takes every pair;
    multi-similarity: mines pairs; proxy-anchor: pairs each image with every class's proxy), and
    with a memory (--memory, from --memory_start on) also against its earlier embeddings (XBM's two
    terms, weight 1). The loss reads the memory and changes nothing: the caller enqueues the batch."""

    columns = label_columns = 1
    unused = ("triplets", "pairs", "batch_size")

    def __init__(self, args, empty_ok):
        self.source = ImageSource.from_args(args)
        self.paths, labels = self.source.split("train")
        self.codes = np.unique(np.asarray(labels), return_inverse=True)[1]
        self.classes = int(self.codes.max()) + 1 if len(self.codes) else 0
        check_images_exist(self.paths, f"--data {args.data} (train)", empty_ok=empty_ok)
        self.sampler = PKBatchSampler(labels, args.classes_per_batch, args.images_per_class, args.seed,
                                      f"--data {self.source.root('train')}")
        self.images_per_batch, self.collate = args.classes_per_batch * args.images_per_class, labelled_batch
        self.unit = {"triplet": "triplets", "proxy_anchor": "images"}.get(args.loss, "pairs")

    def dataset(self, size, augment):
        return LabelledImages(self.paths, self.codes, size(self.paths), augment)

    def loss(self, emb, labels, args, state, memory=None):
        if args.loss == "triplet":
            return ranking_loss(emb, labels, args.mining, args.margin, args.distance, args.soft_margin)
        if args.loss == "proxy_anchor":
            return proxy_anchor_loss(emb, labels, state.proxies, args.pa_alpha, args.pa_delta)
        ms = (args.ms_alpha, args.ms_beta, args.ms_base, args.ms_epsilon)
        pairs = (partial(pair_loss, emb, labels, None, args.margin) if args.loss == "contrastive" else
                 partial(multi_similarity_loss, emb, labels, *ms))
        loss, stats = pairs()
        if memory is not None:  # the batch against the memory, the batch's own rows included
            loss = loss + pairs(*memory.references(emb, labels))[0]
        return loss, stats


def mode_of(args):
    """The mode class a run's flags choose."""
    return PKBatches if args.mining != "none" else CsvPairs if args.loss == "contrastive" else CsvTriplets


BATCH_LAYOUTS = ("csv", "pk")


def resolve_batches(args, given):
    """--batches and --mining as one choice (given: the flags the command line gave): --batches pk
    without --mining mines batch_all (for the triplet loss: every triplet; the other losses take
    every image anyway); --mining batch_* means P x K batches (the old spelling, kept); args.batches
    is then what the run does. A CSV layout asked for with a miner is refused."""
    if args.batches == "pk" and args.mining == "none":
        if "mining" in given:
            raise PipelineError("--batches pk mines inside P x K batches: pass --mining batch_all, batch_hard or "
                                "batch_semihard (or leave --mining out), not none")
        args.mining = "batch_all"
    elif "batches" in given and args.batches == "csv" and args.mining != "none":
        raise PipelineError(f"--mining {args.mining} mines inside P x K batches: pass --batches pk, not csv")
    args.batches = "pk" if args.mining != "none" else "csv"


def unused_flags(args):
    """The flags this run does not read (its mode's, the other losses', --memory_start without a
    memory, and --distill's temperature without --distill)."""
    others = set(EVERY_LOSS_FLAG) - set(LOSS_FLAGS[args.loss]) | (set() if args.memory else {"memory_start"})
    return mode_of(args).unused + tuple(sorted(others)) + (() if args.distill else ("distill_temperature",))


def training_mode(args):
    """The mode of a run's flags: its inputs read and checked (every listed image exists)."""
    return mode_of(args)(args, empty_ok=args.on_bad_image == "skip")


# ----------------------------------------------------------------------------- optimiser and schedule

def parameter_groups(model, lr, head_lr_mult=1.0):
    """Optimiser groups: trainable backbone layers at lr, the new layers (heads, branches) at lr * mult."""
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    owned = {id(p) for p in model.features.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    groups = [{"params": head, "lr": lr * head_lr_mult}]
    if backbone:
        groups.append({"params": backbone, "lr": lr})
    return groups


def make_optimizer(name, params, lr, weight_decay, momentum=MOMENTUM, fused=False):
    """The original's three optimisers; weight decay is the paper's L2 regularisation. fused: one
    kernel for the whole update (CUDA; SGD and Adam)."""
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay, **extra)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)
    if name == "rms":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise PipelineError(f"unknown --optim {name}; choose {', '.join(OPTIMS)}")


def build_optimizer(model, args, ckpt, extra_groups=()):
    """The optimiser over the trainable layers (and extra_groups: the loss's proxies), with
    --resume's state when there is one."""
    cuda = next(model.parameters()).device.type == "cuda"
    groups = parameter_groups(model, args.lr, args.head_lr_mult) + list(extra_groups)
    optimizer = make_optimizer(args.optim, groups, args.lr, args.weight_decay, fused=cuda)
    if ckpt is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise PipelineError(f"{args.resume}'s optimizer state does not fit --optim {args.optim} "
                                f"--trainable {args.trainable} ({err}); resume with the run's flags") from None
    return optimizer


def lr_factor(step, total_steps, warmup_steps, schedule):
    """Learning-rate multiplier at a global step: linear warm-up, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Schedule:
    """The learning rate of each global step. With --max_minutes the run's length in steps is
    re-estimated every step from the pace so far, so a cosine schedule spans the time budget."""

    def __init__(self, optimizer, args, steps_per_epoch, start_epoch, cluster=None):
        self.optimizer, self.kind, self.start_step = optimizer, args.schedule, start_epoch * steps_per_epoch
        self.cluster = cluster or Cluster()
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.total_steps = steps_per_epoch * args.epochs
        self.warmup_steps = int(args.warmup_epochs * steps_per_epoch)
        self.budget = args.max_minutes * 60
        self.start = time.perf_counter()

    def set_lr(self, step):
        """Set every group's learning rate for global step `step`."""
        if self.budget:
            spent = self.spent()
            done = step - self.start_step
            self.total_steps = max(step + 1, int(step + (self.budget - spent) * done / max(spent, 1e-9)))
        factor = lr_factor(step, self.total_steps, self.warmup_steps, self.kind)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def spent(self):
        """Seconds since the start; under torchrun the slowest rank's, so every rank agrees."""
        return self.cluster.maximum(time.perf_counter() - self.start)

    def out_of_time(self):
        return bool(self.budget) and self.spent() >= self.budget


# ----------------------------------------------------------------------------- the layers that train

class TrainedLayers(torch.nn.Module):
    """The layers that train, as one module (what DistributedDataParallel wraps): the trainable
    backbone layers after the frozen trunk, then the head."""

    def __init__(self, model, tail):
        super().__init__()
        self.model, self.tail = model, tail

    def forward(self, features, images):
        return self.model.head(self.tail(features), images)


def compile_trained_layers(device):
    """Whether the layers that train are compiled too (forward and backward) when compiling: on
    CUDA only; on a CPU it did not repay its compiling time (docs/benchmarks.md, "Speed benchmarks")."""
    return device.type == "cuda"


# ----------------------------------------------------------------------------- one epoch's statistics

class EpochStats:
    """Running totals of one epoch's steps; row() is its line in the log."""

    def __init__(self):
        self.losses, self.d_pos, self.d_neg, self.distill = [], [], [], []
        self.actives, self.counts = [], []
        self.active = self.count = self.images = 0
        self.start = time.perf_counter()

    def add(self, loss, stats, images):
        """Count one step: its loss, the loss's stats, the images it saw."""
        self.losses.append(loss)
        self.active += stats["active"]
        self.count += stats["count"]
        self.actives.append(stats["active"])
        self.counts.append(stats["count"])
        self.d_pos.append(stats["d_pos"])
        self.d_neg.append(stats["d_neg"])
        if "distill" in stats:
            self.distill.append(stats["distill"])
        self.images += images

    def window(self, since):
        """The means of the steps after the first `since` of this epoch (a step record's figures)."""
        d_pos, d_neg = self.d_pos[since:], self.d_neg[since:]
        return {"loss": float(np.mean(self.losses[since:])),
                "active_share": sum(self.actives[since:]) / max(1, sum(self.counts[since:])),
                "mean_pos_distance": float(np.nanmean(d_pos)) if d_pos else None,
                "mean_neg_distance": float(np.nanmean(d_neg)) if d_neg else None}

    def elapsed(self):
        return time.perf_counter() - self.start

    def postfix(self):
        """The progress bar's loss (last 50 steps) and images per second."""
        return {"loss": f"{np.mean(self.losses[-50:]):.4f}",
                "img_s": f"{self.images / (time.perf_counter() - self.start):.1f}"}

    def row(self, epoch, lr):
        """The epoch's metrics (epoch counted from 1)."""
        elapsed = time.perf_counter() - self.start
        row = {"epoch": epoch, "steps": len(self.losses),
               "loss": float(np.mean(self.losses)) if self.losses else None,
               "active_share": self.active / max(1, self.count),
               "zero_loss_share": 1 - self.active / max(1, self.count),
               "mean_pos_distance": float(np.nanmean(self.d_pos)) if self.d_pos else None,
               "mean_neg_distance": float(np.nanmean(self.d_neg)) if self.d_neg else None,
               "seconds": round(elapsed, 2), "images_per_s": round(self.images / max(elapsed, 1e-9), 2), "lr": lr}
        if self.distill:
            row["distill_kl"] = float(np.mean(self.distill))
        return row


def collapsed(row):
    """Whether an epoch's embedding has collapsed: every distance near zero."""
    return max(row["mean_pos_distance"], row["mean_neg_distance"]) < 1e-3
