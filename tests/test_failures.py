"""What happens when things go wrong: bad images, bad files, bad flags, read-only folders,
interrupted runs. Each case ends in one clear line (or a documented skip) and no half-written
output."""

import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import eval as evaluation
import gen_embeddings
import train_net
import triplet_sampler
from conftest import FAST, ROOT, read_log
from deep_rank_net import DeepRank, ModelError
from deeprank.checkpoints import load_model, save_checkpoint
from deeprank.common import PipelineError, atomic_write, run_cli
from deeprank.datasets import list_split
from deeprank.embedding_io import EmbeddingWriter, read_embeddings
from deeprank.images import load_rgb
from deeprank.sample_csv import read_triplet_csv

SMALL_MODEL = dict(backbone="small_cnn", image_size=32, embed_dim=8, weights="none")


# ----------------------------------------------------------------------------- helpers

def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels, with no real pixel data (a 'bomb')."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def spoil(path, kind):
    """Turn an image file into one that cannot be decoded."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a JPEG\n")
    else:  # a decompression bomb: 40,000 x 40,000 pixels claimed
        png_header_only(path, 40_000, 40_000)


@pytest.fixture
def dataset_with_bad_image(prepared_master, tmp_path):
    """A copy of the prepared synthetic data set, its train/val triplet CSVs, and one train image
    that the test spoils."""
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    triplet_sampler.main(["--data", str(data), "--training", "1", "--out", str(train)])
    triplet_sampler.main(["--data", str(data), "--training", "0", "--out", str(val)])
    victim = Path(list_split(data, "train")[0][5])
    return data, train, val, victim


def read_only(folder):
    """Make folder unwritable, even for root (chattr +i); returns the undo, or skips the test."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "bomb"])
def test_unreadable_image_stops_training_with_one_line_naming_it(dataset_with_bad_image, tmp_path, kind, capsys):
    """With the default two loader workers: the error comes from the main process, as one line. The
    bomb runs as a whole process, as a user starts it (nothing but that line reaches the terminal);
    the other kinds run the stage's main() in this process (the same code, a second faster)."""
    data, train, _, victim = dataset_with_bad_image
    spoil(victim, kind)
    out = tmp_path / "run"
    out.mkdir()
    flags = [f for f in FAST if f != "--num_workers" and f != "0"] + ["--num_workers", "2", "--triplets", str(train),
                                                                     "--max_steps", "6", "--batch_size", "16",
                                                                     "--out", str(out / "m.model")]
    if kind == "bomb":
        result = subprocess.run([sys.executable, str(ROOT / "train_net.py"), *flags], capture_output=True, text=True,
                                cwd=tmp_path)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = run_cli(train_net.main, flags), capsys.readouterr().err
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert victim.name in errors[0] and "--on_bad_image skip" in errors[0]
    assert not (out / "m.model").exists()


def test_skip_leaves_unreadable_images_out_and_reports_them(dataset_with_bad_image, tmp_path):
    data, train, val, victim = dataset_with_bad_image
    spoil(victim, "truncated")
    bomb = victim.with_name("bomb.png")  # not in the CSVs: embedded with --data --split train
    png_header_only(bomb, 40_000, 40_000)
    out = tmp_path / "run"
    out.mkdir()
    assert train_net.main(FAST + ["--triplets", str(train), "--val_triplets", str(val), "--epochs", "2",
                                  "--on_bad_image", "skip", "--out", str(out / "m.model")]) == 0
    report = (out / "m_bad_images.txt").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(f"{victim}\t")
    assert [row["epoch"] for row in read_log(out / "m_log.jsonl")] == [1, 2]
    # embedding every train image: the two bad ones are left out and listed
    emb_out = tmp_path / "emb" / "train.txt"
    emb_out.parent.mkdir()
    assert gen_embeddings.main(["--model", str(out / "m.model"), "--data", str(data), "--split", "train",
                                "--train_out", str(emb_out), "--num_workers", "2", "--on_bad_image", "skip"]) == 0
    embedded = read_embeddings(emb_out)
    assert len(embedded) == len(list_split(data, "train")[0]) - 2
    assert str(victim) not in embedded.paths and str(bomb) not in embedded.paths
    listed = {line.split("\t")[0] for line in (tmp_path / "emb" / "train_bad_images.txt").read_text().splitlines()}
    assert listed == {str(victim), str(bomb)}


def test_every_stage_that_reads_data_checks_its_files_before_the_model_loads(dataset_with_bad_image, tmp_path):
    data, _, _, victim = dataset_with_bad_image
    spoil(victim, "empty")
    missing_model = tmp_path / "no_such.model"  # were the model read first, this would be the error
    with pytest.raises(PipelineError, match=f"empty files: .*{victim.name}.*--on_bad_image skip"):
        gen_embeddings.main(["--model", str(missing_model), "--data", str(data), "--split", "train",
                             "--train_out", str(tmp_path / "e.txt")])
    with pytest.raises(PipelineError, match=f"--data {data} \\(train\\) are empty files: .*{victim.name}"):
        train_net.main(FAST + ["--data", str(data), "--mining", "batch_all", "--classes_per_batch", "2",
                               "--images_per_class", "2", "--out", str(tmp_path / "m.model")])
    assert not (tmp_path / "e.txt").exists() and not (tmp_path / "m.model").exists()


def test_a_label_csv_row_naming_a_folder_is_refused_by_the_sampler(prepared_master, tmp_path):
    paths, labels = list_split(prepared_master, "train")
    rows = [f"{p},{label}" for p, label in zip(paths, labels, strict=True)]
    rows[3] = f"{Path(paths[3]).parent},{labels[3]}"  # a folder where an image belongs
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(PipelineError, match="are not files \\(folders\\?\\): .*name image files, not folders"):
        triplet_sampler.main(["--data", str(csv), "--training", "1", "--val_fraction", "0.2",
                              "--out", str(tmp_path / "t.csv")])
    assert not (tmp_path / "t.csv").exists()


def test_empty_image_is_refused_before_training_starts(dataset_with_bad_image, tmp_path):
    _, train, _, victim = dataset_with_bad_image
    spoil(victim, "empty")
    with pytest.raises(PipelineError, match=f"empty files: .*{victim.name}.*--on_bad_image skip"):
        train_net.main(FAST + ["--triplets", str(train), "--out", str(tmp_path / "m.model")])
    assert not (tmp_path / "m.model").exists()


def test_image_modes_load_as_upright_rgb(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    base = Image.fromarray(pixels)
    cases = {"gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "cmyk.jpg": base.convert("CMYK"),
             "palette.png": base.convert("P"), "rgb.jpg": base}
    for name, image in cases.items():
        image.save(tmp_path / name)
    sixteen = (np.arange(20 * 40).reshape(20, 40) * 80).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    base.save(tmp_path / "rotated.jpg", exif=exif)
    for name in list(cases) + ["sixteen.png"]:
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 20), name
    sixteen_rgb = np.asarray(load_rgb(tmp_path / "sixteen.png"))[:, :, 0].astype(int)
    assert np.abs(sixteen_rgb - np.rint(sixteen / 257)).max() <= 1  # scaled to 8 bits, not clipped at 255
    assert sixteen_rgb.max() > 200 and (sixteen_rgb < 255).mean() > 0.5
    rotated = load_rgb(tmp_path / "rotated.jpg")
    assert rotated.size == (20, 40)  # upright: 20 wide, 40 high


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("content,message", [
    (b"", "is an empty file"),
    (b"hi\n", "is not a torch file .*text"),
    (b"model weights, see the README\n" * 20, "is not a torch file .*text"),
    ("truncated", "truncated or damaged"),
    ("state_dict", "bare state_dict"),
])
def test_bad_checkpoints_are_one_line_each(tmp_path, content, message):
    path = tmp_path / "bad.model"
    if content == "truncated":
        save_checkpoint(path, DeepRank(**SMALL_MODEL))
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "state_dict":
        torch.save(DeepRank(**SMALL_MODEL).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match=message):
        train_net.main(FAST + ["--resume", str(path), "--mining", "batch_all", "--out", str(out / "m.model")])
    if content in (b"", b"hi\n", "truncated"):
        with pytest.raises(ModelError, match=message):  # the model's own error, as --weights PATH meets it
            DeepRank(**{**SMALL_MODEL, "weights": str(path)})
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- embedding files

def test_embedding_file_with_a_path_twice_is_refused(tmp_path):
    path = tmp_path / "e.txt"
    with EmbeddingWriter(path, 2, True, "m") as out:
        out.write([str(tmp_path / "a/1.jpg"), str(tmp_path / "a/2.jpg"), str(tmp_path / "a/1.jpg")],
                  ["a", "a", "a"], np.eye(3, 2))
    with pytest.raises(PipelineError, match=r"lists .*1.jpg twice \(lines 2 and 4\)"):
        read_embeddings(path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PipelineError, match="empty.txt is empty"):
        read_embeddings(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- output folders and files

def test_read_only_output_folder_is_refused_before_any_work(prepared_master, tmp_path):
    train = tmp_path / "train.csv"
    triplet_sampler.main(["--data", str(prepared_master), "--training", "1", "--out", str(train)])
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = read_only(locked)
    try:
        for stage, argv in ((triplet_sampler.main, ["--data", str(prepared_master), "--out", str(locked / "t.csv")]),
                            (train_net.main, FAST + ["--triplets", str(train), "--out", str(locked / "m.model")])):
            started = time.perf_counter()
            with pytest.raises(PipelineError, match="is not writable"):
                stage(argv)
            assert time.perf_counter() - started < 5  # refused up front, not after an epoch
        emb = tmp_path / "emb.txt"
        with open(emb, "w") as handle:
            handle.write("# deep-ranking embeddings v1 dim=1 normalized=1 model=m\na/1.jpg\ta\t0\na/2.jpg\tb\t1\n")
        with pytest.raises(PipelineError, match="is not writable"):
            evaluation.main(["--train_embeddings", str(emb), "--test_embeddings", str(emb),
                             "--json", str(locked / "m.json")])
    finally:
        undo()
    assert list(locked.iterdir()) == []


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
        os.umask(0o077)
        with atomic_write(tmp_path / "b.txt") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    stale = tmp_path / f".out.txt.{dead.pid}.abc123.tmp"
    stale.write_text("half")
    alive = tmp_path / f".out.txt.{os.getppid()}.def456.tmp"  # a running process's: left alone
    alive.write_text("busy")
    with atomic_write(tmp_path / "out.txt") as handle:
        handle.write("done")
    assert not stale.exists() and alive.exists() and (tmp_path / "out.txt").read_text() == "done"


def test_failed_rerun_keeps_the_finished_runs_log(dataset_with_bad_image, tmp_path):
    _, train, _, victim = dataset_with_bad_image
    out = tmp_path / "run"
    out.mkdir()
    assert train_net.main(FAST + ["--triplets", str(train), "--max_steps", "2", "--out", str(out / "m.model")]) == 0
    before = (out / "m_log.jsonl").read_text()
    spoil(victim, "truncated")
    with pytest.raises(PipelineError, match=victim.name):
        train_net.main(FAST + ["--triplets", str(train), "--out", str(out / "m.model")])
    assert (out / "m_log.jsonl").read_text() == before


# ----------------------------------------------------------------------------- messages and CSVs

def test_one_class_is_refused_naming_the_folder(prepared_master, tmp_path):
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    for folder in sorted((data / "train").iterdir())[1:]:
        shutil.rmtree(folder)
    with pytest.raises(PipelineError, match=f"{data / 'train'} has 1 class folder"):
        triplet_sampler.main(["--data", str(data), "--out", str(tmp_path / "t.csv")])


def test_short_csv_row_is_named_by_its_line(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("query,positive,negative\na.jpg,b.jpg,c.jpg\n\nd.jpg,e.jpg\n")
    with pytest.raises(PipelineError, match=r"t.csv line 4 has an empty field or fewer than 3 columns"):
        read_triplet_csv(csv)


def test_image_paths_with_commas_and_quotes_work(prepared_master, tmp_path):
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data, v2"))
    odd = data / "train" / sorted(os.listdir(data / "train"))[0] / "images" / 'a, "b".JPEG'
    shutil.copy(list_split(data, "train")[0][0], odd)
    out = tmp_path / "t.csv"
    assert triplet_sampler.main(["--data", str(data), "--out", str(out)]) == 0
    q, p, n = read_triplet_csv(out)
    assert str(odd) in set(q) and all(os.path.isfile(x) for x in set(q) | set(p) | set(n))
    assert pd.read_csv(out)["query"].str.contains('a, "b"', regex=False).any()
    assert train_net.main(FAST + ["--triplets", str(out), "--max_steps", "1", "--out", str(tmp_path / "m.model")]) == 0


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("stage,argv", [
    (train_net, ["--num_workers", "-1"]), (train_net, ["--embed_dim", "0"]), (train_net, ["--batch_size", "0"]),
    (train_net, ["--lr", "-1"]), (gen_embeddings, ["--num_workers", "-1"]), (evaluation, ["--k", "0"]),
    (triplet_sampler, ["--num_pos_images", "0"]),
])
def test_nonsense_flag_values_are_refused_by_the_parser(stage, argv, capsys):
    with pytest.raises(SystemExit) as info:
        stage.main(argv)
    assert info.value.code == 2 and f"argument {argv[0]}: must be" in capsys.readouterr().err


def test_image_size_guard_and_message_agree(tmp_path):
    for size in (8, 15):
        with pytest.raises(PipelineError, match=f"--image_size {size} is too small for the network; use >= 16"):
            train_net.main(FAST + ["--image_size", str(size), "--mining", "batch_all", "--out", str(tmp_path / "m")])
    DeepRank(**{**SMALL_MODEL, "image_size": 16})  # the stated minimum works


def test_k_above_the_gallery_is_honoured_with_a_warning(tmp_path, capsys):
    emb = tmp_path / "emb.txt"
    emb.write_text("# deep-ranking embeddings v1 dim=1 normalized=1 model=m\n"
                   "a/1.jpg\ta\t0\na/2.jpg\ta\t1\nb/3.jpg\tb\t5\n")
    assert evaluation.main(["--train_embeddings", str(emb), "--test_embeddings", str(emb), "--k", "50"]) == 0
    assert "warning: --k 50 is more than the 2 train images a query can retrieve; scoring at k = 2" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- interruptions

def test_kill_mid_epoch_then_resume_equals_an_uninterrupted_run(triplets, tmp_path):
    """kill -9 in the middle of epoch 2, then --resume from temp_net1: bit-identical weights and
    optimizer state to a run never interrupted (CPU, fp32, same seed); no file under a final name."""
    train, _ = triplets
    flags = FAST + ["--triplets", str(train), "--epochs", "3", "--max_steps", "12", "--batch_size", "8",
                    "--optim", "adam", "--seed", "5", "--no_amp"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    assert train_net.main(flags + ["--out", str(straight / "m.model")]) == 0
    process = subprocess.Popen([sys.executable, str(ROOT / "train_net.py"), *flags, "--out", str(killed / "m.model")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while not (killed / "temp_net1.model").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "temp_net1.model").exists() and not (killed / "temp_net2.model").exists()
    assert not (killed / "m.model").exists()
    assert train_net.main(flags + ["--resume", str(killed / "temp_net1.model"), "--out", str(killed / "m.model")]) == 0
    a, b = (torch.load(folder / "m.model", weights_only=True) for folder in (straight, killed))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)
    assert [row["epoch"] for row in read_log(killed / "m_log.jsonl")] == [1, 2, 3]
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]  # a killed write's temp: swept


# ----------------------------------------------------------------------------- odd file names and folders

def test_symlink_cycle_is_walked_once(prepared_master, tmp_path):
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    before = list_split(data, "train")[0]
    images = data / "train" / sorted(os.listdir(data / "train"))[0] / "images"
    (images / "loop").symlink_to(images, target_is_directory=True)  # a folder that contains itself
    assert list_split(data, "train")[0] == before


def test_file_name_that_is_not_utf8_is_named_and_refused(prepared_master, tmp_path):
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    images = data / "train" / sorted(os.listdir(data / "train"))[0] / "images"
    pixels = Path(list_split(data, "train")[0][0]).read_bytes()
    with open(os.fsencode(images) + b"/bad\xff.JPEG", "wb") as handle:
        handle.write(pixels)
    with pytest.raises(PipelineError, match=r"bad\\xff.JPEG'?: the file name is not valid UTF-8; rename it"):
        triplet_sampler.main(["--data", str(data), "--out", str(tmp_path / "t.csv")])


def test_tab_in_a_file_name_is_refused_before_embedding(prepared_master, tmp_path):
    import shutil

    data = Path(shutil.copytree(prepared_master, tmp_path / "data"))
    first = Path(list_split(data, "val")[0][0])
    shutil.copy(first, first.with_name("a\tb.JPEG"))
    model = tmp_path / "m.model"
    save_checkpoint(model, DeepRank(**SMALL_MODEL))
    with pytest.raises(PipelineError, match="holds a tab or a line break"):
        gen_embeddings.main(["--model", str(model), "--data", str(data), "--split", "val",
                             "--test_out", str(tmp_path / "val.txt"), "--num_workers", "0"])
    assert not (tmp_path / "val.txt").exists()
    with pytest.raises(PipelineError, match="same file"):
        gen_embeddings.main(["--model", str(model), "--data", str(data), "--train_out", str(tmp_path / "x.txt"),
                             "--test_out", str(tmp_path / "x.txt")])
