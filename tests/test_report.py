"""eval.py --report: one self-contained page whose numbers are the JSON's, with intervals, the
training curves, the query grids and the pair / triple pictures; every image loads in a real browser."""

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

import eval as evaluation
import gen_embeddings
import train_net
from conftest import FAST, chromium, sample_pairs
from deeprank.metrics import bootstrap_interval
from deeprank.pictures import fitted


@pytest.fixture(scope="module")
def reported(tmp_path_factory, prepared_master):
    """A trained checkpoint (its log beside it), its embeddings, pair CSVs, and eval's report and JSON."""
    out = tmp_path_factory.mktemp("report")
    model = out / "m.model"
    assert train_net.main(FAST + ["--data", str(prepared_master), "--mining", "batch_all", "--classes_per_batch", "4",
                                  "--images_per_class", "3", "--epochs", "2", "--max_steps", "3", "--log_every", "1",
                                  "--out", str(model)]) == 0
    files = {split: out / f"{split}.txt" for split in ("train", "val")}
    assert gen_embeddings.main(["--model", str(model), "--data", str(prepared_master), "--num_workers", "0",
                                "--train_out", str(files["train"]), "--test_out", str(files["val"])]) == 0
    csvs = sample_pairs(prepared_master, out)
    previous = out / "previous.json"
    previous.write_text(json.dumps({"map_at_r": 0.123456, "precision_at_1": 0.5}))
    assert evaluation.main(["--train_embeddings", str(files["train"]), "--test_embeddings", str(files["val"]),
                            "--pairs", str(csvs[0]), "--calibrate", str(csvs[1]), "--k", "5", "--report",
                            str(out / "report"), "--compare", str(previous), "--json", str(out / "m.json")]) == 0
    return out / "report" / "index.html", json.loads((out / "m.json").read_text())


def test_the_report_holds_the_json_figures_with_intervals(reported):
    page, metrics = reported
    text = page.read_text()
    values = dict(re.findall(r'data-key="(\w+)" data-value="([^"]+)"', text))
    assert {"precision_at_1", "map_at_r", "score_at_k", "pair_accuracy", "pair_roc_auc"} <= set(values)
    for key, value in values.items():
        assert float(value) == metrics[key], key  # the page shows exactly what the JSON holds
    for key in ("precision_at_1", "precision_at_k", "r_precision", "map_at_r", "score_at_k"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert "12.35%" in text  # the compared run's MAP@R beside this one
    assert "Recall@5" in text and "score@5" in text  # the definitions name k and the Recall@K ambiguity
    sources = re.findall(r"src='([^']*)'", text)
    assert len(sources) >= 6 and all(src.startswith("data:image/png;base64,") for src in sources)  # nothing outside
    for heading in ("Training curves", "Pairs", "Queries"):
        assert f"<h2>{heading}</h2>" in text
    assert "<td>../m.model (sha256 " in text and str(page.parents[1]) not in text  # no absolute temp path


def test_the_report_in_a_real_browser(reported):
    from selenium.webdriver.common.by import By
    page, metrics = reported
    browser = chromium()
    try:
        browser.get(page.as_uri())
        loaded = "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        assert browser.execute_script(loaded) and len(browser.find_elements(By.TAG_NAME, "img")) >= 6
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-key="map_at_r"]')
        assert row.find_elements(By.TAG_NAME, "td")[1].text == f"{100 * metrics['map_at_r']:.2f}%"
    finally:
        browser.quit()


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_bootstrap_interval_equals_scipys_percentile_bootstrap(level):
    """The same data, the same resamples (seed 0, 100 at a time): scipy's percentile interval."""
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed (requirements-dev.txt)")
    values = np.random.default_rng(1).random(400)
    ours = bootstrap_interval(values, resamples=1000, level=level, seed=0, block=100)
    theirs = stats.bootstrap((values,), np.mean, n_resamples=1000, method="percentile", confidence_level=level,
                             batch=100, rng=np.random.default_rng(0)).confidence_interval
    assert np.allclose(ours, (theirs.low, theirs.high), rtol=1e-12, atol=0)
    assert bootstrap_interval([1.0, 1.0, float("nan")]) == (1.0, 1.0)


def test_one_roc_with_ties_gives_the_auc_of_every_pair_counted():
    from deeprank.metrics import roc_auc, roc_curve
    rng = np.random.default_rng(2)
    scores, labels = rng.integers(0, 6, 300).astype(float), rng.random(300) < 0.4  # many ties
    brute = np.mean([1.0 if a < b else 0.5 if a == b else 0.0 for a in scores[labels] for b in scores[~labels]])
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    fpr, tpr, cuts = roc_curve(scores, labels)
    assert len(cuts) == len(set(scores)) == len(fpr) - 1 and (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_bootstrap_interval_covers_a_known_mean_at_its_level():
    """300 samples of 200 draws from a distribution of mean 0.3: about 95% of the 95% intervals hold
    0.3 (the percentile bootstrap runs a little short on small samples), and about 90% of the 90% ones."""
    rng = np.random.default_rng(7)
    samples = (rng.random((300, 200)) < 0.3).astype(float)
    for level, low, high in ((0.95, 0.91, 0.98), (0.9, 0.85, 0.95)):
        covered = np.mean([a <= 0.3 <= b for a, b in (bootstrap_interval(x, level=level, seed=i)
                                                      for i, x in enumerate(samples))])
        assert low <= covered <= high, (level, covered)


def test_long_captions_are_cut_to_their_cell():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    cut = fitted(draw, "Yorkshire terrier, " * 5, 92)
    assert draw.textlength(cut) <= 92 and cut.endswith("…") and fitted(draw, "cat", 92) == "cat"
