"""Benchmark: find_duplicates.py --calibrate_copies on folders that already hold duplicates.

For each --shares value s: every image of --data (TinyImageNet layout) plus planted copies of
random ones, so that copies make up s of the folder (bench_duplicates.make_collection, its
combined recipe: two modifications a copy, at other strengths than the calibration's own
copies); embedded with --model and --embed_flags; then --calibrate_copies N synthetic copies
made, embedded and searched as find_duplicates.py does (deeprank.calibration), and thresholds chosen from them:
--precision's (the rule find_duplicates.py has used: the most copies kept while that share of the
pairs they form below it, with their originals and every neighbour, are copy and original) and
each of --recalls' (the threshold that keeps that share of the copies, whatever the folder holds).
Each threshold is scored on the planted pairs:
pairs closer than it over the whole folder, against the (original, copy) pairs.

    python -m bench.bench_calibration --model pretrained.model --embed_flags "--layer backbone --tta flip"
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.bench_duplicates import make_collection
from deeprank.calibration import calibration_pairs
from deeprank.datasets import list_split
from deeprank.duplicates import close_pairs, copy_threshold, pair_precision, recall_threshold
from deeprank.embedding_io import read_embeddings
from deeprank.search.searcher import Searcher

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "tiny-imagenet-mini"


def score(gallery, truth, threshold):
    """(pairs called, precision, recall, F1) of 'duplicates when closer than threshold' on the planted pairs."""
    i, j, _ = close_pairs(np.asarray(gallery.vectors, dtype=np.float32), threshold)
    called = {frozenset((gallery.paths[a], gallery.paths[b])) for a, b in zip(i, j, strict=True)}
    planted = {frozenset(pair) for pair in zip(truth["original"], truth["copy"], strict=True)}
    hits = len(called & planted)
    precision, recall = hits / max(len(called), 1), hits / max(len(planted), 1)
    return len(called), precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(MINI), help="a TinyImageNet-layout set (default: the mini set)")
    parser.add_argument("--model", required=True, help="the checkpoint the folder is embedded with")
    parser.add_argument("--embed_flags", default="--layer backbone --tta flip", help="more gen_embeddings.py flags")
    parser.add_argument("--shares", default="0,0.1,0.3", help="the folder's share of planted copies, comma-separated")
    parser.add_argument("--calibrate_copies", type=int, default=500)
    parser.add_argument("--precision", type=float, default=0.99, help="the precision rule's target")
    parser.add_argument("--recalls", default="0.9,0.95", help="the recall-based thresholds tried, comma-separated")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data)
        subprocess.run([sys.executable, str(ROOT / "transform_validation.py"), "--data", str(data)],
                       capture_output=True, cwd=ROOT, check=True)
        print("| planted copies | rule | threshold | calibration copies kept | their precision, every neighbour "
              "counting | pairs called | precision | recall | F1 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for share in map(float, args.shares.split(",")):
            folder = Path(tmp) / f"share{share}"
            images = sum(len(list_split(data, split)[0]) for split in ("train", "val"))
            copies = int(round(share / (1 - share) * images))
            csv, truth, _ = make_collection(data, folder, copies, "combined")
            gallery_path = folder / "gallery.npy"
            subprocess.run([sys.executable, str(ROOT / "gen_embeddings.py"), "--model", args.model, "--data", str(csv),
                            "--split", "train", "--val_fraction", "0", "--train_out", str(gallery_path),
                            *args.embed_flags.split()], cwd=ROOT, check=True, capture_output=True)
            gallery = read_embeddings(gallery_path)
            searcher = Searcher(args.model, str(gallery_path), num_workers=2)
            searcher.gallery = gallery  # read once already
            copy_d, _, others = calibration_pairs(searcher, gallery, args.calibrate_copies, 0, str(gallery_path))
            folder_shown = f"{copies} of {len(gallery)} ({share:.0%})"
            rules = {f"precision {args.precision} (every neighbour counts)":
                     copy_threshold(copy_d, others[np.isfinite(others)], args.precision)}
            rules.update({f"recall {r:g}": recall_threshold(copy_d, r) for r in map(float, args.recalls.split(","))})
            for rule, chosen in rules.items():
                if chosen is None:
                    print(f"| {folder_shown} | {rule} | none reaches the precision | | | | | | |")
                    continue
                threshold, kept = chosen[:2]
                floor = pair_precision(copy_d, others, threshold)[0]
                called, precision, recall, f1 = score(gallery, truth, threshold)
                shown = (f"{precision:.3f} | {recall:.3f} | {f1:.3f}" if copies else "– | – | –")
                print(f"| {folder_shown} | {rule} | {threshold:.4f} | {kept:.1%} | {floor:.3f} | {called} | {shown} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
