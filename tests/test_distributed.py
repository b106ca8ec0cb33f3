"""torchrun: two gloo processes on the CPU train like one process with the same global batch
(loss curve and weights), resume like one, embed into the same file byte for byte, and stop
together with one clear line when one of them fails."""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_net
from conftest import ROOT, read_log
from deeprank import distributed, runtime
from deeprank.common import run_cli
from deeprank.loaders import PKBatchSampler, RankSlices

# the equivalence runs: BN frozen (--trainable head: per-process batch statistics would differ,
# and SyncBatchNorm runs on GPUs only), no augmentation (its random draws follow the loader workers),
# and fp32 (--no_amp) on every CPU: these tests check rounding-level equality over two epochs, where
# bf16's rounding (8 significant bits) compounds; test_bf16_two_processes_take_the_same_first_step
# checks the bf16 path where the CPU has it
TWO_PROCESS_MODEL = ["--backbone", "small_cnn", "--weights", "none", "--image_size", "64", "--embed_dim", "32",
                     "--conv_dim", "32",
                     "--num_workers", "0", "--trainable", "head", "--augment", "none", "--compile", "off",
                     "--batch_size", "8", "--seed", "3", "--keep_last", "1"]
SMALL = TWO_PROCESS_MODEL + ["--optim", "adam", "--lr", "0.001", "--max_steps", "6", "--no_amp"]


def run(script, *argv, processes=1, timeout=120):
    """A stage as a user runs it: `torchrun --nproc_per_node N script`, or for one process the stage's
    main() in this process (the same code as `python script`, without a second interpreter's start-up)
    on one thread, as torchrun gives each of its processes (OMP_NUM_THREADS=1)."""
    argv = [str(a) for a in argv]
    if processes == 1:
        module = importlib.import_module(Path(script).stem)
        out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_cli(module.main, argv)
        finally:
            torch.set_num_threads(threads)
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets per process
    return subprocess.run(launcher + [str(ROOT / script)] + argv, capture_output=True, text=True, timeout=timeout,
                          env=env)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_processes_train_like_one_and_resume_under_torchrun(triplets, tmp_path):
    """Two epochs of one process against two processes: the first epoch run by torchrun, the second
    resumed from its checkpoint by torchrun. Each epoch's loss and active share, and the weights at
    the end, are the one process's (fp32, Adam, 12 steps: rounding differences only)."""
    train, _ = triplets
    result = run("train_net.py", *SMALL, "--epochs", 2, "--triplets", train, "--out", tmp_path / "p1.model")
    assert result.returncode == 0, result.stderr[-2000:]
    two = tmp_path / "two" / "p2.model"
    two.parent.mkdir()
    result = run("train_net.py", *SMALL, "--epochs", 1, "--triplets", train, "--out", two, processes=2)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run("train_net.py", *SMALL, "--epochs", 2, "--triplets", train, "--out", two,
                 "--resume", two.parent / "temp_net1.model", processes=2)
    assert result.returncode == 0, result.stderr[-2000:]
    one, both = read_log(tmp_path / "p1_log.jsonl"), read_log(two.parent / "p2_log.jsonl")
    assert [row["epoch"] for row in both] == [1, 2]
    assert [row["world_size"] for row in one + both] == [1, 1, 2, 2]
    np.testing.assert_allclose([r["loss"] for r in both], [r["loss"] for r in one], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["active_share"] for r in both], [r["active_share"] for r in one])
    a, b = weights(tmp_path / "p1.model"), weights(two)
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=2e-4, rtol=0), key


@pytest.mark.skipif(runtime.precision(torch.device("cpu")) != "bf16",
                    reason="this CPU runs fp32 only (no AVX512-BF16 / AMX), or DEEPRANK_FP32=1 forces fp32")
def test_bf16_two_processes_take_the_same_first_step(triplets, tmp_path):
    """The bf16 autocast path under torchrun: one SGD step of two processes equals one process's.
    One step, not two epochs: bf16 keeps 8 significant bits, and each process runs half the batch,
    so oneDNN may accumulate in another order and round an activation to the neighbouring bf16
    value (2^-8 = 0.4% apart); over epochs such differences compound, over one step they stay near
    that size. Measured on an AVX512-BF16 CPU: equal losses and steps within 0.35% of their size. The
    bounds: the loss within 1%, and each tensor's step (SGD, so a step is lr x gradient, not Adam's
    normalised one) within 2% of its largest entry."""
    train, _ = triplets
    flags = TWO_PROCESS_MODEL + ["--optim", "sgd", "--lr", "0.01", "--max_steps", "1", "--triplets", str(train)]
    assert train_net.main(flags + ["--epochs", "0", "--out", str(tmp_path / "p0.model")]) == 0
    for processes in (1, 2):
        result = run("train_net.py", *flags, "--epochs", 1, "--out", tmp_path / f"p{processes}.model",
                     processes=processes)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "  precision: bf16" in result.stdout
    one, two = read_log(tmp_path / "p1_log.jsonl"), read_log(tmp_path / "p2_log.jsonl")
    np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-2)
    start, a, b = (weights(tmp_path / f"p{i}.model") for i in range(3))
    for key in start:
        step_one, step_two = a[key].float() - start[key].float(), b[key].float() - start[key].float()
        bound = 0.02 * float(step_one.abs().max()) + 1e-7
        assert float((step_two - step_one).abs().max()) <= bound, key
    assert float((a["embedding.weight"] - start["embedding.weight"]).abs().max()) > 1e-3  # the step was taken


def test_two_processes_embed_the_same_file(triplets, tmp_path):
    train, val = triplets
    model = tmp_path / "m.model"
    assert train_net.main(SMALL + ["--epochs", "0", "--triplets", str(train), "--out", str(model)]) == 0
    files = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        result = run("gen_embeddings.py", "--model", model, "--train_triplets", train, "--test_triplets", val,
                     "--train_out", folder / "train.txt", "--test_out", folder / "test.npy", "--num_workers", 0,
                     processes=processes)
        assert result.returncode == 0, result.stderr[-2000:]
        files[processes] = [(folder / name).read_bytes() for name in ("train.txt", "test.npy", "test.paths.tsv")]
        assert not [p for p in os.listdir(folder) if "shard" in p]  # the shards are gone
    assert files[1] == files[2]


def test_online_mining_under_torchrun_sees_the_global_batch(prepared_master, tmp_path):
    flags = SMALL + ["--epochs", "1", "--data", prepared_master, "--mining", "batch_all", "--classes_per_batch", "4",
                     "--images_per_class", "3"]
    for processes in (1, 2):
        result = run("train_net.py", *flags, "--out", tmp_path / f"m{processes}.model", processes=processes)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_log(tmp_path / "m1_log.jsonl"), read_log(tmp_path / "m2_log.jsonl")
    assert one[0]["active_share"] == two[0]["active_share"]  # the same mined triplets
    np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-5)


def test_a_failing_rank_stops_the_run_with_one_line(triplets, tmp_path):
    train, _ = triplets
    import pandas as pd
    rows = pd.read_csv(train)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not a picture")
    rows.loc[len(rows) - 1, "query"] = str(broken)  # the last batch's last triplet: rank 1's share
    csv = tmp_path / "broken.csv"
    rows.to_csv(csv, index=False)
    result = run("train_net.py", *SMALL, "--max_steps", 0, "--epochs", 1, "--triplets", csv,
                 "--out", tmp_path / "m.model", processes=2, timeout=90)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert any("cannot read image" in line and "broken.JPEG" in line for line in errors)
    assert all("cannot read image" in line or "another process of this run stopped" in line for line in errors)
    assert not (tmp_path / "m.model").exists()


@pytest.mark.parametrize("flags,processes,message", [(["--batch_size", "7"], 2, "multiple of the 2 processes"),
                                                     (["--sync_bn"], 1, "--sync_bn needs CUDA")])
def test_refused(triplets, tmp_path, flags, processes, message):
    train, _ = triplets
    result = run("train_net.py", *(SMALL + flags), "--triplets", train, "--out", tmp_path / "m.model",
                 processes=processes)
    assert result.returncode != 0 and message in result.stderr


def test_rank_slices_cover_each_global_batch_once_and_split_pk_classes():
    labels = np.repeat(np.arange(8), 5)
    sampler = PKBatchSampler(labels, classes_per_batch=4, images_per_class=2, seed=1)
    shares = [list(RankSlices(sampler, rank, 2)) for rank in (0, 1)]
    for whole, first, second in zip(sampler, *shares, strict=True):
        assert first + second == whole  # in order, nothing lost or repeated
        assert not set(labels[first]) & set(labels[second])  # each rank its own classes
        assert len(set(labels[first])) == len(set(labels[second])) == 2
    batches = torch.utils.data.BatchSampler(range(11), 4, drop_last=False)
    assert [a + b for a, b in zip(RankSlices(batches, 0, 2), RankSlices(batches, 1, 2), strict=True)] == list(batches)


def test_one_process_cluster_is_a_no_op():
    cluster = distributed.Cluster()
    x = torch.arange(6.0).reshape(6, 1)
    assert cluster.gather(x, columns=3) is x and cluster.part(list(range(5))) == [0, 1, 2, 3, 4]
    assert cluster.every_rank(True) and not cluster.every_rank(False) and cluster.maximum(2.5) == 2.5
    assert json.dumps(cluster.gather_objects({"a": 1})) == '[{"a": 1}]'
