"""The commands in README.md and docs/ run as written: every `python STAGE.py ...`, `torchrun ...
STAGE.py ...` and `python -m bench.NAME ...` line of their shell blocks is parsed by that script's own
argument parser (train_net.py's loss-flag refusals included), so a renamed or removed flag, or a
flag a stage refuses, fails here. The commands' files are not needed: nothing runs past parsing."""

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

import train_net
from deeprank.loss_flags import check_loss_flags, given_flags
from deeprank.training import resolve_batches

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands():
    """(page, command words) of every stage or benchmark command in the pages' ```bash blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "-m" in words and words[words.index("-m") + 1].startswith("bench."):
                    found.append((page.name, words[words.index("-m") + 1:]))
                else:
                    stage = next((i for i, w in enumerate(words) if w.endswith(".py") and (ROOT / w).is_file()), None)
                    if stage is not None:
                        found.append((page.name, words[stage:]))
    return found


class Parsed(Exception):
    """Raised once a script's parser has accepted its arguments."""


@pytest.mark.parametrize("page,words", commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_a_documented_command_parses(page, words, monkeypatch):
    name, argv = words[0].removesuffix(".py").replace("/", "."), words[1:]
    if name == "train_net":
        parser = train_net.build_parser()
        args = parser.parse_args(argv)
        given = given_flags(parser, argv)
        resolve_batches(args, given)
        check_loss_flags(args, given)
        return
    module = importlib.import_module(name)
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    monkeypatch.setattr(sys, "argv", [words[0], *argv])
    with pytest.raises(Parsed):
        module.main(argv) if "argv" in module.main.__code__.co_varnames else module.main()


def test_the_pages_hold_commands_of_every_stage():
    stages = {words[0] for _, words in commands()}
    assert {"transform_validation.py", "triplet_sampler.py", "train_net.py", "gen_embeddings.py", "eval.py",
            "image_search.py", "find_duplicates.py"} <= stages
