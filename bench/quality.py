"""Quality benchmark: the recommended recipe against two baselines, within a time budget.

On a TinyImageNet-layout directory (copied to a work folder first; never modified) it
runs every stage through the stage scripts' own main(), then evaluates val against train:

  recommended  online batch-all mining (P x K batches), AdamW + weight decay, new layers at
               10x the LR, warm-up + cosine over the budget, mild augmentation, every layer
               of the ImageNet-pretrained efficientnet_lite0 (offline,
               requirements-pretrained.txt) trainable, 160 px
  untrained    the same pretrained backbone, not trained: its pooled features, L2-normalised
  original     the original recipe: pre-sampled random triplets (N = M = 1), SGD 0.001 with
               Nesterov momentum, margin 1, batch 25, conv5 trainable; same backbone, same
               image size, same --minutes

All three embed with flip test-time augmentation (gen_embeddings.py --tta flip) and are
scored on the same val triplet CSV (N = M = 1) and the same kNN metrics.
Prints one JSON line with the three metric sets side by side (stage logs go to stderr).

--task pairs|triples asks the other two questions instead, on --data of any layout: "same
class?" for val pairs, "at least two of one class?" for val triples (half of each label), each
threshold calibrated on one half of the val pairs / triples and scored on the other. The models:
untrained, recommended (triplet-trained) and contrastive (the recommended recipe with
--loss contrastive: every pair of each P x K batch).

    python -m bench.quality --data ../shared/data/tiny-imagenet-mini --minutes 30
    python -m bench.quality --data mini-imagefolder --task pairs --minutes 30
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

import eval as evaluation
import gen_embeddings
import train_net
import transform_validation
import triplet_sampler
from deeprank.datasets import detect_layout

ROOT = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------- the recommended recipe
BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image_size", "160"]
RECOMMENDED = ["--mining", "batch_all", "--classes_per_batch", "16", "--images_per_class", "4",
               "--optim", "adam", "--lr", "0.0002", "--head_lr_mult", "10", "--weight_decay", "0.0005",
               "--schedule", "cosine", "--warmup_epochs", "0.3", "--augment", "standard", "--trainable", "all",
               "--margin", "0.1", "--embed_dim", "512"]
EMBED = ["--tta", "flip"]  # every model (baselines too) embeds each image and its mirror image
CONTRASTIVE = ["--loss", "contrastive", "--margin", "1.0"]  # over RECOMMENDED: every pair of each P x K batch
DECISION_KEYS = ("pair_accuracy", "pair_roc_auc", "pair_f1", "pair_threshold", "triple_accuracy", "triple_f1",
                 "triple_threshold")
ORIGINAL = ["--mining", "none", "--optim", "sgd", "--lr", "0.001", "--batch_size", "25", "--margin", "1.0",
            "--augment", "flip", "--trainable", "conv5", "--embed_dim", "4096"]
# ----------------------------------------------------------------


def stage(main, argv):
    """Run a stage's main() with its printout on stderr; fail loudly on a non-zero status."""
    with contextlib.redirect_stdout(sys.stderr):
        status = main(argv)
    if status:
        raise SystemExit(f"{main.__module__} {' '.join(argv)} exited with {status}")


def score(work, name, model, csvs, layer="embedding", embed_flags=EMBED):
    """Embed every train and val image with a checkpoint and evaluate val against train."""
    train_csv, val_csv = csvs
    train_out, test_out = work / f"{name}_train.txt", work / f"{name}_test.txt"
    stage(gen_embeddings.main, ["--model", str(model), "--train_triplets", str(train_csv),
                                "--test_triplets", str(val_csv), "--train_out", str(train_out),
                                "--test_out", str(test_out), "--layer", layer, "--batch_size", "128", *embed_flags])
    metrics_path = work / f"{name}_metrics.json"
    stage(evaluation.main, ["--train_embeddings", str(train_out), "--test_embeddings", str(test_out),
                            "--train_triplets", str(train_csv), "--test_triplets", str(val_csv),
                            "--json", str(metrics_path)])
    metrics = json.loads(metrics_path.read_text())
    return {key: metrics[key] for key in evaluation.METRIC_KEYS + ("k",)}


def decision_csvs(work, data, kind, seed):
    """(calibration half, scored half) of a balanced val pair or triple CSV (one row per val image)."""
    full = work / f"val_{kind}.csv"
    stage(triplet_sampler.main, ["--data", str(data), "--kind", kind, "--training", "0", "--out", str(full),
                                 "--seed", str(seed)])
    frame = pd.read_csv(full, dtype=str, keep_default_na=False)
    flag = "same" if kind == "pairs" else "label"
    halves = []
    for part in (0, 1):  # alternate rows of each label: both halves stay balanced
        rows = pd.concat([group.iloc[part::2] for _, group in frame.groupby(flag)])
        path = work / f"val_{kind}_{'calibrate' if part == 0 else 'score'}.csv"
        rows.to_csv(path, index=False)
        halves.append(path)
    return halves


def score_decisions(work, name, model, data, csvs, layer="embedding"):
    """Embed every train and val image, then decide the scored pairs and triples with thresholds
    calibrated on the other halves."""
    train_out, test_out = work / f"{name}_train.txt", work / f"{name}_test.txt"
    stage(gen_embeddings.main, ["--model", str(model), "--data", str(data), "--train_out", str(train_out),
                                "--test_out", str(test_out), "--layer", layer, "--batch_size", "128", *EMBED])
    metrics_path = work / f"{name}_metrics.json"
    stage(evaluation.main, ["--train_embeddings", str(train_out), "--test_embeddings", str(test_out),
                            "--pairs", str(csvs["pairs"][1]), "--triples", str(csvs["triples"][1]), "--calibrate",
                            str(csvs["pairs"][0]), str(csvs["triples"][0]), "--json", str(metrics_path)])
    metrics = json.loads(metrics_path.read_text())
    return {key: metrics[key] for key in DECISION_KEYS + ("precision_at_1", "map_at_r")}


def main_decisions(args, work, data, prep_s):
    """--task pairs / triples: untrained, triplet-trained and contrastive-trained models side by side."""
    csvs = {kind: decision_csvs(work, data, kind, args.seed) for kind in ("pairs", "triples")}
    common = BACKBONE + ["--data", str(data), "--seed", str(args.seed)]
    result = {"data": str(args.data), "task": args.task, "minutes": args.minutes, "backbone": " ".join(BACKBONE),
              "recommended_flags": " ".join(RECOMMENDED), "contrastive_flags": " ".join(RECOMMENDED + CONTRASTIVE)}
    untrained = work / "untrained.model"
    start = time.perf_counter()
    stage(train_net.main, common + RECOMMENDED + ["--epochs", "0", "--out", str(untrained)])
    result["untrained"] = score_decisions(work, "untrained", untrained, data, csvs, layer="backbone")
    scoring_s = time.perf_counter() - start
    train_minutes = max(1.0, (args.minutes * 60 - prep_s - 1.2 * scoring_s) / 60)
    result["train_minutes"] = None if args.epochs else round(train_minutes, 2)
    for name, flags in (("recommended", RECOMMENDED + args.flags.split()),
                        ("contrastive", RECOMMENDED + CONTRASTIVE + args.flags.split())):
        (work / name).mkdir(exist_ok=True)
        model = work / name / "deepranknet.model"
        budget = (["--epochs", str(args.epochs)] if args.epochs else
                  ["--epochs", "1000", "--max_minutes", f"{train_minutes:.3f}"])
        start = time.perf_counter()
        stage(train_net.main, common + flags + budget + ["--keep_last", "1", "--out", str(model)])
        result[f"{name}_train_seconds"] = round(time.perf_counter() - start, 1)
        result[name] = score_decisions(work, name, model, data, csvs)
    print(json.dumps(result))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset (TinyImageNet-layout directory, copied; or with "
                                                          "--task pairs / triples any layout, read in place)")
    parser.add_argument("--task", default="triplets", choices=("triplets", "pairs", "triples"),
                        help="triplets: the ranking benchmark; pairs / triples: both decision tasks (the same run)")
    parser.add_argument("--minutes", type=float, default=30, help="training budget per trained recipe")
    parser.add_argument("--epochs", type=int, default=0,
                        help="train each recipe this many epochs instead of --minutes (a fixed amount of work, "
                             "for comparing variants on a faster machine, e.g. a GPU); 0: the --minutes budget")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder, removed after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_original", action="store_true", help="only the recommended recipe and untrained")
    parser.add_argument("--flags", default="", help="extra train_net.py flags for the recommended recipe (they "
                                                    "override its own), to try a variant against the baselines")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        if args.task != "triplets" and detect_layout(args.data) != "tinyimagenet":
            return main_decisions(args, work, Path(args.data).resolve(), time.perf_counter() - begin)
        if not data.exists():
            shutil.copytree(args.data, data)
            stage(transform_validation.main, ["--data", str(data)])
        if args.task != "triplets":
            return main_decisions(args, work, data, time.perf_counter() - begin)
        csvs = (work / "training_triplet_sample.csv", work / "val_triplet_sample.csv")
        for training, csv in zip((1, 0), csvs, strict=False):
            stage(triplet_sampler.main, ["--data", str(data), "--training", str(training), "--num_pos_images", "1",
                                         "--num_neg_images", "1", "--out", str(csv), "--seed", str(args.seed)])
        common = BACKBONE + ["--data", str(data), "--seed", str(args.seed), "--triplets", str(csvs[0])]
        result = {"data": str(args.data), "minutes": args.minutes, "backbone": " ".join(BACKBONE),
                  "recommended_flags": " ".join(RECOMMENDED), "original_flags": " ".join(ORIGINAL),
                  "embed_flags": " ".join(EMBED)}
        prep_s = time.perf_counter() - begin

        untrained = work / "untrained.model"
        start = time.perf_counter()
        stage(train_net.main, common + ["--epochs", "0", "--out", str(untrained)])
        result["untrained"] = score(work, "untrained", untrained, csvs, layer="backbone")
        scoring_s = time.perf_counter() - start
        # the recommended pipeline (data stages + training + embedding + eval) fits in --minutes:
        # training gets what is left after the data stages and a scoring pass like the one just timed
        train_minutes = max(1.0, (args.minutes * 60 - prep_s - 1.2 * scoring_s) / 60)
        result["train_minutes"] = None if args.epochs else round(train_minutes, 2)
        result["epochs"] = args.epochs or None

        recommended = RECOMMENDED + args.flags.split()
        result["recommended_flags"] = " ".join(recommended)
        recipes = [("recommended", recommended)] + ([] if args.skip_original else [("original", ORIGINAL)])
        for name, flags in recipes:
            (work / name).mkdir(exist_ok=True)
            model = work / name / "deepranknet.model"
            start = time.perf_counter()
            budget = (["--epochs", str(args.epochs)] if args.epochs else
                      ["--epochs", "1000", "--max_minutes", f"{train_minutes:.3f}"])
            stage(train_net.main, common + flags + budget + ["--keep_last", "1", "--out", str(model)])
            result[f"{name}_train_seconds"] = round(time.perf_counter() - start, 1)
            result[name] = score(work, name, model, csvs)
            result[f"{name}_pipeline_seconds"] = round(prep_s + time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
