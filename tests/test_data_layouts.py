"""--data in every layout: TinyImageNet, an ImageFolder tree (with or without split folders) and a
label CSV (with or without a split column, --top_classes / --per_class selections) read into the
same (paths, labels) per split, and used by the stages."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

import gen_embeddings
import train_net
import triplet_sampler
from conftest import FAST
from deeprank.common import PipelineError
from deeprank.datasets import ImageSource, detect_layout, list_split
from deeprank.embedding_io import read_embeddings


def as_imagefolder(prepared, root, splits=True):
    """The prepared synthetic TinyImageNet tree as an ImageFolder export: ROOT/<split>/<class>/*.JPEG
    (or ROOT/<class>/*.JPEG with splits=False, train and val pooled)."""
    for split in ("train", "val"):
        for path, label in zip(*list_split(prepared, split), strict=True):
            folder = root / split / label if splits else root / label
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / f"{split}_{Path(path).name}")
    return root


def as_label_csv(prepared, root, split_column=True, names=None):
    """The prepared tree as images in one folder and a label CSV (labels renamed by `names`)."""
    (root / "img").mkdir(parents=True)
    rows = []
    for split in ("train", "val"):
        for path, label in zip(*list_split(prepared, split), strict=True):
            name = f"{split}_{Path(path).name}"
            shutil.copy(path, root / "img" / name)
            rows.append({"filename": f"img/{name}", "label": (names or {}).get(label, label), "split": split})
    frame = pd.DataFrame(rows)
    if not split_column:
        frame = frame.drop(columns="split")
    frame.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def test_layouts_are_detected_and_refused_clearly(prepared_master, tmp_path):
    assert detect_layout(prepared_master) == "tinyimagenet"
    assert detect_layout(as_imagefolder(prepared_master, tmp_path / "if")) == "imagefolder"
    assert detect_layout(as_label_csv(prepared_master, tmp_path / "csv")) == "csv"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="none of the layouts"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(PipelineError, match="does not exist"):
        detect_layout(tmp_path / "nothing")
    (tmp_path / "nothing.txt").write_text("x")
    with pytest.raises(PipelineError, match="neither a folder nor a .csv"):
        detect_layout(tmp_path / "nothing.txt")


def test_every_layout_reads_into_the_same_lists(prepared_master, tmp_path):
    """Same images, same labels, same splits, whatever the layout."""
    names = {label: f"kind {i}, ü" for i, label in enumerate(sorted(set(list_split(prepared_master, "train")[1])))}
    sources = {"imagefolder": ImageSource(as_imagefolder(prepared_master, tmp_path / "if")),
               "csv": ImageSource(as_label_csv(prepared_master, tmp_path / "csv", names=names))}
    for split in ("train", "val"):
        paths, labels = list_split(prepared_master, split)
        expected = sorted((names[label], f"{split}_{Path(path).name}")
                          for path, label in zip(paths, labels, strict=True))
        for layout, dataset in sources.items():
            got_paths, got_labels = dataset.split(split)
            got_labels = [names.get(label, label) for label in got_labels]  # imagefolder keeps folder names
            assert sorted(zip(got_labels, [Path(p).name for p in got_paths], strict=True)) == expected, layout
            assert got_labels == sorted(got_labels), layout  # grouped by label, as the samplers need


def test_layouts_without_splits_hold_out_a_share_of_each_class(prepared_master, tmp_path):
    flat = as_imagefolder(prepared_master, tmp_path / "flat", splits=False)
    csv = as_label_csv(prepared_master, tmp_path / "csv", split_column=False)
    for dataset in (ImageSource(flat, val_fraction=0.25), ImageSource(csv, val_fraction=0.25)):
        train, val = dataset.split("train"), dataset.split("val")
        assert not set(train[0]) & set(val[0]) and len(train[0]) + len(val[0]) == 4 * 16
        assert all(val[1].count(label) == 4 for label in set(val[1]))  # 25% of each class's 16
        again = ImageSource(dataset.data, val_fraction=0.25).split("val")
        assert again == val  # deterministic
        assert ImageSource(dataset.data, val_fraction=0.25, split_seed=1).split("val")[0] != val[0]


def test_top_classes_selection_round_trip(prepared_master, tmp_path):
    csv = as_label_csv(prepared_master, tmp_path / "csv", split_column=False)
    frame = pd.read_csv(csv)
    frame = frame[~((frame["label"] == frame["label"].iloc[0]) & (frame.index % 2 == 0))]  # one class smaller
    frame.to_csv(csv, index=False)
    out = tmp_path / "t.csv"
    assert triplet_sampler.main(["--data", str(csv), "--top_classes", "3", "--per_class", "10",
                                 "--out", str(out)]) == 0
    selection = tmp_path / "t_selection.csv"
    chosen = pd.read_csv(selection)
    assert list(chosen.columns) == ["filename", "label", "split"]
    assert chosen["label"].nunique() == 3 and (chosen["label"].value_counts() == 10).all()
    assert frame["label"].iloc[0] not in set(chosen["label"])  # the smallest class is the one left out
    reused = ImageSource(selection)
    first = ImageSource(csv, top_classes=3, per_class=10)
    for split in ("train", "val"):
        assert reused.split(split) == first.split(split)


def test_top_classes_and_per_class_select_in_folder_layouts_too(prepared_master, tmp_path):
    """TinyImageNet and ImageFolder trees with split folders honour the selection as CSVs do."""
    full = ImageSource(prepared_master)
    chosen = ImageSource(prepared_master, top_classes=2, per_class=3)
    train, val = chosen.split("train"), chosen.split("val")
    assert len(train[0]) == 6 and sorted(set(train[1])) == sorted(set(full.split("train")[1]))[:2]  # ties by name
    assert set(val[1]) == set(train[1]) and len(val[0]) == 6  # the train split's classes, K of each
    assert set(train[0]) <= set(full.split("train")[0])
    selection = tmp_path / "s.csv"
    assert chosen.write_selection(selection) == selection
    again = ImageSource(selection)
    assert again.split("train") == train and again.split("val") == val


@pytest.mark.parametrize("layout", ["tinyimagenet", "imagefolder"])
def test_a_train_only_run_keeps_the_val_images_in_its_selection(prepared_master, tmp_path, layout):
    """triplet_sampler --training 1 reads only train/, yet its selection lists every split, so that
    reusing it as --data gives the same images and splits again (gen_embeddings needs val)."""
    data = prepared_master if layout == "tinyimagenet" else as_imagefolder(prepared_master, tmp_path / "if")
    out = tmp_path / "t.csv"
    assert triplet_sampler.main(["--data", str(data), "--training", "1", "--top_classes", "2", "--per_class", "3",
                                 "--out", str(out)]) == 0
    chosen = pd.read_csv(tmp_path / "t_selection.csv")
    assert (chosen["split"].value_counts().to_dict()) == {"train": 6, "val": 6}
    first = ImageSource(data, top_classes=2, per_class=3)
    reused = ImageSource(tmp_path / "t_selection.csv")
    for split in ("train", "val"):
        assert reused.split(split) == first.split(split)


def test_stages_run_on_a_label_csv(prepared_master, tmp_path):
    names = {label: f"class {i}" for i, label in enumerate(sorted(set(list_split(prepared_master, "train")[1])))}
    csv = as_label_csv(prepared_master, tmp_path / "csv", names=names)
    model = tmp_path / "m.model"
    assert train_net.main(FAST + ["--mining", "batch_all", "--data", str(csv), "--classes_per_batch", "4",
                                  "--images_per_class", "3", "--max_steps", "2", "--out", str(model)]) == 0
    out = tmp_path / "emb"
    out.mkdir()
    assert gen_embeddings.main(["--model", str(model), "--data", str(csv), "--train_out", str(out / "train.txt"),
                                "--test_out", str(out / "val.txt"), "--num_workers", "0"]) == 0
    val = read_embeddings(out / "val.txt")
    assert set(val.labels) == set(names.values()) and len(val) == 16  # labels from the CSV, not the folders


def test_bad_label_csvs(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\na.jpg,x\n")
    with pytest.raises(PipelineError, match="no column filename .*--path_column"):
        ImageSource(csv).split("train")
    csv.write_text("filename,label,split\na.jpg,x,train\nb.jpg,y,holdout\n")
    with pytest.raises(PipelineError, match="split column holds 'holdout'"):
        ImageSource(csv).split("train")
    csv.write_text("filename,label\na.jpg,x\nb.jpg,\n")
    with pytest.raises(PipelineError, match="line 3 has an empty filename or label"):
        ImageSource(csv).split("train")
