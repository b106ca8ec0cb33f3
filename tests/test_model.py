"""deep_rank_net.py: architecture, trainable layers, weights and checkpoints."""

import urllib.error

import pytest
import torch
import torchvision

import deep_rank_net
from deep_rank_net import DeepRank, ModelError, branch_dims, trainable_parameters
from deeprank import runtime
from deeprank.checkpoints import load_model, save_checkpoint
from deeprank.common import PipelineError


def small(**kwargs):
    """A small DeepRank for tests."""
    args = dict(backbone="resnet18", image_size=32, embed_dim=16, conv_dim=32, weights="none")
    args.update(kwargs)
    torch.manual_seed(0)
    return DeepRank(**args)


def test_branch_sizes_follow_image_size():
    assert sum(branch_dims(224)) == 3072  # the original's hard-coded size at 224 px
    assert branch_dims(64) == [96 * 1 * 1, 96 * 2 * 2]
    with pytest.raises(ModelError, match="too small"):
        branch_dims(4)


@pytest.mark.parametrize("backbone,size", [("resnet18", 32), ("resnet18", 64), ("resnet34", 48), ("resnet50", 40)])
def test_output_shape_and_unit_norm(backbone, size):
    model = small(backbone=backbone, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_backbone_flag_takes_effect():
    a, b = small(backbone="resnet18"), small(backbone="resnet50")
    assert a.features.fc.__class__ is torch.nn.Identity
    assert a.conv_fc.in_features == 512 and b.conv_fc.in_features == 2048
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in b.parameters())
    with pytest.raises(ModelError, match="unknown --backbone"):
        small(backbone="vgg11")


def test_branches_are_wired_in():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for branch in model.branches:
            branch[0].weight.mul_(3.0).add_(0.5)
        after = model(x)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("which", ["conv5", "head", "all"])
def test_frozen_layers_do_not_change_and_trainable_ones_do(which):
    model = small(trainable=which).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    out = model(torch.randn(4, 3, 32, 32))
    (out[:2] - out[2:]).pow(2).sum().neg().backward()
    opt.step()
    model(torch.randn(4, 3, 32, 32))  # a second train-mode forward: BN statistics of frozen layers stay
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "embedding.weight" in changed and "branches.0.0.weight" in changed and "conv_fc.weight" in changed
    stem = {k for k in before if k.startswith("features.conv1.") or k.startswith("features.bn1.")}
    last = {k for k in before if k.startswith("features.layer4.") and "num_batches" not in k}
    if which == "all":
        assert stem & changed and last <= changed
    elif which == "conv5":
        assert not stem & changed and not {k for k in changed if k.startswith("features.layer3.")}
        assert last <= changed
    else:
        assert not {k for k in changed if k.startswith("features.")}


def test_save_load_round_trip(tmp_path):
    model = small(backbone="small_cnn").eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.model"
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9)
    save_checkpoint(path, model, opt, epoch=3, config={"lr": 0.1}, metrics={"loss": 0.5})
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["config"] == {"lr": 0.1} and raw["metrics"] == {"loss": 0.5}
    assert raw["model_args"]["backbone"] == "small_cnn" and "weights" not in raw["model_args"]
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.model"]  # no temp file left


def test_rebuild_needs_no_backbone_weights(tmp_path, monkeypatch):
    path = tmp_path / "m.model"
    save_checkpoint(path, small())

    def no_download(*args, **kwargs):
        raise AssertionError("rebuilding a checkpoint must not fetch weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    load_model(path)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "old.model"
    torch.save(small(backbone="small_cnn"), path)  # the original project's format: a whole pickled module
    with pytest.raises(PipelineError, match="pickled"):
        load_model(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "m.model"
    save_checkpoint(path, small(backbone="small_cnn"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["embed_dim"] = 32
    torch.save(ckpt, path)
    with pytest.raises(PipelineError, match="does not match"):
        load_model(path)
    torch.save({"something": 1}, path)
    with pytest.raises(PipelineError, match="not a DeepRank checkpoint"):
        load_model(path)


def test_local_weights_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = small(weights=str(path))
    assert torch.equal(model.features.conv1.weight, reference.conv1.weight)
    with pytest.raises(ModelError, match="does not fit resnet34"):
        small(backbone="resnet34", weights=str(path))
    with pytest.raises(ModelError, match="no such file"):
        small(weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_fail_with_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match="--weights PATH") as info:
        small(weights="imagenet")
    assert "\n" not in str(info.value)


def test_efficientnet_lite_needs_its_package_or_says_so():
    try:
        import efficientnet_lite_pytorch  # noqa: F401 - imported to see whether it is installed
    except ImportError:
        with pytest.raises(ModelError, match="requirements-pretrained.txt"):
            small(backbone="efficientnet_lite0")
        return
    model = small(backbone="efficientnet_lite0").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_unwrap_and_model_args_rebuild():
    model = small(trainable="head")
    rebuilt = DeepRank(**model.model_args)
    assert rebuilt.model_args == model.model_args
    assert deep_rank_net.unwrap(torch.nn.DataParallel(model)) is model


@pytest.mark.parametrize("which", ["conv5", "head", "all"])
def test_frozen_split_reproduces_the_backbone(which):
    model = small(trainable=which).train()
    trunk, tail = model.frozen_split()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tail(trunk(x)) if trunk is not None else tail(x)
        assert torch.equal(out, model.features(x))
    if which == "all":
        assert trunk is None
    else:
        assert not any(p.requires_grad for p in trunk.parameters())
        assert not any(m.training for m in trunk.modules())  # frozen BatchNorm keeps its statistics


def test_last_stage_is_what_conv5_trains_and_where_the_split_falls():
    """One adapter per backbone family decides the last stage: conv5 trains exactly it, and the
    frozen trunk is everything before it."""
    model = small(trainable="conv5")
    trained = {id(p) for p in model.features.parameters() if p.requires_grad}
    assert trained == {id(p) for p in model.features.layer4.parameters()}
    trunk, _ = model.frozen_split()
    assert not trained & {id(p) for p in trunk.parameters()}
    assert {id(p) for p in trunk.parameters()} | trained == {id(p) for p in model.features.parameters()}


def test_frozen_split_of_efficientnet_lite():
    pytest.importorskip("efficientnet_lite_pytorch")
    model = small(backbone="efficientnet_lite0", image_size=64).train()
    trunk, tail = model.frozen_split()
    assert not any(m.training for m in trunk.modules()) and model.features.net._blocks[-1].training
    model.eval()  # no drop-connect: deterministic
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tail(trunk(x)), model.features(x))
    trainable = {id(p) for p in model.features.parameters() if p.requires_grad}
    assert trainable and not any(id(p) in trainable for p in trunk.parameters())


def test_want_compile():
    cpu = torch.device("cpu")
    assert runtime.want_compile("off", 10 ** 9, 224, cpu) is False
    assert runtime.want_compile("on", 1, 32, cpu) is True
    assert runtime.want_compile("auto", 100, 224, cpu) is False  # too little work to repay compiling
    assert runtime.want_compile("auto", 10 ** 6, 224, cpu) == runtime.compiler_available(cpu)
    with pytest.raises(PipelineError, match="--compile"):
        runtime.want_compile("maybe", 1, 32, cpu)
    cuda = torch.device("cuda")  # the policy only: a GPU eager forward runs thousands of images a second
    assert runtime.compile_pays(3000, 224, cpu) and not runtime.compile_pays(4000, 224, cuda)
    assert runtime.compile_pays(10 ** 6, 224, cuda)
    assert not runtime.freeze_when_compiling(cuda, amp=True) and not runtime.freeze_when_compiling(cpu, amp=False)


def test_default_batch_follows_the_device_and_image_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # a CPU pass holds about 16 images of 224 px (measured fastest), more of smaller ones, at most 64
    assert [runtime.default_batch(cpu, size) for size in (224, 160, 128, 64, 32, 512)] == [16, 31, 49, 64, 64, 3]
    assert runtime.default_batch(cuda, 224) == runtime.default_batch(cuda, 64) == 64
    # a training batch of 75 images at 224 px passes through a CPU's frozen layers in 5 passes of 15; CUDA's whole
    assert runtime.frozen_rows(cpu, 75, 224) == 15 and runtime.frozen_rows(cpu, 12, 224) == 12
    assert runtime.frozen_rows(cpu, 64, 224) == 16 and runtime.frozen_rows(cpu, 75, 64) == 38
    assert runtime.frozen_rows(cuda, 75, 224) == 75


def test_eager_runner_passes_large_batches_in_chunks():
    model = small().eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    runner = runtime.FrozenRunner(model, batch_size=4)
    x = torch.randn(9, 3, 32, 32)
    out = runner(x)
    assert calls == [4, 4, 1] and not runner.compiled
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)


def test_fp32_switch_turns_bf16_off_for_the_whole_process(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(runtime.FP32_ENV, raising=False)
    native = "bf16" if runtime.bf16_supported(cpu) else "fp32"
    assert runtime.precision(cpu) == native and runtime.precision(cpu, amp=False) == "fp32"
    for value, expected in (("1", "fp32"), ("0", native), ("", native)):
        monkeypatch.setenv(runtime.FP32_ENV, value)
        assert runtime.precision(cpu) == expected
        with runtime.autocast(cpu):
            assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
    monkeypatch.setenv(runtime.FP32_ENV, "1")
    assert not runtime.freeze_when_compiling(cpu, amp=True)


@pytest.mark.parametrize("freeze", [True, False])
def test_compiled_runner_matches_eager_for_any_batch_size(freeze):
    """fp32 on every CPU (no autocast here): compiled and eager agree to 1e-4. What is tested is the
    runner around the compiled graph (padding, splitting, frozen weights with batch norm folded), so
    a conv-BN-ReLU-pool network stands for a backbone: it compiles in seconds."""
    if not runtime.compiler_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.nn.init.uniform_(model[1].running_mean, -0.5, 0.5)  # statistics that folding must carry
    torch.nn.init.uniform_(model[1].running_var, 0.5, 2.0)
    runner = runtime.FrozenRunner(model, batch_size=4, compile=True, freeze=freeze)
    x = torch.randn(9, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for rows in (4, 3, 9):  # full, padded, split into several batches
        out = runner(x[:rows])
        assert runner.compiled and out.shape == (rows, 16)
        assert torch.allclose(out, expected[:rows], atol=1e-4)


def test_fresh_head_starts_from_the_backbone():
    model = small()
    w = model.embedding.weight.detach()
    conv, branches = w[:, :model.conv_fc.out_features], w[:, model.conv_fc.out_features:]
    ratio = branches.abs().mean() / conv.abs().mean()
    assert ratio == pytest.approx(deep_rank_net.BRANCH_INIT, rel=0.2)


def test_flip_tta_is_mirror_invariant(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(pixels).save(paths[0])
    Image.fromarray(pixels[:, ::-1].copy()).save(paths[1])
    model = small().eval()
    cpu = torch.device("cpu")
    plain = torch.cat([v for v, _ in runtime.embed_batches(model, paths, cpu, num_workers=0, amp=False)])
    flip = torch.cat([v for v, _ in runtime.embed_batches(model, paths, cpu, num_workers=0, amp=False, tta="flip")])
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)
    assert torch.allclose(flip[0], flip[1], atol=1e-5)
    assert torch.allclose(flip, deep_rank_net.l2n(plain + plain.flip(0)), atol=1e-5)
    with pytest.raises(PipelineError, match="--tta"):
        list(runtime.embed_batches(model, paths, cpu, num_workers=0, tta="rotate"))


@pytest.mark.parametrize("backbone", [b for b in deep_rank_net.BACKBONES if b not in ("efficientnet_lite0",)])
def test_every_backbone_builds_runs_and_splits_at_its_last_stage(backbone):
    """One forward at 64 px; conv5 trains exactly the last stage; trunk then tail equals the backbone."""
    torch.manual_seed(0)
    model = DeepRank(backbone=backbone, image_size=64, embed_dim=8, conv_dim=16, trainable="conv5").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        trunk, tail = model.frozen_split()
        assert torch.allclose(tail(trunk(x)), model.features(x), atol=1e-5)
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    trained = {id(p) for p in model.features.parameters() if p.requires_grad}
    frozen = {id(p) for p in trunk.parameters()}
    assert trained and frozen and not trained & frozen
    assert trained | frozen == {id(p) for p in model.features.parameters()}


def test_no_branches_ablation_and_small_cnn_round_trip(tmp_path):
    model = small(backbone="small_cnn", branches=False)
    assert len(model.branches) == 0 and model.embedding.in_features == model.conv_fc.out_features
    path = tmp_path / "m.model"
    save_checkpoint(path, model)
    loaded, _ = load_model(path)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(model.eval()(x), loaded(x), atol=1e-6)
    with pytest.raises(ModelError, match="small_cnn has no pretrained weights"):
        small(backbone="small_cnn", weights="imagenet")
