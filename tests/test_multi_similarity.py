"""--loss multi_similarity: the loss and its miner against a direct loop over a tiny batch, a
P x K training run that lowers it, its refusals, and two gloo processes equal to one on the same
global batch (fp32)."""

import math

import numpy as np
import pytest
import torch

import train_net
from conftest import FAST, read_log
from deeprank import losses
from deeprank.common import PipelineError
from test_distributed import SMALL, run


def reference(emb, labels, alpha, beta, base, epsilon):
    """The multi-similarity loss (Wang et al. 2019) written out: mined pairs, then each anchor's two terms."""
    x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in emb.tolist()]
    s = [[sum(a * b for a, b in zip(x[i], x[j], strict=True)) for j in range(len(x))] for i in range(len(x))]
    total, mined = 0.0, 0
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(len(x)) if labels[k] != labels[i]]
        kept_pos = [j for j in pos if neg and s[i][j] - epsilon < max(s[i][k] for k in neg)]
        kept_neg = [k for k in neg if pos and s[i][k] + epsilon > min(s[i][j] for j in pos)]
        mined += len(kept_pos) + len(kept_neg)
        total += math.log(1 + sum(math.exp(-alpha * (s[i][j] - base)) for j in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s[i][k] - base)) for k in kept_neg)) / beta
    return total / len(x), mined


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 2.0])  # 2.0: every pair is mined
def test_multi_similarity_loss_and_miner_against_the_formula(epsilon):
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    loss, stats = losses.multi_similarity_loss(emb, labels, 2.0, 50.0, 0.5, epsilon)
    expected, mined = reference(emb.detach(), labels.tolist(), 2.0, 50.0, 0.5, epsilon)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and stats["active"] == mined
    assert stats["count"] == 9 * 8
    if epsilon == 2.0:
        assert mined == 9 * 8
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_multi_similarity_trains_on_pk_batches_and_refuses_csv_inputs(prepared_master, tmp_path, capsys):
    out = tmp_path / "ms.model"
    assert train_net.main(FAST + ["--loss", "multi_similarity", "--mining", "batch_all", "--data",
                                  str(prepared_master), "--classes_per_batch", "4", "--images_per_class", "3",
                                  "--epochs", "4", "--optim", "adam", "--lr", "0.001", "--trainable", "all",
                                  "--augment", "none", "--out", str(out)]) == 0
    log = read_log(tmp_path / "ms_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    printed = capsys.readouterr().out
    assert "ms_alpha" in printed and "  margin:" not in printed  # only the flags this run reads
    for argv, message in ((["--mining", "none"], "pass --mining batch_all"),
                          (["--mining", "batch_all", "--soft_margin"], "--soft_margin and --distance")):
        with pytest.raises(PipelineError, match=message):
            train_net.main(FAST + ["--loss", "multi_similarity", *argv, "--out", str(tmp_path / "x.model")])


def test_multi_similarity_under_torchrun_equals_one_process(prepared_master, tmp_path):
    flags = SMALL + ["--epochs", "1", "--data", prepared_master, "--mining", "batch_all", "--classes_per_batch", "4",
                     "--images_per_class", "3", "--loss", "multi_similarity"]
    for processes in (1, 2):
        result = run("train_net.py", *flags, "--out", tmp_path / f"m{processes}.model", processes=processes)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_log(tmp_path / "m1_log.jsonl"), read_log(tmp_path / "m2_log.jsonl")
    assert one[0]["active_share"] == two[0]["active_share"]  # the same mined pairs of the global batch
    np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-5)
