"""Property-based tests (hypothesis): the triplet sampler's rules for any class sizes, and the
embedding file round trip for any paths, labels and finite vectors."""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeprank.common import PipelineError
from deeprank.embedding_io import EmbeddingWriter, read_embeddings
from triplet_sampler import sample_triplets


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 8), min_size=2, max_size=6), num_pos=st.integers(1, 3),
       num_neg=st.integers(1, 3), seed=st.integers(0, 2 ** 31))
def test_sampler_rules_hold_for_any_class_sizes(sizes, num_pos, num_neg, seed):
    labels = [f"c{c}" for c, size in enumerate(sizes) for _ in range(size)]
    codes = np.repeat(np.arange(len(sizes)), sizes)
    try:
        triplets, short = sample_triplets(labels, num_pos, num_neg, seed)
    except PipelineError:  # refused only when no triplet can exist
        assert max(sizes) < 2 or min(len(labels) - s for s in sizes) < num_neg
        return
    q, p, n = triplets.T
    assert (codes[q] == codes[p]).all() and (codes[q] != codes[n]).all() and (q != p).all()
    for query in range(len(labels)):  # every query: min(size - 1, N) distinct positives, each with M negatives
        rows = triplets[q == query]
        positives = min(sizes[codes[query]] - 1, num_pos)
        assert len(rows) == positives * num_neg
        assert len(set(rows[:, 1].tolist())) == positives
        for positive in set(rows[:, 1].tolist()):
            negatives = rows[rows[:, 1] == positive, 2]
            assert len(set(negatives.tolist())) == num_neg
    assert set(short) == {f"c{c}" for c, size in enumerate(sizes) if size - 1 < num_pos}
    again, _ = sample_triplets(labels, num_pos, num_neg, seed)
    assert np.array_equal(triplets, again)  # same seed, same triplets


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda text: text.strip() == text and text not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(names, names), min_size=1, max_size=8, unique_by=lambda row: row[0]),
       dim=st.integers(1, 6), data=st.data())
def test_embedding_files_round_trip(tmp_path_factory, rows, dim, data):
    folder = tmp_path_factory.mktemp("emb")
    paths = [str(folder / "images" / name.replace("/", "_")) for name, _ in rows]
    if len(set(paths)) < len(paths):
        return
    labels = [label for _, label in rows]
    values = data.draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=len(rows) * dim,
                                max_size=len(rows) * dim))
    vectors = np.array(values, dtype=np.float32).reshape(len(rows), dim)
    for name in ("e.txt", "e.npy"):
        with EmbeddingWriter(folder / name, dim, False, "model") as out:
            out.write(paths, labels, vectors)
        back = read_embeddings(folder / name)
        assert back.paths == paths and back.labels == labels
        if name == "e.npy":
            assert np.array_equal(back.vectors, vectors)
        else:  # 7 significant digits
            assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30)
                       for a, b in zip(back.vectors.ravel().tolist(), vectors.ravel().tolist(), strict=True))
