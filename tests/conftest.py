"""Shared test helpers: the synthetic dataset (generated once per session, copied per test),
the real TinyImageNet sample from ../shared (copied to a temp folder, never modified), triplet
CSVs of the synthetic set, the small-model flags every training test uses, and log reading.
(pytest.ini's pythonpath puts the project root on sys.path.)"""

import json
import shutil
from pathlib import Path

import pytest

import synthetic_data
import transform_validation
import triplet_sampler

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "tiny-imagenet-mini"
# a small, fast model for every training test about the pipeline (not the backbone): small_cnn from
# random init at 32 px, its features projected to 32 dimensions, not the paper's 4,096 (a checkpoint
# with its optimiser state of 2 MB, where resnet18's at 4,096 is ~100 MB), and only the last epoch's
# temp_net kept (a test that reads earlier ones passes a later --keep_last)
FAST = ["--backbone", "small_cnn", "--weights", "none", "--image_size", "32", "--embed_dim", "32",
        "--conv_dim", "32", "--num_workers", "0", "--keep_last", "1"]


def read_log(path):
    """The epoch records of a training log (its step records left out)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [row for row in rows if row.get("record") != "step"]


@pytest.fixture(scope="session")
def synthetic_master(tmp_path_factory):
    """A small synthetic TinyImageNet-layout tree (original flat val layout). Do not modify."""
    out = tmp_path_factory.mktemp("master") / "synthetic"
    synthetic_data.generate(out, classes=4, train_per_class=12, val_per_class=4, test_images=3, seed=0)
    return out


@pytest.fixture
def synthetic(synthetic_master, tmp_path):
    """A private copy of the synthetic tree, flat val layout, free to modify."""
    return Path(shutil.copytree(synthetic_master, tmp_path / "data"))


@pytest.fixture(scope="session")
def prepared_master(tmp_path_factory, synthetic_master):
    """Synthetic tree with val/ already transformed to val/<wnid>/images/. Do not modify."""
    out = Path(shutil.copytree(synthetic_master, tmp_path_factory.mktemp("prepared") / "data"))
    assert transform_validation.main(["--data", str(out)]) == 0
    return out


@pytest.fixture
def mini_copy(tmp_path):
    """A temp copy of ../shared/data/tiny-imagenet-mini (real JPEGs), or skip when absent."""
    if not MINI.is_dir():
        pytest.skip(f"{MINI} is not present (it sits beside the checkout in this project's workplace)")
    return Path(shutil.copytree(MINI, tmp_path / "tiny-imagenet-mini"))


def sample_pairs(data, folder, count=40):
    """Pair CSVs of data's train (key 1) and val (key 0) splits, `count` pairs each, in folder."""
    csvs = {}
    for training in (1, 0):
        csvs[training] = Path(folder) / f"pairs{training}.csv"
        assert triplet_sampler.main(["--data", str(data), "--kind", "pairs", "--training", str(training),
                                     "--count", str(count), "--out", str(csvs[training])]) == 0
    return csvs


@pytest.fixture
def triplets(prepared_master, tmp_path):
    """Train (N = M = 2) and val (N = M = 1) triplet CSVs of the synthetic dataset."""
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    assert triplet_sampler.main(["--data", str(prepared_master), "--training", "1", "--num_pos_images", "2",
                                 "--num_neg_images", "2", "--out", str(train)]) == 0
    assert triplet_sampler.main(["--data", str(prepared_master), "--training", "0", "--out", str(val)]) == 0
    return train, val


def chromium():
    """A headless Chromium under Selenium (Debian's chromium and chromedriver, which
    tests/install_browser.sh installs), or skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium / chromedriver are not installed: run tests/install_browser.sh (root, Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
