"""Draw training logs as curves: one or more <out stem>_log.jsonl files that train_net.py wrote
(finished, or still running) on shared axes, to compare runs: loss, active share, mean positive
and negative distance, learning rate and validation accuracy against the global step, with each
log's epochs marked.

    python plot_log.py deepranknet_log.jsonl --out curves.png
    python plot_log.py runs/a_log.jsonl runs/b_log.jsonl --out compare.png --title "triplet vs contrastive"
"""

import argparse
import sys

from deeprank.common import check_output_path, print_args, run_cli
from deeprank.curves import distinct_names, draw_curves, read_log

OUT = "curves.png"  # --out default


def build_parser():
    """plot_log.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training logs (<out stem>_log.jsonl)")
    parser.add_argument("--out", default=OUT, help="the PNG to write (default: %(default)s)")
    parser.add_argument("--title", default=None, help="the picture's title (default: the logs' names)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_output_path(args.out)
    print_args("plot_log.py", args)
    runs = distinct_names([read_log(path) for path in args.logs])
    title = args.title if args.title is not None else "training curves: " + ", ".join(run.name for run in runs)
    draw_curves(runs, args.out, title)
    print(f"wrote {args.out} ({len(runs)} log{'s' if len(runs) > 1 else ''}, "
          f"{sum(len(run.epochs) for run in runs)} epoch and {sum(len(run.steps) for run in runs)} step records)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
