"""Benchmark: the search page under load, as users reach it: `image_search.py --serve`'s app under
waitress on a free localhost port, --requests image uploads (POST /api/search, multipart, as the
page sends them) from --clients concurrent clients; requests per second and the median and 95th
percentile latency, every answer checked (200, k results). Bounded in count and time, localhost only.

    python -m bench.bench_serve --model deepranknet.model --gallery gallery.npy
    python -m bench.bench_serve --model m.model --gallery g.npy --requests 200 --clients 8
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def post_image(port, path, timeout=60):
    """POST one image file to /api/search as the page's form does; (status, JSON answer, seconds)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{Path(path).name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + Path(path).read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read()), time.perf_counter() - start
    finally:
        connection.close()


def load(port, paths, clients=8):
    """Upload every path once, from `clients` concurrent clients; [(status, answer, seconds)] in order."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda path: post_image(port, path), paths))


def main():
    from deeprank.embedding_io import read_embeddings
    from deeprank.search.searcher import Searcher
    from deeprank.search.web import THREADS, create_app, make_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    searcher = Searcher(args.model, args.gallery, num_workers=0)
    server = make_server(create_app(searcher, k=args.k))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    gallery = read_embeddings(args.gallery, mmap=True)
    paths = [gallery.paths[(i * 7919) % len(gallery)] for i in range(args.requests)]  # spread over the gallery
    post_image(server.effective_port, paths[0])  # warm-up: the first forward pass
    try:
        start = time.perf_counter()
        answers = load(server.effective_port, paths, args.clients)
        wall = time.perf_counter() - start
    finally:
        server.close()
    bad = [status for status, body, _ in answers if status != 200 or len(body.get("results", [])) != args.k]
    latencies = sorted(seconds for _, _, seconds in answers)
    cpu = "bf16" if "bf16" in open("/proc/cpuinfo").read() else "fp32 only"
    print(f"{args.requests} uploads from {args.clients} clients, waitress {THREADS} threads, {searcher.precision}, "
          f"{cpu} CPU: {args.requests / wall:.1f} requests/s, p50 {1000 * statistics.median(latencies):.0f} ms, "
          f"p95 {1000 * latencies[int(0.95 * (len(latencies) - 1))]:.0f} ms, {len(bad)} bad answers")


if __name__ == "__main__":
    main()
