"""Benchmark triplet_sampler.py on a full-size TinyImageNet train tree (200 classes x 500 images).

The files are empty (the sampler only lists paths). Prints the median wall time of the
whole stage (listing + sampling + CSV writing) and of sampling alone, over --repeats runs.

    python -m bench.bench_sampler --num_pos_images 2 --num_neg_images 2
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import triplet_sampler
from deeprank.datasets import list_split

ROOT = Path(__file__).resolve().parents[1]


def make_tree(root, classes, images):
    """An empty-file TinyImageNet train/ tree with the given size."""
    for c in range(classes):
        wnid = f"n{c:08d}"
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"{wnid}_{i}.JPEG").touch()
    (root / "wnids.txt").write_text("".join(f"n{c:08d}\n" for c in range(classes)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--num_pos_images", type=int, default=2)
    parser.add_argument("--num_neg_images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tiny"
        make_tree(root, args.classes, args.images)
        _, labels = list_split(root, "train")
        stage, sampling = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            triplet_sampler.sample_triplets(labels, args.num_pos_images, args.num_neg_images, seed=r)
            sampling.append(time.perf_counter() - start)
            start = time.perf_counter()
            triplet_sampler.main(["--data", str(root), "--training", "1", "--num_pos_images",
                                  str(args.num_pos_images), "--num_neg_images", str(args.num_neg_images),
                                  "--out", str(Path(tmp) / "t.csv"), "--seed", str(r)])
            stage.append(time.perf_counter() - start)
    rows = args.classes * args.images * args.num_pos_images * args.num_neg_images
    print(f"triplet_sampler: {args.classes} classes x {args.images} images, N={args.num_pos_images} "
          f"M={args.num_neg_images}, {rows} rows")
    print(f"  whole stage (list + sample + write CSV): median {statistics.median(stage):.2f} s "
          f"over {args.repeats} runs")
    print(f"  sampling alone:                          median {statistics.median(sampling):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
