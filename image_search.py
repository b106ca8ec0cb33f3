"""Stage 5: search a gallery by image. Which images of the gallery look most like this one?

A gallery is an embedding file written by gen_embeddings.py (text or .npy). Each query image
(or every image in a query folder) is embedded with the checkpoint that wrote the gallery (or its
export from export_model.py, run by onnxruntime: then this stage never imports torch), the
way the gallery was (its header names the checkpoint, layer, test-time augmentation and
precision; another checkpoint is refused unless --force), then its --k nearest gallery images
are printed: rank, squared L2 distance, label, path.

    python image_search.py --model deepranknet.model --gallery train_embedding.txt query.jpg more_queries/
    python image_search.py --gallery train_embedding.txt --json hits.json --grid hits.png query.jpg
    python image_search.py --pair a.jpg b.jpg --threshold_from metrics.json     # same class or not?
    python image_search.py --gallery train_embedding.txt --add new_photos/       # grow the gallery
    python image_search.py --serve --gallery train_embedding.txt                 # a web page on localhost:8000
    python image_search.py --serve --model deepranknet.onnx --gallery train_embedding.txt   # ... without torch

--index auto (the default) searches exactly below 200,000 gallery rows and with a faiss index
from there (pip install -r requirements-faiss.txt); the index is saved beside the gallery as
<gallery>.faiss and rebuilt when the gallery changes.
"""

import argparse
import json
import os
import sys

from deeprank.common import (
    MODEL,
    TRAIN_EMBEDDINGS,
    PipelineError,
    atomic_write,
    bad_image_flag,
    check_output_path,
    device_flag,
    non_negative_int,
    pair_threshold_from,
    positive_int,
    print_args,
    run_cli,
    workers_flag,
)
from deeprank.datasets import class_of, images_in
from deeprank.embedders import RUNTIMES
from deeprank.embedding_io import EmbeddingWriter, check_names, read_embeddings
from deeprank.images import BadImages
from deeprank.pictures import save_captioned_grid
from deeprank.search.index import INDEX_KINDS, NPROBE, extend_faiss, faiss_module, load_fresh_faiss
from deeprank.search.searcher import Searcher

# ---------------------------------------------------------------- hyperparameters
K = 10              # neighbours shown per query
BATCH_SIZE = None   # query images per forward pass; None: runtime.default_batch's (CPU: by image size)
QUERY_CHUNK = 1024  # query images embedded, then searched, at a time (a folder of any size in bounded memory)
PORT = 8000         # --serve
HOST = "127.0.0.1"  # --serve binds to this machine only unless told otherwise
MAX_UPLOAD_MB = 20  # --serve: larger uploads are refused
LABEL_WIDTH = 32    # the printout's label column (a longer class name is cut short)
RUNTIME = "torch"   # a checkpoint's runtime: torch | onnx
# ----------------------------------------------------------------


def build_parser():
    """image_search.py's flags; constants above are their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[device_flag(), workers_flag(), bad_image_flag()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("queries", nargs="*", metavar="QUERY", help="query images, or folders (every image inside)")
    a("--model", default=MODEL, help="the checkpoint that wrote the gallery, or its export (.onnx) "
                                     "(default: %(default)s)")
    a("--runtime", default=RUNTIME, choices=RUNTIMES,
      help="a checkpoint's runtime: torch, or onnx (onnxruntime runs its fp32 export, made once and kept beside "
           "it); an .onnx --model always runs in onnxruntime (default: %(default)s)")
    a("--gallery", default=TRAIN_EMBEDDINGS, help="embedding file to search, from gen_embeddings.py "
                                                  "(default: %(default)s)")
    a("--k", type=positive_int, default=K, help="neighbours per query (default: %(default)s)")
    a("--exclude_self", action="store_true", help="never return the gallery entry with the query's own path")
    a("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    a("--grid", default=None, metavar="PNG", help="save the queries and their neighbours as one captioned picture")
    a("--index", default="auto", choices=INDEX_KINDS,
      help="exact: brute force; faiss: an index saved beside the gallery; auto: exact below 200,000 rows "
           "(default: %(default)s)")
    a("--nprobe", type=positive_int, default=NPROBE,
      help="faiss IVF cells searched per query: more finds more of the true neighbours, slower "
           "(default: %(default)s)")
    a("--force", action="store_true", help="search a gallery that another checkpoint wrote")
    a("--class_names", default=None, metavar="FILE",
      help="id<TAB>name lines naming the gallery's labels (default: TinyImageNet's words.txt, found from the gallery's "
           "image paths; without names, labels stand for themselves)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE,
      help="images per forward pass (default: 64 on CUDA; on a CPU 16 at 224 px, more for smaller images, at most 64)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pair", nargs=2, metavar=("A", "B"),
                      help="print the distance between two images (and the decision, with a threshold)")
    mode.add_argument("--add", nargs="+", metavar="IMAGE",
                      help="embed these images (or folders) and append them to --gallery; the label is each "
                           "image's folder name")
    mode.add_argument("--serve", action="store_true", help="serve a search page on --host:--port")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, default=None,
                           help="--pair: same class when the squared distance is below this")
    threshold.add_argument("--threshold_from", default=None, metavar="JSON",
                           help="--pair: the pair_threshold that eval.py --pairs --calibrate wrote to its --json")
    a("--host", default=HOST, help="--serve: address to listen on (default: %(default)s, this machine only)")
    a("--port", type=non_negative_int, default=PORT, help="--serve: port (default: %(default)s)")
    a("--dev_server", action="store_true",
      help="--serve: Flask's development server instead of waitress (for debugging the page)")
    a("--max_upload_mb", type=positive_int, default=MAX_UPLOAD_MB,
      help="--serve: largest upload accepted (default: %(default)s MB)")
    return parser


SERVE_FLAGS = ("host", "port", "max_upload_mb", "dev_server")
SEARCH_FLAGS = ("k", "exclude_self", "json", "grid", "index", "nprobe", "class_names")


def unused_flags(args):
    """The flags this run does not read (left out of its printed arguments)."""
    unused = ("threshold", "threshold_from") if not args.pair else SEARCH_FLAGS
    if not args.serve:
        unused += SERVE_FLAGS
    return unused + (() if args.queries else ("queries",))


def check_args(parser, args):
    """Which flags go together."""
    if args.serve or args.add or args.pair:
        if args.queries:
            parser.error("query images cannot be given with --pair, --add or --serve")
    elif not args.queries:
        parser.error("give query images or folders (or --pair A B, --add IMAGES, --serve)")
    if (args.threshold is not None or args.threshold_from) and not args.pair:
        parser.error("--threshold and --threshold_from go with --pair")
    if args.dev_server and not args.serve:
        parser.error("--dev_server goes with --serve")
    for path in filter(None, (args.json, args.grid)):
        check_output_path(path)


# ----------------------------------------------------------------------------- searching

def search_queries(searcher, args, chunk):
    """Embed the queries and search, `chunk` queries at a time (memory holds one chunk's vectors
    and distances, whatever the number of queries); yield [{"query", "results"}] per chunk, in
    query order."""
    paths = images_in(args.queries, "QUERY")
    gallery = searcher.load_gallery()
    print(f"{len(paths)} queries against {len(gallery)} gallery images ({describe(searcher.index)})")
    if args.k > len(gallery) - int(args.exclude_self):
        print(f"warning: --k {args.k} is more than the {len(gallery) - int(args.exclude_self)} gallery images a query "
              f"can get; each gets them all", file=sys.stderr)
    skipped = BadImages(args.on_bad_image, None)
    for vectors, kept in searcher.embed_chunks(paths, skipped, rows=chunk):
        exclude = gallery.rows_of(kept) if args.exclude_self else None
        yield [{"query": query, "results": results}
               for query, results in zip(kept, searcher.search(vectors, args.k, exclude), strict=True)]
    if skipped.found:  # --on_bad_image skip: say which queries were left out
        shown = ", ".join(f"{path} ({reason})" for path, reason in sorted(skipped.found.items())[:10])
        print(f"warning: skipped {len(skipped.found)} unreadable query image(s): {shown}", file=sys.stderr)


def describe(index):
    return getattr(index, "description", "exact search")


def print_results(found, stream=None):
    stream = stream or sys.stdout
    for item in found:
        print(f"\nquery: {item['query']}", file=stream)
        print(f"{'rank':>5}  {'distance':>10}  {'label':<{LABEL_WIDTH}} path", file=stream)
        for hit in item["results"]:
            print(f"{hit['rank']:>5}  {hit['distance']:>10.6f}  {shown(hit):<{LABEL_WIDTH}} {hit['path']}", file=stream)


def shown(hit, width=LABEL_WIDTH):
    """A hit's class as printed, at most `width` characters: its name (cut short with '…' where
    needed) and id, or the label alone."""
    if not hit.get("name"):
        return hit["label"]
    text = f"{hit['name']} ({hit['label']})"
    if len(text) <= width:
        return text
    room = max(1, width - len(hit["label"]) - 4)
    return f"{hit['name'][:room]}… ({hit['label']})"


def write_json(path, found):
    """[{"query": path, "results": [{"rank", "distance", "label", "name", "path"}]}], atomically (name: the
    label's class name, or null)."""
    keys = ("rank", "distance", "label", "name", "path")
    clean = [{"query": item["query"], "results": [{key: hit[key] for key in keys} for hit in item["results"]]}
             for item in found]
    with atomic_write(path) as handle:
        json.dump(clean, handle, indent=2)
        handle.write("\n")


def save_grid(path, found, gallery):
    """One row per query: the query, then its neighbours captioned with class and distance, green
    where a neighbour has the query's label and red where not; without a known label (see
    query_label), no colour."""
    labels = set(gallery.labels)
    rows = []
    for item in found:
        label = query_label(item["query"], gallery, labels)
        rows.append([(item["query"], f"query\n{label or ''}", "black")] +
                    [(hit["path"], f"{hit['name'] or hit['label']}\nd={hit['distance']:.3f}",
                      "black" if label is None else "green" if hit["label"] == label else "red")
                     for hit in item["results"]])
    save_captioned_grid(path, rows)


def query_label(query, gallery, labels):
    """A query's label where it is known: its own gallery row's, else its class folder's name when
    the gallery has that label (an image of a labelled tree); None otherwise."""
    row = gallery.index_of(query)
    if row >= 0:
        return gallery.labels[row]
    folder = class_of(query)
    return folder if folder in labels else None


# ----------------------------------------------------------------------------- pairs

def read_threshold(args):
    """--threshold, or the pair_threshold in eval.py's --json; None when neither is given."""
    return args.threshold if args.threshold_from is None else pair_threshold_from(args.threshold_from)


def compare_pair(searcher, args):
    """The squared distance between two images and, with a threshold, same or different."""
    threshold = read_threshold(args)
    for item in args.pair:
        if os.path.isdir(item):
            raise PipelineError(f"--pair {item} is a folder; --pair takes two image files")
    paths = images_in(args.pair, "--pair")
    if len(paths) != 2:
        raise PipelineError("--pair needs two different image files")
    vectors, _ = searcher.embed(paths)
    distance = float(((vectors[0] - vectors[1]) ** 2).sum())
    print(f"distance {distance:.6f} (squared L2) between\n  {paths[0]}\n  {paths[1]}")
    if threshold is not None:
        print(f"{'same' if distance < threshold else 'different'} "
              f"(threshold {threshold:.6g}: same class when the distance is below it)")
    else:
        print("no threshold: to decide same or different, pass --threshold T, or --threshold_from metrics.json that "
              "eval.py --pairs PAIRS --calibrate OTHER_PAIRS --json metrics.json wrote")


# ----------------------------------------------------------------------------- adding

def add_to_gallery(searcher, args):
    """Embed the new images and append them to the gallery file (a new file renamed over it),
    and to its faiss index when that index is up to date."""
    gallery = read_embeddings(args.gallery, mmap=True)
    paths = images_in(args.add, "--add")
    new = [p for p in paths if gallery.index_of(p) < 0]
    if len(new) < len(paths):
        print(f"{len(paths) - len(new)} of the images are in the gallery already; left as they are")
    if not new:
        return
    check_names(new, [class_of(p) for p in new])
    index = None
    try:
        index = load_fresh_faiss(args.gallery, len(gallery))
    except PipelineError:  # faiss not installed: no index to keep up to date
        pass
    vectors, kept = searcher.embed(new)
    with EmbeddingWriter.like(args.gallery, gallery.header) as writer:
        writer.copy_rows(args.gallery, len(gallery))
        writer.write(kept, [class_of(p) for p in kept], vectors)
    print(f"added {len(kept)} images to {args.gallery} ({writer.count} rows now)")
    if index is not None:
        extend_faiss(index, args.gallery, vectors)
        print("added them to its faiss index too")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.add:
        check_output_path(args.gallery)
    if args.index == "faiss":
        faiss_module()  # a clear message now, not after embedding
    pair_gallery = args.gallery if not args.pair or os.path.exists(args.gallery) else None
    searcher = Searcher(args.model, pair_gallery, args.device, args.index, args.nprobe, args.force, args.batch_size,
                        args.num_workers, args.on_bad_image, names_file=args.class_names, runtime=args.runtime)
    print_args("image_search.py", args, skip=unused_flags(args), precision=searcher.precision)
    if args.pair:
        compare_pair(searcher, args)
    elif args.add:
        add_to_gallery(searcher, args)
    elif args.serve:
        from deeprank.search.web import serve
        serve(searcher, args.host, args.port, args.k, args.max_upload_mb, args.dev_server)
    else:
        found = []
        for chunk in search_queries(searcher, args, QUERY_CHUNK):
            print_results(chunk)
            found += chunk
        if args.json:
            write_json(args.json, found)
            print(f"wrote {args.json}")
        if args.grid:
            save_grid(args.grid, found, searcher.load_gallery())
            print(f"saved {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
