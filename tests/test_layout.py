"""The project's shape: imports flow one way (stages -> helpers -> common), no stage imports
another, the torch-free modules stay torch-free, and each stage takes only the flags it reads."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = {"synthetic_data", "transform_validation", "triplet_sampler", "train_net", "gen_embeddings", "eval",
          "image_search"}
# helper -> the project modules it may import (its place in the one-way order)
HELPERS = {
    "common": set(),
    "fastparse": set(),
    "datasets": {"common"},
    "embedding_io": {"common", "fastparse"},
    "loaders": {"common"},
    "losses": set(),
    "metrics": {"common"},
    "deep_rank_net": {"common"},
    "runtime": {"common", "deep_rank_net", "loaders"},
    "distributed": {"common", "runtime"},
    "pictures": {"common", "loaders"},
    "search_index": {"common", "embedding_io", "metrics"},
    "searcher": {"common", "deep_rank_net", "embedding_io", "loaders", "runtime", "search_index"},
    "search_web": {"common", "loaders"},
}
TORCH_FREE = ("common", "datasets", "embedding_io", "fastparse", "synthetic_data", "transform_validation",
              "triplet_sampler")


def project_imports(name):
    """The project modules that ROOT/<name>.py imports, anywhere in the file."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & (STAGES | set(HELPERS))


def test_every_module_is_known():
    modules = {path.stem for path in ROOT.glob("*.py")}
    assert modules == STAGES | set(HELPERS)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_imports_another_stage(name):
    assert not project_imports(name) & STAGES


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helpers_import_only_lower_helpers(name):
    assert project_imports(name) <= HELPERS[name]


def test_torch_free_modules_do_not_load_torch():
    code = f"import sys; import {', '.join(TORCH_FREE)}; print('torch' in sys.modules)"
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
