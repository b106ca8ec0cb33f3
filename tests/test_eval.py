"""The metrics and kNN (metrics.py), eval.py, and the embedding file format (embedding_io.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluation
from deeprank import fastparse, metrics
from deeprank.common import PipelineError
from deeprank.embedding_io import Embeddings, EmbeddingWriter, read_embeddings


def emb(paths, labels, vectors):
    """An in-memory Embeddings object."""
    return Embeddings(list(paths), list(labels), np.asarray(vectors, dtype=np.float32), {"model": "m"})


REFS = emb([f"/r/{i}.jpg" for i in range(5)], ["a", "a", "b", "b", "a"], [[0.0], [1.0], [2.0], [3.0], [10.0]])


def test_metrics_by_hand():
    queries = emb(["/q/0.jpg", "/q/1.jpg"], ["a", "b"], [[0.4], [2.6]])
    m = metrics.knn_scores(REFS, queries, k=2)
    # query a: neighbours a a b b a, R = 3; query b: b b a a a, R = 2
    assert m["score_at_k"] == 1.0 and m["precision_at_1"] == 1.0 and m["precision_at_k"] == 1.0
    assert m["r_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["map_at_r"] == pytest.approx(((1 + 1) / 3 + 1) / 2)


def test_ties_go_to_the_earlier_reference():
    # 1.5 is 0.25 from refs 1 (a) and 2 (b), 2.25 from refs 0 (a) and 3 (b): order 1 2 0 3 4
    m = metrics.knn_scores(REFS, emb(["/q.jpg"], ["a"], [[1.5]]), k=2)
    assert m["precision_at_1"] == 1.0 and m["precision_at_k"] == 0.5
    assert m["r_precision"] == pytest.approx(2 / 3)
    assert m["map_at_r"] == pytest.approx((1 + 2 / 3) / 3)
    _, idx = metrics.knn(torch.tensor([[1.5]]), torch.tensor(REFS.vectors), 5)
    assert idx.tolist() == [[1, 2, 0, 3, 4]]
    # a tie straddling the k-th place: refs 1 and 2 tie for 1st; k = 1 keeps ref 1
    _, idx = metrics.knn(torch.tensor([[1.5]]), torch.tensor(REFS.vectors), 1)
    assert idx.tolist() == [[1]]


def test_topk_orders_ties_by_column_like_a_stable_sort():
    d = torch.from_numpy(np.random.default_rng(5).integers(0, 4, size=(30, 40)).astype(np.float32))
    full = np.argsort(d.numpy(), axis=1, kind="stable")  # by distance, then column
    for k in (1, 2, 9, 39, 40):
        vals, idx = metrics._stable_topk(d.clone(), k)
        assert np.array_equal(idx.numpy(), full[:, :k])
        assert np.array_equal(vals.numpy(), np.take_along_axis(d.numpy(), full[:, :k], 1))


def test_query_in_reference_set_never_retrieves_itself():
    m = metrics.knn_scores(REFS, emb(["/r/0.jpg"], ["a"], [[0.0]]), k=1)
    # without itself: 1 (a), 2 (b), 3 (b), 4 (a); R = 2
    assert m["precision_at_1"] == 1.0
    assert m["r_precision"] == pytest.approx(0.5)
    assert m["map_at_r"] == pytest.approx(0.5)
    same = metrics.knn_scores(REFS, REFS, k=1)
    assert same["precision_at_1"] == pytest.approx(3 / 5)  # 0->1 a, 1->0 a, 2->1|3 b, 3->2 b, 4->3 b
    assert same["queries"] == 5


def test_query_of_a_class_absent_from_references():
    m = metrics.knn_scores(REFS, emb(["/q.jpg", "/p.jpg"], ["z", "a"], [[0.0], [0.1]]), k=1)
    assert m["precision_at_1"] == 0.5 and m["score_at_k"] == 0.5
    assert m["r_precision"] == pytest.approx(2 / 3)  # only query a counts (R = 3); z has R = 0


def test_retrieval_metrics_pure():
    out = metrics.retrieval_metrics([[1, 0, 1, 1], [0, 0, 0, 0]], [1, 1], [3, 1], k=2)
    assert out["score_at_k"] == 0.5 and out["precision_at_1"] == 0.5 and out["precision_at_k"] == 0.25
    assert out["r_precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["map_at_r"] == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)


def test_triplet_accuracy_by_hand():
    vectors = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    # (0,1,2): 1 < 9 right; (0,2,1): wrong; (0,1,3): 1 == 1 is a tie, counted wrong
    assert metrics.triplet_accuracy(vectors, [0, 0, 0], [1, 2, 1], [2, 1, 3]) == pytest.approx(1 / 3)
    assert metrics.triplet_accuracy(vectors, [0, 0], [1, 1], [2, 2], chunk=1) == 1.0


def test_chunked_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    refs, queries = rng.normal(size=(301, 8)), rng.normal(size=(37, 8))
    exclude = np.full(37, -1)
    exclude[[3, 10]] = [5, 7]
    d, idx = metrics.knn(queries, refs, 20, exclude=exclude, chunk_elements=1000)
    brute = ((queries[:, None, :] - refs[None, :, :]) ** 2).sum(-1)
    brute[3, 5] = brute[10, 7] = np.inf
    expected = np.argsort(brute, axis=1, kind="stable")[:, :20]
    assert np.array_equal(idx.numpy(), expected)
    assert np.allclose(d.numpy(), np.take_along_axis(brute, expected, 1), rtol=1e-4, atol=1e-4)


def test_embedding_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(7, 5)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [str(tmp_path / "imgs" / c / f"{i}.JPEG") for i, c in enumerate("aabbccc")]
    out = tmp_path / "sub" / "e.txt"
    out.parent.mkdir()
    with EmbeddingWriter(out, 5, True, "model.model") as writer:
        writer.write(paths[:3], list("aab"), vectors[:3])
        writer.write(paths[3:], list("bccc"), vectors[3:])
    text = out.read_text().splitlines()
    assert text[0] == "# deep-ranking embeddings v1 dim=5 normalized=1 model=model.model"
    assert text[1].startswith("../imgs/a/0.JPEG\ta\t")
    back = read_embeddings(out)
    assert back.paths == paths and back.labels == list("aabbccc")
    assert np.abs(back.vectors - vectors).max() < 1e-6
    assert back.header == {"dim": 5, "normalized": True, "model": "model.model"}


def test_embedding_writer_failure_leaves_no_file(tmp_path):
    out = tmp_path / "e.txt"
    with pytest.raises(RuntimeError):
        with EmbeddingWriter(out, 2, True, "m") as writer:
            writer.write(["/a.jpg"], ["a"], [[1.0, 0.0]])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


BAD_EMBEDDING_FILES = [
    ("# something else\n/a.jpg\ta\t1 2\n", "line 1 is not a deep-ranking"),
    ("# deep-ranking embeddings v1 dim=2 normalized=1 model=m\n/a.jpg\ta\t1 2\n/b.jpg\tb\t1 2 3\n",
     "line 3 has 3 values, the header says dim=2"),
    ("# deep-ranking embeddings v1 dim=2 normalized=1 model=m\n/a.jpg\t\t1 2\n", "line 2 has no label"),
    ("# deep-ranking embeddings v1 dim=2 normalized=1 model=m\n/a.jpg 1 2\n", "line 2 is not path"),
    ("# deep-ranking embeddings v1 dim=2 normalized=1 model=m\n/a.jpg\ta\t1 x\n", "line 2 has a value that is not"),
    ("# deep-ranking embeddings v1 normalized=1 model=m\n", "dim"),
]


@pytest.mark.parametrize("content,message", BAD_EMBEDDING_FILES)
def test_bad_embedding_files(tmp_path, content, message):
    path = tmp_path / "e.txt"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message) as info:
        read_embeddings(path)
    assert "gen_embeddings.py" in str(info.value) and str(path) in str(info.value)


def write(path, rows, dim):
    """An embedding file from (path, label, vector) rows."""
    with EmbeddingWriter(path, dim, True, "m") as writer:
        for p, label, v in rows:
            writer.write([p], [label], [v])


def test_eval_main_errors(tmp_path):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    write(train, [(str(tmp_path / "a/1.jpg"), "a", [1, 0]), (str(tmp_path / "b/2.jpg"), "b", [0, 1])], 2)
    write(test, [(str(tmp_path / "a/3.jpg"), "a", [1, 0, 0])], 3)
    with pytest.raises(PipelineError, match="dim=2 but .* has dim=3"):
        evaluation.main(["--train_embeddings", str(train), "--test_embeddings", str(test)])
    write(test, [(str(tmp_path / "a/3.jpg"), "a", [1, 0])], 2)
    csv = tmp_path / "t.csv"
    csv.write_text("query,positive,negative\na/3.jpg,a/9.jpg,b/2.jpg\n")
    with pytest.raises(PipelineError, match=r"names .*a/9.jpg.*rerun gen_embeddings.py"):
        evaluation.main(["--train_embeddings", str(train), "--test_embeddings", str(test),
                         "--test_triplets", str(csv)])
    with pytest.raises(PipelineError, match="does not exist"):
        evaluation.main(["--train_embeddings", str(tmp_path / "none.txt"), "--test_embeddings", str(test)])


def test_format_metrics_prints_percentages():
    text = evaluation.format_metrics({"k": 30, "score_at_k": 0.5, "precision_at_1": 1.0, "map_at_r": math.nan})
    assert "score_at_30" in text and "50.00%" in text and "100.00%" in text and "n/a" in text


def test_npy_embedding_round_trip_and_eval_reads_both_formats(tmp_path, capsys):
    rng = np.random.default_rng(2)
    centres = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]  # same-class vectors close together
    vectors = centres + 0.01 * rng.normal(size=(6, 4)).astype(np.float32)
    paths = [str(tmp_path / "img" / c / f"{i}.jpg") for i, c in enumerate("aabbcc")]
    npy, txt = tmp_path / "train.npy", tmp_path / "test.txt"
    for out in (npy, txt):
        with EmbeddingWriter(out, 4, False, "m") as writer:
            writer.write(paths[:4], list("aabb"), vectors[:4])
            writer.write(paths[4:], list("cc"), vectors[4:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.txt", "train.npy", "train.paths.tsv"]
    back = read_embeddings(npy)
    assert back.paths == paths and back.labels == list("aabbcc")
    assert np.array_equal(back.vectors, vectors)  # binary: exact
    assert np.load(npy).shape == (6, 4)
    assert evaluation.main(["--train_embeddings", str(npy), "--test_embeddings", str(txt), "--k", "2"]) == 0
    assert "precision_at_1           100.00%" in capsys.readouterr().out  # its one same-class partner


def test_bad_npy_embedding_files(tmp_path):
    npy = tmp_path / "e.npy"
    with EmbeddingWriter(npy, 3, True, "m") as writer:
        writer.write(["/a.jpg", "/b.jpg"], ["a", "b"], np.eye(2, 3))
    np.save(npy, np.zeros((3, 3), np.float32))
    with pytest.raises(PipelineError, match=r"shape \(3, 3\).*lists 2 images"):
        read_embeddings(npy)
    (tmp_path / "e.paths.tsv").unlink()
    with pytest.raises(PipelineError, match="paths and labels"):
        read_embeddings(npy)


def random_text_file(out, rows, dim, classes, name):
    """An embedding text file of random vectors; name(i, class) gives row i's image path."""
    vectors = np.random.default_rng(rows).normal(size=(rows, dim)).astype(np.float32)
    paths = [name(i, f"c{i % classes}") for i in range(rows)]
    with EmbeddingWriter(out, dim, False, "m") as writer:
        writer.write(paths, [f"c{i % classes}" for i in range(rows)], vectors)
    return paths, vectors


def test_parallel_parse_equals_serial_and_names_bad_lines(tmp_path):
    out = tmp_path / "e.txt"
    paths, _ = random_text_file(out, 301, 6, 5, lambda i, c: str(tmp_path / "imgs" / c / f"{i}.JPEG"))
    serial = read_embeddings(out, workers=1)
    for workers in (2, 3):
        parallel = read_embeddings(out, chunk_bytes=512, workers=workers)
        assert parallel.paths == serial.paths == paths and parallel.labels == serial.labels
        assert np.array_equal(parallel.vectors, serial.vectors)
    lines = out.read_text().splitlines(keepends=True)
    lines[250] = lines[250].rsplit(" ", 1)[0] + "\n"  # line 251 loses a value, in the last worker's range
    out.write_text("".join(lines))
    with pytest.raises(PipelineError, match="line 251 has 5 values, the header says dim=6"):
        read_embeddings(out, chunk_bytes=512, workers=2)


def test_bf16_knn_finds_the_same_neighbours_when_gaps_are_clear():
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(300, 64)).astype(np.float32)
    queries = refs[::7] + 0.01 * rng.normal(size=(43, 64)).astype(np.float32)  # each query near one ref
    exact_d, exact_i = metrics.knn(queries, refs, 1)
    fast_d, fast_i = metrics.knn(queries, refs, 1, precision="bf16")
    assert np.array_equal(exact_i.numpy()[:, 0], np.arange(0, 300, 7))
    assert np.array_equal(fast_i.numpy(), exact_i.numpy())
    assert np.allclose(fast_d.numpy(), exact_d.numpy(), atol=0.5)  # ~1e-2 of |q|^2 ~ 64
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # restored afterwards
    with pytest.raises(PipelineError, match="fp32 or bf16"):
        metrics.knn(queries, refs, 1, precision="fp16")


def test_paths_with_spaces_round_trip(tmp_path):
    out = tmp_path / "e.txt"
    paths, vectors = random_text_file(out, 40, 3, 2, lambda i, c: str(tmp_path / "my images" / c / f"{i} copy.JPEG"))
    back = read_embeddings(out, chunk_bytes=256, workers=2)
    assert back.paths == paths and np.abs(back.vectors - vectors).max() < 1e-6


def test_hand_edited_whitespace_still_parses(tmp_path):
    path = tmp_path / "e.txt"
    path.write_bytes(b"# deep-ranking embeddings v1 dim=2 normalized=0 model=m\r\n/a.jpg\ta\t1  2\r\n/b.jpg\tb\t3 4 \n")
    back = read_embeddings(path)
    assert back.labels == ["a", "b"] and back.vectors.tolist() == [[1, 2], [3, 4]]
    assert back.header["model"] == "m"


# the compiled text parser (fastparse) against numpy's

HEADER = "# deep-ranking embeddings v1 dim=4 normalized=0 model=m\n"
HANDLED = [  # every number shape the compiled parser reads itself
    "1 -2.5 +3.25e-3 4E+02",
    ".5 5. -0 0.000000",
    "1.234567e-05 -9.999999e+22 0.001969091 -0.0001234567",
    "123456789012345 0.100000000000000 7e0 -3.402823e+28",
    "1e-22 1e22 2.2250738585072014e-308 0.30000001192092896",
]


def body_bytes(rows):
    return "".join(f"/imgs/ü {i}.jpg\tc{i % 2}\t{row}\n" for i, row in enumerate(rows)).encode()


def test_compiled_parser_handles_every_plain_decimal_like_numpy():
    assert fastparse.available(), "numba is in requirements.txt: the compiled parser must be usable"
    rows = [r for r in HANDLED if "2.2250738585072014e-308" not in r]  # 17 digits: not handled
    data = body_bytes(rows)
    paths, labels, vectors = fastparse.parse_block(data, len(data), 4)
    expect = np.loadtxt([r for r in rows], dtype=np.float32, comments=None, ndmin=2)
    assert vectors.tobytes() == expect.tobytes()  # bit for bit, signs of zero included
    assert paths == [f"/imgs/ü {i}.jpg" for i in range(len(rows))] and labels == ["c0", "c1"] * 2
    for bad in ("nan 1 2 3", "1 2 3", "1 2 3 4 5", "1 2 3 x", "1 2 3 1e", "1 2 3 --1", "1 2 3 1e-23",
                "1 2 3 2.2250738585072014e-308", "1 2 3 9007199254740993", "1 2 3 4\t", "1  2 3 0x1"):
        data = body_bytes([bad])
        assert fastparse.parse_block(data, len(data), 4) is None, bad
    for bad in (b"\tc\t1 2 3 4\n", b"/a.jpg\t\t1 2 3 4\n", b"/a.jpg 1 2 3 4\n", b"/\xff.jpg\tc\t1 2 3 4\n"):
        assert fastparse.parse_block(bad, len(bad), 4) is None, bad


CACHE_PROBE = """
from deeprank import fastparse
data = b"a.jpg\\tc\\t0.5 1.25 -3e-2 4\\n"
assert fastparse.parse_block(data, len(data), 4)[2].tolist() == [[0.5, 1.25, -0.029999999329447746, 4.0]]
print(sum(fastparse._kernel().stats.cache_hits.values()), sum(fastparse._parse_line.stats.cache_hits.values()))
"""


def test_the_compiled_parser_is_cached_once_and_loaded_by_later_processes(tmp_path):
    """The first process compiles and writes numba's cache; the next ones load both kernels from it,
    and the cache does not grow."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    files, hits = [], []
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, env=env, cwd=root)
        assert run.returncode == 0, run.stderr
        hits.append(run.stdout.split())
        files.append(sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()))
    assert hits[0] == ["0", "0"] and hits[1] == hits[2] == ["1", "0"]  # the block kernel loads (its callee with it)
    assert files[0] and files[0] == files[1] == files[2]


def test_compiled_read_equals_numpy_read(tmp_path):
    out = tmp_path / "e.txt"
    paths, _ = random_text_file(out, 203, 7, 3, lambda i, c: str(tmp_path / "my imgs" / c / f"{i}.JPEG"))
    numpy_read = read_embeddings(out, fast=False)
    for chunk in (64, 1000, 1 << 20):  # 64: every line outgrows the buffer
        fast = read_embeddings(out, chunk_bytes=chunk, fast=True)
        assert fast.paths == numpy_read.paths == paths and fast.labels == numpy_read.labels
        assert fast.vectors.tobytes() == numpy_read.vectors.tobytes()
    # long lines first, then short ones: the row estimate from the first blocks falls short and grows
    mixed = tmp_path / "mixed.txt"
    rows = [" ".join(["-0.001234567"] * 4)] * 5 + ["0 1 2 3"] * 60
    mixed.write_bytes(HEADER.encode() + body_bytes(rows))
    fast = read_embeddings(mixed, chunk_bytes=120, fast=True)
    assert fast.vectors.tobytes() == read_embeddings(mixed, fast=False).vectors.tobytes() and len(fast) == 65
    # CRLF, runs of spaces and no newline at the end
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(HEADER.encode() + b"/a.jpg\ta\t1  2 3 4 \r\n/b.jpg\tb\t5 6 7 8")
    back = read_embeddings(crlf, chunk_bytes=16, fast=True)
    assert back.labels == ["a", "b"] and back.vectors.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_lines_the_compiled_parser_leaves_go_to_numpy(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text(HEADER + "/a.jpg\ta\t1 2 3 4\n/b.jpg\tb\t1 2 3 2.2250738585072014e-308\n")
    assert read_embeddings(path, fast=True).vectors.tobytes() == read_embeddings(path, fast=False).vectors.tobytes()
    path.write_text(HEADER + "/a.jpg\ta\t1 2 3 4\n/b.jpg\tb\t1 2 nan 4\n")
    with pytest.raises(PipelineError, match="/b.jpg has a non-finite value"):
        read_embeddings(path, fast=True)


@pytest.mark.parametrize("content,message", BAD_EMBEDDING_FILES)
def test_bad_files_name_their_line_with_the_compiled_parser(tmp_path, content, message):
    path = tmp_path / "e.txt"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        read_embeddings(path, fast=True)


def test_without_numba_the_numpy_parser_reads(tmp_path, monkeypatch):
    out = tmp_path / "e.txt"
    paths, vectors = random_text_file(out, 20, 3, 2, lambda i, c: str(tmp_path / c / f"{i}.JPEG"))
    monkeypatch.setattr(fastparse, "_KERNEL", False)  # as when numba is not installed or failed to compile
    assert not fastparse.available()
    back = read_embeddings(out, fast=True)
    assert back.paths == paths and np.abs(back.vectors - vectors).max() < 1e-6


def test_query_grid_file_names_hold_no_spaces_or_commas():
    name = evaluation.safe_name("00001_Yorkshire terrier, 433_n02094433_12")
    assert name == "00001_Yorkshire_terrier_433_n02094433_12"
    assert evaluation.safe_name(" , ") == "query"
