"""The search page of image_search.py --serve: a small Flask app over a Searcher.

    GET  /                          the page (search.html beside this module: plain HTML and JavaScript)
    GET  /api/info                  gallery size, model, index, k
    POST /api/search                multipart field "image": its k nearest gallery images
    GET  /api/search?row=N          the k nearest of gallery image N (itself left out)
    GET  /api/gallery?page=P        one page of the gallery, in file order
    GET  /image/N                   gallery image N as a JPEG thumbnail

Images are served by gallery row number only: no request names a file, so nothing outside the
gallery's own images can be read. Uploads larger than max_upload_mb are refused (413) before
they are read; the rest are decoded by the loaders' decoder (decompression-bomb guard included).
Bad requests get a JSON {"error": ...} with status 400, 404 or 413.
"""

import io
import os
import tempfile
from pathlib import Path

from flask import Flask, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from deeprank.common import PipelineError
from deeprank.images import BadImages, load_rgb

PAGE = Path(__file__).resolve().parent / "search.html"
THUMBNAIL = 256  # longest side of a served image, in pixels
THREADS = 8      # waitress worker threads (requests answered at once; forward passes still run one at a time)
PER_PAGE = 48    # gallery browser


def create_app(searcher, k=10, max_upload_mb=20):
    """The Flask app; searcher: a searcher.Searcher with a gallery."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb) << 20
    gallery = searcher.load_gallery()
    _ = searcher.index  # build or load the index now, not on the first request

    def hits(results):
        return [{**{key: hit[key] for key in ("rank", "distance", "label", "name", "row")},
                 "path": os.path.relpath(hit["path"], os.path.dirname(os.path.abspath(searcher.gallery_path))),
                 "url": f"/image/{hit['row']}"} for hit in results]

    @app.errorhandler(HTTPException)
    def http_error(err):
        message = err.description if err.code != 413 else f"the upload is larger than {max_upload_mb} MB"
        return jsonify(error=message), err.code

    @app.errorhandler(BadRequest)
    def bad_request(err):
        return jsonify(error=str(err)), err.status

    @app.get("/")
    def page():
        return send_file(PAGE, mimetype="text/html")

    @app.get("/api/info")
    def info():
        model = os.path.basename(searcher.header.get("model", ""))  # the file's name: no folder of this machine
        return jsonify(rows=len(gallery), dim=searcher.dim, model=model, k=k,
                       index=getattr(searcher.index, "description", "exact search"), per_page=PER_PAGE)

    @app.post("/api/search")
    def search_upload():
        upload = request.files.get("image")
        if upload is None:
            raise BadRequest("send the image as the multipart field 'image'")
        data = upload.read()
        if not data:
            raise BadRequest("the upload is empty")
        vectors = embed_upload(searcher, data, upload.filename or "upload")
        return jsonify(results=hits(searcher.search(vectors, requested_k(k))[0]))

    @app.get("/api/search")
    def search_row():
        row = request.args.get("row", "")
        if not row.isdigit() or int(row) >= len(gallery):
            raise BadRequest(f"row must be a gallery row from 0 to {len(gallery) - 1}, not {row!r}", 404)
        row = int(row)
        results = searcher.search(searcher.row_vector(row), requested_k(k), exclude=[row])[0]
        label = gallery.labels[row]
        return jsonify(query={"row": row, "label": label, "name": searcher.names.name(label), "url": f"/image/{row}"},
                       results=hits(results))

    @app.get("/api/gallery")
    def gallery_page():
        page = request.args.get("page", "0")
        pages = max(1, -(-len(gallery) // PER_PAGE))
        if not page.isdigit() or int(page) >= pages:
            raise BadRequest(f"page must be from 0 to {pages - 1}, not {page!r}", 404)
        start = int(page) * PER_PAGE
        rows = range(start, min(start + PER_PAGE, len(gallery)))
        return jsonify(page=int(page), pages=pages, rows=len(gallery),
                       items=[{"row": r, "label": gallery.labels[r], "name": searcher.names.name(gallery.labels[r]),
                               "url": f"/image/{r}"} for r in rows])

    @app.get("/image/<int:row>")
    def image(row):
        if row >= len(gallery):
            raise BadRequest(f"no gallery image {row}", 404)
        return send_file(thumbnail_jpeg(gallery.paths[row]), mimetype="image/jpeg", max_age=3600)

    return app


def requested_k(default):
    """The request's k (neighbours to return), checked; default when it names none."""
    value = request.values.get("k", str(default))
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise BadRequest(f"k must be a whole number from 1 to 1000, not {value!r}")
    return int(value)


def thumbnail_jpeg(path):
    """A gallery image as a JPEG of at most THUMBNAIL pixels a side, in memory (404 if unreadable)."""
    try:
        picture = load_rgb(path)
    except PipelineError as err:
        raise BadRequest(str(err), 404) from None
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=90)
    out.seek(0)
    return out


class BadRequest(Exception):
    """A request the page answers with {"error": message} and a status."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def embed_upload(searcher, data, name):
    """The (1, D) vector of uploaded image bytes, embedded as a file (so exactly as a query from
    the shell is); not an image, or one too large to decode, is a BadRequest."""
    suffix = Path(name).suffix.lower()[:8] if Path(name).suffix.isascii() else ""
    with tempfile.TemporaryDirectory(prefix="image-search-upload.") as folder:
        path = os.path.join(folder, "upload" + suffix)
        with open(path, "wb") as handle:
            handle.write(data)
        bad_images = BadImages("skip", None)
        vectors, kept = searcher.embed([path], bad_images)
        if not kept:
            reason = bad_images.found.get(path, "not an image that can be decoded")
            raise BadRequest(f"cannot read {name!r} ({reason.replace(path, repr(name))}); upload an image file")
    return vectors


def make_server(app, host="127.0.0.1", port=0, threads=THREADS):
    """A waitress server of the app (a production WSGI server in pure Python), not yet running:
    .run() serves until .close(); port 0 picks a free one (.effective_port)."""
    import waitress

    return waitress.create_server(app, host=host, port=port, threads=threads, ident="deep-ranking search")


def serve(searcher, host, port, k, max_upload_mb, dev_server=False):
    """Run the page until interrupted: under waitress, or Flask's development server with dev_server."""
    app = create_app(searcher, k, max_upload_mb)
    shown = f"[{host}]" if ":" in host else host
    server = None if dev_server else make_server(app, host, port)
    port = server.effective_port if server is not None else port
    print(f"search page: http://{shown}:{port}/  ({len(searcher.gallery)} gallery images; "
          f"{'Flask development server' if dev_server else f'waitress, {THREADS} threads'}; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: other machines can reach the page", flush=True)
    if server is None:
        app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)
        return
    try:
        server.run()
    finally:
        server.close()
