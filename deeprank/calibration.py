"""The synthetic copies a near-duplicate threshold is calibrated on: random gallery images copied
(deeprank.copies, one kind a copy, in turn), embedded as the gallery was, and measured against
their originals and against the other gallery images near them. find_duplicates.py
--calibrate_copies chooses its threshold from these distances (deeprank.duplicates'
recall_threshold or copy_threshold); bench/bench_calibration.py compares the two rules on them.

    copy_d, kinds, others = calibration_pairs(searcher, gallery, 500, seed=0, source="gallery.npy")
"""

import os
import random
import tempfile

import numpy as np

from deeprank.common import PipelineError
from deeprank.copies import KINDS, save_copy
from deeprank.metrics import pair_scores

NEIGHBOURS = 50  # the nearest other gallery images each copy is checked against


def calibration_pairs(searcher, gallery, count, seed=0, source="the gallery", neighbours=NEIGHBOURS):
    """`count` synthetic copies of random gallery images (of those on disk), embedded by searcher (a
    search.searcher.Searcher over gallery) as the gallery was: (each copy's distance to its original,
    its kind, its distances to its `neighbours` nearest other gallery images (n, m), inf where there
    are fewer). source: the gallery's name, for the refusal when too few of its images are on disk."""
    rng = random.Random(seed)
    present = [row for row in range(len(gallery)) if os.path.isfile(gallery.paths[row])]
    if len(present) < count:
        raise PipelineError(f"--calibrate_copies {count}: {source} lists {len(present)} images that are on disk; "
                            f"ask for {len(present)} or fewer")
    rows = sorted(rng.sample(present, count))
    with tempfile.TemporaryDirectory(prefix="calibrate_copies_") as folder:
        made = {}
        for number, row in enumerate(rows):
            kind = KINDS[number % len(KINDS)]
            target = os.path.join(folder, f"copy_{number:05d}_{kind}.jpg")
            save_copy(gallery.paths[row], kind, target, rng)
            made[target] = (row, kind)
        vectors, kept = searcher.embed(list(made))
    originals = np.array([made[path][0] for path in kept])
    kinds = np.array([made[path][1] for path in kept])
    copy_d = pair_scores(vectors, np.asarray(gallery.vectors[originals], dtype=np.float32))
    # every gallery image a copy would join, up to its `neighbours` nearest non-originals
    others, _ = searcher.index.search(vectors, min(neighbours, len(gallery) - 1), exclude=originals)
    return copy_d, kinds, others
