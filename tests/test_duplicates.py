"""find_duplicates.py: star and chain groups against a brute-force reference, chains, byte-identical
files, leaks between splits, new images checked against a gallery, and its one-line errors."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import find_duplicates
import gen_embeddings
import train_net
from conftest import FAST
from deeprank.common import PipelineError, run_cli
from deeprank.embedding_io import EmbeddingWriter, read_embeddings, read_header


def gallery_of(folder, vectors, labels=None, name="gallery.npy", contents=None):
    """An embedding file of `vectors`, each row a small file of its own (distinct bytes unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in range(len(vectors)):
        path = folder / f"img_{row:03d}.jpg"
        path.write_bytes(contents[row] if contents else f"image {row} ".encode() * (row + 1))
        paths.append(str(path))
    labels = labels or [f"c{row % 3}" for row in range(len(vectors))]
    with EmbeddingWriter(folder / name, vectors.shape[1], False, "m") as out:
        out.write(paths, labels, vectors.astype(np.float32))
    return folder / name


def brute_force(vectors, threshold, order, mode):
    """Groups as sets of rows, from the full float64 distance matrix: star in `order`, or components."""
    v = vectors.astype(np.float64)
    close = ((v[:, None] - v[None]) ** 2).sum(-1) < threshold
    np.fill_diagonal(close, False)
    groups, taken = [], set()
    if mode == "star":
        for keeper in order:
            if keeper in taken:
                continue
            members = {j for j in np.flatnonzero(close[keeper]) if j not in taken}
            if members:
                taken |= members | {keeper}
                groups.append(frozenset(members | {keeper}))
        return set(groups)
    for start in range(len(v)):
        if start in taken or not close[start].any():
            continue
        component, frontier = {start}, [start]
        while frontier:
            row = frontier.pop()
            for j in np.flatnonzero(close[row]):
                if j not in component:
                    component.add(j)
                    frontier.append(j)
        taken |= component
        groups.append(frozenset(component))
    return set(groups)


def groups_in(csv, gallery):
    rows = {p: i for i, p in enumerate(read_embeddings(gallery).paths)}
    frame = pd.read_csv(csv)
    return {frozenset(rows[p] for p in part["path"]) for _, part in frame.groupby("group")}


@pytest.mark.parametrize("mode,index", [("star", "exact"), ("chain", "exact"), ("star", "faiss"), ("chain", "faiss"),
                                        ("star", "ivf"), ("chain", "ivf")])
def test_groups_equal_a_brute_force_reference(tmp_path, mode, index, monkeypatch):
    probes = []
    if index != "exact":
        pytest.importorskip("faiss", reason="faiss-cpu is not installed (requirements-faiss.txt)")
    if index == "ivf":  # the large-gallery path on a small one: IVF cells, every cell probed
        import deeprank.search.index
        monkeypatch.setattr(deeprank.search.index, "IVF_MIN_ROWS", 1)
        index, probes = "faiss", ["--nprobe", "1000"]
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 8))
    copies = base[:12] + rng.normal(0, 0.05, (12, 8))  # near copies of the first 12
    vectors = np.concatenate([base, copies, base[12:15]])  # and 3 exact copies
    gallery = gallery_of(tmp_path / "g", vectors)
    out = tmp_path / f"{mode}.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.5", "--group", mode, "--keep", "first",
                                 "--index", index, "--out", str(out), *probes]) == 0
    got = groups_in(out, gallery)
    assert got == brute_force(vectors, 0.5, range(len(vectors)), mode) and len(got) == 15
    kept = pd.read_csv(out).groupby("group").first()
    assert (kept["distance"] == 0).all()  # each group starts with its kept image


def test_the_ivf_cell_join_finds_close_pairs_and_every_cell_makes_it_exact():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (requirements-faiss.txt)")
    from deeprank.duplicates import close_pairs
    from deeprank.search.index import FaissIndex, build_faiss, random_rows
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((60, 16))
    base = centres[rng.integers(0, 60, 3000)] + rng.normal(0, 0.3, (3000, 16))
    vectors = np.concatenate([base, base[:300] + rng.normal(0, 0.05, (300, 16))]).astype(np.float32)
    faiss_index = build_faiss([vectors], len(vectors), 16, lambda count, seed: random_rows(vectors, count, seed),
                              structure="ivf")
    index = FaissIndex(faiss_index, vectors)
    exact = close_pairs(vectors, 0.2)
    truth = set(zip(exact[0].tolist(), exact[1].tolist(), strict=True))
    assert len(truth) >= 300
    every = close_pairs(vectors, 0.2, index, probes=faiss_index.nlist)
    assert set(zip(every[0].tolist(), every[1].tolist(), strict=True)) == truth
    float64 = ((vectors[every[0]].astype(np.float64) - vectors[every[1]]) ** 2).sum(1)
    assert np.allclose(every[2], float64, rtol=1e-6) and np.allclose(every[2], exact[2], atol=1e-4)
    few = close_pairs(vectors, 0.2, index, probes=2)  # 2 of the cells: fewer pairs, each a true one
    found = set(zip(few[0].tolist(), few[1].tolist(), strict=True))
    assert found <= truth and len(found) >= 0.9 * len(truth) and (few[0] < few[1]).all()


def test_every_join_decides_a_pair_at_the_threshold_by_its_float64_distance():
    """Thresholds set a hair (1e-9) above and below pairs' float64 distances, on large-norm vectors
    where float32's |a|^2 + |b|^2 - 2ab is off by far more than that: the exact join and the IVF
    cell join keep exactly the pairs a float64 brute force keeps."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (requirements-faiss.txt)")
    from deeprank.duplicates import close_pairs
    from deeprank.search.index import FaissIndex, build_faiss, random_rows
    rng = np.random.default_rng(3)
    base = rng.standard_normal((400, 8)) * 30
    vectors = np.concatenate([base, base + rng.normal(0, 0.02, base.shape)]).astype(np.float32)
    v64 = vectors.astype(np.float64)
    pair_d = ((v64[:400] - v64[400:]) ** 2).sum(1)
    faiss_index = build_faiss([vectors], len(vectors), 8, lambda count, seed: random_rows(vectors, count, seed),
                              structure="ivf")
    index = FaissIndex(faiss_index, vectors)
    for threshold in (np.median(pair_d) + 1e-9, np.median(pair_d) - 1e-9, pair_d.max() + 1e-9):
        truth = {(int(i), int(i) + 400) for i in np.flatnonzero(pair_d < threshold)}
        for found in (close_pairs(vectors, threshold), close_pairs(vectors, threshold, index,
                                                                   probes=faiss_index.nlist)):
            assert set(zip(found[0].tolist(), found[1].tolist(), strict=True)) == truth


def test_the_hash_pass_reads_heads_first_and_whole_files_only_where_heads_collide(tmp_path, monkeypatch):
    from deeprank import duplicates
    files = {"a": b"HEAD" + b"1" * 20, "b": b"HEAD" + b"1" * 20, "c": b"HEAD" + b"2" * 20,  # one size, one head
             "d": b"XXXX" + b"1" * 20, "e": b"tiny", "f": b"tiny", "g": b"tinier"}
    paths = []
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    reads = []
    real = duplicates.sha256_of
    monkeypatch.setattr(duplicates, "sha256_of", lambda path, limit=None: reads.append((Path(path).name, limit))
                        or real(path, limit))
    sizes, unreadable = duplicates.file_sizes(paths)
    pairs, unhashed = duplicates.identical_files(paths, sizes, head=4)
    assert pairs == [(0, 1), (4, 5)] and unreadable == unhashed == []
    whole = sorted(name for name, limit in reads if limit is None)
    assert whole == ["a", "b", "c"]  # d's head differs, e and f fit in the head, g's size is its own
    assert "g" not in {name for name, _ in reads}


def test_copy_threshold_keeps_the_most_copies_at_the_precision():
    from deeprank.duplicates import copy_threshold
    copies = [0.1, 0.2, 0.3, 0.5, 0.9]
    others = [0.4, 0.6, 0.7, 0.8]
    # sorted: .1c .2c .3c .4o .5c .6o .7o .8o .9c; precision 0.8 holds up to .5 (4 of 5), not at .9 (5 of 9)
    threshold, recall, share = copy_threshold(copies, others, 0.8)
    assert threshold == pytest.approx(0.55) and recall == pytest.approx(0.8) and share == pytest.approx(0.8)
    assert copy_threshold(copies, others, 1.0)[:2] == (pytest.approx(0.35), pytest.approx(0.6))
    assert copy_threshold([0.5, 0.5], [0.5, 0.1], 0.9) is None  # an equal distance cannot be split
    assert copy_threshold([0.2], [0.1], 0.99) is None


def test_images_folder_in_one_command(synthetic, tmp_path, capsys):
    """find_duplicates.py --images DIR alone: the ImageNet-pretrained features with flip (no checkpoint
    of one's own), the threshold calibrated on copies of the folder's images, a file that is not an
    image named and left out, and each planted copy (of the calibration's own kinds) in one group with
    its original (--group chain: the synthetic classes' look-alikes join star groups of their own)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="requirements-pretrained.txt is not installed")
    from deeprank.copies import save_copy
    folder = tmp_path / "photos"
    originals = sorted((synthetic / "train").rglob("*.JPEG"))
    (folder / "copies").mkdir(parents=True)
    for path in originals:
        shutil.copy(path, folder / path.name)
    rng = random.Random(0)
    for number, (path, kind) in enumerate(zip(originals[:3], ("jpeg", "flip", "jpeg"), strict=True)):
        save_copy(str(path), kind, str(folder / "copies" / f"copy{number}.jpg"), rng)  # the calibration's kinds
    (folder / "notes.jpg").write_bytes(b"not an image")
    out = tmp_path / "groups.csv"
    assert find_duplicates.main(["--images", str(folder), "--out", str(out), "--group", "chain"]) == 0
    printed = capsys.readouterr()
    assert "calibrated on 25 synthetic copies" in printed.out and "notes.jpg" in printed.err
    header = read_header(folder / ".deeprank" / "gallery.npy")
    assert (header["layer"], header["tta"]) == ("backbone", "flip")
    rows = pd.read_csv(out)
    group_of = dict(zip(rows["path"], rows["group"], strict=True))
    for number, path in enumerate(originals[:3]):
        copy = str(folder / "copies" / f"copy{number}.jpg")
        assert copy in group_of and group_of[copy] == group_of.get(str(folder / path.name))
    assert str(folder / "notes.jpg") not in group_of


def test_a_gallery_without_a_threshold_is_one_line(tmp_path, capsys):
    gallery = gallery_of(tmp_path / "g", np.eye(3))
    code = run_cli(find_duplicates.main, ["--gallery", str(gallery), "--out", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "--threshold T" in err and not (tmp_path / "x.csv").exists()


def test_recall_threshold_keeps_that_share_of_the_copies():
    from deeprank.duplicates import pair_precision, recall_threshold
    copies = [0.1, 0.2, 0.3, 0.5, 0.9]
    assert recall_threshold(copies, 0.6) == (pytest.approx(0.4), pytest.approx(0.6))     # 3 of 5: between .3 and .5
    assert recall_threshold(copies, 0.61) == (pytest.approx(0.7), pytest.approx(0.8))    # 3.05 of 5: four
    assert recall_threshold(copies, 1.0)[1] == 1.0 and recall_threshold(copies, 1.0)[0] > 0.9
    assert recall_threshold([0.1, 0.2, 0.2, 0.4], 0.5)[1] == 0.75  # a threshold cannot split the two at 0.2
    others = np.array([[0.15, np.inf], [0.35, 0.6]])
    assert pair_precision(copies, others, 0.4) == (pytest.approx(3 / 5), 3, 2)


def planted_folder(share, rng, classes=40, per_class=25, dim=32):
    """Unit vectors in classes of look-alikes (another image of a class at squared distance ~0.5), with
    `share` of the folder near-copies (~0.03) of random images: (gallery, planted pairs)."""
    centres = rng.standard_normal((classes, dim))
    images = np.repeat(centres, per_class, axis=0) + 0.5 * rng.standard_normal((classes * per_class, dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    copies = int(round(share / (1 - share) * len(images)))
    originals = rng.choice(len(images), copies, replace=False)
    planted = images[originals] + 0.025 * rng.standard_normal((copies, dim))
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    gallery = np.concatenate([images, planted]).astype(np.float32)
    return gallery, {frozenset((int(o), len(images) + i)) for i, o in enumerate(originals)}


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3])
def test_the_calibration_holds_when_the_folder_is_full_of_duplicates(share):
    """Synthetic copies of a folder with 0%, 10% and 30% planted duplicates: the threshold that keeps
    95% of the copies finds the planted pairs at precision and recall 0.9 or more, however many there
    are; the precision rule (0.99, every neighbour counting against it) keeps ever fewer copies as the
    folder's own duplicates count as its errors, and fails at 30%."""
    from deeprank.duplicates import close_pairs, copy_threshold, recall_threshold
    rng = np.random.default_rng(0)
    gallery, planted = planted_folder(share, rng)
    sources = rng.choice(len(gallery), 200, replace=False)
    copies = gallery[sources] + 0.03 * rng.standard_normal((200, gallery.shape[1])).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    copy_d = ((copies - gallery[sources]) ** 2).sum(1)
    d = ((copies[:, None, :] - gallery[None]) ** 2).sum(-1)
    d[np.arange(200), sources] = np.inf
    others = np.sort(d, axis=1)[:, :50]
    threshold, kept = recall_threshold(copy_d, 0.95)
    assert kept >= 0.95
    if planted:
        i, j, _ = close_pairs(gallery, threshold)
        called = {frozenset((int(a), int(b))) for a, b in zip(i, j, strict=True)}
        precision, recall = len(called & planted) / max(len(called), 1), len(called & planted) / len(planted)
        assert precision >= 0.9 and recall >= 0.9
    before = copy_threshold(copy_d, others[np.isfinite(others)], 0.99)
    if share >= 0.3:
        assert before is None or before[1] < 0.6  # the precision rule fails exactly here


def test_a_chain_is_one_group_only_when_asked(tmp_path, capsys):
    vectors = np.array([[0.0], [0.6], [1.2], [1.8], [10.0]])  # A~B~C~D one step apart (0.36 < 0.5), D far from A
    gallery = gallery_of(tmp_path / "g", vectors)
    for mode, expected in (("chain", {frozenset({0, 1, 2, 3})}), ("star", {frozenset({0, 1}), frozenset({2, 3})})):
        out = tmp_path / f"{mode}.csv"
        assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.5", "--group", mode, "--keep",
                                     "first", "--out", str(out)]) == 0
        assert groups_in(out, gallery) == expected, mode
    assert "weakest pair" in capsys.readouterr().out


def test_byte_identical_files_are_grouped_and_the_summary_counts_them(tmp_path, capsys):
    vectors = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # far apart: no embedding says they are alike
    contents = [b"same picture" * 10, b"another" * 3, b"same picture" * 10]
    gallery = gallery_of(tmp_path / "g", vectors, labels=["a", "b", "c"], contents=contents)
    out, summary = tmp_path / "d.csv", tmp_path / "d.json"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.1", "--out", str(out),
                                 "--json", str(summary)]) == 0
    assert groups_in(out, gallery) == {frozenset({0, 2})}
    printed = capsys.readouterr().out
    assert "1 groups holding 2 images" in printed and "would free 120 bytes" in printed
    assert "1 groups mix labels" in printed and json.loads(summary.read_text())[0]["size"] == 2


def test_no_duplicates_writes_the_header_alone_and_says_so(tmp_path, capsys):
    gallery = gallery_of(tmp_path / "g", np.eye(4) * 3)
    out = tmp_path / "d.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.5", "--out", str(out)]) == 0
    assert out.read_text() == "group,path,label,distance\n"
    assert "no duplicates closer than the threshold" in capsys.readouterr().out


def test_leaks_between_splits(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((20, 6))
    val = np.concatenate([rng.standard_normal((5, 6)) + 10, train[[3]] + 0.01])  # one val image copies train 3
    gallery, against = gallery_of(tmp_path / "train", train), gallery_of(tmp_path / "val", val)
    out = tmp_path / "leaks.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--against", str(against), "--threshold", "0.1",
                                 "--out", str(out)]) == 0
    leaks = pd.read_csv(out)
    assert list(leaks.columns) == ["path", "duplicates", "distance"] and len(leaks) == 1
    assert leaks["path"][0].endswith("val/img_005.jpg") and leaks["duplicates"][0].endswith("train/img_003.jpg")


def test_a_new_image_is_checked_against_the_gallery(prepared_master, tmp_path):
    model = tmp_path / "m.model"
    assert train_net.main(FAST + ["--epochs", "0", "--data", str(prepared_master), "--mining", "batch_all",
                                  "--classes_per_batch", "2", "--images_per_class", "2", "--out", str(model)]) == 0
    gallery = tmp_path / "gallery.npy"
    assert gen_embeddings.main(["--model", str(model), "--data", str(prepared_master), "--split", "train",
                                "--num_workers", "0", "--train_out", str(gallery)]) == 0
    original = read_embeddings(gallery).paths[7]
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(original, new / "copy.JPEG")  # filed twice under another name
    out = tmp_path / "q.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "1e-4", "--model", str(model),
                                 "--query", str(new), "--num_workers", "0", "--out", str(out)]) == 0
    found = pd.read_csv(out)
    assert original in set(found["duplicates"]) and (found["path"] == str(new / "copy.JPEG")).all()


@pytest.mark.parametrize("argv,message", [
    (["--threshold", "0"], "must be a positive squared distance"),
    (["--threshold", "-1"], "must be a positive squared distance"),
    (["--threshold_from", "missing.json"], "cannot read --threshold_from"),
])
def test_bad_threshold_is_one_line(tmp_path, argv, message, capsys):
    gallery = gallery_of(tmp_path / "g", np.eye(3))
    assert run_cli(find_duplicates.main, ["--gallery", str(gallery), *argv, "--out", str(tmp_path / "d.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "d.csv").exists()


def test_missing_gallery_is_one_line(tmp_path, capsys):
    assert run_cli(find_duplicates.main, ["--gallery", str(tmp_path / "none.npy"), "--threshold", "1",
                                          "--out", str(tmp_path / "d.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_weakest_pair_in_blocks_equals_the_whole_matrix():
    from deeprank.duplicates import weakest_pair
    vectors = np.random.default_rng(5).standard_normal((50, 4))
    whole = max(((vectors[i] - vectors[j]) ** 2).sum() for i in range(50) for j in range(50))
    assert weakest_pair(vectors, range(50), block=7) == pytest.approx(whole)


def test_grid_draws_the_largest_groups_first(tmp_path):
    import io

    from PIL import Image

    def png(colour):
        out = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(out, format="PNG")
        return out.getvalue()
    vectors = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])  # a group of 3, a group of 2, one alone
    gallery = gallery_of(tmp_path / "g", vectors, contents=[png((40 * row, 0, 0)) for row in range(6)])
    pictures = tmp_path / "grid"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.5", "--keep", "first", "--out",
                                 str(tmp_path / "d.csv"), "--grid", str(pictures), "--max_groups", "1"]) == 0
    drawn = sorted(pictures.iterdir())
    assert [p.name for p in drawn] == ["groups_001.png"]
    with Image.open(drawn[0]) as picture:  # one row (the largest group): three cells wide, one row high
        assert picture.height < 2 * 96 and picture.width >= 3 * 96


def check_against_disk(csv):
    """Every row of a --move_to CSV says what is on disk: moved -> at planned_to and gone from path;
    planned / refused / failed (and kept images) -> still at path. Returns {file name: status}."""
    frame = pd.read_csv(csv, keep_default_na=False)
    for path, planned, status in zip(frame["path"], frame["planned_to"], frame["status"], strict=True):
        if status == "moved":
            assert Path(planned).is_file() and not Path(path).exists(), path
        else:
            assert Path(path).is_file(), (path, status)
    return {Path(path).name: status for path, status in zip(frame["path"], frame["status"], strict=True)}


MOVE_VECTORS = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])  # groups {0, 1, 2} and {3, 4}; 5 alone


def move_argv(tmp_path, gallery, moved):
    return ["--gallery", str(gallery), "--threshold", "0.5", "--keep", "first", "--out", str(tmp_path / "d.csv"),
            "--move_to", str(moved)]


def test_move_to_dry_run_plans_and_moves_nothing(tmp_path, capsys):
    gallery = gallery_of(tmp_path / "photos", MOVE_VECTORS)
    moved = tmp_path / "moved"
    assert find_duplicates.main(move_argv(tmp_path, gallery, moved) + ["--dry_run"]) == 0
    assert "would move 3 images" in capsys.readouterr().out and not moved.exists()
    assert check_against_disk(tmp_path / "d.csv") == {"img_000.jpg": "", "img_001.jpg": "planned",
                                                     "img_002.jpg": "planned", "img_003.jpg": "",
                                                     "img_004.jpg": "planned"}
    with pytest.raises(PipelineError, match="go with --move_to"):
        find_duplicates.main(move_argv(tmp_path, gallery, moved)[:-2] + ["--dry_run"])


def test_move_to_moves_only_members_and_a_rerun_finishes(tmp_path, capsys):
    gallery = gallery_of(tmp_path / "photos", MOVE_VECTORS)
    paths, moved = read_embeddings(gallery).paths, tmp_path / "moved"
    argv = move_argv(tmp_path, gallery, moved)
    moved.mkdir()  # an earlier run moved one member, then died
    shutil.move(paths[2], moved / "img_002.jpg")
    assert find_duplicates.main(argv) == 0
    printed = capsys.readouterr().out
    assert "moved 2 images" in printed and "(1 moved by an earlier run)" in printed and "--update_gallery" in printed
    assert [Path(p).exists() for p in paths] == [True, False, False, True, False, True]  # kept images stay
    assert sorted(p.name for p in moved.iterdir()) == ["img_001.jpg", "img_002.jpg", "img_004.jpg"]
    assert sorted(check_against_disk(tmp_path / "d.csv").values()) == ["", "", "moved", "moved", "moved"]
    assert find_duplicates.main(argv + ["--update_gallery"]) == 0  # again: nothing left to move; the gallery shrinks
    assert read_embeddings(gallery).paths == [paths[0], paths[3], paths[5]]


def test_a_refused_move_is_recorded_as_refused_and_the_others_happen(tmp_path, capsys):
    gallery = gallery_of(tmp_path / "photos", MOVE_VECTORS)
    paths, moved = read_embeddings(gallery).paths, tmp_path / "moved"
    moved.mkdir()
    (moved / "img_001.jpg").write_bytes(b"another picture")  # its destination holds another file
    code = run_cli(find_duplicates.main, move_argv(tmp_path, gallery, moved))
    err = capsys.readouterr().err
    assert code != 0 and "1 of 3 moves were refused or failed" in err.strip().splitlines()[-1]
    assert "refused: " + paths[1] in err
    assert check_against_disk(tmp_path / "d.csv") == {"img_000.jpg": "", "img_001.jpg": "refused",
                                                     "img_002.jpg": "moved", "img_003.jpg": "",
                                                     "img_004.jpg": "moved"}
    assert (moved / "img_001.jpg").read_bytes() == b"another picture"  # nothing overwritten


def test_a_move_killed_half_way_loses_nothing_and_a_rerun_finishes(tmp_path, monkeypatch):
    """Killed inside the second move (its hard link made, its source not yet removed), with the CSV's
    statuses rewritten after every move: the CSV names only moves that happened; a rerun finishes."""
    gallery = gallery_of(tmp_path / "photos", MOVE_VECTORS)
    paths, moved = read_embeddings(gallery).paths, tmp_path / "moved"
    monkeypatch.setattr(find_duplicates, "MOVE_BATCH", 1)
    real_unlink, calls = find_duplicates.os.unlink, []

    def killed_on_the_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between the link and the removal of the source
        real_unlink(path)

    monkeypatch.setattr(find_duplicates.os, "unlink", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        find_duplicates.main(move_argv(tmp_path, gallery, moved))
    assert check_against_disk(tmp_path / "d.csv") == {"img_000.jpg": "", "img_001.jpg": "moved",
                                                     "img_002.jpg": "planned", "img_003.jpg": "",
                                                     "img_004.jpg": "planned"}
    assert Path(paths[2]).exists() and (moved / "img_002.jpg").exists()  # both copies: nothing lost
    monkeypatch.setattr(find_duplicates.os, "unlink", real_unlink)
    assert find_duplicates.main(move_argv(tmp_path, gallery, moved)) == 0
    assert set(check_against_disk(tmp_path / "d.csv").values()) == {"", "moved"}
    assert sorted(p.name for p in moved.iterdir()) == ["img_001.jpg", "img_002.jpg", "img_004.jpg"]


def test_unreadable_files_are_named_and_left_out_of_the_hash_pass(tmp_path, capsys):
    same = b"the same bytes " * 10
    gallery = gallery_of(tmp_path / "g", np.array([[0.0], [5.0], [9.0], [13.0]]), contents=[same, same, same, b"x"])
    paths = read_embeddings(gallery).paths
    Path(paths[2]).unlink()  # vanished since it was embedded
    out = tmp_path / "d.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--threshold", "0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 files could not be read" in err and paths[2] in err
    frame = pd.read_csv(tmp_path / "d.csv")
    assert sorted(frame["path"]) == sorted(paths[:2])  # the two readable identical files: one group


def test_calibrate_copies_picks_a_threshold_that_groups_a_planted_copy(prepared_master, tmp_path, capsys):
    from PIL import Image
    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    original = sorted((data / "train").rglob("*.JPEG"))[5]
    with Image.open(original) as picture:  # a copy filed twice: re-encoded at another quality
        picture.convert("RGB").save(original.with_name("copy_of_" + original.name), format="JPEG", quality=70)
    model = tmp_path / "m.model"
    assert train_net.main(FAST + ["--epochs", "0", "--data", str(data), "--mining", "batch_all",
                                  "--classes_per_batch", "2", "--images_per_class", "2", "--out", str(model)]) == 0
    gallery = tmp_path / "gallery.npy"
    assert gen_embeddings.main(["--model", str(model), "--data", str(data), "--split", "train", "--layer", "backbone",
                                "--num_workers", "0", "--train_out", str(gallery)]) == 0
    capsys.readouterr()
    out = tmp_path / "groups.csv"
    assert find_duplicates.main(["--gallery", str(gallery), "--calibrate_copies", "30", "--precision", "0.9",
                                 "--model", str(model), "--num_workers", "0", "--keep", "first", "--out",
                                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 30 synthetic copies" in printed
    frame = pd.read_csv(out)
    group = dict(zip(frame["path"], frame["group"], strict=True))
    copy = str(original.with_name("copy_of_" + original.name))
    assert copy in group and group[copy] == group.get(str(original)), printed


@pytest.mark.parametrize("argv,message", [
    (["--calibrate_copies", "5"], "--calibrate_copies needs --model"),
    (["--calibrate_copies", "5", "--precision", "1.5"], "must be at most 1"),
])
def test_calibrate_copies_errors_are_one_line(tmp_path, argv, message, capsys):
    gallery = gallery_of(tmp_path / "g", np.eye(3))
    try:
        code = run_cli(find_duplicates.main, ["--gallery", str(gallery), *argv, "--out", str(tmp_path / "d.csv")])
    except SystemExit as exit:  # a flag argparse refuses: its usage line, then the reason
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and message in err[-1] and not (tmp_path / "d.csv").exists()
