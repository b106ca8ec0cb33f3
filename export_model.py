"""Stage 3b: export a checkpoint as ONNX, so the model runs anywhere onnxruntime does (no PyTorch).

Writes the embedding network (or --layer backbone: the backbone's pooled features) with a
dynamic batch axis, its preprocessing (image size, mean, std, resize rule, test-time
augmentation) and the checkpoint's SHA-256 in the model's metadata. Before anything is written
the graph passes onnx's full checker and onnxruntime's fp32 output matches PyTorch's on two
batch sizes; otherwise one line and no file.

With --int8 the export is quantised statically (onnxruntime's QDQ format, per-channel weights),
calibrated on --calibrate_images images of --calibrate (a folder, or a triplet CSV); the top-10
neighbour overlap with the fp32 model is measured on other images of that data and the model is
refused below --min_overlap.

    python export_model.py --model deepranknet.model --out deepranknet.onnx
    python export_model.py --model deepranknet.model --out deepranknet.int8.onnx --int8 --calibrate data/train
    python gen_embeddings.py --model deepranknet.onnx ...      # then any embedding stage takes it
"""

import argparse
import os
import random
import sys
import tempfile

from deeprank.checkpoints import load_model
from deeprank.common import (
    MODEL,
    TTA_CHOICES,
    PipelineError,
    atomic_write,
    check_output_path,
    file_digest,
    positive_int,
    print_args,
    run_cli,
)
from deeprank.datasets import images_in, unique_in_order
from deeprank.export import export_bytes
from deeprank.onnx_model import OnnxEmbedder
from deeprank.quantize import KEEP_FP32, METHODS, embed_all, neighbour_overlap, quantize_int8
from deeprank.sample_csv import read_triplet_csv

# ---------------------------------------------------------------- hyperparameters
CALIBRATE_IMAGES = 256   # --int8: images the activation ranges are calibrated on
CHECK_IMAGES = 256       # --int8: other images of --calibrate the neighbour overlap is measured on
MIN_OVERLAP = 0.95       # --int8: refuse a model whose top-10 neighbours agree less with fp32's
NEIGHBOURS = 10          # ... the top-k of that overlap
SEED = 0                 # which images calibrate and which check
# ----------------------------------------------------------------


def build_parser():
    """export_model.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--model", default=MODEL, help="checkpoint from train_net.py (default: %(default)s)")
    a("--out", default=None, help="the ONNX file to write (default: the checkpoint's name with .onnx, or .int8.onnx)")
    a("--layer", default="embedding", choices=("embedding", "backbone"),
      help="embedding: DeepRank's output; backbone: the backbone's pooled features, L2-normalised "
           "(default: %(default)s)")
    a("--tta", default="none", choices=TTA_CHOICES,
      help="flip: the graph embeds each image and its mirror image and returns their normalised sum "
           "(default: %(default)s)")
    a("--int8", action="store_true", help="quantise to int8 (static, calibrated on --calibrate)")
    a("--calibrate", default=None, metavar="DIR|CSV",
      help="--int8: images of your data, a folder (every image below it) or a triplet CSV")
    a("--calibrate_images", type=positive_int, default=CALIBRATE_IMAGES,
      help="--int8: images to calibrate on (default: %(default)s)")
    a("--check_images", type=positive_int, default=CHECK_IMAGES,
      help="--int8: other images of --calibrate the neighbour overlap is measured on (default: %(default)s)")
    a("--min_overlap", type=float, default=MIN_OVERLAP,
      help=f"--int8: refuse a model whose top-{NEIGHBOURS} neighbours on the check images agree less than this "
           f"with the fp32 model's (default: %(default)s)")
    a("--calibration", default="minmax", choices=METHODS,
      help="--int8: how activation ranges are set from the calibration images (default: %(default)s)")
    a("--keep_fp32", default="none",
      help="--int8: layers left in fp32, comma-separated: first_conv, last_linear, or none (default: %(default)s)")
    return parser


def check_args(parser, args):
    int8_only = ("calibrate", "calibrate_images", "check_images", "min_overlap", "calibration", "keep_fp32")
    if args.int8 and not args.calibrate:
        parser.error("--int8 needs --calibrate DIR|CSV: images of your data to calibrate on")
    if not args.int8 and args.calibrate:
        parser.error("--calibrate goes with --int8")
    keep = tuple(part for part in args.keep_fp32.split(",") if part and part != "none")
    if set(keep) - set(KEEP_FP32):
        parser.error(f"--keep_fp32 takes {', '.join(KEEP_FP32)} or none, not {args.keep_fp32}")
    args.keep_fp32 = keep
    args.out = args.out or os.path.splitext(args.model)[0] + (".int8.onnx" if args.int8 else ".onnx")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        parser.error(f"--out {args.out} is the checkpoint itself; give the ONNX file another name")
    check_output_path(args.out)
    return () if args.int8 else int8_only


def calibration_images(source, calibrate, check):
    """(calibration paths, check paths): a seeded shuffle of the images of a folder or a triplet CSV."""
    paths = (unique_in_order(*read_triplet_csv(source)) if os.path.isfile(source) and source.lower().endswith(".csv")
             else images_in([source], "--calibrate"))
    paths = list(paths)
    if len(paths) < 2 + min(calibrate, len(paths) // 2):
        raise PipelineError(f"--calibrate {source} has {len(paths)} images; int8 needs some to calibrate on and at "
                            f"least two others to check it with")
    random.Random(SEED).shuffle(paths)
    used = min(calibrate, len(paths) - 2)
    return paths[:used], paths[used:used + check]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    unused = check_args(parser, args)
    print_args("export_model.py", args, skip=unused)
    model, _ = load_model(args.model)
    digest = file_digest(args.model)
    data = export_bytes(model, digest, args.layer, args.tta, args.model)
    print(f"exported {args.model} ({args.layer}, tta {args.tta}): onnx's full check passed; onnxruntime matches "
          f"PyTorch in fp32 on batches of 2 and 5")
    if args.int8:
        data = int8_model(data, args)
    with atomic_write(args.out, mode="wb") as handle:
        handle.write(data)
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, {'int8' if args.int8 else 'fp32'}, checkpoint sha256 {digest})")
    return 0


def int8_model(fp32, args):
    """The int8 model's bytes, once its neighbours on the check images agree enough with fp32's."""
    calibrate, check = calibration_images(args.calibrate, args.calibrate_images, args.check_images)
    with tempfile.TemporaryDirectory(prefix="deeprank-export-") as work:
        fp32_path, int8_path = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
        with open(fp32_path, "wb") as handle:
            handle.write(fp32)
        reference_model = OnnxEmbedder(fp32_path)  # calibrates the int8 model, then is the reference
        data = quantize_int8(reference_model, calibrate, method=args.calibration, keep=args.keep_fp32)
        with open(int8_path, "wb") as handle:
            handle.write(data)
        reference, kept = embed_all(reference_model, check)
        quantised, _ = embed_all(OnnxEmbedder(int8_path), kept)
    overlap = neighbour_overlap(reference, quantised, NEIGHBOURS)
    print(f"int8: calibrated on {len(calibrate)} images ({args.calibration}; fp32 kept: "
          f"{', '.join(args.keep_fp32) or 'none'}); top-{NEIGHBOURS} neighbour overlap with fp32 on {len(kept)} "
          f"other images: {overlap:.3f}")
    if overlap < args.min_overlap:
        raise PipelineError(f"the int8 model's top-{NEIGHBOURS} neighbours agree {overlap:.3f} with fp32's, below "
                            f"--min_overlap {args.min_overlap}; nothing written (calibrate on more images, try "
                            f"--calibration percentile, or keep the fp32 export)")
    return data


if __name__ == "__main__":
    sys.exit(run_cli(main))
