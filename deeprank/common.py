"""What every stage and helper shares, without torch: the one-line error, the CLI wrapper, the
flags that several stages take, the default file names between stages, and the path and
atomic-write rules of every file the pipeline writes.

    from deeprank.common import PipelineError, data_flag, print_args, run_cli

Path rule: a relative path inside a file (triplet CSVs, embedding files) is relative to *that
file's folder*, never to the current working directory, so the files work from anywhere and
move together with the data.
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# ---------------------------------------------------------------- the files between stages
DATA = "tiny-imagenet-200"                     # dataset root (TinyImageNet layout)
TRAIN_TRIPLETS = "training_triplet_sample.csv"  # triplet_sampler.py --training 1
VAL_TRIPLETS = "val_triplet_sample.csv"         # triplet_sampler.py --training 0
# triplet_sampler.py --kind pairs / triples: training_pair_sample.csv, val_triple_sample.csv, ...
SAMPLE_FILES = {(kind, training): f"{'training' if training else 'val'}_{kind[:-1]}_sample.csv"
                for kind in ("triplets", "pairs", "triples") for training in (0, 1)}
MODEL = "deepranknet.model"                     # train_net.py's final checkpoint
TRAIN_EMBEDDINGS = "train_embedding.txt"        # gen_embeddings.py's outputs, eval.py's inputs
TEST_EMBEDDINGS = "test_embedding.txt"
NUM_WORKERS = 2                                 # image-loading worker processes
ON_BAD_IMAGE = "error"                          # an image that cannot be decoded: error | skip
BAD_IMAGE_POLICIES = ("error", "skip")
PREPROCESS_CHOICES = ("auto", "cpu", "device")   # --preprocess
TTA_CHOICES = ("none", "flip")                   # --tta: test-time augmentation
COMPILE = "auto"                                 # --compile default of the stages that run a network
COMPILE_CHOICES = ("auto", "on", "off")
# ----------------------------------------------------------------


class PipelineError(Exception):
    """Bad input or state the user can fix: reported as one line, exit status 1."""


def run_cli(main, argv=None):
    """Run a stage's main(); a PipelineError, or an OSError the stage did not foresee (a full
    disk, a folder turned read-only mid-run), becomes one 'error:' line and exit status 1."""
    try:
        return main(argv) or 0
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; free space or fix the permissions, then rerun", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def first_line(err, limit=160):
    """The first non-empty line of an exception's message (or its type), for one-line errors."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


# ----------------------------------------------------------------------------- flag value types

def _number(kind, low, inclusive):
    """An argparse type: kind(text) that must be > low (>= low when inclusive)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, not {text}")
        return value
    return parse


positive_int = _number(int, 0, inclusive=False)      # 1, 2, ...
non_negative_int = _number(int, 0, inclusive=True)   # 0, 1, ...
positive_float = _number(float, 0.0, inclusive=False)
non_negative_float = _number(float, 0.0, inclusive=True)


def fraction(text):
    """An argparse type: a share in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, not {text}")
    return value


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


def dataset_flags(data_default=DATA):
    """--data and how to read it: the layout, the split of layouts without split folders, and a
    label CSV's columns and selection."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("dataset")
    a = group.add_argument
    a("--data", default=data_default,
      help="dataset: a TinyImageNet root, an ImageFolder tree (ROOT/train|val|test/<class>/*, or ROOT/<class>/*), "
           "or a CSV of image paths and labels (default: %(default)s)")
    a("--layout", default=None, choices=("tinyimagenet", "imagefolder", "csv"),
      help="force the layout instead of detecting it from --data")
    a("--val_fraction", type=float, default=0.2,
      help="layouts without split folders or a split column: the share of each class held out as val "
           "(default: %(default)s)")
    a("--split_seed", type=non_negative_int, default=0,
      help="the seed of that split (apart from --seed, so training seeds never move images between splits) "
           "(default: %(default)s)")
    a("--path_column", default="filename", help="label CSV: the image path column (default: %(default)s)")
    a("--label_column", default="label", help="label CSV: the label column (default: %(default)s)")
    a("--image_root", default=None, help="label CSV: the folder its paths are relative to (default: the CSV's)")
    a("--top_classes", type=non_negative_int, default=0,
      help="label CSV: keep the N most frequent labels (0: all); the selection is written beside the output as "
           "<output stem>_selection.csv, reusable as --data")
    a("--per_class", type=non_negative_int, default=0, help="label CSV: keep K images of each label (0: all)")
    return parser


def seed_flag():
    """--seed: same seed, same output."""
    return _parent("--seed", type=int, default=0, help="random seed; same seed, same output (default: %(default)s)")


def device_flag():
    """--device: where the network runs."""
    return _parent("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default: %(default)s)")


def workers_flag():
    """--num_workers: image-loading processes."""
    return _parent("--num_workers", type=non_negative_int, default=NUM_WORKERS,
                   help="image-loading worker processes; 0 loads in the main process (default: %(default)s)")


def bad_image_flag():
    """--on_bad_image: what an image that cannot be decoded does."""
    return _parent("--on_bad_image", default=ON_BAD_IMAGE, choices=BAD_IMAGE_POLICIES,
                   help="an image file that cannot be decoded (truncated, empty, not an image, too large): error "
                        "stops with its name; skip leaves it out and lists it in <output>_bad_images.txt "
                        "(default: %(default)s)")


def preprocess_flag():
    """--preprocess: where images are resized (and, training, augmented)."""
    return _parent("--preprocess", default="auto", choices=PREPROCESS_CHOICES,
                   help="where images are resized (and, training, augmented): device (the workers only decode; the "
                        "GPU resizes, augments and normalises whole batches), cpu (the workers), auto: device on "
                        "CUDA (default: %(default)s)")


def print_args(stage, args, stream=None, skip=(), **resolved):
    """Print a stage's arguments once, sorted, so a log shows exactly what ran; skip: flags this run
    does not read (left out); resolved: values the stage decided from them and the machine (e.g.
    precision=bf16), printed among them."""
    stream = stream or sys.stdout
    print(f"{stage} arguments:", file=stream)
    for key, value in sorted({**vars(args), **resolved}.items()):
        if key not in skip:
            print(f"  {key}: {value}", file=stream)


def pair_threshold_from(path):
    """The pair_threshold that eval.py --pairs --calibrate wrote to its --json (a --threshold_from flag)."""
    try:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot read --threshold_from {path} ({err}); give eval.py's --json output") from None
    value = metrics.get("pair_threshold") if isinstance(metrics, dict) else None
    if not isinstance(value, (int, float)):
        raise PipelineError(f"{path} has no pair_threshold; write one with eval.py --pairs PAIRS --calibrate "
                            f"OTHER_PAIRS --json {path}")
    return float(value)


# ----------------------------------------------------------------------------- paths and files

def resolve_in(path, folder):
    """A path read from a file: relative paths are relative to that file's folder."""
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(folder, path))


class RelativeTo:
    """Inverse of resolve_in for many paths: how a file at file_path refers to each path (relative,
    '/' separated), with one os.path.relpath per folder rather than per path."""

    def __init__(self, file_path):
        self.folder, self.folders = os.path.dirname(os.path.abspath(file_path)), {}

    def __call__(self, path):
        parent, name = os.path.split(os.path.abspath(path))
        rel = self.folders.get(parent)
        if rel is None:
            rel = self.folders[parent] = os.path.relpath(parent, self.folder).replace(os.sep, "/")
        return name if rel == "." else f"{rel}/{name}"


HASH_CHUNK = 1 << 20  # bytes read at a time by sha256_of


def sha256_of(path, limit=None):
    """The SHA-256 (a hashlib object) of a file's bytes, or of its first `limit` bytes, read in
    HASH_CHUNK pieces: the project's one file hash (hashlib's own file helper needs Python 3.11)."""
    digest, left = hashlib.sha256(), float("inf") if limit is None else limit
    with open(path, "rb") as handle:
        while left > 0:
            chunk = handle.read(int(min(HASH_CHUNK, left)))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest


def file_digest(path, length=16):
    """The first `length` hex digits of a file's SHA-256: which exact checkpoint made a file."""
    return sha256_of(path).hexdigest()[:length]


def check_output_path(path):
    """Refuse an output path whose folder does not exist or cannot be written, before any work
    is done (a file is created and removed there: permissions alone do not tell, for root or on
    a read-only file system)."""
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise PipelineError(f"cannot write {path}: folder {folder} does not exist; create it or pick another path")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise PipelineError(f"cannot write {path}: folder {folder} is not writable ({err.strerror}); "
                            f"pick another output folder") from None
    return Path(path).expanduser()


def _temp_prefix(path):
    """Hidden temp files of an output: .<name>.<pid>.<random>.tmp beside it."""
    return f".{path.name}.{os.getpid()}."


def _remove_stale_temps(path):
    """Delete temp files of path left by a process that no longer runs (killed mid-write)."""
    folder, stem = path.resolve().parent, f".{path.name}."
    for entry in os.scandir(folder):
        name = entry.name
        if not (name.startswith(stem) and name.endswith(".tmp")):
            continue
        pid = name[len(stem):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        except PermissionError:  # alive, another user's
            pass


def _umask():
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8", newline=None):
    """Open a temp file beside path; rename it over path only if the block succeeds.

    Readers never see a half-written output, and a failure leaves no partial file. The file gets
    the permissions of any new file (0666 less the umask). Temp files of earlier runs that were
    killed mid-write are removed.
    """
    path = check_output_path(path)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.resolve().parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
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
