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

    python bench/quality.py --data ../shared/data/tiny-imagenet-mini --minutes 30
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluation  # noqa: E402
import gen_embeddings  # noqa: E402
import train_net  # noqa: E402
import transform_validation  # noqa: E402
import triplet_sampler  # noqa: E402

# ---------------------------------------------------------------- the recommended recipe
BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image_size", "160"]
RECOMMENDED = ["--mining", "batch_all", "--classes_per_batch", "16", "--images_per_class", "4",
               "--optim", "adam", "--lr", "0.0002", "--head_lr_mult", "10", "--weight_decay", "0.0005",
               "--schedule", "cosine", "--warmup_epochs", "0.3", "--augment", "standard", "--trainable", "all",
               "--margin", "0.1", "--embed_dim", "512"]
EMBED = ["--tta", "flip"]  # every model (baselines too) embeds each image and its mirror image
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="TinyImageNet-layout directory (read only)")
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
        if not data.exists():
            shutil.copytree(args.data, data)
            stage(transform_validation.main, ["--data", str(data)])
        csvs = (work / "training_triplet_sample.csv", work / "val_triplet_sample.csv")
        for training, csv in zip((1, 0), csvs):
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
