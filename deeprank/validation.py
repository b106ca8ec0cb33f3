"""Validation during training: each epoch, the model's figures on a held-out CSV, every distinct
image embedded once (an image skipped by --on_bad_image skip leaves its rows out).

    accuracy = triplet_accuracy_of(model, "val_triplet_sample.csv", device, args, bad_images)
    figures = pair_figures_of(model, "val_pair_sample.csv", device, args, bad_images)  # accuracy, ROC AUC
"""

import numpy as np
import torch

from deeprank.datasets import unique_in_order
from deeprank.loaders import preprocess_on_device
from deeprank.metrics import best_threshold, decision_metrics, pair_scores, roc_auc, triplet_accuracy
from deeprank.runtime import embed_batches
from deeprank.sample_csv import read_pair_csv, read_triplet_csv, readable_triplets, triplet_rows


def embed_listed(model, paths, device, args, bad_images):
    """(vectors (n, D), {path: row}) of the given distinct image paths, in eval mode (then back to
    training mode), at the training run's precision and preprocessing."""
    model.eval()
    parts = list(embed_batches(model, paths, device, max(args.batch_size * 3, 64), args.num_workers,
                               not args.no_amp, bad_images=bad_images,
                               preprocess=preprocess_on_device(args.preprocess, device)))
    model.train()
    vectors = torch.cat([vectors for vectors, _ in parts]) if parts else torch.zeros(0, 1)
    return vectors, {paths[i]: r for r, i in enumerate(i for _, rows in parts for i in rows)}


def triplet_accuracy_of(model, csv_path, device, args, bad_images):
    """Share of a triplet CSV's triplets ranked correctly."""
    columns = read_triplet_csv(csv_path)
    vectors, row = embed_listed(model, unique_in_order(*columns), device, args, bad_images)
    columns, _ = readable_triplets(columns, row)
    return triplet_accuracy(vectors, *triplet_rows(columns, row, csv_path, "was not embedded"))


def pair_figures_of(model, csv_path, device, args, bad_images):
    """{"val_pair_accuracy", "val_pair_roc_auc"} of a pair CSV: the accuracy of 'same class below
    the threshold' at the threshold that is best on these pairs (an upper bound of what a threshold
    calibrated elsewhere gets; eval.py --calibrate measures that), and the threshold-free ROC AUC."""
    first, second, same = read_pair_csv(csv_path)
    vectors, row = embed_listed(model, unique_in_order(first, second), device, args, bad_images)
    keep = np.array([a in row and b in row for a, b in zip(first, second, strict=True)], dtype=bool)
    if not keep.any():
        return {"val_pair_accuracy": float("nan"), "val_pair_roc_auc": float("nan")}
    vectors = vectors.numpy()
    scores = pair_scores(vectors[[row[p] for p in first[keep]]], vectors[[row[p] for p in second[keep]]])
    labels = same[keep]
    decided = decision_metrics(scores, labels, best_threshold(scores, labels))
    return {"val_pair_accuracy": decided["accuracy"], "val_pair_roc_auc": roc_auc(scores, labels)}
