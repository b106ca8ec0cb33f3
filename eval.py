"""Stage 4: score embeddings. Reads train/test embedding files (and triplet CSVs), prints
the metrics, and optionally writes them as JSON and saves query grids as PNGs.

Metrics (test images are the queries, train images the references; D = squared L2):
  test_triplet_accuracy / train_triplet_accuracy  share of CSV triplets with D(q,p) < D(q,n)
  score_at_k      share of queries with at least one same-class image among their k nearest
  precision_at_1  same-class share of the nearest reference
  precision_at_k  same-class share of the k nearest references
  r_precision     same-class share of the R nearest, R = same-class references of the query
  map_at_r        mean average precision at R (Musgrave et al., "A Metric Learning Reality Check")
A query never retrieves itself (same path in both sets). Exact ties in distance are
broken by reference order (earlier rows of the train file first).

    python eval.py --train_embeddings train_embedding.txt --test_embeddings test_embedding.txt --json metrics.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from deeprank.class_names import ClassNames
from deeprank.common import (
    TEST_EMBEDDINGS,
    TRAIN_EMBEDDINGS,
    TRAIN_TRIPLETS,
    VAL_TRIPLETS,
    PipelineError,
    atomic_write,
    check_output_path,
    file_digest,
    non_negative_int,
    positive_int,
    print_args,
    resolve_in,
    run_cli,
    seed_flag,
)
from deeprank.curves import read_log
from deeprank.embedding_io import read_embeddings
from deeprank.metrics import (
    DECISION_CHUNK_ELEMENTS,
    KNN_PRECISIONS,
    best_threshold,
    decision_metrics,
    gathered_scores,
    knn_scores,
    pair_scores,
    roc_auc,
    squared_distances,
    triple_scores,
    triplet_accuracy,
)
from deeprank.pictures import save_captioned_grid
from deeprank.report import write_report
from deeprank.sample_csv import csv_kind, read_decision_codes, read_triplet_csv, triplet_rows

# ---------------------------------------------------------------- hyperparameters
K = 30                       # neighbours for score_at_k / precision_at_k (the original's top-30)
SHOW = 0                     # query grids to save (0: none)
SHOW_DIR = "ranked_imgs"     # where --show writes its PNGs
REPORT_GRIDS = 3             # query grids in a --report when --show asks for none
KNN_PRECISION = "fp32"       # fp32: exact search | bf16: bf16 products, fp32 sums (faster kNN on CPUs with AMX;
                             # neighbours closer than ~1e-3 in squared distance may swap places)
# ----------------------------------------------------------------

METRIC_KEYS = ("train_triplet_accuracy", "test_triplet_accuracy", "score_at_k", "precision_at_1",
               "precision_at_k", "r_precision", "map_at_r")
DECISION_KEYS = ("pair_accuracy", "pair_precision", "pair_recall", "pair_f1", "pair_roc_auc", "pair_threshold",
                 "triple_accuracy", "triple_precision", "triple_recall", "triple_f1", "triple_threshold")


# ----------------------------------------------------------------------------- pictures

def save_query_grid(path, query_path, query_label, ranked, names=None):
    """PNG: the query, then its nearest and farthest references, captioned with class (its name,
    where names knows one) and distance (green: the query's class, red: another).

    ranked: {"nearest": [(path, label, distance)], "farthest": [...]}.
    """
    names = names or ClassNames()
    rows = []
    for title in ("nearest", "farthest"):
        rows.append([(query_path, f"query ({title})\n{names.name(query_label) or query_label}", "black")] + [
            (p, f"{names.name(lab) or lab}\nd={dist:.3f}", "green" if lab == query_label else "red")
            for p, lab, dist in ranked[title]])
    save_captioned_grid(path, rows)


def safe_name(text):
    """A file name without spaces, commas or other characters a shell or a URL would need quoted."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "query"


def show_queries(train, test, count, folder, seed=0, names=None):
    """Save grids for `count` test queries spread over the file (captions: class names where names
    knows them); returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    picks = np.random.default_rng(seed).choice(len(test), size=min(count, len(test)), replace=False)
    refs = torch.as_tensor(train.vectors)
    written = []
    for i in sorted(picks.tolist()):
        d = squared_distances(torch.as_tensor(test.vectors[i:i + 1]), refs)[0]
        self_row = train.index_of(test.paths[i])
        if self_row >= 0:
            d[self_row] = float("nan")
        valid = (~torch.isnan(d)).nonzero().flatten()
        order = valid[torch.sort(d[valid], stable=True).indices]
        ranked = {title: [(train.paths[j], train.labels[j], float(d[j])) for j in rows.tolist()]
                  for title, rows in (("nearest", order[:10]), ("farthest", order.flip(0)[:10]))}
        name = safe_name(f"{i:05d}_{test.labels[i]}_{Path(test.paths[i]).stem}") + ".png"
        save_query_grid(folder / name, test.paths[i], test.labels[i], ranked, names)
        written.append(folder / name)
    return written


# ----------------------------------------------------------------------------- main

def format_metrics(metrics):
    """The printout: one metric per line, shares as percentages."""
    lines = []
    for key in METRIC_KEYS + DECISION_KEYS:
        if key.endswith("_threshold") and metrics.get(key) is not None:
            lines.append(f"{key:<24} {metrics[key]:.6g} (squared L2)")
        elif key in metrics and metrics[key] is not None:
            name = key.replace("_at_k", f"_at_{metrics['k']}") if key.endswith("_at_k") else key
            value = metrics[key]
            lines.append(f"{name:<24} {'n/a' if value != value else f'{100 * value:6.2f}%'}")
    return "\n".join(lines)


def _optional_csv(given, default):
    """An explicit CSV must exist; the default is used only when present."""
    if given is not None:
        return given
    return default if os.path.isfile(default) else None


def build_parser():
    """eval.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[seed_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_embeddings", default=TRAIN_EMBEDDINGS, help="references (default: %(default)s)")
    parser.add_argument("--test_embeddings", default=TEST_EMBEDDINGS, help="queries (default: %(default)s)")
    parser.add_argument("--train_triplets", default=None,
                        help=f"train triplet CSV for train_triplet_accuracy (default: {TRAIN_TRIPLETS} if present)")
    parser.add_argument("--test_triplets", default=None,
                        help=f"test triplet CSV for test_triplet_accuracy (default: {VAL_TRIPLETS} if present)")
    parser.add_argument("--k", type=positive_int, default=K,
                        help="neighbours for score/precision at k (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the metrics here (fractions in [0, 1])")
    parser.add_argument("--show", type=non_negative_int, default=SHOW, help="save N query grids (default: %(default)s)")
    parser.add_argument("--show_dir", default=SHOW_DIR, help="folder for --show PNGs (default: %(default)s)")
    parser.add_argument("--class_names", default=None, metavar="FILE",
                        help="id<TAB>name lines naming the labels in --show's captions (default: TinyImageNet's "
                             "words.txt, found from the image paths; without names, labels stand for themselves)")
    parser.add_argument("--pairs", default=None,
                        help="pair CSV (image1,image2,same) to decide: same class when the distance is below the "
                             "threshold; its images are looked up in the embedding files")
    parser.add_argument("--triples", default=None,
                        help="triple CSV (image1,image2,image3,label) to decide: at least two of one class when "
                             "the smallest of the three distances is below the threshold")
    parser.add_argument("--calibrate", nargs="+", default=[], metavar="CSV",
                        help="pair and / or triple CSVs, never the scored ones, on which each kind's threshold is "
                             "chosen to maximise accuracy")
    parser.add_argument("--threshold", type=float, default=None,
                        help="a given squared-L2 threshold for --pairs and --triples instead of --calibrate")
    parser.add_argument("--no_knn", action="store_true",
                        help="skip the kNN retrieval metrics (score, precision at 1 / k, R-precision, MAP@R), e.g. "
                             "when only --pairs / --triples are to be decided")
    parser.add_argument("--ci", action="store_true",
                        help="also a 95%% bootstrap interval over queries for each ranking metric (in --json as "
                             "<metric>_ci_low and <metric>_ci_high)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write DIR/index.html: one page with the metrics (and intervals), their definitions, the "
                             "run's configuration, training curves, query grids and pair/triple pictures")
    parser.add_argument("--compare", default=None, metavar="JSON",
                        help="--report: another run's eval.py --json (the untrained or a previous model) beside "
                             "this one")
    parser.add_argument("--knn_precision", default=KNN_PRECISION, choices=KNN_PRECISIONS,
                        help="fp32: exact kNN; bf16: bf16 products with fp32 sums, faster on CPUs with AMX, "
                             "near-ties may swap (default: %(default)s)")
    return parser


def score_triplets(train, test, args):
    """train_ / test_triplet_accuracy (and _count) for each triplet CSV given, or present by default."""
    metrics = {}
    for key, given, default, emb in (("train_triplet_accuracy", args.train_triplets, TRAIN_TRIPLETS, train),
                                     ("test_triplet_accuracy", args.test_triplets, VAL_TRIPLETS, test)):
        csv = _optional_csv(given, default)
        if csv is not None:
            q, p, n = triplet_rows(read_triplet_csv(csv), emb.index_of, csv,
                                   "the embedding file lacks; rerun gen_embeddings.py with this CSV")
            metrics[key] = triplet_accuracy(emb.vectors, q, p, n)
            metrics[key.replace("accuracy", "count")] = len(q)
    return metrics


SCORES = {"pairs": pair_scores, "triples": triple_scores}


def decision_scores(csv, kind, train, test, chunk_elements=DECISION_CHUNK_ELEMENTS):
    """(distance scores, 1/0 labels) of a pair or triple CSV, each image looked up by path in the
    test embeddings, then the train ones: once per distinct path, then scored a block of rows at a
    time (memory grows with the rows, not with rows x dim)."""
    paths, codes, labels = read_decision_codes(csv, kind)
    ids = vector_ids(paths, train, test, csv)[codes]
    return gathered_scores(SCORES[kind], vectors_of(train, test), ids, test.vectors.shape[1], chunk_elements), labels


def vector_ids(paths, train, test, csv):
    """Each path's row in test, else len(test) + its row in train (ids into test then train);
    a path neither file holds is refused, naming csv."""
    in_test, in_train = test.rows_of(paths), train.rows_of(paths)
    missing = (in_test < 0) & (in_train < 0)
    if missing.any():
        raise PipelineError(f"{csv} names {paths[np.flatnonzero(missing)[0]]}, which neither embedding file holds; "
                            f"rerun gen_embeddings.py on the split it comes from")
    return np.where(in_test >= 0, in_test, len(test) + in_train)


def vectors_of(train, test):
    """take(ids) -> (n, D) float32 vectors of vector_ids' ids."""
    first = len(test)

    def take(ids):
        in_test = ids < first
        if in_test.all():
            return test.vectors[ids]
        out = np.empty((len(ids), test.vectors.shape[1]), dtype=np.float32)
        out[in_test] = test.vectors[ids[in_test]]
        out[~in_test] = train.vectors[ids[~in_test] - first]
        return out
    return take


def score_decisions(train, test, args):
    """(pair_* / triple_* metrics of --pairs / --triples, {kind: (scores, labels, threshold)}), each
    with a threshold given or calibrated on its own kind of --calibrate CSV (never on the scored CSV)."""
    metrics, decisions = {}, {}
    calibration = {}
    for csv in args.calibrate:
        calibration.setdefault(csv_kind(csv), csv)
    for kind, csv in (("pairs", args.pairs), ("triples", args.triples)):
        if csv is None:
            continue
        prefix = kind[:-1]
        if args.threshold is not None:
            threshold = args.threshold
        elif kind in calibration:
            if os.path.abspath(calibration[kind]) == os.path.abspath(csv):
                raise PipelineError(f"--calibrate {csv} is the CSV being scored; calibrate on another "
                                    f"(e.g. the train split's {kind})")
            threshold = best_threshold(*decision_scores(calibration[kind], kind, train, test))
            metrics[f"{prefix}_calibrated_on"] = str(calibration[kind])
        else:
            raise PipelineError(f"--{kind} needs a threshold: --calibrate a {kind} CSV (not {csv}) or --threshold T")
        scores, labels = decision_scores(csv, kind, train, test)
        metrics.update({f"{prefix}_{key}": value for key, value in decision_metrics(scores, labels, threshold).items()})
        if kind == "pairs":
            metrics["pair_roc_auc"] = roc_auc(scores, labels)
        metrics[f"{prefix}_threshold"] = threshold
        metrics[f"{prefix}_count"] = len(labels)
        decisions[kind] = (scores, labels, threshold)
    return metrics, decisions


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.json:
        check_output_path(args.json)
    if args.show:  # the grids' folder, made and checked before any scoring
        try:
            Path(args.show_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot create --show_dir {args.show_dir} ({err.strerror}); pick another") from None
        check_output_path(Path(args.show_dir) / "query.png")
    print_args("eval.py", args)

    train = read_embeddings(args.train_embeddings)
    same_file = os.path.exists(args.test_embeddings) and os.path.samefile(args.train_embeddings,
                                                                          args.test_embeddings)
    test = train if same_file else read_embeddings(args.test_embeddings)  # one file: read (and held) once
    if train.vectors.shape[1] != test.vectors.shape[1]:
        raise PipelineError(f"{args.train_embeddings} has dim={train.vectors.shape[1]} but {args.test_embeddings} "
                            f"has dim={test.vectors.shape[1]}; rerun gen_embeddings.py with one checkpoint for both")
    if len(train) == 0 or len(test) == 0:
        raise PipelineError("an embedding file has no rows; rerun gen_embeddings.py")
    metrics = score_triplets(train, test, args)
    decision_metrics_, decisions = score_decisions(train, test, args)
    metrics.update(decision_metrics_)
    if not args.no_knn:
        metrics.update(knn_scores(train, test, args.k, args.knn_precision, intervals=args.ci or bool(args.report)))
        if metrics["k"] < args.k:
            print(f"warning: --k {args.k} is more than the {metrics['k']} train images a query can retrieve; "
                  f"scoring at k = {metrics['k']}", file=sys.stderr)
        metrics["knn_precision"] = args.knn_precision
    metrics["train_embeddings"] = str(args.train_embeddings)
    metrics["test_embeddings"] = str(args.test_embeddings)
    metrics["model"] = test.header["model"]

    print(f"{len(test)} test queries against {len(train)} train images, dim={train.vectors.shape[1]}")
    print(format_metrics(metrics))
    if args.json:
        with atomic_write(args.json) as handle:
            clean = {key: (None if isinstance(v, float) and v != v else v) for key, v in metrics.items()}
            json.dump(clean, handle, indent=2, sort_keys=True)
            handle.write("\n")
        print(f"wrote {args.json}")
    names = ClassNames.for_paths(train.paths + test.paths, args.class_names) if args.show or args.report else None
    if args.show > 0:
        written = show_queries(train, test, args.show, args.show_dir, args.seed, names)
        print(f"saved {len(written)} query grids to {args.show_dir}/")
    if args.report:
        print(f"wrote {write_eval_report(args, train, test, metrics, decisions, names)}")
    return 0


def write_eval_report(args, train, test, metrics, decisions, names):
    """--report DIR: index.html with the metrics (and --compare's), the run's configuration, the
    checkpoint's training curves when its log sits beside it, query grids, and the decisions' pictures."""
    compare = read_compare(args.compare) if args.compare else None
    grids = show_queries(train, test, args.show or REPORT_GRIDS, Path(args.report) / "grids", args.seed, names)
    model = resolve_in(test.header["model"], str(Path(args.test_embeddings).resolve().parent))
    log_path = Path(model).with_name(f"{Path(model).stem}_log.jsonl")
    log = read_log(log_path) if log_path.is_file() else None
    header = test.header

    def shown(path):  # relative to the report's folder: the page moves with the run, and names no temp folder
        return os.path.relpath(os.path.abspath(path), os.path.abspath(args.report))

    digest = header.get("checkpoint") or (file_digest(model) if os.path.isfile(model) else "unknown")
    config = {"test embeddings (queries)": shown(args.test_embeddings),
              "train embeddings (references)": shown(args.train_embeddings),
              "checkpoint": f"{shown(model)} (sha256 {digest})", "layer": header.get("layer", "embedding"),
              "tta": header.get("tta", "none"),
              "embedding precision": header.get("amp", "unknown"), "kNN precision": args.knn_precision,
              "k": metrics.get("k", args.k), "commit": project_commit(),
              "compared with": shown(args.compare) if args.compare else "–"}
    return write_report(args.report, metrics, config, compare, log, grids, decisions)


def read_compare(path):
    """--compare: another run's eval.py --json."""
    try:
        with open(path, encoding="utf-8") as handle:
            other = json.load(handle)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot read --compare {path} ({err}); give the metrics JSON of eval.py --json") from None
    if not isinstance(other, dict):
        raise PipelineError(f"--compare {path} is not eval.py's metrics JSON")
    return other


def project_commit():
    """The project's git commit (short), or 'unknown' outside a checkout."""
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(run_cli(main))
