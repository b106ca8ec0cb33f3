"""Stage 2: train DeepRank with the triplet hinge loss (or, with --loss contrastive, on pairs; --loss
multi_similarity, on the pairs of P x K batches; --loss proxy_anchor, against a learned proxy per
class; --memory N adds the last N embeddings to the contrastive and multi-similarity losses).

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
import math
import sys

import torch
from tqdm import tqdm

from deep_rank_net import (
    BACKBONE,
    BACKBONES,
    CONV_DIM,
    EMBED_DIM,
    IMAGE_SIZE,
    TRAINABLE,
    TRAINABLE_CHOICES,
    DeepRank,
    PooledFeatures,
    build_backbone,
    check_image_size,
    trainable_parameters,
)
from deeprank.checkpoints import load_checkpoint, model_errors, model_from_checkpoint, save_checkpoint
from deeprank.common import (
    COMPILE,
    COMPILE_CHOICES,
    MODEL,
    SAMPLE_FILES,
    TRAIN_TRIPLETS,
    PipelineError,
    bad_image_flag,
    check_output_path,
    dataset_flags,
    device_flag,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    preprocess_flag,
    print_args,
    run_cli,
    seed_flag,
    workers_flag,
)
from deeprank.datasets import check_images_exist, unique_in_order
from deeprank.distributed import Cluster
from deeprank.images import BadImages
from deeprank.loaders import (
    AUGMENTS,
    Normalize,
    RankSlices,
    load_size,
    make_augment,
    make_loader,
    preprocess_on_device,
)
from deeprank.loss_flags import ACTIVE_OF, check_loss_flags, given_flags, loss_flags
from deeprank.loss_state import LossState
from deeprank.losses import MINERS, neighbour_kl
from deeprank.runtime import (
    FrozenRunner,
    autocast,
    freeze_when_compiling,
    frozen_rows,
    precision,
    prepare,
    want_compile,
)
from deeprank.sample_csv import read_pair_csv, read_triplet_csv
from deeprank.training import (
    BATCH_LAYOUTS,
    OPTIMS,
    EpochStats,
    Schedule,
    TrainedLayers,
    build_optimizer,
    compile_trained_layers,
    resolve_batches,
    training_mode,
    unused_flags,
)
from deeprank.training_log import LOG_EVERY, TrainingLog, check_tensorboard, earlier_log, report_epoch
from deeprank.validation import pair_figures_of, triplet_accuracy_of

# ---------------------------------------------------------------- hyperparameters
# (the model's shape: --backbone, --embed_dim, --conv_dim, --image_size and --trainable default to
#  deep_rank_net.py's BACKBONE, EMBED_DIM, CONV_DIM, IMAGE_SIZE and TRAINABLE)
EPOCHS = 1                 # passes over the triplet CSV
OPTIM = "sgd"              # sgd (Nesterov, momentum 0.9) | adam | rms, as the original
BATCH_SIZE = 25            # triplets per step (75 images per forward pass)
LEARNING_RATE = 0.001      # the original's
WEIGHT_DECAY = 0.0         # L2 weight regularisation (the paper's); 0 as the original
HEAD_LR_MULT = 1.0         # LR multiplier of the new layers over the pretrained backbone's
SCHEDULE = "constant"      # constant | cosine (after WARMUP_EPOCHS of linear warm-up)
WARMUP_EPOCHS = 0.0        # linear warm-up length, in epochs (fractions allowed)
LOSS = "triplet"           # triplet (the paper's) | contrastive (pairs) | multi_similarity | proxy_anchor (P x K)
MS_ALPHA = 2.0             # multi-similarity: the positives' scale (Wang et al. 2019; PML's default too)
MS_BETA = 50.0             # multi-similarity: the negatives' scale
MS_BASE = 0.5              # multi-similarity: the cosine similarity the terms are centred on (lambda)
MS_EPSILON = 0.1           # multi-similarity miner: how far past the hardest opposite a pair may be and still count
PA_ALPHA = 32.0            # proxy-anchor: the scale of its similarities (Kim et al. 2020; PML's default too)
PA_DELTA = 0.1             # proxy-anchor: its margin
PROXY_LR_MULT = 100.0      # proxy-anchor: the proxies' learning rate over --lr (the paper's 1e-2 over 1e-4)
MEMORY = 0                 # cross-batch memory: the last N embeddings as more references (0: off; Wang et al. 2020)
MEMORY_START = 0           # cross-batch memory: the global step it starts at (filled and used from there on)
MARGIN = 1.0               # loss margin (the original's F.triplet_margin_loss default)
DISTANCE = "euclidean"     # euclidean (the original's) | squared (the paper's) inside the loss
WEIGHTS = "imagenet"       # imagenet | none | PATH to a local backbone state_dict
AUGMENT = "flip"           # none | flip (the original's) | standard (crop + flip + colour)
BATCHES = "csv"            # csv: rows of the triplet / pair CSV (original) | pk: P x K batches of --data's train split
MINING = "none"            # none: pre-sampled CSV triplets (original) | batch_hard | batch_semihard | batch_all
CLASSES_PER_BATCH = 16     # P of a P x K batch (online mining)
IMAGES_PER_CLASS = 4       # K of a P x K batch (online mining)
SOFT_MARGIN = False        # softplus(d_ap - d_an) instead of the hinge
DISTILL = 0.0              # weight of the pull toward the pretrained backbone's neighbourhoods (0: off)
DISTILL_TEMPERATURE = 0.5  # softmax temperature of those neighbour distributions (standardised similarities)
# ----------------------------------------------------------------

SCHEDULES = ("constant", "cosine")


def build_parser():
    """train_net.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[dataset_flags(), seed_flag(), device_flag(),
                                                                   workers_flag(), bad_image_flag(), preprocess_flag(),
                                                                   loss_flags()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(loss=LOSS, margin=MARGIN, distance=DISTANCE, soft_margin=SOFT_MARGIN, ms_alpha=MS_ALPHA,
                        ms_beta=MS_BETA, ms_base=MS_BASE, ms_epsilon=MS_EPSILON, pa_alpha=PA_ALPHA, pa_delta=PA_DELTA,
                        proxy_lr_mult=PROXY_LR_MULT, memory=MEMORY, memory_start=MEMORY_START)
    a = parser.add_argument
    a("--epochs", type=non_negative_int, default=EPOCHS,
      help="epochs; 0 writes the untrained model (default: %(default)s)")
    a("--optim", default=OPTIM, choices=OPTIMS, help="optimiser (default: %(default)s)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE, help="triplets per step (default: %(default)s)")
    a("--lr", type=positive_float, default=LEARNING_RATE, help="learning rate (default: %(default)s)")
    a("--weight_decay", type=non_negative_float, default=WEIGHT_DECAY,
      help="L2 weight decay (default: %(default)s)")
    a("--head_lr_mult", type=positive_float, default=HEAD_LR_MULT,
      help="learning-rate multiplier of the new layers (projection, branches, embedding) (default: %(default)s)")
    a("--schedule", default=SCHEDULE, choices=SCHEDULES, help="LR schedule (default: %(default)s)")
    a("--warmup_epochs", type=non_negative_float, default=WARMUP_EPOCHS,
      help="linear LR warm-up (default: %(default)s)")
    a("--backbone", default=BACKBONE, choices=BACKBONES, help="backbone ConvNet (default: %(default)s)")
    a("--weights", default=WEIGHTS, help="imagenet | none | PATH to a backbone state_dict (default: %(default)s)")
    a("--trainable", default=TRAINABLE, choices=TRAINABLE_CHOICES,
      help="layers to train: conv5 = the last stage and everything after it (ResNet's conv5_x; for other backbones "
           "every layer at the network's lowest resolution, for efficientnet_lite0 its last two stages), all, or "
           "head (default: %(default)s)")
    a("--no_branches", action="store_true", help="drop the two sub-sampling branches (an ablation)")
    a("--image_size", type=positive_int, default=IMAGE_SIZE, help="input side in pixels (default: %(default)s)")
    a("--embed_dim", type=positive_int, default=EMBED_DIM, help="embedding size (default: %(default)s)")
    a("--conv_dim", type=positive_int, default=CONV_DIM,
      help="size the backbone's pooled features are projected to, the paper's 4096 (default: %(default)s)")
    a("--augment", default=AUGMENT, choices=AUGMENTS, help="train-only augmentation (default: %(default)s)")
    a("--triplets", default=TRAIN_TRIPLETS, help="training triplet CSV (default: %(default)s)")
    a("--pairs", default=SAMPLE_FILES["pairs", 1],
      help="training pair CSV of --loss contrastive with --mining none (default: %(default)s)")
    a("--val_triplets", default=None, help="validation triplet CSV: report its accuracy each epoch")
    a("--val_pairs", default=None,
      help="validation pair CSV (image1,image2,same): report each epoch its pair accuracy at the threshold best "
           "on it, and its ROC AUC")
    a("--out", default=MODEL, help="final checkpoint; temp_net<epoch>.model go beside it (default: %(default)s)")
    a("--resume", default=None, help="continue from this checkpoint (same seed: same result)")
    a("--no_amp", action="store_true", help="train in fp32 even where bf16 autocast is available")
    a("--batches", default=BATCHES, choices=BATCH_LAYOUTS,
      help="csv: rows of --triplets (or --pairs), the original's; pk: P x K batches of --data's train split, each "
           "image with its class, which every loss can take (--mining batch_* implies it) (default: %(default)s)")
    a("--mining", default=MINING, choices=("none",) + tuple(MINERS),
      help="--loss triplet: none (CSV triplets), or the triplets mined inside each P x K batch (batch_all: every "
           "one; with --batches pk, batch_all unless given) (default: %(default)s)")
    a("--classes_per_batch", type=positive_int, default=CLASSES_PER_BATCH,
      help="P, online mining (default: %(default)s)")
    a("--images_per_class", type=positive_int, default=IMAGES_PER_CLASS, help="K, online mining (default: %(default)s)")
    a("--distill", type=non_negative_float, default=DISTILL,
      help="weight of a second loss that keeps each image's batch neighbours as the pretrained backbone (a frozen "
           "copy of --weights) ranks them, against overfitting the classes (0: off) (default: %(default)s)")
    a("--distill_temperature", type=positive_float, default=DISTILL_TEMPERATURE,
      help="temperature of --distill's neighbour distributions over standardised cosine similarities "
           "(default: %(default)s)")
    a("--keep_last", type=non_negative_int, default=0, help="keep only the last N temp_net<epoch>.model files (0: all)")
    a("--max_steps", type=non_negative_int, default=0,
      help="stop each epoch after this many steps (0: all; for smoke tests)")
    a("--compile", default=COMPILE, choices=COMPILE_CHOICES,
      help="torch.compile the frozen backbone layers with their weights frozen; auto: when the run is long "
           "enough to repay compiling (default: %(default)s)")
    a("--max_minutes", type=non_negative_float, default=0,
      help="stop training after this many minutes (0: no limit); a cosine schedule then spans the budget")
    a("--log_every", type=positive_int, default=LOG_EVERY,
      help="a step record in the log (and, when stdout is not a terminal, a progress line) every N steps, and at "
           "least every 30 s (default: %(default)s)")
    a("--tensorboard", default=None, metavar="DIR",
      help="also write the log's scalars for TensorBoard into DIR (needs: pip install tensorboard)")
    a("--sync_bn", action="store_true",
      help="under torchrun on GPUs: batch norm statistics over the whole global batch (SyncBatchNorm), as one "
           "process would compute them; without it each process normalises its own share")
    return parser


def check_flags(args, cluster, device):
    """Refuse flag combinations no run can use, before anything is read or written (argparse
    already refused values out of range; main, the loss flags): --distill's, --sync_bn's on this
    device, and under torchrun the global batch's split into equal shares (P x K: whole classes)."""
    with model_errors():
        check_image_size(args.image_size)
    check_tensorboard(args.tensorboard)
    if args.distill and args.weights == "none":
        raise PipelineError("--distill keeps the pretrained backbone's neighbourhoods: it needs --weights imagenet "
                            "or PATH, not none")
    if args.sync_bn and device.type != "cuda":
        raise PipelineError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm does not run on CPUs); on CPUs "
                            "each process normalises its own share of the batch")
    if cluster.distributed and args.mining == "none" and args.batch_size % cluster.world_size:
        raise PipelineError(f"--batch_size {args.batch_size} is the global batch: make it a multiple of the "
                            f"{cluster.world_size} processes")
    if cluster.distributed and args.mining != "none" and args.classes_per_batch % cluster.world_size:
        raise PipelineError(f"--classes_per_batch {args.classes_per_batch} is the global P: make it a multiple of the "
                            f"{cluster.world_size} processes, so that each takes whole classes")


# ----------------------------------------------------------------------------- set-up

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
    with model_errors():
        model = DeepRank(backbone=args.backbone, embed_dim=args.embed_dim, conv_dim=args.conv_dim,
                         image_size=args.image_size, trainable=args.trainable, weights=args.weights,
                         branches=not args.no_branches)
    return model, 0


class TrainingData:
    """The batches of one run, in its mode (deeprank.training: CSV triplets, CSV pairs, or P x K
    batches of the train split). A batch is (uint8 images (N, 3, S, S), labels (N,), same (N / 2,)
    or None, [Unreadable]), see loaders.py."""

    def __init__(self, args, mode, image_size, on_device=False):
        # --preprocess device: the workers decode to the load size, the device resizes and augments
        augment = None if on_device else make_augment(args.augment, image_size)
        size = (lambda paths: load_size(paths, image_size)) if on_device else (lambda paths: image_size)
        self.dataset, self.sampler, self.collate = mode.dataset(size, augment), mode.sampler, mode.collate
        self.images_per_batch = mode.images_per_batch
        steps = len(self.sampler) if self.sampler is not None else math.ceil(len(self.dataset) / args.batch_size)
        self.description = f"{len(self.dataset)} {'images' if self.sampler is not None else mode.unit}"
        self.steps_per_epoch = min(steps, args.max_steps) if args.max_steps else steps
        self.batch_size, self.num_workers, self.seed = args.batch_size, args.num_workers, args.seed

    def loader(self, epoch, device, cluster):
        """This epoch's batches; every epoch's randomness derives from (seed, epoch), so --resume replays it.
        Under torchrun each rank loads its share of every global batch (loaders.RankSlices)."""
        torch.manual_seed(self.seed * 100003 + epoch)
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        if self.sampler is None and not cluster.distributed:
            return make_loader(self.dataset, self.batch_size, self.num_workers, device, shuffle=True,
                               generator=generator, collate_fn=self.collate)
        if self.sampler is None:  # the batches DataLoader(shuffle=True, generator) would draw
            batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(self.dataset, generator=generator),
                                                    self.batch_size, drop_last=False)
        else:
            self.sampler.set_epoch(epoch)
            batches = self.sampler
        if cluster.distributed:
            batches = RankSlices(batches, cluster.rank, cluster.world_size)
        return make_loader(self.dataset, None, self.num_workers, device, batch_sampler=batches,
                           generator=generator, collate_fn=self.collate)


class Network:
    """The model as training runs it: the frozen backbone layers without autograd (compiled when
    that pays), then the trained layers (in DistributedDataParallel under torchrun); plus, with
    --distill, a frozen copy of the pretrained backbone as teacher. images_per_run sizes the
    compile decision. Under torchrun the loss is computed on the gathered global batch."""

    def __init__(self, model, args, mode, state, device, images_per_batch, images_per_run, cluster):
        self.model, self.device, self.amp, self.args, self.cluster = model, device, not args.no_amp, args, cluster
        self.mode, self.state = mode, state
        on_device = preprocess_on_device(args.preprocess, device)
        self.normalize = Normalize(device, model.image_size, args.augment) if on_device else Normalize(device)
        compile = want_compile(args.compile, images_per_run, model.image_size, device)
        self.trunk, tail = model.frozen_split()
        if self.trunk is not None:  # frozen layers: no autograd, and compiled with their weights as constants
            self.trunk = FrozenRunner(self.trunk, frozen_rows(device, images_per_batch, model.image_size),
                                      compile, freeze_when_compiling(device, self.amp))
            if cluster.main:
                print(f"frozen backbone layers: {'compiled' if self.trunk.compiled else 'eager'}")
        self.trained = TrainedLayers(model, tail)
        if cluster.distributed:
            self.trained = torch.nn.parallel.DistributedDataParallel(
                self.trained, device_ids=[device] if device.type == "cuda" else None)
        if compile and compile_trained_layers(device):  # forward and backward of the layers that train
            self.trained = torch.compile(self.trained)
            if cluster.main:
                print("trained layers: compiled")
        self.teacher = None
        if args.distill:  # a frozen copy of the pretrained backbone, as --weights gives it
            with model_errors():
                features = build_backbone(model.model_args["backbone"], args.weights, model.image_size)[0]
            self.teacher = FrozenRunner(prepare(PooledFeatures(features), device),
                                        frozen_rows(device, images_per_batch, model.image_size),
                                        compile, freeze_when_compiling(device, self.amp))

    def embed(self, images):
        """Embeddings of normalised images: frozen trunk (no autograd), then the trained layers."""
        with autocast(self.device, self.amp):
            return self.trained(self.trunk(images) if self.trunk is not None else images, images).float()

    def batch_loss(self, images, labels, step):
        """(loss, stats) of one batch (uint8 images; class labels, pair flags or None) at global step
        `step`: --loss's loss (with its proxies, and its memory from --memory_start on: the batch is
        enqueued after the loss), plus --distill's neighbourhood term; of the global batch under
        torchrun (stats["images"]: the images it holds)."""
        images = self.normalize(images)
        gather, a = self.cluster.gather, self.args
        emb = gather(self.embed(images), self.mode.columns)
        if labels is not None:
            labels = gather(labels.to(self.device), self.mode.label_columns, grad=False)
        memory = self.state.memory if step >= a.memory_start else None
        loss, stats = self.mode.loss(emb, labels, a, self.state, memory)
        if memory is not None:
            memory.push(emb, labels)
        if self.teacher is not None:
            with autocast(self.device, self.amp):
                target = gather(self.teacher(images), self.mode.columns, grad=False)
            kl = neighbour_kl(emb, target, a.distill_temperature)
            loss = loss + a.distill * kl
            stats["distill"] = float(kl.detach())
        stats["images"] = len(emb)
        return loss, stats

    def backward(self, loss):
        """The gradients of one step's loss: under torchrun scaled for DistributedDataParallel's
        average, the proxies' (the same on every rank, not averaged) unscaled again."""
        scale = self.cluster.grad_scale if self.cluster.distributed else 1
        (loss * scale).backward()
        self.state.unscale_grad(scale)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(network, optimizer, loader, schedule, epoch, steps, last_good, total_epochs, bad_images,
                    log=None):
    """Train one epoch of at most `steps` steps; (EpochStats, stopped for the time budget).
    A non-finite loss stops the run, naming the last good checkpoint; unreadable images go to
    bad_images (which stops the run or leaves them out of their batch); log (rank 0's TrainingLog)
    gets every step, to write step records."""
    stats = EpochStats()
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{total_epochs}", unit="step", dynamic_ncols=True,
               leave=False, disable=None if network.cluster.main else True)
    out_of_time = False
    for step, (images, labels, unreadable) in enumerate(bar):
        if step >= steps:
            break
        bad_images.add(unreadable)
        if not network.cluster.every_rank(images is not None):  # a batch left with no readable image (skipped)
            continue
        schedule.set_lr(epoch * steps + step)
        loss, batch_stats = network.batch_loss(images, labels, epoch * steps + step)
        if not torch.isfinite(loss):
            raise PipelineError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; training "
                                f"stopped, last good checkpoint: {last_good or 'none'}; lower --lr or use --no_amp")
        optimizer.zero_grad(set_to_none=True)
        network.backward(loss)
        optimizer.step()
        stats.add(loss.item(), batch_stats, batch_stats.pop("images"))
        bar.set_postfix(stats.postfix())
        if log is not None:
            log.step(epoch, step + 1, steps, epoch * steps + step + 1, stats, optimizer.param_groups[0]["lr"])
        if schedule.out_of_time():
            out_of_time = True
            break
    bar.close()
    return stats, out_of_time


def check_validation_csvs(args):
    """Every image of --val_triplets and --val_pairs exists (and is a file), before any work."""
    for csv, read in ((args.val_triplets, read_triplet_csv), (args.val_pairs, lambda path: read_pair_csv(path)[:2])):
        if csv:
            check_images_exist(unique_in_order(*read(csv)), csv, empty_ok=args.on_bad_image == "skip")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    resolve_batches(args, given)
    check_loss_flags(args, given)
    out = check_output_path(args.out)
    cluster, device = Cluster.start(args.device)
    return cluster.run(train, args, out, cluster, device)


def train(args, out, cluster, device):
    """The run: set-up, then the epoch loop (rank 0 alone writes and prints under torchrun)."""
    folder = out.resolve().parent
    log_path = folder / f"{out.stem}_log.jsonl"
    say = print if cluster.main else (lambda *a, **k: None)

    # --- inputs, all checked before anything is written (the arguments printed first: reading can take a while)
    check_flags(args, cluster, device)
    if cluster.main:
        print_args("train_net.py", args, skip=unused_flags(args), precision=precision(device, not args.no_amp))
    ckpt = load_checkpoint(args.resume) if args.resume else None
    model, start_epoch = build_model(args, ckpt)
    if args.epochs == 0 and ckpt is None:  # the network as initialised: nothing to train on is read, in any mode
        if cluster.main:
            save_checkpoint(out, model, None, 0, dict(vars(args)), {})
            print(f"wrote {out} (--epochs 0: the network as initialised, no training data read)")
        cluster.barrier()
        return 0
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mode = training_mode(args)
    data = TrainingData(args, mode, model.image_size, preprocess_on_device(args.preprocess, device))
    check_validation_csvs(args)
    model = prepare(model, device)
    state = LossState.create(args, mode.classes, model.model_args["embed_dim"], device, ckpt)
    optimizer = build_optimizer(model, args, ckpt, state.parameter_groups(args.lr * args.proxy_lr_mult))
    say(f"device {device}{f' x {cluster.world_size} processes' if cluster.distributed else ''}, bf16 autocast "
        f"{'on' if precision(device, not args.no_amp) == 'bf16' else 'off'}, {data.description}, "
        f"{sum(p.numel() for p in trainable_parameters(model)):,} trainable parameters")
    steps = data.steps_per_epoch
    local_batch = -(-data.images_per_batch // cluster.world_size)  # this process's share of a global batch
    network = Network(model, args, mode, state, device, local_batch, local_batch * steps * (args.epochs - start_epoch),
                      cluster)
    config, metrics, last_good = dict(vars(args)), {}, args.resume
    shown = {key: value for key, value in config.items() if key not in unused_flags(args)}  # the curves' title
    log = TrainingLog(log_path, earlier_log(log_path, start_epoch), folder / f"{out.stem}_curves.png", shown,
                      args.log_every, args.tensorboard) if cluster.main else None
    if cluster.main and mode.source is not None and mode.source.write_selection(folder / f"{out.stem}_selection.csv"):
        print(f"wrote the --top_classes / --per_class selection to {folder / f'{out.stem}_selection.csv'}")
    bad_images = BadImages(args.on_bad_image, folder / f"{out.stem}_bad_images.txt" if cluster.main else None)
    schedule = Schedule(optimizer, args, steps, start_epoch, cluster)

    model.train()
    for epoch in range(start_epoch, args.epochs):
        loader = data.loader(epoch, device, cluster)
        network.normalize.reseed(args.seed * 100003 + epoch * 1009 + cluster.rank)  # --preprocess device's draws
        stats, out_of_time = train_one_epoch(network, optimizer, loader, schedule, epoch, steps, last_good,
                                             args.epochs, bad_images, log)
        metrics = stats.row(epoch + 1, optimizer.param_groups[0]["lr"])
        metrics["world_size"], metrics["active_of"] = cluster.world_size, ACTIVE_OF[args.loss]
        bad_images.merge(cluster.gather_objects(bad_images.found))  # every rank's skips, for rank 0's report
        temp = folder / f"temp_net{epoch + 1}.model"
        if cluster.main:
            if args.val_triplets:
                metrics["val_triplet_accuracy"] = triplet_accuracy_of(model, args.val_triplets, device, args,
                                                                      bad_images)
            if args.val_pairs:
                metrics.update(pair_figures_of(model, args.val_pairs, device, args, bad_images))
            save_checkpoint(temp, model, optimizer, epoch + 1, config, metrics, {"loss_state": state.state_dict()})
            if args.keep_last and epoch + 1 - args.keep_last >= 1:
                (folder / f"temp_net{epoch + 1 - args.keep_last}.model").unlink(missing_ok=True)
            log.epoch(metrics, (epoch + 1) * steps)
            report_epoch(metrics, args.epochs, bad_images.write_report() and bad_images.summary(), mode.unit)
        last_good = str(temp)
        if out_of_time:  # every rank at the same step: the ranks agree on the time spent
            say(f"stopping: --max_minutes {args.max_minutes} reached")
            break

    if cluster.main:
        save_checkpoint(out, model, optimizer, int(metrics.get("epoch", start_epoch)), config, metrics,
                        {"loss_state": state.state_dict()})
        log.close()
        curves = f", curves: {log.curves_path}" if log.curves_path.exists() else ""  # none before a first epoch
        print(f"wrote {out} (log: {log_path}{curves})")
    cluster.barrier()  # every rank ends after rank 0 has written the model
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
