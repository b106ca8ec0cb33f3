"""Training curves: the log's step records, <out stem>_curves.png after every epoch, plot_log.py on
one or more logs (and its one-line refusal of anything else), progress lines without a terminal,
and --tensorboard's scalars."""

import json

import pytest
from PIL import Image

import plot_log
import train_net
from conftest import FAST, read_log
from deeprank import curves
from deeprank.common import PipelineError, run_cli


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def readable_png(path):
    with Image.open(path) as picture:
        picture.verify()
        return picture.format == "PNG" and picture.size[0] > 300


def test_curves_after_every_epoch_and_step_records_between(triplets, tmp_path, monkeypatch, capsys):
    train, val = triplets
    drawn = []
    draw = curves.draw_curves

    def counting(runs, out, title=None):
        drawn.append([len(run.epochs) for run in runs])
        return draw(runs, out, title)
    monkeypatch.setattr("deeprank.training_log.draw_curves", counting)
    out = tmp_path / "m.model"
    assert train_net.main(FAST + ["--epochs", "2", "--max_steps", "4", "--log_every", "2", "--batch_size", "8",
                                  "--triplets", str(train), "--val_triplets", str(val), "--out", str(out)]) == 0
    assert drawn == [[1], [2]]  # redrawn after each epoch, with the epochs so far
    assert readable_png(tmp_path / "m_curves.png")
    rows = records(tmp_path / "m_log.jsonl")
    steps = [row for row in rows if row.get("record") == "step"]
    assert [row["step"] for row in steps] == [2, 4, 6, 8] and [row["epoch"] for row in steps] == [1, 1, 2, 2]
    assert all(row["loss"] > 0 and 0 <= row["active_share"] <= 1 for row in steps)
    assert [row["epoch"] for row in read_log(tmp_path / "m_log.jsonl")] == [1, 2]  # epoch records as before
    printed = capsys.readouterr().out  # stdout is not a terminal here: progress lines inside each epoch
    assert "epoch 1 step 2/4: loss " in printed and "epoch 2 step 4/4: loss " in printed


def test_plot_log_draws_two_logs_and_refuses_anything_else(triplets, tmp_path, capsys):
    train, _ = triplets
    for name, lr in (("a", "0.01"), ("b", "0.001")):
        assert train_net.main(FAST + ["--epochs", "1", "--max_steps", "3", "--log_every", "1", "--lr", lr,
                                      "--triplets", str(train), "--out", str(tmp_path / f"{name}.model")]) == 0
    out = tmp_path / "both.png"
    assert plot_log.main([str(tmp_path / "a_log.jsonl"), str(tmp_path / "b_log.jsonl"), "--out", str(out)]) == 0
    assert readable_png(out) and "2 logs, 2 epoch and 6 step records" in capsys.readouterr().out
    not_a_log = tmp_path / "notes.jsonl"
    not_a_log.write_text('{"hello": 1}\n')
    assert run_cli(plot_log.main, [str(not_a_log), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {not_a_log} line 1 is not a training log record; give a <out stem>_log.jsonl that "
                   f"train_net.py wrote"]
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "empty_log.jsonl").write_text("")
    with pytest.raises(PipelineError, match="has no records yet"):
        curves.read_log(tmp_path / "empty_log.jsonl")


def test_tensorboard_gets_the_scalars_or_a_one_line_message(triplets, tmp_path, monkeypatch):
    train, _ = triplets
    flags = FAST + ["--epochs", "1", "--max_steps", "2", "--log_every", "1", "--triplets", str(train),
                    "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "m.model")]
    pytest.importorskip("tensorboard")
    assert train_net.main(flags) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"step/loss", "epoch/loss", "epoch/lr"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("step/loss")] == [1, 2]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "tensorboard" else object())
    with pytest.raises(PipelineError, match="pip install tensorboard"):
        train_net.main(flags)


def test_contrastive_runs_report_val_pair_accuracy(prepared_master, tmp_path):
    """--val_pairs: each epoch's pair accuracy (at the threshold best on those pairs) and ROC AUC,
    equal to the same figures computed from the final model's embeddings."""
    import gen_embeddings
    from conftest import sample_pairs
    from deeprank import metrics
    from deeprank.embedding_io import read_embeddings
    from deeprank.sample_csv import read_pair_csv
    pairs = sample_pairs(prepared_master, tmp_path)
    model = tmp_path / "c.model"
    assert train_net.main(FAST + ["--loss", "contrastive", "--pairs", str(pairs[1]), "--val_pairs", str(pairs[0]),
                                  "--epochs", "2", "--batch_size", "8", "--out", str(model)]) == 0
    last = read_log(tmp_path / "c_log.jsonl")[-1]
    assert gen_embeddings.main(["--model", str(model), "--data", str(prepared_master), "--split", "val",
                                "--num_workers", "0", "--test_out", str(tmp_path / "val.txt")]) == 0
    val = read_embeddings(tmp_path / "val.txt")
    first, second, same = read_pair_csv(pairs[0])
    scores = metrics.pair_scores(val.vectors[val.rows_of(first)], val.vectors[val.rows_of(second)])
    accuracy = metrics.decision_metrics(scores, same, metrics.best_threshold(scores, same))["accuracy"]
    assert last["val_pair_accuracy"] == pytest.approx(accuracy, abs=1 / len(same))  # within one pair: rounding
    assert last["val_pair_roc_auc"] == pytest.approx(metrics.roc_auc(scores, same), abs=0.02)
    assert readable_png(tmp_path / "c_curves.png")


def test_a_long_title_wraps_inside_the_picture_and_the_active_panel_names_what_it_counts(monkeypatch):
    """Many flags: the title's lines stay inside the figure's width; the active-share panel says
    what the run's loss counts (its log's active_of)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figures = []

    def keep(draw, size):
        figure = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure)
        figure.canvas.draw()
        figures.append(figure)
        return b""

    monkeypatch.setattr(curves, "figure_png", keep)
    flags = {key: "a_long_value_" * 3 for key in curves.TITLE_FLAGS}
    rows = [{"epoch": 1, "steps": 4, "loss": 0.5, "active_share": 0.4, "active_of": "pairs its miner keeps",
             "mean_pos_distance": 0.2, "mean_neg_distance": 0.9, "lr": 0.001}]
    curves.curves_png([curves.RunLog.from_rows("m", rows, flags)])
    figure = figures[0]
    width = figure.bbox.width
    box = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert "\n" in figure._suptitle.get_text() and box.x0 >= 0 and box.x1 <= width
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert "active share: pairs its miner keeps" in titles
