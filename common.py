"""What every stage and helper shares, without torch: the one-line error, the CLI wrapper, the
flags that several stages take, the default file names between stages, and the path and
atomic-write rules of every file the pipeline writes.

    from common import PipelineError, data_flag, print_args, run_cli

Path rule: a relative path inside a file (triplet CSVs, embedding files) is relative to *that
file's folder*, never to the current working directory, so the files work from anywhere and
move together with the data.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

# ---------------------------------------------------------------- the files between stages
DATA = "tiny-imagenet-200"                     # dataset root (TinyImageNet layout)
TRAIN_TRIPLETS = "training_triplet_sample.csv"  # triplet_sampler.py --training 1
VAL_TRIPLETS = "val_triplet_sample.csv"         # triplet_sampler.py --training 0
MODEL = "deepranknet.model"                     # train_net.py's final checkpoint
TRAIN_EMBEDDINGS = "train_embedding.txt"        # gen_embeddings.py's outputs, eval.py's inputs
TEST_EMBEDDINGS = "test_embedding.txt"
NUM_WORKERS = 2                                 # image-loading worker processes
# ----------------------------------------------------------------


class PipelineError(Exception):
    """Bad input or state the user can fix: reported as one line, exit status 1."""


def run_cli(main, argv=None):
    """Run a stage's main(); a PipelineError becomes one 'error:' line and exit status 1."""
    try:
        return main(argv) or 0
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- flags
# Each shared flag is its own argparse parent, so a stage takes exactly the flags it reads:
#     argparse.ArgumentParser(parents=[data_flag(), seed_flag()])

def _parent(*args, **kwargs):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(*args, **kwargs)
    return parser


def data_flag(default=DATA):
    """--data: the dataset root."""
    return _parent("--data", default=default, help="dataset root in TinyImageNet layout (default: %(default)s)")


def seed_flag():
    """--seed: same seed, same output."""
    return _parent("--seed", type=int, default=0, help="random seed; same seed, same output (default: %(default)s)")


def device_flag():
    """--device: where the network runs."""
    return _parent("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default: %(default)s)")


def workers_flag():
    """--num_workers: image-loading processes."""
    return _parent("--num_workers", type=int, default=NUM_WORKERS,
                   help="image-loading worker processes; 0 loads in the main process (default: %(default)s)")


def print_args(stage, args, stream=None):
    """Print a stage's arguments once, sorted, so a log shows exactly what ran."""
    stream = stream or sys.stdout
    print(f"{stage} arguments:", file=stream)
    for key, value in sorted(vars(args).items()):
        print(f"  {key}: {value}", file=stream)


# ----------------------------------------------------------------------------- paths and files

def resolve_in(path, folder):
    """A path read from a file: relative paths are relative to that file's folder."""
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(folder, path))


def relative_to_file(path, file_path):
    """Inverse of resolve_in: how a file at file_path refers to path (relative, '/' separated)."""
    folder = os.path.dirname(os.path.abspath(file_path))
    return os.path.relpath(os.path.abspath(path), folder).replace(os.sep, "/")


def check_output_path(path):
    """Refuse an output path whose folder does not exist, before any work is done."""
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise PipelineError(f"cannot write {path}: folder {folder} does not exist; create it or pick another path")
    return Path(path).expanduser()


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8", newline=None):
    """Open a temp file beside path; rename it over path only if the block succeeds.

    Readers never see a half-written output, and a failure leaves no partial file.
    """
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        if "b" in mode:
            handle = os.fdopen(fd, mode)
        else:
            handle = os.fdopen(fd, mode, encoding=encoding, newline=newline)
        with handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
