"""Shared fixtures: the synthetic dataset (generated once per session, copied per test) and
the real TinyImageNet sample from ../shared, copied to a temp folder (never modified)."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic_data  # noqa: E402
import transform_validation  # noqa: E402

MINI = ROOT.parent / "shared" / "data" / "tiny-imagenet-mini"


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
