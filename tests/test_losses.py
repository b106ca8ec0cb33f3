"""The losses of P x K batches beside the triplet loss (--loss multi_similarity, proxy_anchor,
contrastive with --memory): each against a direct loop over a tiny batch (miners included), the
cross-batch memory's contents after a few steps, training runs that lower them and resume exactly
(proxies and memory included), their refusals, and two gloo processes equal to one on the same
global batch (fp32)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_net
from conftest import FAST, read_log
from deeprank import losses
from deeprank.common import PipelineError
from deeprank.loss_state import CrossBatchMemory, LossState
from deeprank.training import PKBatches
from test_distributed import SMALL, run


def unit_rows(x):
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x.tolist()]


def dot(a, b):
    return sum(u * v for u, v in zip(a, b, strict=True))


def reference(emb, labels, alpha, beta, base, epsilon, ref=None, ref_labels=None):
    """The multi-similarity loss (Wang et al. 2019) written out: mined pairs, then each anchor's two terms;
    references other than the batch (its own rows first) when given."""
    x = unit_rows(emb)
    r, ref_labels = (x, labels) if ref is None else (unit_rows(ref), ref_labels)
    s = [[dot(x[i], r[j]) for j in range(len(r))] for i in range(len(x))]
    total, mined = 0.0, 0
    for i in range(len(x)):
        pos = [j for j in range(len(r)) if j != i and ref_labels[j] == labels[i]]
        neg = [k for k in range(len(r)) if ref_labels[k] != labels[i]]
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
    for argv, message in ((["--mining", "none"], "pass --batches pk"),
                          (["--mining", "batch_all", "--soft_margin"], "--soft_margin belongs to --loss triplet")):
        with pytest.raises(PipelineError, match=message):
            train_net.main(FAST + ["--loss", "multi_similarity", *argv, "--out", str(tmp_path / "x.model")])


@pytest.mark.parametrize("flags", [["--loss", "multi_similarity", "--memory", "24"],  # its loss twice: batch, memory
                                   ["--loss", "contrastive", "--memory", "24"], ["--loss", "proxy_anchor"]])
def test_every_pk_loss_under_torchrun_equals_one_process(prepared_master, tmp_path, flags):
    # SGD: a gradient twice too large (the proxies', were they scaled like the network's) moves it twice as far
    argv = SMALL + ["--optim", "sgd", "--lr", "0.05", "--epochs", "1", "--data", prepared_master, "--mining",
                    "batch_all", "--classes_per_batch", "4", "--images_per_class", "3", *flags]
    for processes in (1, 2):
        result = run("train_net.py", *argv, "--out", tmp_path / f"m{processes}.model", processes=processes)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_log(tmp_path / "m1_log.jsonl"), read_log(tmp_path / "m2_log.jsonl")
    assert one[0]["active_share"] == two[0]["active_share"]  # the same mined pairs of the global batch
    np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-5)
    a, b = (torch.load(tmp_path / f"m{n}.model", weights_only=True) for n in (1, 2))
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key].float(), a["model"][key].float(), atol=2e-4, rtol=0), key
    state_a, state_b = a["loss_state"], b["loss_state"]
    assert state_a.keys() == state_b.keys()
    if "proxies" in state_a:
        start = torch.nn.init.kaiming_normal_(torch.empty(4, 32), mode="fan_out",
                                              generator=torch.Generator().manual_seed(3))  # SMALL's --seed 3
        assert (state_a["proxies"] - start).abs().max() > 1e-2  # they moved: the 2 processes' did as far
        torch.testing.assert_close(state_b["proxies"], state_a["proxies"], atol=1e-4, rtol=0)
    if "memory" in state_a:  # every rank keeps the whole global batch's embeddings
        torch.testing.assert_close(state_b["memory"]["embeddings"], state_a["memory"]["embeddings"], atol=2e-4,
                                   rtol=0)
        assert torch.equal(state_b["memory"]["labels"], state_a["memory"]["labels"])


def test_multi_similarity_and_contrastive_against_references_other_than_the_batch():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    older, older_labels = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([1, 3, 0, 2, 2])
    ref, ref_labels = torch.cat([emb, older]), torch.cat([labels, older_labels])  # the batch's own rows first
    loss, stats = losses.multi_similarity_loss(emb, labels, 2.0, 50.0, 0.5, 0.1, ref, ref_labels)
    expected, mined = reference(emb, labels.tolist(), 2.0, 50.0, 0.5, 0.1, ref, ref_labels.tolist())
    assert float(loss) == pytest.approx(expected, rel=1e-5) and stats["active"] == mined
    assert stats["count"] == 6 * 10  # every reference but itself
    loss, stats = losses.pair_loss(emb, labels, None, 1.0, ref, ref_labels)
    terms = []
    for i in range(6):
        for m in range(11):
            if m != i:
                d = math.dist(emb[i].tolist(), ref[m].tolist())
                terms.append(d * d if labels[i] == ref_labels[m] else max(0.0, 1.0 - d) ** 2)
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-6) and stats["count"] == 60


def proxy_anchor_reference(emb, labels, proxies, alpha, delta):
    """The proxy-anchor loss (Kim et al. 2020) written out, proxy by proxy."""
    x, p = unit_rows(emb), unit_rows(proxies)
    present = [c for c in range(len(p)) if c in labels]
    pull = sum(math.log(1 + sum(math.exp(-alpha * (dot(x[i], p[c]) - delta)) for i in range(len(x))
                                if labels[i] == c)) for c in present) / len(present)
    push = sum(math.log(1 + sum(math.exp(alpha * (dot(x[i], p[c]) + delta)) for i in range(len(x))
                                if labels[i] != c)) for c in range(len(p))) / len(p)
    return pull + push


def test_proxy_anchor_loss_against_the_formula():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    proxies = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3])  # class 2's proxy has no image: only pushed
    for alpha, delta in ((32.0, 0.1), (4.0, 0.3)):
        loss, stats = losses.proxy_anchor_loss(emb, labels, proxies, alpha, delta)
        assert float(loss.detach()) == pytest.approx(
            proxy_anchor_reference(emb.detach(), labels.tolist(), proxies.detach(), alpha, delta), rel=1e-6)
        assert stats["count"] == 7
    loss.backward()
    assert proxies.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0


def test_cross_batch_memory_keeps_the_last_n_embeddings_newest_first():
    memory = CrossBatchMemory(5, 3, torch.device("cpu"))
    batches = [(torch.full((2, 3), float(step)), torch.tensor([step, step + 10])) for step in range(4)]
    for emb, labels in batches[:3]:
        memory.push(emb, labels)
    assert memory.labels.tolist() == [2, 12, 1, 11, 0]  # 6 pushed, the oldest one gone
    assert memory.embeddings[:, 0].tolist() == [2, 2, 1, 1, 0]
    ref, ref_labels = memory.references(*batches[3])  # the batch first, then the newest 3 of the queue
    assert ref_labels.tolist() == [3, 13, 2, 12, 1] and ref[:2, 0].tolist() == [3, 3]


@pytest.mark.parametrize("loss_name", ["contrastive", "multi_similarity"])
def test_a_pk_step_with_memory_adds_the_memory_term_and_enqueues_the_batch(loss_name):
    args = SimpleNamespace(loss=loss_name, margin=1.0, ms_alpha=2.0, ms_beta=50.0, ms_base=0.5, ms_epsilon=0.1,
                           memory=8, seed=0)
    state = LossState.create(args, 3, 4, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    seen = []
    for _ in range(3):
        emb, labels = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        ref, ref_labels = state.memory.references(emb, labels)
        before = state.memory.embeddings.clone()
        loss, _ = PKBatches.loss(None, emb, labels, args, state, state.memory)
        assert torch.equal(state.memory.embeddings, before)  # the loss has no side effect
        state.memory.push(emb, labels)  # the training step enqueues
        alone = PKBatches.loss(None, emb, labels, args, state)[0]  # no memory: the batch alone
        term = (losses.pair_loss(emb, labels, None, 1.0, ref, ref_labels) if loss_name == "contrastive" else
                losses.multi_similarity_loss(emb, labels, 2.0, 50.0, 0.5, 0.1, ref, ref_labels))[0]
        assert float(loss) == pytest.approx(float(alone + term), rel=1e-6)
        seen = [emb] + seen
    torch.testing.assert_close(state.memory.embeddings, torch.cat(seen)[:8])  # the last 8 embeddings


PK = ["--mining", "batch_all", "--classes_per_batch", "4", "--images_per_class", "3", "--optim", "adam", "--lr",
      "0.001", "--trainable", "all", "--augment", "flip", "--no_amp", "--seed", "3"]


@pytest.mark.parametrize("flags", [["--loss", "proxy_anchor"], ["--loss", "multi_similarity", "--memory", "20"]])
def test_proxies_and_memory_train_and_resume_exactly(prepared_master, tmp_path, flags):
    common = FAST + PK + ["--data", str(prepared_master), *flags]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert train_net.main(common + ["--epochs", "3", "--out", str(tmp_path / "a" / "m.model")]) == 0
    assert train_net.main(common + ["--epochs", "1", "--out", str(tmp_path / "b" / "first.model")]) == 0
    assert train_net.main(common + ["--epochs", "3", "--resume", str(tmp_path / "b" / "temp_net1.model"),
                                    "--out", str(tmp_path / "b" / "m.model")]) == 0
    log = read_log(tmp_path / "a" / "m_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    a, b = (torch.load(tmp_path / part / "m.model", weights_only=True) for part in ("a", "b"))
    state = a["loss_state"]
    if "proxies" in state:
        assert state["proxies"].shape == (4, 32)  # one per class of the synthetic data, --embed_dim 32
        first = torch.load(tmp_path / "b" / "first.model", weights_only=True)["loss_state"]["proxies"]
        assert not torch.equal(first, state["proxies"])  # the proxies train
    else:
        assert state["memory"]["embeddings"].shape == (20, 32) and state["memory"]["size"] == 20
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key].float(), a["model"][key].float(), atol=1e-6, rtol=0), key
    for key, value in state.items():
        tensors = value if key == "proxies" else value["embeddings"]
        other = b["loss_state"][key] if key == "proxies" else b["loss_state"][key]["embeddings"]
        torch.testing.assert_close(other, tensors, atol=1e-6, rtol=0)
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--loss", "triplet", "--mining", "batch_all", "--memory", "10"],
     "--memory belongs to --loss contrastive / multi_similarity; --loss triplet does not read it"),
    (["--loss", "contrastive", "--mining", "none", "--memory", "10"], "--memory keeps the embeddings"),
    (["--loss", "proxy_anchor", "--batches", "pk", "--memory", "10"], "--memory belongs to"),
    (["--loss", "proxy_anchor"], "pass --batches pk"),
    (["--loss", "proxy_anchor", "--mining", "batch_all", "--distance", "squared"],
     "--distance belongs to --loss triplet; --loss proxy_anchor does not read it"),
    (["--loss", "multi_similarity", "--batches", "pk", "--margin", "0.5"], "--margin belongs to --loss triplet / "
                                                                            "contrastive"),
    (["--loss", "triplet", "--ms_alpha", "3"], "--ms_alpha belongs to --loss multi_similarity"),
    (["--loss", "contrastive", "--soft_margin"], "--soft_margin belongs to --loss triplet"),
    (["--loss", "contrastive", "--mining", "batch_hard"], "mines triplets for --loss triplet"),
    (["--loss", "contrastive", "--memory_start", "5", "--pa_delta", "0.2"], "--pa_delta belongs to"),
    (["--batches", "csv", "--mining", "batch_hard"], "pass --batches pk, not csv"),
    (["--batches", "pk", "--mining", "none"], "--batches pk mines inside P x K batches"),
])
def test_refused_loss_flags(tmp_path, argv, message):
    with pytest.raises(PipelineError, match=message):
        train_net.main(FAST + argv + ["--out", str(tmp_path / "x.model")])
    assert list(tmp_path.iterdir()) == []


def test_memory_starts_at_its_step_and_pk_batches_have_their_name(prepared_master, tmp_path, capsys):
    """--memory_start 2: the memory holds the batches of the steps from 2 on; --batches pk (the new
    name) and --mining batch_all (the old spelling) train the same run."""
    flags = [f for f in PK if f not in ("--mining", "batch_all")] + ["--data", str(prepared_master), "--loss",
                                                                       "contrastive", "--epochs", "1"]
    assert train_net.main(FAST + flags + ["--batches", "pk", "--memory", "100", "--memory_start", "2", "--out",
                                          str(tmp_path / "m.model")]) == 0
    saved = torch.load(tmp_path / "m.model", weights_only=True)
    steps = saved["metrics"]["steps"]
    assert steps > 2 and saved["loss_state"]["memory"]["embeddings"].shape[0] == (steps - 2) * 12  # P x K = 12
    assert saved["metrics"]["active_of"].startswith("pairs with loss > 0")
    assert train_net.main(FAST + flags + ["--batches", "pk", "--out", str(tmp_path / "new.model")]) == 0
    assert train_net.main(FAST + flags + ["--mining", "batch_all", "--out", str(tmp_path / "old.model")]) == 0
    new, old = (torch.load(tmp_path / f"{name}.model", weights_only=True)["model"] for name in ("new", "old"))
    assert all(torch.equal(new[key], old[key]) for key in new)


def test_a_memory_checkpoint_needs_its_flags_to_resume(prepared_master, tmp_path):
    common = FAST + PK + ["--data", str(prepared_master), "--loss", "multi_similarity", "--max_steps", "1"]
    assert train_net.main(common + ["--epochs", "1", "--out", str(tmp_path / "m.model")]) == 0
    with pytest.raises(PipelineError, match="no saved memory"):
        train_net.main(common + ["--memory", "10", "--epochs", "2", "--resume", str(tmp_path / "m.model"),
                                 "--out", str(tmp_path / "r.model")])
    assert not (tmp_path / "r.model").exists()
