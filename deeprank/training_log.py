"""A training run's record: <out stem>_log.jsonl (an epoch record per finished epoch and, between
them, a step record every --log_every steps and at least every STEP_SECONDS): the run's first
record rewrites the file from the records it keeps (a resumed run's earlier epochs), atomically;
each later record is one line appended by a single write (O(1) a record, where rewriting grew with
the run), so a record, an epoch's above all, is in the file whole or not at all;
<out stem>_curves.png redrawn after every epoch (deeprank.curves); progress lines on stdout when
it is not a terminal (where tqdm's bar is off); and, with --tensorboard DIR, the same scalars for
TensorBoard. Rank 0 keeps it; other ranks keep none.

    log = TrainingLog(log_path, earlier_rows, curves_path, flags, every=50)
    log.step(epoch, step, steps, global_step, stats, lr)    # every step: writes when it is time
    log.epoch(row)                                          # the epoch record, the log, the curves
"""

import importlib.util
import json
import os
import sys
import time

from deeprank.common import PipelineError, atomic_write
from deeprank.curves import RunLog, draw_curves, title_of
from deeprank.training import collapsed

LOG_EVERY = 50      # a step record every this many steps (--log_every) ...
STEP_SECONDS = 30   # ... and at least every this many seconds
SCALARS = ("loss", "active_share", "mean_pos_distance", "mean_neg_distance", "lr", "val_triplet_accuracy",
           "val_pair_accuracy", "val_pair_roc_auc")


def check_tensorboard(directory):
    """--tensorboard needs the tensorboard package: one line saying how to get it, before any work."""
    if directory and importlib.util.find_spec("tensorboard") is None:
        raise PipelineError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave the "
                            "flag out: the curves PNG is drawn anyway)")


class TrainingLog:
    """The log, curves and TensorBoard scalars of a run (see the module docstring)."""

    def __init__(self, path, rows, curves_path, flags, every=LOG_EVERY, tensorboard=None, lines=None):
        self.path, self.rows, self.curves_path, self.flags = path, list(rows), curves_path, dict(flags)
        self.every = every
        self.lines = (not sys.stdout.isatty()) if lines is None else lines
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard))
        self.last_time, self.last_step = time.perf_counter(), 0
        self.started = False  # the file rewritten from self.rows yet

    def step(self, epoch, step, steps, global_step, stats, lr):
        """After each step (counted from 1 in its epoch): a step record when --log_every steps or
        STEP_SECONDS have passed since the last one."""
        now = time.perf_counter()
        if step - self.last_step < self.every and now - self.last_time < STEP_SECONDS:
            return
        row = {"record": "step", "epoch": epoch + 1, "step": global_step, **stats.window(self.last_step), "lr": lr,
               "seconds": round(stats.elapsed(), 2)}
        self.last_time, self.last_step = now, step
        self.rows.append(row)
        self._append(row)
        self._scalars("step", row, global_step)
        if self.lines:
            print(f"epoch {epoch + 1} step {step}/{steps}: loss {row['loss']:.4f}, "
                  f"{stats.images / max(stats.elapsed(), 1e-9):.1f} img/s, {stats.elapsed():.0f} s", flush=True)

    def epoch(self, row, global_step):
        """The epoch record: into the log, the curves redrawn, the scalars written."""
        self.rows.append(row)
        self.last_step = 0
        self._append(row)
        self._scalars("epoch", row, global_step)
        draw_curves([RunLog.from_rows(self.path.name.removesuffix("_log.jsonl"), self.rows, self.flags)],
                    self.curves_path, title_of(self.flags))

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def _append(self, row):
        """Add a record (already in self.rows): the first of the run rewrites the file from every kept
        record, atomically; later ones are one line added by a single write to an O_APPEND file."""
        if not self.started:
            with atomic_write(self.path) as handle:
                handle.write("".join(json.dumps(kept) + "\n" for kept in self.rows))
            self.started = True
            return
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(descriptor, (json.dumps(row) + "\n").encode("utf-8"))
        finally:
            os.close(descriptor)

    def _scalars(self, kind, row, global_step):
        if self.writer is None:
            return
        for key in SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"{kind}/{key}", row[key], global_step)
        self.writer.flush()


def earlier_log(path, start_epoch):
    """The log rows a resumed run keeps: those of the epochs its checkpoint had finished."""
    if start_epoch == 0 or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # not a log line (edited by hand, or another program's): left out
            continue
    return [row for row in rows if isinstance(row, dict) and row.get("epoch", 0) <= start_epoch]


def report_epoch(row, total_epochs, skipped="", unit="triplets"):
    """The epoch's summary line; warnings when the embedding has collapsed, or images were skipped."""
    val = f", val triplet accuracy {100 * row['val_triplet_accuracy']:.2f}%" if "val_triplet_accuracy" in row else ""
    val += f", val pair accuracy {100 * row['val_pair_accuracy']:.2f}%" if "val_pair_accuracy" in row else ""
    val += f", distill KL {row['distill_kl']:.4f}" if "distill_kl" in row else ""
    print(f"epoch {row['epoch']}/{total_epochs}: loss {row['loss']:.4f}, active {unit} "
          f"{100 * row['active_share']:.1f}%, d(a,p) {row['mean_pos_distance']:.3f}, "
          f"d(a,n) {row['mean_neg_distance']:.3f}{val}, {row['images_per_s']:.1f} img/s, {row['seconds']:.0f} s")
    if skipped:
        print(f"warning: {skipped}", file=sys.stderr)
    if collapsed(row):
        print("warning: the embedding has collapsed (all distances near zero); lower --lr, raise --margin, "
              "or use --mining batch_semihard / --soft_margin", file=sys.stderr)
