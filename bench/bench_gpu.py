"""Benchmark: whole jobs on a GPU, as a user runs them (each stage a process of its own).

Generates a TinyImageNet-layout set of 64 px JPEGs (synthetic_data.py), samples triplets, then
times, as whole processes with the GPU's utilisation sampled by nvidia-smi every 100 ms:
  train all  train_net.py, every layer trainable (--trainable all), 2 epochs
  train conv5  the same with --trainable conv5
  embed      gen_embeddings.py on --embed_small and --embed_large images
Training img/s: the log's second epoch (steady: the first includes compiling) and the whole
process. Embedding: whole-job seconds for each size, and steady img/s from their difference.

    python -m bench.bench_gpu                          # ResNet-101 at 224 px, bf16 (the issue's table)
    python -m bench.bench_gpu --device cpu --backbone resnet18 --image_size 64 --classes 4 --per_class 40 \\
        --embed_small 100 --embed_large 200 --batch_size 8 --workers 2     # a smoke run of this script on a CPU
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class GpuBusy:
    """Mean GPU utilisation (%) while a block runs, from `nvidia-smi -lms 100`; None without it."""

    def __enter__(self):
        self.samples, self.process = [], None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,"
                                             "nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.process.stdout:
            if line.strip().split(",")[0].strip().isdigit():
                self.samples.append(int(line.strip().split(",")[0]))

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def timed(command, cwd):
    """(seconds, mean GPU utilisation) of one whole process; stops the bench if it fails."""
    start = time.perf_counter()
    with GpuBusy() as busy:
        result = subprocess.run([sys.executable] + command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:1])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, busy.mean


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per_class", type=int, default=1000, help="train images per class (64 px JPEGs)")
    parser.add_argument("--batch_size", type=int, default=64, help="triplets per step")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--embed_small", type=int, default=4000)
    parser.add_argument("--embed_large", type=int, default=20000)
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    stage = lambda name: str(ROOT / name)  # noqa: E731 - a one-line helper, named for the lines below
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        data = os.path.join(folder, "data")
        subprocess.run([sys.executable, stage("synthetic_data.py"), "--out", data, "--classes", str(args.classes),
                        "--train_per_class", str(args.per_class), "--val_per_class", "10"], check=True,
                       capture_output=True)
        csv = os.path.join(folder, "t.csv")
        subprocess.run([sys.executable, stage("triplet_sampler.py"), "--data", data, "--training", "1", "--out", csv],
                       check=True, capture_output=True)
        common = ["--backbone", args.backbone, "--weights", "none", "--image_size", str(args.image_size),
                  "--device", args.device, "--num_workers", str(args.workers), "--compile", args.compile]
        print(f"{args.classes * args.per_class} images of 64 px; {args.backbone} at {args.image_size} px on "
              f"{args.device}; batch {args.batch_size} triplets; {args.workers} loader workers", flush=True)
        rows = []
        for trainable in ("all", "conv5"):
            out = os.path.join(folder, f"{trainable}.model")
            seconds, busy = timed([stage("train_net.py"), *common, "--trainable", trainable, "--epochs", "2",
                                   "--batch_size", str(args.batch_size), "--triplets", csv, "--out", out], folder)
            log = [json.loads(line) for line in Path(out).with_name(f"{trainable}_log.jsonl").read_text().splitlines()]
            images = sum(row["steps"] for row in log) * 3 * args.batch_size
            rows.append((f"train, {trainable} trainable", f"{log[-1]['images_per_s']:.0f} img/s (epoch 2)",
                         f"{images / seconds:.0f} img/s ({seconds:.1f} s, 2 epochs)", busy))
        model = os.path.join(folder, "all.model")
        times = {}
        for count in (args.embed_small, args.embed_large):
            subset = os.path.join(folder, f"embed{count}.csv")
            with open(subset, "w") as handle:  # the first `count` train images, as a triplet CSV's rows
                images = sorted(Path(data, "train").rglob("*.JPEG"))[:count]
                handle.write("query,positive,negative\n" + "".join(f"{p},{p},{p}\n" for p in images))
            seconds, busy = timed([stage("gen_embeddings.py"), "--model", model, "--device", args.device,
                                   "--num_workers", str(args.workers), "--compile", args.compile,
                                   "--train_triplets", subset, "--test_triplets", subset,
                                   "--train_out", os.path.join(folder, "a.npy"),
                                   "--test_out", os.path.join(folder, "b.npy")], folder)
            times[count] = seconds
            rows.append((f"embed {len(images)} images (whole job)", "", f"{seconds:.1f} s", busy))
        steady = (args.embed_large - args.embed_small) / max(1e-9, times[args.embed_large] - times[args.embed_small])
        rows.append(("embed, steady (from the difference)", f"{steady:.0f} img/s", "", None))
    print("\n| job | steady state | whole process | GPU busy |\n|---|---|---|---|")
    for name, steady_text, whole, busy in rows:
        print(f"| {name} | {steady_text} | {whole} | {'n/a' if busy is None else f'{busy:.0f}%'} |")


if __name__ == "__main__":
    main()
