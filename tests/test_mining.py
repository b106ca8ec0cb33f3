"""Online triplet mining: each miner against brute-force enumeration, the P x K sampler, a short run."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

import train_net
import triplet_sampler
from conftest import FAST, read_log
from deep_rank_net import build_backbone
from deeprank import losses, training, training_log
from deeprank.common import PipelineError
from deeprank.loaders import PKBatchSampler


def random_batch(seed, classes=3, per_class=3, dim=5):
    """Small random embeddings with labels, like a P x K batch."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per_class, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    perm = torch.randperm(len(labels), generator=g)
    return emb[perm], labels[perm]


def dist(emb, i, j, distance):
    """Distance between rows i and j, computed directly."""
    sq = float(((emb[i] - emb[j]) ** 2).sum())
    return math.sqrt(sq) if distance == "euclidean" else sq


def loss_of(d_ap, d_an, margin, soft):
    """One triplet's loss, by definition."""
    return math.log1p(math.exp(d_ap - d_an)) if soft else max(0.0, margin + d_ap - d_an)


def brute(emb, labels, kind, margin, distance, soft):
    """Enumerate every triplet of the batch in Python and apply the miner's definition."""
    labels = labels.tolist()
    n = len(labels)
    pos = lambda a: [p for p in range(n) if p != a and labels[p] == labels[a]]  # noqa: E731 - a one-line helper, named for the lines below
    neg = lambda a: [x for x in range(n) if labels[x] != labels[a]]  # noqa: E731 - a one-line helper, named for the lines below
    d = lambda i, j: dist(emb, i, j, distance)  # noqa: E731 - a one-line helper, named for the lines below
    if kind == "batch_all":
        values = [(d(a, p), d(a, x)) for a in range(n) for p in pos(a) for x in neg(a)]
        losses = [loss_of(dp, dn, margin, soft) for dp, dn in values]
        active = [margin + dp - dn > 0 for dp, dn in values]
        return (sum(losses) / len(losses)) if soft else sum(losses) / max(1, sum(active)), sum(active), len(values)
    if kind == "batch_hard":
        rows = [(max(d(a, p) for p in pos(a)), min(d(a, x) for x in neg(a))) for a in range(n)]
    else:  # semi-hard: nearest negative farther than the positive, else farthest negative
        rows = []
        for a in range(n):
            for p in pos(a):
                farther = [d(a, x) for x in neg(a) if d(a, x) > d(a, p)]
                rows.append((d(a, p), min(farther) if farther else max(d(a, x) for x in neg(a))))
    losses = [loss_of(dp, dn, margin, soft) for dp, dn in rows]
    return sum(losses) / len(losses), sum(margin + dp - dn > 0 for dp, dn in rows), len(rows)


@pytest.mark.parametrize("kind", ["batch_all", "batch_hard", "batch_semihard"])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miner_matches_brute_force(kind, distance, soft, seed):
    emb, labels = random_batch(seed)
    margin = 0.5 if distance == "euclidean" else 2.0
    loss, stats = losses.ranking_loss(emb, labels, kind, margin, distance, soft)
    expected, active, count = brute(emb, labels, kind, margin, distance, soft)
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert stats["active"] == active and stats["count"] == count


def test_miners_give_gradients_and_zero_loss_when_separated():
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for kind in losses.MINERS:
        loss, stats = losses.ranking_loss(emb, labels, kind, margin=1.0, distance="euclidean")
        assert loss.item() == 0.0 and stats["active"] == 0, kind
        loss, _ = losses.ranking_loss(emb, labels, kind, margin=100.0, distance="euclidean")
        loss.backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
        emb.grad = None


def test_miners_return_valid_triplets():
    """Every (a, p, n) a miner returns has label[a] == label[p] != label[n] and a != p."""
    emb, labels = random_batch(3, classes=4, per_class=3)
    d = losses.distance_matrix(emb, "euclidean")
    for kind, miner in losses.MINERS.items():
        a, p, n = miner(d, labels)
        assert len(a) > 0, kind
        assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all() and (a != p).all(), kind
    assert len(losses.all_triplets(d, labels)[0]) == 12 * 2 * 9  # every anchor: 2 positives x 9 negatives
    assert len(losses.hard_triplets(d, labels)[0]) == 12  # one per anchor
    assert len(losses.semihard_triplets(d, labels)[0]) == 12 * 2  # one per positive pair


def test_pk_sampler_invariants():
    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 3 + ["d"] * 1 + ["e"] * 8
    sampler = PKBatchSampler(labels, classes_per_batch=3, images_per_class=4, seed=0)
    assert len(sampler) == len(labels) // 12
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len(batch) == 12
            per_class = Counter(labels[i] for i in batch)
            assert len(per_class) == 3 and set(per_class.values()) == {4}
            assert "d" not in per_class  # a single-image class has no positive
            for name in per_class:
                chosen = [i for i in batch if labels[i] == name]
                if labels.count(name) >= 4:
                    assert len(set(chosen)) == 4  # distinct when the class has enough images
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first  # same (seed, epoch), same batches
    sampler.set_epoch(3)
    assert list(sampler) != first


def test_pk_sampler_refuses_impossible_batches():
    with pytest.raises(PipelineError, match="classes_per_batch"):
        PKBatchSampler(["a"] * 5 + ["b"] * 5, classes_per_batch=3, images_per_class=2)
    with pytest.raises(PipelineError, match="images_per_class"):
        PKBatchSampler(["a"] * 5 + ["b"] * 5, classes_per_batch=2, images_per_class=1)


@pytest.mark.parametrize("kind", ["batch_hard", "batch_semihard", "batch_all"])
def test_online_mining_run_lowers_the_loss(prepared_master, tmp_path, kind):
    out = tmp_path / "m.model"
    assert train_net.main(FAST + ["--mining", kind, "--data", str(prepared_master), "--classes_per_batch", "4",
                                  "--images_per_class", "4", "--epochs", "6", "--optim", "adam", "--lr", "0.001",
                                  "--trainable", "all", "--margin", "0.5", "--out", str(out)]) == 0
    log = read_log(tmp_path / "m_log.jsonl")
    assert len(log) == 6
    assert np.mean([row["loss"] for row in log[-2:]]) < np.mean([row["loss"] for row in log[:2]])
    for row in log:
        assert 0 <= row["active_share"] <= 1
        assert row["mean_pos_distance"] > 0 and row["mean_neg_distance"] > 0


def test_collapse_is_warned(capsys):
    epoch = training.EpochStats()
    epoch.add(0.0, {"active": 0, "count": 16, "d_pos": 0.0, "d_neg": 1e-4}, images=16)
    row = epoch.row(1, 0.001)
    assert training.collapsed(row) and row["zero_loss_share"] == 1.0
    training_log.report_epoch(row, total_epochs=1)
    assert "collapsed" in capsys.readouterr().err
    epoch.add(0.5, {"active": 8, "count": 16, "d_pos": 0.2, "d_neg": 0.9}, images=16)
    assert not training.collapsed(epoch.row(1, 0.001))


def test_epochs_zero_writes_the_initial_model(prepared_master, tmp_path):
    out = tmp_path / "init.model"
    train_net.main(FAST + ["--epochs", "0", "--mining", "batch_hard", "--data", str(prepared_master),
                           "--classes_per_batch", "2", "--out", str(out)])
    assert torch.load(out, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("flags", [[], ["--batches", "pk"], ["--loss", "contrastive", "--pairs", "none.csv"]],
                         ids=["triplet_csv", "pk", "pair_csv"])
def test_epochs_zero_needs_no_training_data_in_any_mode(tmp_path, flags, capsys):
    """The untrained network as a checkpoint (a baseline, find_duplicates' features) needs no triplet,
    pair or --data: none of them exists here."""
    out = tmp_path / "init.model"
    assert train_net.main(FAST + ["--epochs", "0", "--out", str(out)] + flags) == 0
    assert "no training data read" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["model_args"]["backbone"] == "small_cnn"


def test_parameter_groups_split_backbone_and_head():
    from deep_rank_net import DeepRank

    model = DeepRank(backbone="resnet18", image_size=32, embed_dim=8, trainable="conv5")
    groups = training.parameter_groups(model, 0.01, head_lr_mult=10)
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[1]["lr"] == 0.01
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in model.features.layer4.parameters()} <= {id(p) for p in groups[1]["params"]}
    head_only = training.parameter_groups(DeepRank(backbone="resnet18", image_size=32, trainable="head"), 0.01)
    assert len(head_only) == 1


def neighbour_kl_by_definition(student, teacher, temperature):
    """The --distill term computed row by row in float64 numpy."""
    total = 0.0
    n = len(student)
    for i in range(n):
        rows = []
        for x in (student, teacher):
            sim = np.array([float(x[i] @ x[j]) for j in range(n) if j != i])
            z = (sim - sim.mean()) / sim.std(ddof=1) / temperature
            rows.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
        q, p = rows
        total += float((p * np.log(p / q)).sum())
    return total / n


def test_neighbour_kl_matches_its_definition_and_gives_finite_gradients():
    g = torch.Generator().manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(7, 9, generator=g, dtype=torch.float64), dim=1)
    student.requires_grad_(True)
    kl = losses.neighbour_kl(student, teacher, temperature=0.5)
    assert float(kl.detach()) == pytest.approx(neighbour_kl_by_definition(student.detach(), teacher, 0.5), rel=1e-4)
    kl.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # only the neighbours' order and relative spacing count: the same space gives zero
    assert float(losses.neighbour_kl(teacher, teacher, 0.5)) == pytest.approx(0, abs=1e-6)


def test_distill_needs_pretrained_weights(prepared_master, tmp_path):
    with pytest.raises(PipelineError, match="--distill .* needs --weights"):
        train_net.main(FAST + ["--mining", "batch_all", "--data", str(prepared_master), "--distill", "1",
                               "--out", str(tmp_path / "m.model")])
    assert not list(tmp_path.iterdir())


def test_distill_run_keeps_the_pretrained_neighbourhoods(prepared_master, tmp_path):
    """--distill with --weights PATH: the teacher is that file's backbone, and the KL term falls."""
    torch.manual_seed(0)
    weights = tmp_path / "small_cnn.pth"
    torch.save(build_backbone("small_cnn", "none", 32)[0].state_dict(), weights)
    flags = [f if f != "none" else str(weights) for f in FAST] + ["--conv_dim", "4096"]  # the paper's width
    out = tmp_path / "m.model"
    assert train_net.main(flags + ["--mining", "batch_all", "--data", str(prepared_master), "--classes_per_batch", "4",
                                   "--images_per_class", "4", "--epochs", "4", "--optim", "adam", "--lr", "0.001",
                                   "--trainable", "all", "--margin", "0.5", "--distill", "1", "--out", str(out)]) == 0
    log = read_log(tmp_path / "m_log.jsonl")
    assert all(math.isfinite(row["loss"]) and row["distill_kl"] >= 0 for row in log)
    assert log[-1]["distill_kl"] < log[0]["distill_kl"]
    # pre-sampled CSV triplets: the teacher sees the same query | positive | negative batch
    csv = tmp_path / "train.csv"
    (tmp_path / "csv").mkdir()
    triplet_sampler.main(["--data", str(prepared_master), "--training", "1", "--out", str(csv)])
    assert train_net.main(flags + ["--triplets", str(csv), "--batch_size", "8", "--max_steps", "2", "--distill",
                                   "1", "--out", str(tmp_path / "csv" / "m.model")]) == 0
    (row,) = read_log(tmp_path / "csv" / "m_log.jsonl")
    assert math.isfinite(row["loss"]) and row["distill_kl"] > 0


def test_too_many_classes_per_batch_says_the_largest_that_works(prepared_master, tmp_path):
    from deeprank.common import PipelineError
    with pytest.raises(PipelineError, match=r"--classes_per_batch 16: .* 2 to 4 classes \(the classes of --data "
                                            r".*train with 2 or more images\); pass --classes_per_batch 4 or less"):
        train_net.main(FAST + ["--data", str(prepared_master), "--mining", "batch_all", "--classes_per_batch", "16",
                               "--out", str(tmp_path / "m.model")])


def test_each_run_prints_only_the_arguments_it_reads(prepared_master, triplets, tmp_path, capsys):
    train, _ = triplets
    pk = ["--data", str(prepared_master), "--mining", "batch_all", "--classes_per_batch", "2",
          "--images_per_class", "2"]
    assert train_net.main(FAST + pk + ["--max_steps", "1", "--out", str(tmp_path / "m.model")]) == 0
    printed = capsys.readouterr().out.split("\n  precision:")[0]
    assert "  classes_per_batch: 2" in printed and "  data: " in printed
    assert "  triplets:" not in printed and "  pairs:" not in printed and "  batch_size:" not in printed
    out = tmp_path / "t.model"
    assert train_net.main(FAST + ["--triplets", str(train), "--max_steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "  triplets: " in printed and "  batch_size: " in printed
    assert "  pairs:" not in printed and "  classes_per_batch:" not in printed and "  data:" not in printed
