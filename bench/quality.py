"""Quality benchmark: the recommended recipe against two baselines, within a time budget.

On a TinyImageNet-layout directory (copied to a work folder first; never modified) it
runs every stage through the stage scripts' own main(), then evaluates val against train:

  recommended  the contrastive loss (margin 0.8) over every pair of each online P x K batch,
               AdamW + weight decay, new layers at 10x the LR, warm-up + cosine over the
               budget, mild augmentation, every layer of the ImageNet-pretrained
               efficientnet_lite0 (offline, requirements-pretrained.txt) trainable, 160 px
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
untrained, recommended (contrastive) and triplet (the same recipe with the paper's triplet loss,
batch-all mined, margin 0.1: the recipe recommended before --losses compared them).

--losses triplet,contrastive,multi_similarity,proxy_anchor,multi_similarity+memory compares
losses as "A Metric Learning Reality Check" (Musgrave et al. 2020) asks: every one over the
base recipe, BASE (same backbone, embedding size, P x K batch, augmentation, optimiser), only
the loss and its few hyperparameters changed. Three stages, each run's figures kept in
--results (default: --work's results/; a stage run again reads back the runs already there,
on the same kind of CPU, so the comparison can be finished in parts):
  tune    each loss's small grid (LOSS_GRIDS), --tune_minutes each, trained on 3/4 of the
          train images and scored (MAP@R) on the other 1/4: never on the val images
  screen  each loss with its best grid point, --screen_minutes, seed 0, scored on val
  final   the triplet recipe, the best two of the screen and today's recommended recipe (each
          recipe once), --minutes, seeds 0 and 1 (--seeds);
          untrained and the original recipe (seed 0) as the floor
--recipes triplet,recommended runs the final stage alone, for those fixed recipes.
A held-out test split that no tuning, screening or choice reads: TEST_FRACTION of each class's
train images (by image, seed 0), removed from training and from the gallery. Every screen and
final model is scored twice, val queries and test queries, each against the remaining train
images: the kNN metrics, test triplets, pair and triple accuracy (thresholds calibrated on the
other half of that split's pairs / triples). Choices read val; the headline table is test's.
A kept run is read back only when its dataset, flags, minutes, CPU kind and code (a digest of
the files that train, embed and score: CODE_FILES) are the same.

    python -m bench.quality --data ../shared/data/tiny-imagenet-mini --minutes 30
    python -m bench.quality --data mini-imagefolder --task pairs --minutes 30
    python -m bench.quality --data ../shared/data/tiny-imagenet-mini --losses triplet,contrastive --work runs
    python -m bench.quality --data ../shared/data/tiny-imagenet-mini --recipes triplet,recommended --seeds 0
"""

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import eval as evaluation
import gen_embeddings
import train_net
import transform_validation
import triplet_sampler
from deeprank.common import file_digest
from deeprank.datasets import detect_layout, list_split, split_by_fraction
from deeprank.loss_flags import LOSSES
from deeprank.runtime import precision

ROOT = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------- the recommended recipe
BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image_size", "160"]
# the shared recipe every loss of --losses trains over (P x K batches: every triplet of the triplet loss,
# batch-all mined; every pair of the pair losses)
BASE = ["--batches", "pk", "--classes_per_batch", "16", "--images_per_class", "4",
        "--optim", "adam", "--lr", "0.0002", "--head_lr_mult", "10", "--weight_decay", "0.0005",
        "--schedule", "cosine", "--warmup_epochs", "0.3", "--augment", "standard", "--trainable", "all",
        "--embed_dim", "512"]
# the paper's triplet loss at margin 0.1 over BASE: the recipe recommended before --losses compared losses
TRIPLET = BASE + ["--loss", "triplet", "--margin", "0.1"]
# the best measured row of --losses (docs/training.md, "Comparing losses"): every pair of each P x K batch
RECOMMENDED = BASE + ["--loss", "contrastive", "--margin", "0.8"]
EMBED = ["--tta", "flip"]  # every model (baselines too) embeds each image and its mirror image
DECISION_KEYS = ("pair_accuracy", "pair_roc_auc", "pair_f1", "pair_threshold", "triple_accuracy", "triple_f1",
                 "triple_threshold")
# --losses: each loss (train_net.py --loss NAME) over BASE, and its grid of hyperparameters to tune (on
# train images only); NAME+memory is NAME with its tuned flags and a grid of --memory sizes
LOSS_GRIDS = {"triplet": [["--margin", "0.1"], ["--margin", "0.2"]],
              "contrastive": [["--margin", "1.0"], ["--margin", "0.8"]],
              "multi_similarity": [["--ms_base", "0.5"], ["--ms_base", "0.75"]],
              "proxy_anchor": [["--proxy_lr_mult", "100"], ["--proxy_lr_mult", "10"]],
              "memory": [["--memory", "1024"], ["--memory", "2048"]]}
TUNE_FRACTION = 0.25  # of each class's train images: the tuning stage's held-out queries
TEST_FRACTION = 0.2   # of each class's train images (seed 0): the test split no choice reads
RECIPES = {"triplet": TRIPLET, "recommended": RECOMMENDED}  # --recipes: the final stage of fixed recipes
# the files whose code trains, embeds and scores a run: a kept run made by other code is not read back
CODE_FILES = ("train_net.py", "gen_embeddings.py", "eval.py", "triplet_sampler.py", "transform_validation.py",
              "deep_rank_net.py", "deeprank/*.py", "deeprank/*/*.py")
METRICS = ("precision_at_1", "r_precision", "map_at_r", "score_at_k", "test_triplet_accuracy", "pair_accuracy",
           "triple_accuracy")
ORIGINAL = ["--mining", "none", "--optim", "sgd", "--lr", "0.001", "--batch_size", "25", "--margin", "1.0",
            "--augment", "flip", "--trainable", "conv5", "--embed_dim", "4096"]
# ----------------------------------------------------------------


def stage(main, argv):
    """Run a stage's main() with its printout on stderr; fail loudly on a non-zero status."""
    with contextlib.redirect_stdout(sys.stderr):
        status = main(argv)
    if status:
        raise SystemExit(f"{main.__module__} {' '.join(argv)} exited with {status}")


def embed_and_evaluate(work, name, model, images, evaluate, layer="embedding", embed_flags=EMBED):
    """Embed a checkpoint's train and test images (images: gen_embeddings.py's flags choosing them),
    run eval.py on the two files with the `evaluate` flags, and return its metrics (eval's --json)."""
    train_out, test_out = work / f"{name}_train.txt", work / f"{name}_test.txt"
    stage(gen_embeddings.main, ["--model", str(model), *images, "--train_out", str(train_out), "--test_out",
                                str(test_out), "--layer", layer, "--batch_size", "128", *embed_flags])
    metrics_path = work / f"{name}_metrics.json"
    stage(evaluation.main, ["--train_embeddings", str(train_out), "--test_embeddings", str(test_out), *evaluate,
                            "--json", str(metrics_path)])
    return json.loads(metrics_path.read_text())


def score(work, name, model, csvs, layer="embedding", embed_flags=EMBED):
    """Embed every train and val image with a checkpoint and evaluate val against train."""
    triplets = ["--train_triplets", str(csvs[0]), "--test_triplets", str(csvs[1])]
    metrics = embed_and_evaluate(work, name, model, triplets, triplets, layer, embed_flags)
    return {key: metrics[key] for key in evaluation.METRIC_KEYS + ("k",)}


def triplet_csvs(work, data, seed):
    """(train, val) triplet CSVs of data, N = M = 1."""
    csvs = (work / "training_triplet_sample.csv", work / "val_triplet_sample.csv")
    for training, csv in zip((1, 0), csvs, strict=True):
        stage(triplet_sampler.main, ["--data", str(data), "--training", str(training), "--num_pos_images", "1",
                                     "--num_neg_images", "1", "--out", str(csv), "--seed", str(seed)])
    return csvs


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
    metrics = embed_and_evaluate(work, name, model, ["--data", str(data)], [
        "--pairs", str(csvs["pairs"][1]), "--triples", str(csvs["triples"][1]), "--calibrate", str(csvs["pairs"][0]),
        str(csvs["triples"][0])], layer)
    return {key: metrics[key] for key in DECISION_KEYS + ("precision_at_1", "map_at_r")}


def main_decisions(args, work, data, prep_s):
    """--task pairs / triples: untrained, recommended (contrastive) and triplet-trained models side by side."""
    csvs = {kind: decision_csvs(work, data, kind, args.seed) for kind in ("pairs", "triples")}
    common = BACKBONE + ["--data", str(data), "--seed", str(args.seed)]
    result = {"data": str(args.data), "task": args.task, "minutes": args.minutes, "backbone": " ".join(BACKBONE),
              "recommended_flags": " ".join(RECOMMENDED), "triplet_flags": " ".join(TRIPLET)}
    untrained = work / "untrained.model"
    start = time.perf_counter()
    stage(train_net.main, common + RECOMMENDED + ["--epochs", "0", "--out", str(untrained)])
    result["untrained"] = score_decisions(work, "untrained", untrained, data, csvs, layer="backbone")
    scoring_s = time.perf_counter() - start
    train_minutes = max(1.0, (args.minutes * 60 - prep_s - 1.2 * scoring_s) / 60)
    result["train_minutes"] = None if args.epochs else round(train_minutes, 2)
    for name, flags in (("recommended", RECOMMENDED + args.flags.split()), ("triplet", TRIPLET + args.flags.split())):
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


def score_all(work, name, model, data, csvs, layer="embedding", split_flags=()):
    """Every figure of one model: embed every train and val image of data once, then the kNN metrics
    (val against train), test triplets, and the decided pairs and triples (None: ranking only)."""
    decide = [] if csvs is None else [
        "--train_triplets", str(csvs["triplets"][0]), "--test_triplets", str(csvs["triplets"][1]),
        "--pairs", str(csvs["pairs"][1]), "--triples", str(csvs["triples"][1]),
        "--calibrate", str(csvs["pairs"][0]), str(csvs["triples"][0])]
    metrics = embed_and_evaluate(work, name, model, ["--data", str(data), *split_flags], decide, layer)
    for suffix in ("train.txt", "test.txt", "metrics.json"):  # hundreds of runs: keep only their figures
        (work / f"{name}_{suffix}").unlink()
    return {key: metrics[key] for key in METRICS if key in metrics}


def hold_out_test(data, view, gallery, fraction=TEST_FRACTION, seed=0):
    """Move `fraction` of each class's train images of data (TinyImageNet layout, a work copy) into
    view/val/<class>/images/, and make view a dataset whose train split links to `gallery` (data's
    train folder once in place: what remains): view's val queries are the test split, searched
    against the same gallery as data's val."""
    paths, labels = list_split(data, "train")
    for index in split_by_fraction(paths, labels, fraction, seed)["val"]:
        folder = view / "val" / labels[index] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(paths[index], folder / Path(paths[index]).name)
    (view / "train").symlink_to(gallery.resolve(), target_is_directory=True)
    for name in ("wnids.txt", "words.txt"):
        if (data / name).is_file():
            shutil.copy(data / name, view / name)


def code_digest():
    """A digest of CODE_FILES' contents (sorted by path): which code made a run."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in CODE_FILES for p in ROOT.glob(pattern)}):
        digest.update(f"{path.relative_to(ROOT)}\0{file_digest(path, 64)}\n".encode())
    return digest.hexdigest()[:16]


def split_csvs(work, data, seed):
    """A split's triplet, pair and triple CSVs (its val queries'), in work."""
    work.mkdir(parents=True, exist_ok=True)
    csvs = {kind: decision_csvs(work, data, kind, seed) for kind in ("pairs", "triples")}
    csvs["triplets"] = triplet_csvs(work, data, seed)
    return csvs


class Runs:
    """The comparison's runs, each trained once and kept as RESULTS/<stage>_<name>_s<seed>_<precision>.json
    (--results, default WORK/results): a kept run of the same dataset, flags, minutes and code on the
    same kind of CPU (bf16 or fp32) is read back, not trained again. test: (view, csvs) of the held-out
    test split, scored beside val (the result's "test" figures)."""

    def __init__(self, work, results, dataset, common, csvs, test):
        self.work, self.results, self.dataset, self.common, self.csvs = work, results, dataset, common, csvs
        self.test = test
        self.kind, self.code = precision(torch.device("cpu")), code_digest()
        results.mkdir(parents=True, exist_ok=True)

    def get(self, stage_name, name, flags, minutes, seed, data, split_flags=(), csvs="val"):
        path = self.results / f"{stage_name}_{name}_s{seed}_{self.kind}.json"
        key = (self.dataset, " ".join(flags), minutes, self.code)
        if path.is_file():
            kept = json.loads(path.read_text())
            if (kept.get("dataset"), kept["flags"], kept["minutes"], kept.get("code")) == key:
                return kept
        folder = self.work / "runs" / f"{stage_name}_{name}_s{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        model = folder / "deepranknet.model"
        start = time.perf_counter()
        budget = ["--epochs", "0"] if minutes == 0 else ["--epochs", "1000", "--max_minutes", str(minutes)]
        stage(train_net.main, self.common + ["--data", str(data), *split_flags, "--seed", str(seed), *flags, *budget,
                                             "--keep_last", "1", "--out", str(model)])
        log_path = folder / "deepranknet_log.jsonl"
        log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
        steps = sum(row.get("steps", 0) for row in log if row.get("record") != "step")
        layer = "backbone" if minutes == 0 else "embedding"
        result = {"dataset": self.dataset, "precision": self.kind, "flags": " ".join(flags), "minutes": minutes,
                  "seed": seed, "steps": steps, "code": self.code,
                  "train_seconds": round(time.perf_counter() - start, 1),
                  **score_all(self.work, f"{stage_name}_{name}", model, data, self.csvs if csvs == "val" else None,
                              layer, split_flags)}
        if csvs == "val":  # the held-out test queries against the same gallery
            result["test"] = score_all(self.work, f"{stage_name}_{name}_test", model, self.test[0], self.test[1],
                                       layer)
        shutil.rmtree(folder)
        path.write_text(json.dumps(result))
        print(f"{stage_name} {name} seed {seed}: " + ", ".join(f"{k} {result[k]:.4f}" for k in METRICS if k in result),
              file=sys.stderr)
        return result


def summary(rows):
    """Mean and range of each metric over seeds."""
    return {key: {"mean": sum(r[key] for r in rows) / len(rows), "low": min(r[key] for r in rows),
                  "high": max(r[key] for r in rows)} for key in METRICS if all(key in r for r in rows)}


HEADS = ("P@1", "R-precision", "MAP@R", "score@30", "test triplets", "pair acc.", "triple acc.")  # METRICS'


def markdown_table(result, split="test"):
    """The comparison's rows as a Markdown table of one split's figures (test: the held-out split;
    val): the tuning runs (val only: ranking metrics on their own 1/4 of train), the screen, then
    the final runs (mean, and range over seeds) and the floor."""
    lines = ["| stage | loss | its flags over the base recipe | steps | " + " | ".join(HEADS) + " |",
             "|---" * (4 + len(HEADS)) + "|"]
    chosen = {name: f"`{' '.join(flags)}`" for name, flags in result["chosen"].items()}

    def add(stage_name, name, flags, steps, cells):
        lines.append(f"| {stage_name} | {name} | {flags} | {steps} | " + " | ".join(cells) + " |")

    def figures(row):
        return row if split == "val" else row["test"]

    for name, rows in result["tune"].items() if split == "val" else ():
        for row in rows:
            add(f"tune, {row['minutes']:g} min, 3/4 of train vs 1/4", name, f"`{row['flags']}`", row["steps"],
                [f"{row[key]:.3f}" if key in row else "-" for key in METRICS])
    for name, row in result.get("screen", {}).items():
        add(f"screen, {row['minutes']:g} min, seed 0", name, chosen[name], row["steps"],
            [f"{figures(row)[key]:.3f}" for key in METRICS])
    for name, row in result.get("final", {}).items():
        seeds = [figures(seed) for seed in row["seeds"]]
        add(f"final, {row['seeds'][0]['minutes']:g} min, seed{'s' if len(seeds) > 1 else ''} "
            f"{' and '.join(str(seed['seed']) for seed in row['seeds'])}", name,
            chosen.get(name, f"`{row['flags'].removeprefix(' '.join(BASE)).strip()}`".replace("``", "(base)")),
            " / ".join(str(seed["steps"]) for seed in row["seeds"]),
            [f"{cell['mean']:.3f}" + (f" ({cell['low']:.3f}-{cell['high']:.3f})" if len(seeds) > 1 else "")
             for cell in (summary(seeds)[key] for key in METRICS)])
    for name, row in result.get("floor", {}).items():
        add("floor, seed 0", name, "", row["steps"], [f"{figures(row)[key]:.3f}" for key in METRICS])
    return "\n".join(lines)


def final_stage(result, runs, finals, args, data, csvs):
    """The final stage: each recipe of finals ({name: flags}) at --minutes for each of --seeds, then
    untrained and (unless --skip_original) the original recipe, seed 0, as the floor."""
    seeds = [int(seed) for seed in args.seeds.split(",")]
    result["final"] = {}
    for name, flags in finals.items():
        rows = [runs.get("final", name, flags, args.minutes, seed, data) for seed in seeds]
        result["final"][name] = {"flags": " ".join(flags), "seeds": rows, **summary(rows)}
    result["floor"] = {"untrained": runs.get("final", "untrained", BASE, 0, 0, data)}
    if not args.skip_original:
        result["floor"]["original"] = runs.get("final", "original", ORIGINAL + ["--triplets",
                                                                                 str(csvs["triplets"][0])],
                                               args.minutes, 0, data)
    return finish(result)


def main_losses(args, work, data, view):
    """--losses: tune each loss on train images, screen at --screen_minutes, the best two and today's
    recommended recipe at --minutes with --seeds; untrained and original as the floor. --recipes: the
    final stage alone, for those fixed recipes. view: the held-out test split's dataset."""
    names = (args.losses or "").split(",") if not args.recipes else []
    for name in names:
        if name.removesuffix("+memory") not in LOSSES:
            raise SystemExit(f"--losses: unknown {name}; choose among {', '.join(LOSSES)} (NAME+memory: with "
                             f"cross-batch memory)")
    recipes = args.recipes.split(",") if args.recipes else []
    for name in recipes:
        if name not in RECIPES:
            raise SystemExit(f"--recipes: unknown {name}; choose among {', '.join(RECIPES)}")
    csvs, test_csvs = split_csvs(work, data, args.seed), split_csvs(work / "test_csvs", view, args.seed)
    runs = Runs(work, Path(args.results) if args.results else work / "results", Path(args.data).resolve().name,
                BACKBONE, csvs, (view, test_csvs))
    result = {"data": str(args.data), "backbone": " ".join(BACKBONE), "base_flags": " ".join(BASE),
              "precision": runs.kind, "code": runs.code, "tune": {}, "chosen": {}}
    if recipes:
        return final_stage(result, runs, {name: RECIPES[name] for name in recipes}, args, data, csvs)
    tune_data, tune_split = data / "train", ["--val_fraction", str(TUNE_FRACTION)]
    for name in names:  # tune: each grid point on 3/4 of the train images, MAP@R on the other 1/4
        base = name.removesuffix("+memory")
        if base != name and base not in result["chosen"]:
            raise SystemExit(f"--losses: {name} takes {base}'s tuned flags: list {base} before it")
        tuned = result["chosen"][base] if base != name else []  # NAME+memory: NAME's, then the memory size
        grid = LOSS_GRIDS["memory" if base != name else base]
        tried = [(point, runs.get("tune", f"{name}_{'_'.join(point).replace('--', '')}",
                                  BASE + ["--loss", base] + tuned + point, args.tune_minutes, args.seed,
                                  tune_data, tune_split, csvs=None)) for point in grid]
        result["tune"][name] = [{**r, "flags": " ".join(point)} for point, r in tried]
        result["chosen"][name] = tuned + max(tried, key=lambda t: t[1]["map_at_r"])[0]
    if args.stop_after == "tune":
        return finish(result)
    flags_of = {name: BASE + ["--loss", name.removesuffix("+memory")] + result["chosen"][name] for name in names}
    result["screen"] = {name: runs.get("screen", name, flags_of[name], args.screen_minutes, 0, data)
                        for name in names}
    if args.stop_after == "screen":
        return finish(result)
    best = sorted(names, key=lambda n: result["screen"][n]["map_at_r"], reverse=True)[:2]  # chosen on val
    result["best_two"] = best
    # the final stage: the triplet recipe (recommended before this comparison), the best two and
    # today's recommended recipe, each recipe once: flags train_net.py parses to the same run (the
    # triplet loss tuned to margin 0.1 is TRIPLET itself) are one recipe
    parser, finals = train_net.build_parser(), {}
    for name, flags in [("triplet", TRIPLET), *((n, flags_of[n]) for n in best), ("recommended", RECOMMENDED)]:
        if vars(parser.parse_args(flags)) not in [vars(parser.parse_args(f)) for f in finals.values()]:
            finals[name] = flags
    return final_stage(result, runs, finals, args, data, csvs)


def finish(result):
    """Print the comparison: its Markdown tables (test, the headline, then val) on stderr, its JSON
    line on stdout."""
    if "final" in result or "screen" in result:
        print("held-out test split (the headline: nothing was chosen on it)\n" + markdown_table(result, "test") +
              "\n", file=sys.stderr)
    print("val (what the stages chose on)\n" + markdown_table(result, "val"), file=sys.stderr)
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
    parser.add_argument("--losses", default=None, metavar="NAMES",
                        help="compare these losses (comma-separated: triplet, contrastive, multi_similarity, "
                             "proxy_anchor, NAME+memory) in three stages instead (see above)")
    parser.add_argument("--tune_minutes", type=float, default=3, help="--losses: training budget of a tuning run")
    parser.add_argument("--screen_minutes", type=float, default=15, help="--losses: training budget of a screen run")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="--losses: where each run's figures are kept and read back (default: WORK/results)")
    parser.add_argument("--stop_after", default="final", choices=("tune", "screen", "final"),
                        help="--losses: the last stage to run (default: %(default)s)")
    parser.add_argument("--recipes", default=None, metavar="NAMES",
                        help=f"the --losses final stage alone, for these fixed recipes ({', '.join(RECIPES)})")
    parser.add_argument("--seeds", default="0,1", help="--losses / --recipes: the final stage's seeds "
                                                       "(default: %(default)s)")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        if args.task != "triplets" and detect_layout(args.data) != "tinyimagenet":
            return main_decisions(args, work, Path(args.data).resolve(), time.perf_counter() - begin)
        view = work / "test_view"  # --losses / --recipes: the held-out test split (taken from data's train)
        held_out = bool(args.losses or args.recipes)
        if held_out:
            data = work / "data_heldout"
        if not data.exists():  # prepared under another name, then renamed: an interrupted copy is not reused
            partial = data.with_name(data.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(args.data, partial)
            stage(transform_validation.main, ["--data", str(partial)])
            if held_out:
                shutil.rmtree(view, ignore_errors=True)
                hold_out_test(partial, view, data / "train")
            partial.rename(data)
        if held_out:
            return main_losses(args, work, data, view)
        if args.task != "triplets":
            return main_decisions(args, work, data, time.perf_counter() - begin)
        csvs = triplet_csvs(work, data, args.seed)
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
