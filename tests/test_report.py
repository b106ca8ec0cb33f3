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


def test_bootstrap_interval_of_a_mean():
    rng = np.random.default_rng(1)
    values = rng.random(400)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and 0.02 < high - low < 0.08  # about 4 standard errors (0.0144) wide
    assert bootstrap_interval([1.0, 1.0, float("nan")]) == (1.0, 1.0)


def test_long_captions_are_cut_to_their_cell():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    cut = fitted(draw, "Yorkshire terrier, " * 5, 92)
    assert draw.textlength(cut) <= 92 and cut.endswith("…") and fitted(draw, "cat", 92) == "cat"
