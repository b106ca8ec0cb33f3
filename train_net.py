"""Stage 2: train DeepRank with the triplet hinge loss.

Reads a triplet CSV (query,positive,negative) from triplet_sampler.py (--mining none, the
original's way), or with --mining batch_hard|batch_semihard|batch_all the train split of
--data, mining triplets online inside P x K batches (Hermans et al. 2017). Writes
temp_net<epoch>.model after each epoch and deepranknet.model at the end (plain-data
checkpoints, written atomically, next to --out), plus <out stem>_log.jsonl with one JSON
line per epoch. Each batch's images go through the network in one forward pass.
--resume continues a run with the same result as an uninterrupted one.

    python train_net.py --epochs 1 --optim sgd
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import (ImageList, Normalize, PipelineError, autocast, bf16_supported, check_images_exist,
                      check_output_path, common_parser, list_split, make_loader, print_args, read_triplet_csv,
                      resolve_device, run_cli, unique_in_order)
from deep_rank_net import (BACKBONES, COMPILE_CHOICES, TRAINABLE_CHOICES, DeepRank, FrozenRunner, PooledFeatures,
                           build_backbone, embed_batches, load_checkpoint, model_from_checkpoint, prepare,
                           save_checkpoint, trainable_parameters, want_compile)

# ---------------------------------------------------------------- hyperparameters
EPOCHS = 1                 # passes over the triplet CSV
OPTIM = "sgd"              # sgd (Nesterov, momentum 0.9) | adam | rms, as the original
BATCH_SIZE = 25            # triplets per step (75 images per forward pass)
LEARNING_RATE = 0.001      # the original's
MOMENTUM = 0.9             # SGD / RMSprop momentum
WEIGHT_DECAY = 0.0         # L2 weight regularisation (the paper's); 0 as the original
HEAD_LR_MULT = 1.0         # LR multiplier of the new layers over the pretrained backbone's
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
MINING = "none"            # none: pre-sampled CSV triplets (original) | batch_hard | batch_semihard | batch_all
CLASSES_PER_BATCH = 16     # P of a P x K batch (online mining)
IMAGES_PER_CLASS = 4       # K of a P x K batch (online mining)
SOFT_MARGIN = False        # online mining: softplus(d_ap - d_an) instead of the hinge
DISTILL = 0.0              # weight of the pull toward the pretrained backbone's neighbourhoods (0: off)
DISTILL_TEMPERATURE = 0.5  # softmax temperature of those neighbour distributions (standardised similarities)
COMPILE = "auto"           # compile the frozen backbone layers: auto (long runs) | on | off
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


def distance_matrix(emb, distance=DISTANCE):
    """(B, B) distances between the rows of emb: squared L2 or Euclidean."""
    sq = emb.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * emb @ emb.T).clamp(min=0)
    return (d + 1e-12).sqrt() if distance == "euclidean" else d


def _masks(labels):
    """(positive pair mask, negative pair mask), each (B, B) bool."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _hinge(d_ap, d_an, margin, soft):
    """Per-triplet loss: softplus(d_ap - d_an) or max(0, margin + d_ap - d_an)."""
    return F.softplus(d_ap - d_an) if soft else F.relu(margin + d_ap - d_an)


def _stats(d, pos, neg, active, count):
    """Batch statistics every miner reports."""
    return {"active": int(active), "count": int(count),
            "d_pos": float(d[pos].mean()) if pos.any() else float("nan"),
            "d_neg": float(d[neg].mean()) if neg.any() else float("nan")}


def batch_all_loss(emb, labels, margin=MARGIN, distance=DISTANCE, soft=False):
    """Every valid (a, p, n) of the batch; mean over the active ones (Hermans et al.'s BA!=0)."""
    d = distance_matrix(emb, distance)
    pos, neg = _masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # (B, B, B): a, p, n
    gap = (d[:, :, None] - d[:, None, :])[valid]  # d(a,p) - d(a,n) of every valid triplet
    loss = _hinge(gap, torch.zeros_like(gap), margin, soft)
    active = margin + gap > 0
    total = loss.mean() if soft else loss.sum() / active.sum().clamp(min=1)
    return total, _stats(d.detach(), pos, neg, active.sum(), valid.sum())


def batch_hard_loss(emb, labels, margin=MARGIN, distance=DISTANCE, soft=False):
    """Per anchor: its farthest positive against its nearest negative (Hermans et al.'s batch hard)."""
    d = distance_matrix(emb, distance)
    pos, neg = _masks(labels)
    hardest_pos = d.masked_fill(~pos, float("-inf")).max(1).values
    hardest_neg = d.masked_fill(~neg, float("inf")).min(1).values
    ok = pos.any(1) & neg.any(1)
    loss = _hinge(hardest_pos[ok], hardest_neg[ok], margin, soft)
    active = (margin + hardest_pos[ok] - hardest_neg[ok] > 0).sum()
    return loss.mean() if ok.any() else emb.sum() * 0, _stats(d.detach(), pos, neg, active, ok.sum())


def batch_semihard_loss(emb, labels, margin=MARGIN, distance=DISTANCE, soft=False):
    """Per positive pair: the nearest negative farther than the positive (FaceNet's semi-hard);
    where none is, the farthest negative nearer than it."""
    d = distance_matrix(emb, distance)
    pos, neg = _masks(labels)
    a, p = pos.nonzero(as_tuple=True)
    d_ap = d[a, p]  # (Pairs,)
    d_an = d[a]  # (Pairs, B)
    neg_a = neg[a]
    outside = neg_a & (d_an > d_ap[:, None])
    semi = d_an.masked_fill(~outside, float("inf")).min(1).values
    inside = d_an.masked_fill(~neg_a, float("-inf")).max(1).values
    chosen = torch.where(outside.any(1), semi, inside)
    ok = neg_a.any(1)
    loss = _hinge(d_ap[ok], chosen[ok], margin, soft)
    active = (margin + d_ap[ok] - chosen[ok] > 0).sum()
    return loss.mean() if ok.any() else emb.sum() * 0, _stats(d.detach(), pos, neg, active, ok.sum())


def neighbour_kl(student, teacher, temperature=DISTILL_TEMPERATURE):
    """Mean over the batch's rows of KL(P_teacher(.|i) || P_student(.|i)): how far each image's
    distribution over its batch neighbours has moved from the teacher's. P(j|i) is the softmax
    over j != i of z_ij / temperature, z_ij the cosine similarity cos(x_i, x_j) standardised over
    row i (zero mean, unit variance), so only the neighbours' order and relative spacing count,
    not the scale of either space. Rows of both inputs are unit vectors; at least 3 rows."""
    n = len(student)
    eye = torch.eye(n, dtype=torch.bool, device=student.device)

    def log_p(x):
        sim = (x @ x.T).masked_fill(eye, 0)
        mean = sim.sum(1, keepdim=True) / (n - 1)
        var = (sim - mean).masked_fill(eye, 0).pow(2).sum(1, keepdim=True) / (n - 2)
        z = (sim - mean) / (var + 1e-12).sqrt()
        return F.log_softmax((z / temperature).masked_fill(eye, -1e4), dim=1)  # exp(-1e4) == 0: never oneself

    return F.kl_div(log_p(student.float()), log_p(teacher.float()), log_target=True, reduction="batchmean")


MINERS = {"batch_all": batch_all_loss, "batch_hard": batch_hard_loss, "batch_semihard": batch_semihard_loss}


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P classes x K images ("In Defense of the Triplet Loss").

    Each batch: P distinct classes (of those with >= 2 images), K images of each, distinct
    unless the class has fewer than K. An epoch has len(labels) // (P * K) batches. The
    draw depends only on (seed, epoch): set_epoch() makes resumed runs replay it.
    """

    def __init__(self, labels, classes_per_batch, images_per_class, seed=0):
        names, codes = np.unique(np.asarray(labels), return_inverse=True)
        self.members = [np.flatnonzero(codes == c) for c in range(len(names))]
        self.eligible = np.array([c for c, m in enumerate(self.members) if len(m) >= 2])
        if images_per_class < 2:
            raise PipelineError("--images_per_class must be at least 2 (a positive needs a partner)")
        if classes_per_batch < 2 or len(self.eligible) < classes_per_batch:
            raise PipelineError(f"--classes_per_batch {classes_per_batch} needs that many classes with >= 2 images "
                                f"(found {len(self.eligible)}) and at least 2")
        self.p, self.k, self.seed, self.epoch = classes_per_batch, images_per_class, seed, 0
        self.batches = max(1, len(labels) // (classes_per_batch * images_per_class))

    def set_epoch(self, epoch):
        """Choose the epoch whose batches __iter__ yields."""
        self.epoch = epoch

    def __len__(self):
        return self.batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches):
            batch = []
            for c in rng.choice(self.eligible, self.p, replace=False):
                m = self.members[c]
                batch.extend(rng.choice(m, self.k, replace=len(m) < self.k).tolist())
            yield batch


class LabelledImages(torch.utils.data.Dataset):
    """Image i -> ((3, S, S) uint8, class code)."""

    def __init__(self, paths, codes, image_size, augment=None):
        self.images = ImageList(paths, image_size, augment)
        self.codes = codes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.codes[index])


def parameter_groups(model, lr, head_lr_mult=1.0):
    """Optimiser groups: trainable backbone layers at lr, the new layers (heads, branches) at lr * mult."""
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    owned = {id(p) for p in model.features.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    groups = [{"params": head, "lr": lr * head_lr_mult}]
    if backbone:
        groups.append({"params": backbone, "lr": lr})
    return groups


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
    a("--head_lr_mult", type=float, default=HEAD_LR_MULT,
      help="learning-rate multiplier of the new layers (projection, branches, embedding) (default: %(default)s)")
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
    a("--mining", default=MINING, choices=("none",) + tuple(MINERS),
      help="none: triplets from --triplets (original); else mine triplets online inside P x K batches "
           "drawn from --data's train split (default: %(default)s)")
    a("--classes_per_batch", type=int, default=CLASSES_PER_BATCH, help="P, online mining (default: %(default)s)")
    a("--images_per_class", type=int, default=IMAGES_PER_CLASS, help="K, online mining (default: %(default)s)")
    a("--soft_margin", action="store_true", default=SOFT_MARGIN,
      help="online mining: soft-margin loss softplus(d_ap - d_an) instead of the hinge")
    a("--distill", type=float, default=DISTILL,
      help="weight of a second loss that keeps each image's batch neighbours as the pretrained backbone (a frozen "
           "copy of --weights) ranks them, against overfitting the classes (0: off) (default: %(default)s)")
    a("--distill_temperature", type=float, default=DISTILL_TEMPERATURE,
      help="temperature of --distill's neighbour distributions over standardised cosine similarities "
           "(default: %(default)s)")
    a("--keep_last", type=int, default=0, help="keep only the last N temp_net<epoch>.model files (0: all)")
    a("--max_steps", type=int, default=0, help="stop each epoch after this many steps (0: all; for smoke tests)")
    a("--compile", default=COMPILE, choices=COMPILE_CHOICES,
      help="torch.compile the frozen backbone layers with their weights frozen (about 2x per step for "
           "resnet101 conv5 on a CPU with AMX, ~20 s to compile); auto: for long enough runs (default: %(default)s)")
    a("--max_minutes", type=float, default=0,
      help="stop training after this many minutes (0: no limit); a cosine schedule then spans the budget")
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


def build_model(args, ckpt):
    """(model, first epoch): rebuilt from --resume's checkpoint, or new from the flags."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, args.resume)
        if model.trainable != args.trainable:
            model.set_trainable(args.trainable)
        start_epoch = int(ckpt["epoch"])
        if start_epoch >= args.epochs:
            raise PipelineError(f"{args.resume} already finished epoch {start_epoch}; pass --epochs > {start_epoch}")
        return model, start_epoch
    torch.manual_seed(args.seed)  # random init (heads, branches, --weights none) follows --seed
    model = DeepRank(backbone=args.backbone, embed_dim=args.embed_dim, image_size=args.image_size,
                     trainable=args.trainable, weights=args.weights)
    return model, 0


def build_data(args, image_size):
    """(dataset, batch sampler or None, images per batch) for --mining none or online mining."""
    augment = make_augment(args.augment, image_size)
    if args.mining == "none":
        q, p, n = read_triplet_csv(args.triplets)
        check_images_exist(unique_in_order(q, p, n), args.triplets)
        return TripletImages(q, p, n, image_size, augment), None, 3 * args.batch_size
    paths, labels = list_split(args.data, "train")
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    sampler = PKBatchSampler(labels, args.classes_per_batch, args.images_per_class, args.seed)
    return LabelledImages(paths, codes, image_size, augment), sampler, args.classes_per_batch * args.images_per_class


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs < 0 or args.batch_size < 1 or args.lr <= 0:
        raise PipelineError("--epochs must be >= 0 (0 writes the initial model), --batch_size >= 1 and --lr > 0")
    if args.distill < 0 or args.distill_temperature <= 0:
        raise PipelineError("--distill must be >= 0 and --distill_temperature > 0")
    if args.distill and args.weights == "none":
        raise PipelineError("--distill keeps the pretrained backbone's neighbourhoods: it needs --weights imagenet "
                            "or PATH, not none")
    out = check_output_path(args.out)
    folder = out.resolve().parent
    log_path = folder / f"{out.stem}_log.jsonl"
    device = resolve_device(args.device)

    # --- inputs, all checked before anything is written
    ckpt = load_checkpoint(args.resume) if args.resume else None
    model, start_epoch = build_model(args, ckpt)
    dataset, batch_sampler, batch_images = build_data(args, model.image_size)
    if args.val_triplets:
        check_images_exist(unique_in_order(*read_triplet_csv(args.val_triplets)), args.val_triplets)
    model = prepare(model, device)
    optimizer = make_optimizer(args.optim, parameter_groups(model, args.lr, args.head_lr_mult), args.lr,
                               args.weight_decay)
    if ckpt is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise PipelineError(f"{args.resume}'s optimizer state does not fit --optim {args.optim} "
                                f"--trainable {args.trainable} ({err}); resume with the run's flags") from None
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    print("train_net.py arguments:")
    print_args(args)
    amp = not args.no_amp
    print(f"device {device}, bf16 autocast {'on' if amp and bf16_supported(device) else 'off'}, "
          f"{len(dataset)} {'triplets' if batch_sampler is None else 'images'}, "
          f"{sum(p.numel() for p in trainable_parameters(model)):,} trainable parameters")

    steps_per_epoch = len(batch_sampler) if batch_sampler is not None else math.ceil(len(dataset) / args.batch_size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    budget = args.max_minutes * 60
    normalize = Normalize(device)
    trunk, tail = model.frozen_split()
    work = batch_images * steps_per_epoch * (args.epochs - start_epoch)  # images through the network
    if trunk is not None:  # frozen layers: no autograd, and compiled with their weights as constants
        trunk = FrozenRunner(trunk, batch_images, want_compile(args.compile, work, model.image_size, device))
        print(f"frozen backbone layers: {'compiled' if trunk.compiled else 'eager'}")
    teacher = None
    if args.distill:  # a frozen copy of the pretrained backbone, as --weights gives it
        features = build_backbone(model.model_args["backbone"], args.weights, model.image_size)[0]
        teacher = FrozenRunner(prepare(PooledFeatures(features), device), batch_images,
                               want_compile(args.compile, work, model.image_size, device))

    def embed(images):
        """Embeddings of normalised images: frozen trunk (no autograd), then the trained layers."""
        with autocast(device, amp):
            features = tail(trunk(images) if trunk is not None else images)  # no trunk: tail is the backbone
            return model.head(features, images).float()

    config = dict(vars(args))
    metrics = {}
    last_good = args.resume
    if start_epoch == 0:
        log_path.unlink(missing_ok=True)
    train_start = time.perf_counter()
    out_of_time = False

    def ranking_loss(batch):
        """(loss, stats, embeddings, normalised images) of one batch: pre-sampled triplets or online mining."""
        if batch_sampler is None:
            b = batch.shape[0]
            images = normalize(batch.transpose(0, 1).reshape(3 * b, *batch.shape[2:]))  # (3B, 3, S, S): q|p|n
            eq, ep, en = embed(images).split(b)
            per_triplet = triplet_hinge(eq, ep, en, args.margin, args.distance)
            d_pos, d_neg = pairwise_sq(eq, ep).detach(), pairwise_sq(eq, en).detach()
            if args.distance == "euclidean":
                d_pos, d_neg = d_pos.sqrt(), d_neg.sqrt()
            return per_triplet.mean(), {"active": int((per_triplet > 0).sum()), "count": b,
                                        "d_pos": float(d_pos.mean()), "d_neg": float(d_neg.mean())}, \
                torch.cat([eq, ep, en]), images
        images, labels = batch
        images = normalize(images)
        emb = embed(images)
        loss, stats = MINERS[args.mining](emb, labels.to(device), args.margin, args.distance, args.soft_margin)
        return loss, stats, emb, images

    def batch_loss(batch):
        """(loss, stats) of one batch: the ranking loss, plus --distill's neighbourhood term."""
        loss, stats, emb, images = ranking_loss(batch)
        if teacher is not None:
            with autocast(device, amp):
                target = teacher(images)
            kl = neighbour_kl(emb, target, args.distill_temperature)
            loss = loss + args.distill * kl
            stats["distill"] = float(kl.detach())
        return loss, stats

    model.train()
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness derives from (seed, epoch): --resume replays it exactly
        torch.manual_seed(args.seed * 100003 + epoch)
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        if batch_sampler is None:
            loader = make_loader(dataset, args.batch_size, args.num_workers, device, shuffle=True,
                                 generator=generator)
        else:
            batch_sampler.set_epoch(epoch)
            loader = make_loader(dataset, None, args.num_workers, device, batch_sampler=batch_sampler,
                                 generator=generator)
        losses, active, count, d_pos, d_neg, distill, images_seen = [], 0, 0, [], [], [], 0
        start = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                   dynamic_ncols=True, leave=False, disable=None)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            global_step = epoch * steps_per_epoch + step
            if budget:  # the schedule spans the time budget: estimate its length in steps from the pace so far
                spent = time.perf_counter() - train_start
                done = global_step - start_epoch * steps_per_epoch
                total_steps = max(global_step + 1, int(global_step + (budget - spent) * done / max(spent, 1e-9)))
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(global_step, total_steps, warmup_steps, args.schedule)
            loss, stats = batch_loss(batch)
            if not torch.isfinite(loss):
                raise PipelineError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; training "
                                    f"stopped, last good checkpoint: {last_good or 'none'}; lower --lr or use --no_amp")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            active += stats["active"]
            count += stats["count"]
            d_pos.append(stats["d_pos"])
            d_neg.append(stats["d_neg"])
            if "distill" in stats:
                distill.append(stats["distill"])
            images_seen += batch_images if batch_sampler is not None else 3 * len(batch)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}",
                            img_s=f"{images_seen / (time.perf_counter() - start):.1f}")
            if budget and time.perf_counter() - train_start >= budget:
                out_of_time = True
                break
        bar.close()
        elapsed = time.perf_counter() - start
        metrics = {"epoch": epoch + 1, "steps": len(losses), "loss": float(np.mean(losses)) if losses else None,
                   "active_share": active / max(1, count), "zero_loss_share": 1 - active / max(1, count),
                   "mean_pos_distance": float(np.nanmean(d_pos)) if d_pos else None,
                   "mean_neg_distance": float(np.nanmean(d_neg)) if d_neg else None,
                   "seconds": round(elapsed, 2), "images_per_s": round(images_seen / max(elapsed, 1e-9), 2),
                   "lr": optimizer.param_groups[0]["lr"]}
        if distill:
            metrics["distill_kl"] = float(np.mean(distill))
        if args.val_triplets:
            metrics["val_triplet_accuracy"] = evaluate_triplets(model, args.val_triplets, device, args)
        temp = folder / f"temp_net{epoch + 1}.model"
        save_checkpoint(temp, model, optimizer, epoch + 1, config, metrics)
        last_good = str(temp)
        if args.keep_last and epoch + 1 - args.keep_last >= 1:
            (folder / f"temp_net{epoch + 1 - args.keep_last}.model").unlink(missing_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")
        val = f", val triplet accuracy {100 * metrics['val_triplet_accuracy']:.2f}%" if args.val_triplets else ""
        val += f", distill KL {metrics['distill_kl']:.4f}" if distill else ""
        print(f"epoch {epoch + 1}/{args.epochs}: loss {metrics['loss']:.4f}, active triplets "
              f"{100 * metrics['active_share']:.1f}%, d(a,p) {metrics['mean_pos_distance']:.3f}, "
              f"d(a,n) {metrics['mean_neg_distance']:.3f}{val}, {metrics['images_per_s']:.1f} img/s, {elapsed:.0f} s")
        if max(metrics["mean_pos_distance"], metrics["mean_neg_distance"]) < 1e-3:
            print("warning: the embedding has collapsed (all distances near zero); lower --lr, raise --margin, "
                  "or use --mining batch_semihard / --soft_margin", file=sys.stderr)
        if out_of_time:
            print(f"stopping: --max_minutes {args.max_minutes} reached")
            break

    save_checkpoint(out, model, optimizer, int(metrics.get("epoch", start_epoch)), config, metrics)
    print(f"wrote {out} (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
