"""image_search.py: exact and faiss search, the gallery header check, --pair, --add, --json and
--grid, and the web page's endpoints (plain HTTP here; in a real browser in test_search_page.py)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gen_embeddings
import image_search
import train_net
import triplet_sampler
from conftest import FAST, chromium
from deeprank.common import PipelineError
from deeprank.embedding_io import read_embeddings
from deeprank.search import index as search_index

faiss_missing = not search_index.faiss_available()
needs_faiss = pytest.mark.skipif(faiss_missing, reason="faiss-cpu is not installed (requirements-faiss.txt)")


@pytest.fixture(scope="module")
def world(tmp_path_factory, prepared_master):
    """One small trained checkpoint, and its train and val embedding files (read-only)."""
    out = tmp_path_factory.mktemp("search")
    train = out / "train.csv"
    assert triplet_sampler.main(["--data", str(prepared_master), "--training", "1", "--num_pos_images", "1",
                                 "--num_neg_images", "1", "--out", str(train)]) == 0
    model = out / "m.model"
    assert train_net.main(FAST + ["--epochs", "1", "--triplets", str(train), "--out", str(model)]) == 0
    assert gen_embeddings.main(["--model", str(model), "--data", str(prepared_master), "--num_workers", "0",
                                "--train_out", str(out / "train_embedding.txt"),
                                "--test_out", str(out / "test_embedding.txt")]) == 0
    return {"model": model, "train": out / "train_embedding.txt", "test": out / "test_embedding.txt",
            "data": prepared_master}


def run(*argv):
    return image_search.main([str(a) for a in argv])


def brute_force(queries, gallery, k):
    """Rows of the k nearest by squared L2 in float64, ties by row: numpy, independent of ours."""
    d = ((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), d.shape), d), axis=-1)
    return order[:, :k], np.take_along_axis(d, order, 1)[:, :k]


def test_exact_top_k_equals_brute_force_with_ties_by_row():
    rng = np.random.default_rng(0)
    gallery = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)  # small integers: many exact ties
    queries = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    distances, rows = search_index.ExactIndex(gallery).search(queries, 12)
    want_rows, want_d = brute_force(queries, gallery, 12)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(distances, want_d, atol=1e-5)
    exclude = want_rows[:, 0]
    _, rows = search_index.ExactIndex(gallery).search(queries, 12, exclude=exclude)
    assert not (rows == exclude[:, None]).any()
    assert np.array_equal(rows[:, :11], want_rows[:, 1:12])


def test_search_from_the_shell_prints_json_and_grid(world, tmp_path, capsys):
    gallery = read_embeddings(world["train"])
    query = gallery.paths[5]
    out_json, out_png = tmp_path / "hits.json", tmp_path / "hits.png"
    assert run("--model", world["model"], "--gallery", world["train"], "--k", 4, "--json", out_json,
               "--grid", out_png, "--num_workers", 0, query) == 0
    found = json.loads(out_json.read_text())
    assert [item["query"] for item in found] == [query]
    hits = found[0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and set(hits[0]) == {"rank", "distance", "label", "name", "path"}
    assert hits[0]["path"] == query and hits[0]["distance"] < 1e-6  # the query itself, first, at distance 0
    assert hits[0]["label"] == gallery.labels[5]
    vectors = gallery.vectors
    want_rows, _ = brute_force(vectors[5:6], vectors, 4)
    assert [h["path"] for h in hits] == [gallery.paths[r] for r in want_rows[0]]
    printed = capsys.readouterr().out
    assert all(h["path"] in printed for h in hits)
    from PIL import Image
    with Image.open(out_png) as grid:
        assert grid.width > 4 * 96 and grid.height >= 96  # query + 4 neighbours in one row

    assert run("--model", world["model"], "--gallery", world["train"], "--k", 3, "--exclude_self",
               "--json", out_json, "--num_workers", 0, query) == 0
    again = json.loads(out_json.read_text())[0]["results"]
    assert query not in [h["path"] for h in again] and [h["path"] for h in again] == [h["path"] for h in hits[1:4]]


def test_a_query_folder_searches_every_image(world, tmp_path):
    folder = world["data"] / "val" / sorted(p.name for p in (world["data"] / "val").iterdir() if p.is_dir())[0]
    out_json = tmp_path / "hits.json"
    assert run("--model", world["model"], "--gallery", world["train"], "--k", 2, "--json", out_json,
               "--num_workers", 0, folder) == 0
    found = json.loads(out_json.read_text())
    assert len(found) == len(list(folder.rglob("*.JPEG"))) and all(len(item["results"]) == 2 for item in found)


def test_queries_searched_in_small_chunks_give_the_results_of_one_chunk(world, tmp_path, monkeypatch):
    folder = world["data"] / "val"
    searched = []  # queries per search call
    search = image_search.Searcher.search
    def counting(self, vectors, *args, **kwargs):
        searched.append(len(vectors))
        return search(self, vectors, *args, **kwargs)
    monkeypatch.setattr(image_search.Searcher, "search", counting)
    results = {}
    for chunk in (3, 10 ** 6):  # 3 queries at a time (passes of 2 images: 4 a chunk), and all at once
        monkeypatch.setattr(image_search, "QUERY_CHUNK", chunk)
        out_json = tmp_path / f"hits{chunk}.json"
        assert run("--model", world["model"], "--gallery", world["train"], "--k", 5, "--json", out_json,
                   "--num_workers", 0, "--batch_size", 2, "--exclude_self", folder) == 0
        results[chunk] = json.loads(out_json.read_text())
    queries = len(list(folder.rglob("*.JPEG")))
    assert searched == [4] * (queries // 4) + [queries] and queries > 4
    assert results[3] == results[10 ** 6]


def test_a_caller_that_stops_early_holds_no_lock(world):
    """One caller takes a first chunk and stops (the generator left suspended); another thread still
    embeds at once, without waiting for garbage collection."""
    import threading

    from deeprank.search.searcher import Searcher
    searcher = Searcher(str(world["model"]), str(world["train"]), num_workers=0)
    paths = sorted(str(p) for p in (world["data"] / "val").rglob("*.JPEG"))[:6]
    paused = searcher.embed_chunks(paths, rows=1)
    first, _ = next(paused)
    done = []
    other = threading.Thread(target=lambda: done.append(searcher.embed(paths[:2])[0]))
    other.start()
    other.join(timeout=60)
    assert not other.is_alive() and done and done[0].shape == (2, first.shape[1])


def test_fp32_switch_reaches_the_embedding_header_and_the_queries(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPRANK_FP32", "1")
    gallery = tmp_path / "g.txt"
    assert gen_embeddings.main(["--model", str(world["model"]), "--data", str(world["data"]), "--split", "val",
                                "--num_workers", "0", "--test_out", str(gallery)]) == 0
    assert "  precision: fp32" in capsys.readouterr().out
    header = gallery.read_text().splitlines()[0]
    assert " amp=fp32 " in header
    assert header.endswith(f" model={os.path.relpath(world['model'], tmp_path)}")  # relative, like every path in it
    assert run("--model", world["model"], "--gallery", gallery, "--num_workers", 0,
               read_embeddings(gallery).paths[0]) == 0
    assert "  precision: fp32" in capsys.readouterr().out


def test_a_gallery_from_another_checkpoint_is_refused_unless_forced(world, tmp_path, capsys):
    other = tmp_path / "other.model"
    ckpt = torch.load(world["model"], weights_only=True)  # checkpoints are plain data
    first = next(iter(ckpt["model"]))
    ckpt["model"][first] = ckpt["model"][first] + 1  # another checkpoint of the same shape
    torch.save(ckpt, other)
    query = read_embeddings(world["train"]).paths[0]
    assert image_search.run_cli(image_search.main, ["--model", str(other), "--gallery", str(world["train"]),
                                                    "--num_workers", "0", query]) == 1
    err = capsys.readouterr().err
    assert "was written by checkpoint sha256" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert run("--model", other, "--gallery", world["train"], "--force", "--num_workers", 0, query) == 0


def test_a_gallery_of_another_dimension_is_refused_even_forced(world, tmp_path, capsys):
    text = world["train"].read_text().splitlines()
    header = text[0].replace("dim=32", "dim=2")
    rows = ["\t".join(line.split("\t")[:2] + ["0.6 0.8"]) for line in text[1:]]
    small = tmp_path / "small.txt"
    small.write_text("\n".join([header] + rows) + "\n")
    query = read_embeddings(world["train"]).paths[0]
    code = image_search.run_cli(image_search.main, ["--model", str(world["model"]), "--gallery", str(small),
                                                    "--force", query])
    err = capsys.readouterr().err
    assert code == 1 and "dim=2" in err and "--force" not in err  # forcing cannot help: not offered
    not_torch = tmp_path / "notes.model"
    not_torch.write_text("my model\n")
    code = image_search.run_cli(image_search.main, ["--model", str(not_torch), "--gallery", str(world["train"]), query])
    err = capsys.readouterr().err
    assert code == 1 and "is not a torch file" in err and "--force" not in err


@pytest.mark.parametrize("suffix", [".txt", ".npy"])
def test_add_round_trip(world, tmp_path, suffix, capsys):
    gallery = tmp_path / f"gallery{suffix}"
    assert gen_embeddings.main(["--model", str(world["model"]), "--data", str(world["data"]), "--split", "train",
                                "--num_workers", "0", "--train_out", str(gallery)]) == 0
    before = read_embeddings(gallery)
    first_rows = gallery.read_bytes().splitlines()[:4] if suffix == ".txt" else None
    val = world["data"] / "val"
    assert run("--model", world["model"], "--gallery", gallery, "--add", val, "--num_workers", 0) == 0
    after = read_embeddings(gallery)
    val_embedded = read_embeddings(world["test"])
    assert len(after) == len(before) + len(val_embedded)
    assert after.paths[:len(before)] == before.paths
    np.testing.assert_array_equal(after.vectors[:len(before)], before.vectors)  # old rows kept as they were
    if first_rows:
        assert gallery.read_bytes().splitlines()[:4] == first_rows
    for path, label, vector in zip(after.paths[len(before):], after.labels[len(before):],
                                   after.vectors[len(before):], strict=True):
        row = val_embedded.index_of(path)
        assert row >= 0 and label == val_embedded.labels[row]
        np.testing.assert_allclose(vector, val_embedded.vectors[row], atol=2e-6)  # as gen_embeddings embeds it
    assert after.header == before.header
    capsys.readouterr()
    assert run("--model", world["model"], "--gallery", gallery, "--add", val, "--num_workers", 0) == 0
    assert "in the gallery already" in capsys.readouterr().out and len(read_embeddings(gallery)) == len(after)


@needs_faiss
def test_faiss_recall_on_a_clustered_set_for_both_structures():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    gallery = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.standard_normal((6000, 32)).astype(np.float32)
    queries = centres[rng.integers(0, 40, 200)] + 0.3 * rng.standard_normal((200, 32)).astype(np.float32)
    want, _ = brute_force(queries, gallery, 10)
    for structure in ("hnsw", "ivf"):
        raw = search_index.build_faiss(search_index.row_blocks(gallery), len(gallery), 32,
                                       lambda count, seed: search_index.random_rows(gallery, count, seed),
                                       structure=structure)
        index = search_index.FaissIndex(raw, gallery)
        distances, rows = index.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), want.tolist(), strict=True)])
        assert recall >= 0.95, (structure, recall)
        found = rows >= 0
        exact = ((queries[:, None] - gallery[np.where(found, rows, 0)]) ** 2).sum(-1)
        np.testing.assert_allclose(distances[found], exact[found], rtol=1e-5, atol=1e-5)  # re-ranked: exact
        exclude = want[:, 0]
        _, rows = index.search(queries, 10, exclude=exclude)
        assert not (rows == exclude[:, None]).any()


@needs_faiss
def test_faiss_index_is_saved_reused_rebuilt_when_stale_and_extended_by_add(world, tmp_path, capsys):
    gallery = tmp_path / "g.txt"
    shutil.copy(world["train"], gallery)
    query = read_embeddings(gallery).paths[3]
    args = ["--model", world["model"], "--gallery", gallery, "--index", "faiss", "--k", 3, "--num_workers", 0,
            "--json", tmp_path / "hits.json"]
    assert run(*args, query) == 0
    assert "indexing" in capsys.readouterr().out and (tmp_path / "g.txt.faiss").is_file()
    exact_json = tmp_path / "exact.json"
    assert run("--model", world["model"], "--gallery", gallery, "--index", "exact", "--k", 3, "--num_workers", 0,
               "--json", exact_json, query) == 0
    by_faiss, exact = (json.loads(p.read_text())[0]["results"] for p in (tmp_path / "hits.json", exact_json))
    assert [h["path"] for h in by_faiss] == [h["path"] for h in exact]
    np.testing.assert_allclose([h["distance"] for h in by_faiss], [h["distance"] for h in exact], atol=1e-5)
    assert run(*args, query) == 0
    assert "indexing" not in capsys.readouterr().out  # fresh: loaded, not rebuilt
    assert run("--model", world["model"], "--gallery", gallery, "--add", world["data"] / "val",
               "--num_workers", 0) == 0
    assert "faiss index too" in capsys.readouterr().out
    stamp = json.loads((tmp_path / "g.txt.faiss.json").read_text())
    assert stamp["rows"] == len(read_embeddings(gallery))
    added = read_embeddings(gallery).paths[-1]
    assert run(*args, added) == 0
    assert "indexing" not in capsys.readouterr().out
    assert json.loads((tmp_path / "hits.json").read_text())[0]["results"][0]["path"] == added
    with open(gallery, "a") as handle:  # changed behind the index's back: rebuilt
        handle.write(gallery.read_text().splitlines()[1].replace(".JPEG", "_copy.JPEG") + "\n")
    assert run(*args, query) == 0
    assert "indexing" in capsys.readouterr().out


def test_index_faiss_without_faiss_says_how_to_install(monkeypatch, world, capsys):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as if faiss-cpu were not installed
    code = image_search.run_cli(image_search.main, ["--model", str(world["model"]), "--gallery", str(world["train"]),
                                                    "--index", "faiss", str(world["train"])])
    assert code == 1 and "requirements-faiss.txt" in capsys.readouterr().err


def test_pair_distance_and_decision(world, tmp_path, capsys):
    gallery = read_embeddings(world["train"])
    a, b = gallery.paths[0], gallery.paths[-1]
    want = float(((gallery.vectors[0] - gallery.vectors[-1]) ** 2).sum())
    assert run("--model", world["model"], "--gallery", world["train"], "--pair", a, b, "--num_workers", 0) == 0
    printed = capsys.readouterr().out
    assert abs(float(printed.split("distance ")[1].split()[0]) - want) < 1e-4
    assert "no threshold: to decide same or different, pass --threshold T, or --threshold_from" in printed
    code = image_search.run_cli(image_search.main, ["--model", str(world["model"]), "--pair", str(Path(a).parent), b])
    assert code == 1 and f"--pair {Path(a).parent} is a folder" in capsys.readouterr().err
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"pair_threshold": want + 1e-3}))
    assert run("--model", world["model"], "--pair", a, b, "--threshold_from", metrics, "--num_workers", 0) == 0
    assert "\nsame (threshold" in capsys.readouterr().out
    assert run("--model", world["model"], "--pair", a, b, "--threshold", want - 1e-3, "--num_workers", 0) == 0
    assert "\ndifferent (threshold" in capsys.readouterr().out
    metrics.write_text(json.dumps({"test_triplet_accuracy": 0.9}))
    code = image_search.run_cli(image_search.main, ["--model", str(world["model"]), "--pair", a, b,
                                                    "--threshold_from", str(metrics)])
    assert code == 1 and "eval.py --pairs" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [([], "give query images"), (["--threshold", "1", "q.jpg"], "go with --pair"),
                                          (["--serve", "q.jpg"], "cannot be given with")])
def test_flags_that_do_not_go_together(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        image_search.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_missing_query_is_one_line(world, capsys):
    code = image_search.run_cli(image_search.main, ["--model", str(world["model"]), "--gallery", str(world["train"]),
                                                    "no_such.jpg"])
    assert code == 1 and "no_such.jpg does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the web page over HTTP

@pytest.fixture(scope="module")
def client(world):
    from deeprank.search.searcher import Searcher
    from deeprank.search.web import create_app
    searcher = Searcher(str(world["model"]), str(world["train"]), num_workers=0)
    app = create_app(searcher, k=5, max_upload_mb=1)
    return app.test_client()


def upload(client, data, name="q.jpg"):
    import io
    return client.post("/api/search", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def test_page_and_info(client, world):
    page = client.get("/")
    assert page.status_code == 200 and b'type="file"' in page.data
    info = client.get("/api/info").get_json()
    assert info["rows"] == len(read_embeddings(world["train"])) and info["k"] == 5
    assert info["model"] == world["model"].name  # the checkpoint's file name, not the folder it sits in


def test_upload_search_returns_k_results_the_image_itself_first(client, world):
    gallery = read_embeddings(world["train"])
    answer = upload(client, Path(gallery.paths[7]).read_bytes(), "photo.JPEG")
    assert answer.status_code == 200
    results = answer.get_json()["results"]
    assert len(results) == 5 and results[0]["row"] == 7 and results[0]["distance"] < 1e-6
    assert results[0]["label"] == gallery.labels[7] and results[0]["url"] == "/image/7"
    assert len(upload(client, Path(gallery.paths[7]).read_bytes()).get_json()["results"]) == 5
    import io
    answer = client.post("/api/search?k=2", data={"image": (io.BytesIO(Path(gallery.paths[7]).read_bytes()), "a.jpg")},
                         content_type="multipart/form-data")
    assert len(answer.get_json()["results"]) == 2


@pytest.mark.parametrize("data,status,message", [(b"", 400, "empty"), (b"this is not an image", 400, "cannot read"),
                                                 (b"\xff" * (1 << 20 + 1), 413, "larger than 1 MB")])
def test_bad_uploads(client, data, status, message):
    answer = upload(client, data)
    assert answer.status_code == status and message in answer.get_json()["error"]


def test_upload_without_the_image_field(client):
    answer = client.post("/api/search", data={"other": "x"}, content_type="multipart/form-data")
    assert answer.status_code == 400 and "'image'" in answer.get_json()["error"]


def test_search_by_gallery_row_leaves_the_row_out(client, world):
    gallery = read_embeddings(world["train"])
    body = client.get("/api/search?row=3").get_json()
    rows = [hit["row"] for hit in body["results"]]
    want, _ = brute_force(gallery.vectors[3:4], gallery.vectors, 6)
    assert body["query"]["row"] == 3 and rows == [r for r in want[0].tolist() if r != 3][:5]
    for bad in ("-1", "x", str(len(gallery))):
        assert client.get(f"/api/search?row={bad}").status_code == 404
    assert client.get("/api/search?row=3&k=0").status_code == 400


def test_gallery_pages_and_images(client, world):
    gallery = read_embeddings(world["train"])
    first = client.get("/api/gallery?page=0").get_json()
    assert first["rows"] == len(gallery) and [i["row"] for i in first["items"]] == list(
        range(min(len(gallery), len(first["items"]))))
    assert client.get(f"/api/gallery?page={first['pages']}").status_code == 404
    picture = client.get("/image/0")
    assert picture.status_code == 200 and picture.mimetype == "image/jpeg" and picture.data[:2] == b"\xff\xd8"
    assert client.get(f"/image/{len(gallery)}").status_code == 404


@pytest.mark.parametrize("path", ["/image/../../../../etc/passwd", "/image/..%2f..%2fetc%2fpasswd",
                                  "/image/%2e%2e/%2e%2e/etc/passwd", "/image//etc/passwd", "/image/-1",
                                  "/search.html", "/searcher.py"])
def test_no_file_outside_the_gallery_is_served(client, path):
    answer = client.get(path)
    assert answer.status_code == 404 and b"root:" not in answer.data and b"import" not in answer.data


def test_missing_model_is_one_line(tmp_path, world, capsys):
    code = image_search.run_cli(image_search.main, ["--model", str(tmp_path / "none.model"),
                                                    "--gallery", str(world["train"]), "q.jpg"])
    assert code == 1 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_searcher_refuses_a_row_outside_the_gallery(world):
    from deeprank.search.searcher import Searcher
    with pytest.raises(PipelineError, match="not in the gallery"):
        Searcher(str(world["model"]), str(world["train"]), num_workers=0).row_vector(10 ** 6)


# ----------------------------------------------------------------------------- the web page in a real browser

@pytest.fixture(scope="module")
def live_server(world):
    """The search page served on a free localhost port by waitress (as --serve runs it), in a thread."""
    import threading

    from deeprank.search.searcher import Searcher
    from deeprank.search.web import create_app, make_server
    server = make_server(create_app(Searcher(str(world["model"]), str(world["train"]), num_workers=0), k=4))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(10)


def test_the_page_in_a_real_browser(live_server, world):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = chromium()
    gallery = read_embeddings(world["train"])
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(live_server + "/")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery figure")) > 0)  # the gallery browser
        assert not browser.find_element(By.ID, "found").is_displayed()  # no empty headings before a search
        browser.find_element(By.ID, "file").send_keys(gallery.paths[9])  # choose an image to upload
        figures = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results figure") or None)
        assert len(figures) == 4
        captions = [f.find_element(By.TAG_NAME, "figcaption").text for f in figures]
        from deeprank.class_names import ClassNames
        named = ClassNames.for_paths(gallery.paths).show(gallery.labels[9])  # words.txt's name, then the id
        assert named != gallery.labels[9]
        assert captions[0].startswith(f"1. {named} · d=0.000") and all(" · d=" in c for c in captions)
        loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda b: b.execute_script(loaded))  # every thumbnail decoded
        row = figures[1].get_attribute("data-row")
        figures[1].click()  # search with a result
        wait.until(lambda b: f"gallery image {row}" in b.find_element(By.ID, "query").text)
        again = browser.find_elements(By.CSS_SELECTOR, "#results figure")
        assert len(again) == 4 and row not in [f.get_attribute("data-row") for f in again]
        browser.get(live_server + "/image/..%2F..%2F..%2Fetc%2Fpasswd")  # a path outside the gallery: refused
        assert "root:" not in browser.page_source and "error" in browser.page_source
    finally:
        browser.quit()


def test_raw_dot_dot_requests_are_refused(live_server):
    import http.client
    host, port = live_server.rsplit("/", 1)[1].split(":")
    for path in ("/image/../../../../etc/passwd", "/../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", path)  # sent as written: no client-side normalisation
        answer = connection.getresponse()
        body = answer.read()
        assert answer.status == 404 and b"root:" not in body, path
        connection.close()


def test_class_names_come_from_words_txt_and_fall_back_to_ids(world, tmp_path, capsys):
    from deeprank.class_names import ClassNames
    gallery = read_embeddings(world["train"])
    label = gallery.labels[0]
    names = ClassNames.for_paths(gallery.paths)  # words.txt beside wnids.txt, found from the image paths
    assert names.name(label).startswith("synthetic ") and names.show(label) == f"{names.name(label)} ({label})"
    words = (world["data"] / "words.txt").read_text().splitlines()
    assert names.name(label) == next(line.split("\t")[1] for line in words if line.startswith(label))
    assert ClassNames.for_paths(["/elsewhere/cats/1.jpg"]).show("cats") == "cats"  # no names: the label itself
    own = tmp_path / "names.tsv"
    own.write_text(f"{label}\twalking stick, walkingstick, stick insect\n")
    assert ClassNames.for_paths(gallery.paths, own).show(label) == f"walking stick ({label})"
    out_json = tmp_path / "hits.json"
    assert run("--model", world["model"], "--gallery", world["train"], "--k", 2, "--json", out_json,
               "--num_workers", 0, "--class_names", own, gallery.paths[0]) == 0
    hit = json.loads(out_json.read_text())[0]["results"][0]
    assert hit["label"] == label and hit["name"] == "walking stick"
    assert f"walking stick ({label})" in capsys.readouterr().out
    long = image_search.shown({"name": "Yorkshire terrier, " * 4, "label": "n02094433"})
    assert len(long) == image_search.LABEL_WIDTH and long.endswith("… (n02094433)")  # the column stays aligned


def test_grid_colours_follow_the_query_label_the_gallery_knows(tmp_path, monkeypatch):
    from deeprank.embedding_io import Embeddings
    gallery = Embeddings([str(tmp_path / "csv_images" / f"{i}.jpg") for i in range(3)], ["cat", "dog", "cat"],
                         np.zeros((3, 2), np.float32), {})
    drawn = []
    monkeypatch.setattr(image_search, "save_captioned_grid", lambda path, rows: drawn.append(rows))
    hits = [{"path": p, "label": lab, "name": None, "distance": 0.5} for p, lab in zip(gallery.paths, gallery.labels,
                                                                                       strict=True)]
    queries = [gallery.paths[0], str(tmp_path / "photos" / "q.jpg"), str(tmp_path / "dog" / "q.jpg")]
    image_search.save_grid(tmp_path / "g.png", [{"query": q, "results": hits} for q in queries], gallery)
    colours = [[colour for _, _, colour in row[1:]] for row in drawn[0]]
    assert colours[0] == ["green", "red", "green"]  # a gallery image: its own label (a CSV label, not its folder)
    assert colours[1] == ["black"] * 3  # a photo from elsewhere: no label known, so no colour
    assert colours[2] == ["red", "green", "red"]  # a folder named as a gallery label


def test_skipped_queries_and_a_large_k_are_said(world, tmp_path, capsys):
    gallery = read_embeddings(world["train"])
    folder = tmp_path / "queries"
    folder.mkdir()
    shutil.copy(gallery.paths[0], folder / "good.JPEG")
    (folder / "broken.JPEG").write_text("not a picture")
    assert run("--model", world["model"], "--gallery", world["train"], "--k", 1000, "--on_bad_image", "skip",
               "--num_workers", 0, folder) == 0
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable query image(s): {folder / 'broken.JPEG'}" in err
    assert f"--k 1000 is more than the {len(gallery)} gallery images a query can get" in err


def test_the_served_page_answers_200_concurrent_uploads(world, tmp_path, monkeypatch):
    """waitress under load, bounded (200 requests, 8 clients, localhost): every upload answered 200
    with k results and the image itself first, and no upload left on disk."""
    import tempfile
    import threading

    from bench.bench_serve import load
    from deeprank.search.searcher import Searcher
    from deeprank.search.web import create_app, make_server
    uploads = tmp_path / "tmp"
    uploads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(uploads))  # where the server keeps an upload while embedding it
    server = make_server(create_app(Searcher(str(world["model"]), str(world["train"]), num_workers=0), k=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    gallery = read_embeddings(world["train"])
    try:
        answers = load(server.effective_port, [gallery.paths[i % len(gallery)] for i in range(200)], clients=8)
    finally:
        server.close()
        thread.join(10)
    assert [status for status, _, _ in answers] == [200] * 200
    for i, (_, body, _) in enumerate(answers):
        results = body["results"]
        itself = os.path.relpath(gallery.paths[i % len(gallery)], world["train"].parent)
        assert len(results) == 3 and results[0]["distance"] < 1e-4, i
        assert itself in [hit["path"] for hit in results if hit["distance"] < 1e-4], i  # first, or tied with a twin
    assert list(uploads.iterdir()) == []  # every upload's temporary folder removed


def test_serve_runs_under_waitress_from_the_shell(world):
    """image_search.py --serve as a user starts it: waitress on the port it prints; Ctrl-C (SIGINT) stops it."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    from conftest import ROOT
    process = subprocess.Popen([sys.executable, str(ROOT / "image_search.py"), "--serve", "--port", "0", "--model",
                                str(world["model"]), "--gallery", str(world["train"]), "--num_workers", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "search page:" not in line:
            line = process.stdout.readline()
            assert line, process.stderr.read()[-2000:]
        assert "waitress" in line
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=30) as answer:
            info = json.loads(answer.read())
        assert info["rows"] == len(read_embeddings(world["train"])) and info["model"] == world["model"].name
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
