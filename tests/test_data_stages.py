"""Stage 0 (transform_validation.py) and stage 1 (triplet_sampler.py)."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import synthetic_data
import transform_validation
import triplet_sampler
from deeprank.common import PipelineError
from deeprank.datasets import class_of, list_split
from deeprank.sample_csv import read_triplet_csv

ROOT = Path(__file__).resolve().parents[1]


def val_files(data):
    """{relative path: bytes} of every file under val/ (to check nothing is lost or changed)."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted((data / "val").rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- transform_validation

def test_transform_moves_every_image_to_its_class(synthetic):
    annotations = [line.split("\t")[:2] for line in (synthetic / "val/val_annotations.txt").read_text().splitlines()]
    before = {name: (synthetic / "val/images" / name).read_bytes() for name, _ in annotations}
    assert transform_validation.main(["--data", str(synthetic)]) == 0
    for name, wnid in annotations:
        moved = synthetic / "val" / wnid / "images" / name
        assert moved.read_bytes() == before[name]
    assert not (synthetic / "val/images").exists()
    paths, labels = list_split(synthetic, "val")
    assert len(paths) == len(annotations)
    assert all(class_of(p) == label for p, label in zip(paths, labels, strict=True))


def test_transform_rerun_changes_nothing(synthetic, capsys):
    assert transform_validation.main(["--data", str(synthetic)]) == 0
    snapshot = val_files(synthetic)
    capsys.readouterr()
    assert transform_validation.main(["--data", str(synthetic)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert val_files(synthetic) == snapshot


def test_transform_reports_missing_and_unannotated_and_never_overwrites(synthetic, capsys):
    annotations = (synthetic / "val/val_annotations.txt").read_text().splitlines()
    gone_name, gone_wnid = annotations[0].split("\t")[:2]
    (synthetic / "val/images" / gone_name).unlink()  # annotation names a missing image
    (synthetic / "val/images/extra.JPEG").write_bytes(b"not annotated")
    clash_name, clash_wnid = annotations[1].split("\t")[:2]
    clash = synthetic / "val" / clash_wnid / "images" / clash_name
    clash.parent.mkdir(parents=True)
    clash.write_bytes(b"already here")  # destination taken: must not be overwritten
    total_before = len(val_files(synthetic))

    assert transform_validation.main(["--data", str(synthetic)]) == 1
    err = capsys.readouterr().err
    assert gone_name in err and "extra.JPEG" in err and clash_name in err
    assert clash.read_bytes() == b"already here"
    assert (synthetic / "val/images" / clash_name).is_file()  # left where it was
    assert (synthetic / "val/images/extra.JPEG").read_bytes() == b"not annotated"
    assert len(val_files(synthetic)) == total_before  # no file lost
    assert not (synthetic / "val" / gone_wnid / "images" / gone_name).exists()


@pytest.mark.parametrize("line", ["val_0.JPEG", "\tn90000000\t1\t2\t3\t4", "val_0.JPEG\tn12345678\t0\t0\t1\t1"])
def test_transform_refuses_bad_annotation_lines_before_moving(synthetic, line):
    path = synthetic / "val/val_annotations.txt"
    path.write_text(path.read_text() + line + "\n")
    snapshot = val_files(synthetic)
    with pytest.raises(PipelineError, match="line"):
        transform_validation.main(["--data", str(synthetic)])
    assert val_files(synthetic) == snapshot


def test_transform_missing_files(synthetic, tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        transform_validation.main(["--data", str(tmp_path / "nowhere")])
    (synthetic / "val/val_annotations.txt").unlink()
    with pytest.raises(PipelineError, match="val_annotations.txt is missing"):
        transform_validation.main(["--data", str(synthetic)])
    (synthetic / "wnids.txt").unlink()
    with pytest.raises(PipelineError, match="wnids.txt is missing"):
        transform_validation.main(["--data", str(synthetic)])


def test_untransformed_val_is_refused_with_the_fix(synthetic):
    with pytest.raises(PipelineError, match="transform_validation.py"):
        list_split(synthetic, "val")


# ----------------------------------------------------------------------------- sampler rules

def labels_for(sizes):
    """Grouped labels for classes of the given sizes: ['c0', 'c0', 'c1', ...]."""
    return [f"c{c}" for c, n in enumerate(sizes) for _ in range(n)]


def test_sample_distinct_rows_are_distinct_and_in_range():
    rng = np.random.default_rng(0)
    high = rng.integers(3, 50, size=2000)
    picked = triplet_sampler.sample_distinct(rng, high, 3)
    assert (picked >= 0).all() and (picked < high[:, None]).all()
    assert all(len(set(row)) == 3 for row in picked.tolist())


def test_sample_distinct_is_uniform():
    picked = triplet_sampler.sample_distinct(np.random.default_rng(1), np.full(60000, 5), 2)
    counts = np.bincount(picked.ravel(), minlength=5) / picked.size
    assert np.allclose(counts, 0.2, atol=0.01)


@pytest.mark.parametrize("num_pos,num_neg", [(1, 1), (2, 3), (4, 2)])
def test_sampler_rules(num_pos, num_neg):
    labels = labels_for([7, 5, 9, 6])
    triplets, short = triplet_sampler.sample_triplets(labels, num_pos, num_neg, seed=3)
    lab = np.array(labels)
    q, p, n = triplets.T
    assert short == {}
    assert (lab[q] == lab[p]).all(), "positive is of the query's class"
    assert (q != p).all(), "positive is never the query"
    assert (lab[q] != lab[n]).all(), "negative is of another class"
    assert len(triplets) == len(labels) * num_pos * num_neg
    per_query = Counter(q.tolist())
    assert set(per_query.values()) == {num_pos * num_neg} and len(per_query) == len(labels)
    for query in range(len(labels)):
        rows = triplets[q == query]
        assert len(set(rows[:, 1])) == num_pos, "positives of a query are distinct"
        for positive in set(rows[:, 1]):
            assert len(set(rows[rows[:, 1] == positive, 2])) == num_neg, "negatives of a pair are distinct"
    assert (np.diff(q) >= 0).all(), "rows are query-major"


def test_sampler_determinism_by_seed():
    labels = labels_for([10, 10, 10])
    a, _ = triplet_sampler.sample_triplets(labels, 2, 2, seed=5)
    b, _ = triplet_sampler.sample_triplets(labels, 2, 2, seed=5)
    c, _ = triplet_sampler.sample_triplets(labels, 2, 2, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampler_small_class_gets_what_it_has():
    labels = labels_for([2, 8, 8])
    triplets, short = triplet_sampler.sample_triplets(labels, 3, 1, seed=0)
    assert short == {"c0": 1}
    q = triplets[:, 0]
    assert (np.bincount(q, minlength=18)[:2] == 1).all()
    assert (np.bincount(q, minlength=18)[2:] == 3).all()


def test_sampler_needs_two_classes():
    with pytest.raises(PipelineError, match="at least two classes"):
        triplet_sampler.sample_triplets(labels_for([6]), 1, 1)


def test_sampler_cli_writes_csv_and_warns(prepared_master, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert triplet_sampler.main(["--data", str(prepared_master), "--training", "0", "--num_pos_images", "5",
                                 "--num_neg_images", "2", "--out", str(out)]) == 0
    assert "too few images" in capsys.readouterr().err  # val has 4 images per class: 3 positives each
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["query", "positive", "negative"]
    assert len(frame) == 16 * 3 * 2
    assert not any(os.path.isabs(p) for p in frame["query"])  # relative to the CSV's folder
    q, p, n = read_triplet_csv(out)
    assert all(os.path.isfile(x) for x in set(q) | set(p) | set(n))
    assert all(class_of(a) == class_of(b) != class_of(c) for a, b, c in zip(q, p, n, strict=True))
    # same seed, same CSV
    again = tmp_path / "again.csv"
    triplet_sampler.main(["--data", str(prepared_master), "--training", "0", "--num_pos_images", "5",
                          "--num_neg_images", "2", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()


def test_sampler_default_output_names(prepared_master, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    triplet_sampler.main(["--data", str(prepared_master), "--training", "1"])
    triplet_sampler.main(["--data", str(prepared_master), "--training", "0"])
    assert len(pd.read_csv(tmp_path / "training_triplet_sample.csv")) == 48
    assert len(pd.read_csv(tmp_path / "val_triplet_sample.csv")) == 16


def test_sampler_bad_input_leaves_nothing(synthetic, tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        triplet_sampler.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a.csv")])
    with pytest.raises(PipelineError, match="folder .* does not exist"):
        triplet_sampler.main(["--data", str(synthetic), "--out", str(tmp_path / "no/dir/a.csv")])
    with pytest.raises(PipelineError, match="transform_validation"):
        triplet_sampler.main(["--data", str(synthetic), "--training", "0", "--out", str(tmp_path / "v.csv")])
    assert list(tmp_path.glob("*.csv")) == [] and not list(tmp_path.glob(".*.tmp"))


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "triplet_sampler.py"), "--data", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_synthetic_dataset_layout(synthetic_master):
    wnids = (synthetic_master / "wnids.txt").read_text().split()
    assert len(wnids) == 4
    for wnid in wnids:
        assert len(list((synthetic_master / "train" / wnid / "images").glob("*.JPEG"))) == 12
        assert (synthetic_master / "train" / wnid / f"{wnid}_boxes.txt").is_file()
    assert len(list((synthetic_master / "val/images").glob("*.JPEG"))) == 16
    assert len((synthetic_master / "val/val_annotations.txt").read_text().splitlines()) == 16
    assert len(list((synthetic_master / "test/images").glob("*.JPEG"))) == 3
    words = dict(line.split("\t") for line in (synthetic_master / "words.txt").read_text().splitlines())
    assert set(words) == set(wnids)


def test_synthetic_refuses_non_empty_out(synthetic_master):
    with pytest.raises(PipelineError, match="not empty"):
        synthetic_data.generate(synthetic_master)


# ----------------------------------------------------------------------------- real JPEGs

def test_data_stages_on_real_tiny_imagenet_sample(mini_copy, tmp_path):
    assert transform_validation.main(["--data", str(mini_copy)]) == 0
    assert transform_validation.main(["--data", str(mini_copy)]) == 0
    wnids = (mini_copy / "wnids.txt").read_text().split()
    for split, per_class in (("train", 200), ("val", 50)):
        paths, labels = list_split(mini_copy, split)
        assert Counter(labels) == {w: per_class for w in wnids}
    out = tmp_path / "train.csv"
    assert triplet_sampler.main(["--data", str(mini_copy), "--training", "1", "--num_pos_images", "2",
                                 "--num_neg_images", "2", "--out", str(out)]) == 0
    q, p, n = read_triplet_csv(out)
    assert len(q) == 21 * 200 * 4
    assert all(class_of(a) == class_of(b) != class_of(c) for a, b, c in zip(q, p, n, strict=True))
    assert not (q == p).any()
