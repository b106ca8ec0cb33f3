"""train_net.py: loss, schedule, training, resume and its error cases."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import train_net
from conftest import FAST as SMALL
from conftest import read_log
from deep_rank_net import DeepRank
from deeprank import losses, training
from deeprank.checkpoints import load_model, save_checkpoint
from deeprank.common import PipelineError
from deeprank.distributed import Cluster
from deeprank.images import BadImages
from deeprank.runtime import compiler_available, resolve_device

FAST = SMALL + ["--batch_size", "16"]


def test_csv_batch_loss_by_hand():
    """A CSV batch is its queries, then positives, then negatives: a, p, n = 0..B, B..2B, 2B..3B."""
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    n = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    emb = torch.cat([q, p, n])
    loss, stats = losses.ranking_loss(emb, None, "none", margin=1.0, distance="squared")
    assert float(loss) == pytest.approx((0.0 + (1.0 + 9.0 - 1.0)) / 2)
    assert stats == {"active": 1, "count": 2, "d_pos": pytest.approx(5.0), "d_neg": pytest.approx(2.5)}
    loss, _ = losses.ranking_loss(emb, None, "none", margin=1.0, distance="euclidean")
    assert float(loss) == pytest.approx((0.0 + (1.0 + 3.0 - 1.0)) / 2, abs=1e-5)
    soft, _ = losses.ranking_loss(emb, None, "none", margin=1.0, distance="squared", soft=True)
    assert float(soft) == pytest.approx((math.log1p(math.exp(1 - 4)) + math.log1p(math.exp(9 - 1))) / 2)


def test_lr_schedule():
    assert training.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert training.lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert training.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert training.lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert training.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert training.lr_factor(50, 100, 0, "constant") == 1.0


def test_training_lowers_the_loss_and_writes_checkpoints(triplets, tmp_path):
    train, val = triplets
    out = tmp_path / "run" / "deepranknet.model"
    out.parent.mkdir()
    assert train_net.main(FAST + ["--epochs", "4", "--optim", "adam", "--lr", "0.001", "--trainable", "all",
                                  "--triplets", str(train), "--val_triplets", str(val), "--keep_last", "2",
                                  "--out", str(out)]) == 0
    log = read_log(out.parent / "deepranknet_log.jsonl")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert all(0 <= row["zero_loss_share"] <= 1 and 0 <= row["val_triplet_accuracy"] <= 1 for row in log)
    assert sorted(p.name for p in out.parent.glob("*.model")) == [  # --keep_last 2: the last two epochs'
        "deepranknet.model", "temp_net3.model", "temp_net4.model"]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["config"]["optim"] == "adam" and ckpt["metrics"]["epoch"] == 4
    model, _ = load_model(out)
    assert isinstance(model, DeepRank)


def test_resume_equals_uninterrupted_run(triplets, tmp_path):
    train, _ = triplets
    # fp32 on every CPU (--no_amp), as every equivalence test; both runs would share bf16 where it runs
    common = FAST + ["--triplets", str(train), "--augment", "flip", "--seed", "3", "--max_steps", "4", "--no_amp"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = tmp_path / "a" / "final.model"
    train_net.main(common + ["--epochs", "2", "--out", str(straight)])
    resumed = tmp_path / "b" / "final.model"
    train_net.main(common + ["--epochs", "1", "--out", str(tmp_path / "b" / "first.model")])
    train_net.main(common + ["--epochs", "2", "--resume", str(tmp_path / "b" / "temp_net1.model"),
                             "--out", str(resumed)])
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-6), key
    assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)


def test_training_csv_without_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match="query,positive,negative"):
        train_net.main(FAST + ["--triplets", str(bad), "--out", str(tmp_path / "m.model")])
    assert [p.name for p in tmp_path.iterdir()] == ["bad.csv"]


def test_missing_images_listed_before_training(triplets, tmp_path):
    train, _ = triplets
    frame = pd.read_csv(train)
    frame.loc[:11, "negative"] = [f"nowhere/img_{i}.JPEG" for i in range(12)]
    frame.to_csv(train, index=False)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError) as info:
        train_net.main(FAST + ["--triplets", str(train), "--out", str(out / "m.model")])
    message = str(info.value)
    assert "12 image(s)" in message and "img_0.JPEG" in message and "img_9.JPEG" in message
    assert "img_10.JPEG" not in message and "and 2 more" in message
    assert list(out.iterdir()) == []


def test_resume_refuses_pickled_module_and_other_architecture(triplets, tmp_path):
    train, _ = triplets
    out = tmp_path / "out"
    out.mkdir()
    pickled = tmp_path / "old.model"
    torch.save(DeepRank(backbone="resnet18", image_size=32, embed_dim=8, conv_dim=8), pickled)
    with pytest.raises(PipelineError, match="pickled"):
        train_net.main(FAST + ["--triplets", str(train), "--resume", str(pickled), "--out", str(out / "m.model")])
    other = tmp_path / "other.model"
    save_checkpoint(other, DeepRank(backbone="resnet18", image_size=32, embed_dim=8, conv_dim=8))
    ckpt = torch.load(other, weights_only=True)
    ckpt["model_args"]["backbone"] = "resnet34"
    torch.save(ckpt, other)
    with pytest.raises(PipelineError, match="does not match"):
        train_net.main(FAST + ["--triplets", str(train), "--resume", str(other), "--out", str(out / "m.model")])
    assert list(out.iterdir()) == []


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(triplets, tmp_path):
    """A learning rate of 1e30 blows the weights up after epoch 1's one step: epoch 2's loss is NaN."""
    train, _ = triplets
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"loss became nan at epoch 2 step 1.*temp_net1.model"):
        train_net.main(FAST + ["--triplets", str(train), "--epochs", "2", "--max_steps", "1", "--lr", "1e30",
                               "--no_amp", "--out", str(out / "deepranknet.model")])
    assert (out / "temp_net1.model").is_file()
    assert not (out / "deepranknet.model").exists()
    load_model(out / "temp_net1.model")


def test_train_one_epoch_stops_at_a_non_finite_loss_and_at_the_time_budget():
    """The epoch function on its own: steps, statistics, a NaN loss, --max_minutes."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    flags = SimpleNamespace(schedule="constant", epochs=1, warmup_epochs=0, max_minutes=0)
    stats = {"active": 1, "count": 2, "d_pos": 0.5, "d_neg": 1.0, "images": 3}

    class Network:  # a loss of (w . w) until `poison`, then NaN
        def __init__(self, poison):
            self.calls, self.poison, self.cluster = 0, poison, Cluster()

        def batch_loss(self, images, labels, step):
            self.calls += 1
            loss = weight.pow(2).sum()
            return (loss * math.nan if self.calls > self.poison else loss), dict(stats)

        def backward(self, loss):
            loss.backward()

    batches = [(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), None, [])] * 5
    bad_images = BadImages("error", None)
    schedule = training.Schedule(optimizer, flags, steps_per_epoch=4, start_epoch=0)
    epoch, out_of_time = train_net.train_one_epoch(Network(99), optimizer, batches, schedule, 0, 4, None, 1,
                                                   bad_images)
    row = epoch.row(1, optimizer.param_groups[0]["lr"])
    assert not out_of_time and row["steps"] == 4 and row["active_share"] == 0.5 and row["loss"] < 2
    assert float(weight.detach()[0]) == pytest.approx(0.8 ** 4)  # four SGD steps on w . w at lr 0.1
    with pytest.raises(PipelineError, match="step 3; training stopped, last good checkpoint: temp_net7.model"):
        train_net.train_one_epoch(Network(2), optimizer, batches, schedule, 0, 4, "temp_net7.model", 1, bad_images)
    budget = training.Schedule(optimizer, SimpleNamespace(**{**vars(flags), "max_minutes": 1e-9}), 4, 0)
    epoch, out_of_time = train_net.train_one_epoch(Network(99), optimizer, batches, budget, 0, 4, None, 1,
                                                   bad_images)
    assert out_of_time and epoch.row(1, 0.1)["steps"] == 1


def test_device_selection_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(PipelineError, match="--device cpu"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(PipelineError, match="not a device"):
        resolve_device("tpu9")


def test_compiled_frozen_layers_train_like_eager_ones(triplets, tmp_path, capsys):
    if not compiler_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    train, _ = triplets
    # on the CPU: fp32 there is exact enough for 1e-4 (CUDA convolutions default to TF32)
    common = FAST + ["--triplets", str(train), "--max_steps", "3", "--no_amp", "--lr", "0.01", "--device", "cpu"]
    runs = {}
    for mode in ("off", "on"):
        (tmp_path / mode).mkdir()
        train_net.main(common + ["--compile", mode, "--out", str(tmp_path / mode / "m.model")])
        assert f"frozen backbone layers: {'compiled' if mode == 'on' else 'eager'}" in capsys.readouterr().out
        runs[mode] = torch.load(tmp_path / mode / "m.model", weights_only=True)
    for key, value in runs["off"]["model"].items():
        assert torch.allclose(value.float(), runs["on"]["model"][key].float(), atol=1e-4), key
    assert runs["off"]["metrics"]["loss"] == pytest.approx(runs["on"]["metrics"]["loss"], rel=1e-3)


def test_compiled_trained_layers_give_the_eager_gradients():
    """What --compile does to the layers that train on CUDA (training.compile_trained_layers),
    checked on the CPU: forward and backward through torch.compile match eager."""
    if not compiler_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    assert training.compile_trained_layers(torch.device("cuda"))
    assert not training.compile_trained_layers(torch.device("cpu"))
    torch.manual_seed(0)
    model = DeepRank(backbone="small_cnn", embed_dim=16, image_size=32, trainable="conv5", weights="none")
    trunk, tail = model.frozen_split()
    layers = training.TrainedLayers(model, tail)
    images = torch.randn(6, 3, 32, 32)
    features = trunk(images)

    def gradients(forward):
        model.zero_grad()
        forward(features, images).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    eager, compiled = gradients(layers), gradients(torch.compile(layers))
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, atol=1e-4, rtol=1e-3), name
