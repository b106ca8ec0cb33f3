"""eval.py --report DIR: one self-contained index.html (every picture inside it as a data URI; no
server, no JavaScript) that a person opens from disk: the run's configuration, the metrics with
their definitions and 95% bootstrap intervals (and a compared run beside them), the training
curves of the checkpoint's log, the query grids, and for pair and triple runs the ROC curve and
the distance histograms of same and different pairs with the threshold marked.

    write_report("report", metrics, config, compare=None, log=None, grids=[...], decisions={...})
"""

import base64
import html
import os

import numpy as np

from deeprank.common import atomic_write
from deeprank.curves import curves_png, figure_png
from deeprank.metrics import roc_curve

# metric key -> (name shown, definition); {k} is the run's k
DEFINITIONS = {
    "test_triplet_accuracy": ("test triplet accuracy", "share of the test CSV's triplets with D(q, p) < D(q, n), "
                              "D the squared L2 distance (the original project's 'similarity precision')"),
    "train_triplet_accuracy": ("train triplet accuracy", "the same on the train CSV's triplets"),
    "score_at_k": ("score@{k}", "share of queries with at least one same-class image among their {k} nearest: "
                   "what metric-learning papers call Recall@{k} (in information retrieval, recall@{k} is instead "
                   "the share of all same-class images found in the top {k})"),
    "precision_at_1": ("P@1", "share of queries whose nearest train image is of their class"),
    "precision_at_k": ("P@{k}", "same-class share of each query's {k} nearest, averaged over queries"),
    "r_precision": ("R-precision", "same-class share of each query's R nearest, R = the number of train images "
                    "of its class (queries with R = 0 left out)"),
    "map_at_r": ("MAP@R", "mean average precision over each query's R nearest (Musgrave et al., 'A Metric "
                 "Learning Reality Check', 2020)"),
    "pair_accuracy": ("pair accuracy", "share of pairs decided right: 'same class' when the distance is below "
                      "the threshold"),
    "pair_roc_auc": ("pair ROC AUC", "chance that a same-class pair is closer than a different-class pair "
                     "(threshold-free)"),
    "pair_f1": ("pair F1", "F1 of the 'same class' decisions"),
    "triple_accuracy": ("triple accuracy", "share of triples decided right: 'at least two of one class' when "
                        "the smallest of the three distances is below the threshold"),
    "triple_f1": ("triple F1", "F1 of those decisions"),
}
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
         "td.value{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #ddd}"
         "small{color:#666}")


def png_data_uri(data):
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def decision_pictures(kind, scores, labels, threshold):
    """(ROC curve PNG or None, histogram PNG) of a pair / triple CSV's scores (lower: 'same')."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)

    def histogram(figure):
        ax = figure.subplots()
        bins = np.linspace(scores.min(), scores.max(), 50) if len(scores) else 10
        positive = "same class" if kind == "pairs" else "two of one class"
        ax.hist(scores[labels], bins=bins, alpha=0.6, label=positive)
        ax.hist(scores[~labels], bins=bins, alpha=0.6, label="different" if kind == "pairs" else "three classes")
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.set_xlabel("squared L2 distance" + (" (smallest of three)" if kind == "triples" else ""))
        ax.set_ylabel(kind)
        ax.legend()

    def roc(figure):
        ax = figure.subplots()
        fpr, tpr, cuts = roc_curve(scores, labels)
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        at = np.searchsorted(cuts, threshold)  # the decision: 'same' below the threshold
        ax.plot([fpr[at]], [tpr[at]], "o", color="black", label="the threshold")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend()

    return (figure_png(roc, (4.5, 4)) if kind == "pairs" else None), figure_png(histogram, (6, 3.6))


def fmt(value):
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{100 * value:.2f}%" if isinstance(value, float) and 0 <= value <= 1 else html.escape(str(value))


def metrics_table(metrics, compare):
    """The metrics table: name, value, 95% interval, compared run, definition."""
    k = metrics.get("k", "k")
    rows = []
    for key, (name, definition) in DEFINITIONS.items():
        if metrics.get(key) is None:
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        interval = f"{fmt(low)} – {fmt(high)}" if low is not None else ""
        other = fmt(compare.get(key)) if compare else None
        rows.append(f'<tr data-key="{key}" data-value="{metrics[key]!r}"><td>{html.escape(name.format(k=k))}</td>'
                    f'<td class="value">{fmt(metrics[key])}</td><td class="value">{interval}</td>'
                    + (f'<td class="value">{other}</td>' if compare is not None else "")
                    + f"<td><small>{html.escape(definition.format(k=k))}</small></td></tr>")
    head = ("<tr><th>metric</th><th>this run</th><th>95% interval (bootstrap over queries)</th>"
            + ("<th>compared run</th>" if compare is not None else "") + "<th>definition</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(folder, metrics, config, compare=None, log=None, grids=(), decisions=None):
    """Write folder/index.html (atomically); returns its path. config: {name: value} shown as the
    run's configuration; compare: another run's metrics JSON; log: a curves.RunLog; grids: PNG
    paths; decisions: {kind: (scores, labels, threshold)}."""
    os.makedirs(folder, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>deep-ranking evaluation</title>"
             f"<style>{STYLE}</style></head><body><h1>Evaluation report</h1>"]
    parts.append("<h2>Run</h2><table>" + "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>" for key, value in config.items())
                 + "</table>")
    parts.append("<h2>Metrics</h2>" + metrics_table(metrics, compare))
    if log is not None:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{png_data_uri(curves_png([log]))}'>")
    for kind, (scores, labels, threshold) in (decisions or {}).items():
        roc, histogram = decision_pictures(kind, scores, labels, threshold)
        parts.append(f"<h2>{'Pairs' if kind == 'pairs' else 'Triples'}</h2>")
        if roc is not None:
            parts.append(f"<img alt='ROC curve' src='{png_data_uri(roc)}'>")
        parts.append(f"<img alt='{kind} distance histograms' src='{png_data_uri(histogram)}'>")
    if grids:
        parts.append("<h2>Queries</h2><p>Each row: the query, then its nearest (first row) and farthest (second "
                     "row) train images; green: its class, red: another.</p>")
        for grid in grids:
            with open(grid, "rb") as handle:
                parts.append(f"<p><img alt='{html.escape(os.path.basename(str(grid)))}' "
                             f"src='{png_data_uri(handle.read())}'></p>")
    parts.append("</body></html>\n")
    path = os.path.join(folder, "index.html")
    with atomic_write(path) as handle:
        handle.write("".join(parts))
    return path
