"""train_net.py's losses and the flags each one reads: the one table (LOSS_FLAGS) that its parser,
its refusals, its printed arguments and the benchmarks go by. A flag of another loss, given on the
command line, is refused in one line that names it; so is a batch layout the loss cannot take.

    parser = argparse.ArgumentParser(parents=[loss_flags()]); parser.set_defaults(margin=1.0, ...)
    check_loss_flags(args, given_flags(parser, argv))
"""

import argparse

from deeprank.common import PipelineError, non_negative_float, non_negative_int, positive_float
from deeprank.losses import DISTANCES

LOSSES = ("triplet", "contrastive", "multi_similarity", "proxy_anchor")
MS_FLAGS = ("ms_alpha", "ms_beta", "ms_base", "ms_epsilon")  # the multi-similarity loss's own
PA_FLAGS = ("pa_alpha", "pa_delta", "proxy_lr_mult")         # the proxy-anchor loss's own
MEMORY_FLAGS = ("memory", "memory_start")                    # cross-batch memory (contrastive, multi-similarity)
# which loss reads which flag
LOSS_FLAGS = {"triplet": ("margin", "distance", "soft_margin"), "contrastive": ("margin",) + MEMORY_FLAGS,
              "multi_similarity": MS_FLAGS + MEMORY_FLAGS, "proxy_anchor": PA_FLAGS}
EVERY_LOSS_FLAG = tuple(dict.fromkeys(flag for flags in LOSS_FLAGS.values() for flag in flags))
# what each loss's active_share counts (the log's "active_of", the curves' panel)
ACTIVE_OF = {"triplet": "triplets with loss > 0",
             "contrastive": "pairs with loss > 0 (positives apart, negatives within the margin)",
             "multi_similarity": "pairs its miner keeps",
             "proxy_anchor": "images not 2 delta nearer their own proxy than any other"}
PK_ONLY = ("multi_similarity", "proxy_anchor")  # losses that need each image's class: P x K batches


def loss_flags():
    """A parent parser of --loss and every loss's own flags, without defaults: train_net.py sets them
    (parser.set_defaults) from its hyperparameter constants."""
    parser = argparse.ArgumentParser(add_help=False)
    a = parser.add_argument
    a("--loss", choices=LOSSES,
      help="triplet: max(0, margin + D(q,p) - D(q,n)); contrastive: same * d^2 + (1 - same) * "
           "max(0, margin - d)^2 on pairs (Hadsell, Chopra & LeCun 2006); multi_similarity: the pairs of each P x K "
           "batch its miner keeps, weighted by their cosine similarities (Wang et al. 2019); proxy_anchor: each "
           "image of a P x K batch against one learned proxy per class (Kim et al. 2020) (default: %(default)s)")
    a("--margin", type=non_negative_float, help="triplet, contrastive: the loss margin (default: %(default)s)")
    a("--distance", choices=DISTANCES, help="triplet: the distance inside the loss (default: %(default)s)")
    a("--soft_margin", action="store_true", help="triplet: softplus(d_ap - d_an) instead of the hinge")
    a("--ms_alpha", type=positive_float, help="multi_similarity: positives' scale (default: %(default)s)")
    a("--ms_beta", type=positive_float, help="multi_similarity: negatives' scale (default: %(default)s)")
    a("--ms_base", type=float, help="multi_similarity: the similarity both terms are centred on (default: "
                                    "%(default)s)")
    a("--ms_epsilon", type=non_negative_float,
      help="multi_similarity miner: a positive counts while less similar than the hardest negative + this, a "
           "negative while more similar than the hardest positive - this (default: %(default)s)")
    a("--pa_alpha", type=positive_float, help="proxy_anchor: the similarities' scale (default: %(default)s)")
    a("--pa_delta", type=non_negative_float, help="proxy_anchor: the margin (default: %(default)s)")
    a("--proxy_lr_mult", type=positive_float,
      help="proxy_anchor: the proxies' learning rate over --lr, on the same schedule (default: %(default)s)")
    a("--memory", type=non_negative_int,
      help="contrastive / multi_similarity on P x K batches: also pair each batch with the last N embeddings "
           "(its own included; cross-batch memory, Wang et al. 2020), saved in checkpoints (0: off) "
           "(default: %(default)s)")
    a("--memory_start", type=non_negative_int,
      help="--memory: the global step from which the memory is filled and used (Wang et al. start it after a "
           "warm-up, when the embedding drifts less) (default: %(default)s)")
    return parser


def given_flags(parser, argv):
    """The dests of the flags argv gives (whatever their value), as opposed to those left at their
    defaults: argparse sets a default only where the namespace it fills has no value yet."""
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions if action.dest != "help"})
    return {dest for dest, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


def check_loss_flags(args, given):
    """Refuse (one line) a flag of another loss given for this one (given: given_flags'), and a
    batch layout the loss cannot take; before anything is read or written."""
    for flag in (flag for flag in EVERY_LOSS_FLAG if flag in given and flag not in LOSS_FLAGS[args.loss]):
        readers = " / ".join(name for name, flags in LOSS_FLAGS.items() if flag in flags)
        raise PipelineError(f"--{flag} belongs to --loss {readers}; --loss {args.loss} does not read it: leave it out")
    if args.loss != "triplet" and args.mining in ("batch_hard", "batch_semihard"):
        raise PipelineError(f"--mining {args.mining} mines triplets for --loss triplet; --loss {args.loss} takes "
                            f"{'pairs from --pairs or ' if args.loss == 'contrastive' else ''}every image of P x K "
                            f"batches: pass --batches pk (with --data)")
    if args.mining == "none" and (args.loss in PK_ONLY or args.memory):
        what = "--memory keeps the embeddings of earlier P x K batches" if args.memory else (
            f"--loss {args.loss} takes the images of P x K batches with their classes")
        raise PipelineError(f"{what}: pass --batches pk (with --data)")
