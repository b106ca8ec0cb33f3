"""Stage 3: embed images with a trained checkpoint.

Reads a .model checkpoint and the images named by the train and test triplet CSVs (or,
with --data, every image of a split); writes train_embedding.txt and test_embedding.txt
(header line, then path<TAB>label<TAB>vector per image, paths relative to the file).
Each distinct image is embedded exactly once, however many triplets name it; rows are
streamed to disk, and the files appear atomically when complete. Prints the share of
train and test triplets ranked correctly (the original's "similarity precision").

    python gen_embeddings.py --model deepranknet.model
"""

import argparse
import collections
import concurrent.futures
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deeprank.common import (
    COMPILE,
    COMPILE_CHOICES,
    MODEL,
    TEST_EMBEDDINGS,
    TRAIN_EMBEDDINGS,
    TRAIN_TRIPLETS,
    TTA_CHOICES,
    VAL_TRIPLETS,
    PipelineError,
    bad_image_flag,
    check_output_path,
    dataset_flags,
    device_flag,
    positive_int,
    preprocess_flag,
    print_args,
    run_cli,
    workers_flag,
)
from deeprank.datasets import ImageSource, check_images_exist, class_of, unique_in_order
from deeprank.embedders import RUNTIMES, open_embedder
from deeprank.embedding_io import EmbeddingWriter, check_names, paths_file_of, read_embeddings
from deeprank.images import BadImages
from deeprank.sample_csv import read_triplet_csv, readable_triplets, triplet_rows

# ---------------------------------------------------------------- hyperparameters
BATCH_SIZE = None               # images per forward pass; None: runtime.default_batch's (CPU: by image size)
TTA = None                      # test-time augmentation: none | flip (image + mirror image, 2 passes); None:
                                # an exported model's, a checkpoint's none
RUNTIME = "torch"               # a checkpoint's runtime: torch | onnx (its fp32 export, kept beside it)
# ----------------------------------------------------------------


def build_parser():
    """gen_embeddings.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[dataset_flags(data_default=None), device_flag(),
                                                                   workers_flag(), bad_image_flag(), preprocess_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--model", default=MODEL, help="checkpoint from train_net.py, or a model from export_model.py (.onnx) "
                                     "(default: %(default)s)")
    a("--runtime", default=RUNTIME, choices=RUNTIMES,
      help="a checkpoint's runtime: torch, or onnx (onnxruntime runs its fp32 export, made once and kept beside "
           "it); an .onnx --model always runs in onnxruntime (default: %(default)s)")
    a("--train_triplets", default=TRAIN_TRIPLETS, help="train triplet CSV (default: %(default)s)")
    a("--test_triplets", default=VAL_TRIPLETS, help="test triplet CSV (default: %(default)s)")
    a("--split", default="both", choices=("train", "val", "both"),
      help="with --data: embed every image of train/, val/ or both instead of the CSVs' (default: %(default)s)")
    a("--train_out", default=TRAIN_EMBEDDINGS, help="train embedding file (default: %(default)s)")
    a("--test_out", default=TEST_EMBEDDINGS, help="test embedding file (default: %(default)s)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE,
      help="images per forward pass (default: 64 on CUDA; on a CPU 16 at 224 px, more for smaller images, at most 64)")
    a("--layer", default=None, choices=("embedding", "backbone"),
      help="embedding: DeepRank's output; backbone: the backbone's pooled features, L2-normalised "
           "(a baseline) (default: an exported model's, else embedding)")
    a("--tta", default=TTA, choices=TTA_CHOICES,
      help="test-time augmentation: flip embeds each image and its mirror image and keeps their normalised "
           "sum (two forward passes) (default: an exported model's, else none)")
    a("--no_amp", action="store_true", help="embed in fp32 even where bf16 autocast is available")
    a("--compile", default=COMPILE, choices=COMPILE_CHOICES,
      help="torch.compile the network with its weights frozen; auto: when there are enough images to repay "
           "compiling (default: %(default)s)")
    return parser


def plan_outputs(args):
    """([(output file, [image paths], triplet columns or None)] for the files to write, {path:
    label} from --data (None: labels are the class folders), the ImageSource or None)."""
    plans, labels = [], None
    if args.data:
        splits = {"train": [("train", args.train_out)], "val": [("val", args.test_out)],
                  "both": [("train", args.train_out), ("val", args.test_out)]}[args.split]
        dataset, labels = ImageSource.from_args(args), {}
        for split, out in splits:
            paths, split_labels = dataset.split(split)
            check_images_exist(paths, f"--data {args.data} ({split})", empty_ok=args.on_bad_image == "skip")
            labels.update(zip(paths, split_labels, strict=True))
            plans.append((out, paths, None))
        return plans, labels, dataset
    else:
        for csv, out in ((args.train_triplets, args.train_out), (args.test_triplets, args.test_out)):
            columns = read_triplet_csv(csv)
            paths = unique_in_order(*columns)
            check_images_exist(paths, csv, empty_ok=args.on_bad_image == "skip")
            plans.append((out, paths, columns))
    return plans, labels, None


class Outputs:
    """The files of one run, written as batches arrive: each plan's embedding file (a row goes
    to every file that lists its image) and a disk-backed array of every vector, in arrival
    order, for the triplet scores. Text formatting runs on a thread, overlapping the next batch's
    forward pass (which releases the GIL); at most two batches wait, so memory stays flat."""

    def __init__(self, plans, dim, header_model, source, label_of, total):
        self.label_of, self.row, self.start = label_of, {}, 0
        self.members = [set(paths) for _, paths, _ in plans]
        folder = os.path.dirname(os.path.abspath(plans[0][0]))
        handle, scratch = tempfile.mkstemp(prefix=".embeddings.", suffix=".f32", dir=folder)
        os.close(handle)
        self.vectors = np.memmap(scratch, dtype=np.float32, mode="w+", shape=(max(1, total), dim))
        os.unlink(scratch)  # the mapping keeps the space until it is closed; nothing left behind on a crash
        self.writers = [EmbeddingWriter(out, dim, True, header_model, source) for out, _, _ in plans]
        for writer in self.writers:
            writer.__enter__()
        self.pool, self.pending = concurrent.futures.ThreadPoolExecutor(1), collections.deque()

    def add(self, paths, batch):
        """One batch: paths and their (n, D) float32 vectors."""
        self.vectors[self.start:self.start + len(batch)] = batch
        self.row.update((path, self.start + i) for i, path in enumerate(paths))
        self.start += len(batch)
        self.pending.append(self.pool.submit(self._write_rows, paths, batch))
        while len(self.pending) > 2:
            self.pending.popleft().result()

    def _write_rows(self, paths, batch):
        labels = [self.label_of[p] for p in paths]
        for writer, member in zip(self.writers, self.members, strict=True):
            keep = [i for i, p in enumerate(paths) if p in member]
            if keep:
                writer.write([paths[i] for i in keep], [labels[i] for i in keep], batch[keep])

    def close(self, exc_info=(None, None, None)):
        """Finish (or, given an exception, abandon) every file; returns the files' row counts."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()
            for writer in self.writers:
                writer.__exit__(*exc_info)
        return [writer.count for writer in self.writers]


def write_outputs(plans, dim, header_model, source, label_of, total, batches):
    """Feed (paths, vectors) batches into Outputs; (vectors, {path: row}, row counts)."""
    outputs = Outputs(plans, dim, header_model, source, label_of, total)
    try:
        for paths, batch in batches:
            outputs.add(paths, batch)
    except BaseException:
        outputs.close(sys.exc_info())
        raise
    return outputs.vectors, outputs.row, outputs.close()


def embedded(embedder, paths, bad_images, show=True):
    """(paths, vectors) batches of the images that could be read, in order, with a progress bar (if show)."""
    bar = tqdm(total=len(paths), desc="embedding", unit="img", dynamic_ncols=True, leave=False,
               disable=None if show else True)
    for batch, rows in embedder.batches(paths, bad_images, bar):
        yield [paths[i] for i in rows], batch
    bar.close()


def shard_batches(shards, union, rows=4096):
    """(paths, vectors) batches read back from the ranks' shard files, in rank order (paths as
    union spells them)."""
    spelled = {os.path.abspath(p): p for p in union}
    for shard in shards:
        part = read_embeddings(shard, mmap=True)
        for start in range(0, len(part), rows):
            yield ([spelled[p] for p in part.paths[start:start + rows]],
                   np.asarray(part.vectors[start:start + rows]))


def embed_to_files(embedder, plans, header_model, bad_images, label_of=None, cluster=None):
    """Embed the union of all plans' images once; stream each row to every file that lists it.

    The files' headers name header_model and the embedder's source(). Returns (vectors (N, D) on
    disk, {path: row of vectors}) of the images embedded, for the
    triplet scores, and the files' row counts. Unreadable images go to bad_images. Under
    torchrun each rank embeds its contiguous share of the images into a shard file beside the
    outputs; rank 0 then merges the shards, in order, into the same files one process writes
    (other ranks return None).
    """
    union = unique_in_order(*(paths for _, paths, _ in plans))
    label_of = label_of or {p: class_of(p) for p in union}
    check_names(union, [label_of[p] for p in union])
    dim, source = embedder.dim, embedder.source()
    if cluster is None or not cluster.distributed:
        return write_outputs(plans, dim, header_model, source, label_of, len(union),
                             embedded(embedder, union, bad_images))
    first = Path(plans[0][0]).resolve()
    shards = [first.with_name(f".{first.stem}.shard{r}of{cluster.world_size}.npy") for r in range(cluster.world_size)]
    mine = cluster.part(union)
    try:
        write_outputs([(shards[cluster.rank], mine, None)], dim, header_model, source, label_of, len(mine),
                      embedded(embedder, mine, bad_images, show=cluster.main))
        bad_images.merge(cluster.gather_objects(bad_images.found))  # every rank's skips, for rank 0's report
        if not cluster.main:
            return None
        return write_outputs(plans, dim, header_model, source, label_of, len(union), shard_batches(shards, union))
    finally:
        cluster.barrier()  # rank 0 has read every shard
        if cluster.main:
            for shard in shards:
                for path in (shard, paths_file_of(shard)):
                    path.unlink(missing_ok=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    for out in (args.train_out, args.test_out):
        check_output_path(out)
    both = args.data is None or args.split == "both"
    if both and os.path.abspath(args.train_out) == os.path.abspath(args.test_out):
        raise PipelineError(f"--train_out and --test_out are the same file ({args.train_out}); give them two names")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: no process group (nor torch, for an export)
        return embed_run(args, None, args.device)
    from deeprank.distributed import Cluster
    cluster, device = Cluster.start(args.device)
    return cluster.run(embed_run, args, cluster, device)


def embed_run(args, cluster, device):
    """The run, once the process (group) is up: rank 0 alone prints and writes the outputs (cluster
    None: one process)."""
    main = cluster is None or cluster.main
    plans, label_of, dataset = plan_outputs(args)  # every listed image checked before the model loads
    embedder = open_embedder(args.model, args.runtime, args.layer, args.tta, device, not args.no_amp, args.batch_size,
                             args.num_workers, args.compile, args.preprocess,
                             log=print if main else lambda *_: None)
    args.batch_size = embedder.batch_size
    if main:
        print_args("gen_embeddings.py", args, precision=embedder.precision, runs_in=embedder.runtime)
    first = Path(plans[0][0])
    bad_images = BadImages(args.on_bad_image, first.with_name(f"{first.stem}_bad_images.txt"))
    # the header says how the vectors were made (embedder.source()), so image_search.py embeds queries the same way
    result = embed_to_files(embedder, plans, os.path.abspath(args.model), bad_images, label_of, cluster)
    if result is None:  # a rank other than 0: its share is in rank 0's files
        return 0
    vectors, row, counts = result
    if dataset is not None and dataset.write_selection(first.with_name(f"{first.stem}_selection.csv")):
        print(f"wrote the --top_classes / --per_class selection to {first.with_name(f'{first.stem}_selection.csv')}")
    for (out, _, columns), name, count in zip(plans, ("train", "test"), counts, strict=False):
        print(f"wrote {count} embeddings to {out}")
        if columns is not None:
            columns, dropped = readable_triplets(columns, row)
            index = triplet_rows(columns, row, out, "was not embedded")
            from deeprank.metrics import triplet_accuracy  # imports torch: not for an export's run without triplets
            accuracy = triplet_accuracy(vectors, *index)
            left_out = f" ({dropped} naming a skipped image left out)" if dropped else ""
            print(f"{name} triplets ranked correctly (similarity precision): {100 * accuracy:.2f}% "
                  f"of {len(index[0])}{left_out}")
    if bad_images.write_report():
        print(f"warning: {bad_images.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
