"""Training curves: one or more runs' logs (<out stem>_log.jsonl) drawn as one PNG, without a display
(matplotlib's Agg canvas, no pyplot state). train_net.py redraws its run's picture after every
epoch; plot_log.py draws finished or running logs side by side.

    runs = [read_log("deepranknet_log.jsonl")]
    draw_curves(runs, "deepranknet_curves.png")

A log holds one JSON object a line: an epoch record per finished epoch (epoch, steps, loss,
active_share, mean_pos_distance, mean_neg_distance, lr, val_triplet_accuracy, ...) and, between
them, step records ({"record": "step", "step": global step, ...}) every few steps.
"""

import json
import textwrap
from pathlib import Path

from deeprank.common import PipelineError, atomic_write

# (panel title, log keys drawn in it)
ACTIVE_PANEL = "active share"
PANELS = (("loss", ("loss",)), (ACTIVE_PANEL, ("active_share",)),
          ("mean distance", ("mean_pos_distance", "mean_neg_distance")), ("learning rate (new layers)", ("lr",)),
          ("validation", ("val_triplet_accuracy", "val_pair_accuracy", "val_pair_roc_auc")))
LABELS = {"mean_pos_distance": "d(anchor, positive)", "mean_neg_distance": "d(anchor, negative)",
          "val_triplet_accuracy": "val triplet accuracy", "val_pair_accuracy": "val pair accuracy",
          "val_pair_roc_auc": "val pair ROC AUC"}
TITLE_CHARS = 50  # the picture's title wraps at this many characters a panel's width ...
PANEL_CHARS = 45  # ... a panel's title at this many
TITLE_FLAGS = ("backbone", "image_size", "embed_dim", "loss", "mining", "classes_per_batch", "images_per_class",
               "batch_size", "optim", "lr", "trainable")


class RunLog:
    """A training log read back: name, epoch records, step records, and the run's flags (from the
    checkpoint config written beside it, when the caller gives them)."""

    def __init__(self, name, epochs, steps, flags=None, folder=""):
        self.name, self.epochs, self.steps, self.flags = name, epochs, steps, dict(flags or {})
        self.folder = folder

    @classmethod
    def from_rows(cls, name, rows, flags=None, folder=""):
        """A RunLog of a log's records in file order (epoch and step records mixed)."""
        return cls(name, [r for r in rows if not is_step_record(r)], [r for r in rows if is_step_record(r)], flags,
                   folder)

    def epoch_ends(self):
        """The global step at the end of each epoch record (its steps added up)."""
        ends, total = [], 0
        for row in self.epochs:
            total += int(row.get("steps", 0))
            ends.append(total)
        return ends


def is_step_record(row):
    return row.get("record") == "step"


def read_log(path, flags=None):
    """A RunLog of a log file, refusing (one line) a file that is not a training log."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); give a "
                            f"<out stem>_log.jsonl that train_net.py wrote") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "epoch" not in row or "loss" not in row:
            raise PipelineError(f"{path} line {number} is not a training log record; give a <out stem>_log.jsonl "
                                f"that train_net.py wrote")
        rows.append(row)
    if not rows:
        raise PipelineError(f"{path} has no records yet; train_net.py writes one after its first steps")
    return RunLog.from_rows(path.name.removesuffix("_log.jsonl"), rows, flags, path.resolve().parent.name)


def distinct_names(runs):
    """Give runs whose logs share a name their folder's name too (runs/a/m_log.jsonl: a/m)."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1 and run.folder:
            run.name = f"{run.folder}/{run.name}"
    return runs


def title_of(flags):
    """The run's key flags, for a picture's title."""
    return ", ".join(f"{key} {flags[key]}" for key in TITLE_FLAGS if flags.get(key) is not None)


def panel_title(name, runs):
    """A panel's title; the active-share panel's says what the first run's loss counts there (its
    epoch records' active_of; logs from before it was written: the triplet loss's hinge)."""
    if name != ACTIVE_PANEL:
        return name
    counts = next((row["active_of"] for row in runs[0].epochs + runs[0].steps if row.get("active_of")),
                  "triplets with loss > 0")
    return textwrap.fill(f"active share: {counts}", PANEL_CHARS)


def draw_curves(runs, out, title=None):
    """Write curves_png(runs, title) to out, atomically; returns out."""
    data = curves_png(runs, title)
    with atomic_write(out, mode="wb") as handle:
        handle.write(data)
    return out


def figure_png(draw, size):
    """PNG bytes of a matplotlib figure of `size` inches drawn by draw(figure) (Agg canvas, no pyplot)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=90)
    return out.getvalue()


def curves_png(runs, title=None):
    """PNG bytes of the runs' curves, a panel per quantity, against the global step (step records
    as lines, epoch records as markers; the first run's epoch ends on a top axis)."""
    panels = [(name, keys) for name, keys in PANELS if any(k in row for run in runs for row in run.epochs + run.steps
                                                          for k in keys)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)

    def draw(figure):
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for spare in axes[len(panels):]:
            spare.set_visible(False)
        for ax, (name, keys) in zip(axes, panels, strict=False):
            draw_panel(ax, panel_title(name, runs), keys, runs)
        figure.suptitle(textwrap.fill(title if title is not None else title_of(runs[0].flags), TITLE_CHARS * columns))

    return figure_png(draw, (4.6 * columns, 3.6 * rows))


def draw_panel(ax, name, keys, runs):
    """One quantity's panel: each run's step records as a thin line, its epoch records as markers."""
    colours = [f"C{i}" for i in range(10)]
    for r, run in enumerate(runs):
        ends = run.epoch_ends()
        for k, key in enumerate(keys):
            colour, style = colours[(r * len(keys) + k) % 10], ("-", "--")[k % 2]
            label = (LABELS.get(key, key) if len(keys) > 1 else None)
            label = f"{run.name}: {label}" if len(runs) > 1 and label else (run.name if len(runs) > 1 else label)
            steps = [(row["step"], row[key]) for row in run.steps if row.get(key) is not None]
            if steps:
                ax.plot(*zip(*steps, strict=True), style, color=colour, alpha=0.5, linewidth=1)
            epochs = [(end, row[key]) for end, row in zip(ends, run.epochs, strict=True) if row.get(key) is not None]
            if epochs:
                ax.plot(*zip(*epochs, strict=True), style, marker="o", color=colour, label=label)
    ax.set_title(name)
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    first = runs[0].epoch_ends()
    if first:  # the first run's epochs on a second axis above
        top = ax.secondary_xaxis("top")
        top.set_xticks(first, [str(row["epoch"]) for row in runs[0].epochs])
        top.set_xlabel("epoch")
