"""Benchmark: find_duplicates.py's passes on a gallery of 100,000+ real image files on disk.

Makes the gallery from --data's images (every split): each source re-encoded as JPEG at
several sizes and qualities, mirrored too (VARIANTS), until --files files, plus --identical
byte-identical copies of random ones, so that file sizes collide as they do in a photo
collection (a few thousand distinct sizes among 100,000 files) and a share of the files is
larger than the 64 KiB head. The gallery's vectors are synthetic (embedding is not what is
measured): random unit vectors, each byte-identical copy near its source's.

Then it times, in one run:
- find_duplicates.py as a whole process, its printed passes (hash: sizes, heads, whole files
  where heads collide; join; grouping), with the files in the page cache and, where the
  kernel lets it drop the cache (root), cold;
- the hash pass alone against the previous order (sizes, then the full SHA-256 of every file
  whose size collides), alternated, medians of --repeats, warm.

    python -m bench.bench_hash_pass --data ../shared/data/tiny-imagenet-mini --work /tmp/hash_bench
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from deeprank.common import sha256_of
from deeprank.datasets import is_image
from deeprank.duplicates import file_sizes, identical_files
from deeprank.embedding_io import EmbeddingWriter

ROOT = Path(__file__).resolve().parents[1]
# (side in pixels, JPEG quality, mirrored): 24 variants of each source image, a sixth of them photo-sized
# files larger than the 64 KiB head (1024 px at quality 95)
VARIANTS = [(side, quality, flip) for side in (64, 128, 192, 256, 384, 1024) for quality in (80, 95)
            for flip in (False, True)]


def write_variants(job):
    """Write every variant of one source image into its own folder; returns the paths written."""
    source, folder = job
    os.makedirs(folder, exist_ok=True)
    written = []
    with Image.open(source) as picture:
        picture = picture.convert("RGB")
        for side, quality, flip in VARIANTS:
            copy = picture.resize((side, side), Image.Resampling.BICUBIC)
            if flip:
                copy = copy.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = os.path.join(folder, f"{side}_{quality}{'_m' if flip else ''}.jpg")
            copy.save(path, format="JPEG", quality=quality)
            written.append(path)
    return written


def make_gallery(data, work, files, identical, seed=0):
    """(paths, {copy row: source row}) of the gallery under work/images (made once, reused)."""
    listing = work / "paths.tsv"
    if listing.is_file():
        rows = [line.split("\t") for line in listing.read_text().splitlines()]
        return [path for path, _ in rows], {n: int(source) for n, (_, source) in enumerate(rows) if source != "-"}
    sources = sorted(str(p) for p in Path(data).rglob("*") if p.is_file() and is_image(p.name))
    needed = -(-files // len(VARIANTS))
    if needed > len(sources):
        raise SystemExit(f"--data {data} has {len(sources)} images: {len(sources) * len(VARIANTS)} files at most")
    jobs = [(source, str(work / "images" / f"{n:05d}")) for n, source in enumerate(sources[:needed])]
    with Pool(os.cpu_count()) as pool:
        paths = [p for batch in pool.imap(write_variants, jobs, chunksize=16) for p in batch][:files]
    rng = random.Random(seed)
    (work / "images" / "identical").mkdir(parents=True, exist_ok=True)
    copies = {}
    for number, source in enumerate(rng.sample(range(len(paths)), identical)):
        target = work / "images" / "identical" / f"{number:05d}.jpg"
        target.write_bytes(Path(paths[source]).read_bytes())
        copies[len(paths)] = source
        paths.append(str(target))
    listing.write_text("".join(f"{path}\t{copies.get(n, '-')}\n" for n, path in enumerate(paths)))
    return paths, copies


def old_identical_files(paths):
    """The previous hash pass: sizes, then the full SHA-256 of every file whose size collides."""
    by_size = defaultdict(list)
    for row, path in enumerate(paths):
        by_size[os.path.getsize(path)].append(row)
    pairs = []
    for rows in by_size.values():
        if len(rows) < 2:
            continue
        by_hash = defaultdict(list)
        for row in rows:
            by_hash[sha256_of(paths[row]).digest()].append(row)
        pairs += [(same[0], other) for same in by_hash.values() for other in same[1:]]
    return sorted(pairs)


def new_identical_files(paths):
    return identical_files(paths, file_sizes(paths)[0])[0]


def drop_page_cache():
    """Empty the kernel's page cache (root only); whether it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def run_stage(gallery, out):
    """find_duplicates.py as a whole process: (wall seconds, {pass: seconds} as it printed them)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "find_duplicates.py"), "--gallery", str(gallery),
                             "--threshold", "0.01", "--keep", "largest", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"find_duplicates.py failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("passes: "))
    passes = {name: float(value.split()[0]) for name, value in
              (part.split(" ", 1) for part in line.removeprefix("passes: ").split(", "))}
    return wall, passes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--work", required=True, help="where the gallery is made (kept for reruns)")
    parser.add_argument("--files", type=int, default=100_000, help="re-encoded files (before the identical copies)")
    parser.add_argument("--identical", type=int, default=1_000, help="planted byte-identical copies")
    parser.add_argument("--dim", type=int, default=128, help="dimension of the synthetic vectors")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths, copies = make_gallery(args.data, work, args.files, args.identical)
    made = time.perf_counter() - start
    sizes = file_sizes(paths)[0]
    print(f"{len(paths):,} files ({len(copies):,} byte-identical copies), {sizes.sum() / 1e9:.2f} GB, "
          f"{len(np.unique(sizes)):,} distinct sizes, {np.mean(sizes > 65536):.1%} larger than 64 KiB; made or "
          f"listed in {made:.1f} s", flush=True)

    rng = np.random.default_rng(0)  # random unit vectors; each identical copy's a little off its source's
    vectors = rng.standard_normal((len(paths), args.dim)).astype(np.float32)
    for copy, source in copies.items():
        vectors[copy] = vectors[source] + rng.normal(0, 0.002, args.dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gallery = work / "gallery.npy"
    with EmbeddingWriter(gallery, args.dim, True, "bench") as out:
        out.write(paths, ["c"] * len(paths), vectors)

    table = []
    for state in ("warm", "cold"):
        if state == "cold" and not drop_page_cache():
            print("cold: not measured (the page cache cannot be dropped here: needs root)")
            continue
        if state == "warm":
            run_stage(gallery, work / "groups.csv")  # reads every file once: the page cache holds them
        wall, passes = run_stage(gallery, work / "groups.csv")
        table.append((state, wall, passes))
    print("| page cache | find_duplicates.py, whole process | hash | join | grouping |")
    print("|---|---|---|---|---|")
    for state, wall, passes in table:
        print(f"| {state} | {wall:.1f} s | {passes['hash']:.2f} s | {passes['join']:.2f} s | "
              f"{passes['grouping']:.2f} s |")

    new_s, old_s = [], []
    for repeat in range(args.repeats):  # alternated, warm
        found = []
        for timings, finder in ((new_s, new_identical_files), (old_s, old_identical_files)):
            start = time.perf_counter()
            found.append(finder(paths))
            timings.append(time.perf_counter() - start)
        if repeat == 0:
            assert found[0] == found[1], "the two orders find different pairs"
            print(f"byte-identical pairs found: {len(found[0]):,} (planted: {len(copies):,})")
    new, old = statistics.median(new_s), statistics.median(old_s)
    print(f"hash pass alone, warm, medians of {args.repeats}: sizes + 64 KiB heads + whole files where heads "
          f"collide {new:.2f} s; sizes + whole files where sizes collide {old:.2f} s ({old / new:.2f} x)")
    cpu = "bf16" if "bf16" in open("/proc/cpuinfo").read() else "fp32 only"
    print(f"({os.cpu_count()} cores, {cpu} CPU)")


if __name__ == "__main__":
    main()
