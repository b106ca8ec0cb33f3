"""Benchmark: a checkpoint embedded by today's eager path against its ONNX exports (fp32, int8), as
whole gen_embeddings.py processes, and what each costs in accuracy.

  eager       python gen_embeddings.py --model m.model (PyTorch; bf16 autocast where the CPU has it)
  onnx fp32   python gen_embeddings.py --model m.onnx        (export_model.py --tta as --tta)
  onnx int8   python gen_embeddings.py --model m.int8.onnx   (export_model.py --int8, calibrated on
              --calibrate_images train images of --data)

Speed: the images of --data's train/ and val/ hard-linked --repeat times into one folder (so the
run is long enough that start-up is a small share of it: the start-up, a run of 32 images, is
printed beside it). Each variant runs at its best batch size and loader setting, chosen by one
untimed run of each setting of a small grid on the mini set's train images alone; then the
variants' whole processes run --repeats times, alternated, and the medians are compared.

Accuracy: every train and val image of --data embedded by each variant and by eager fp32
(--no_amp); eval.py's MAP@R, P@1 and test-triplet accuracy (val against train), and each
variant's top-10 overlap with eager fp32 (the share of each val image's 10 nearest train images
both find). The figures are written to --out as JSON.

    python -m bench.bench_export --model rec.model --tta flip
    python -m bench.bench_export --model rec.model --tta flip --repeat 2 --repeats 1 --skip_speed
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "tiny-imagenet-mini"
# the settings tried: images per forward pass; loader processes (eager) or decoding threads (onnxruntime)
EAGER_GRID = [("--batch_size", b, "--num_workers", w) for b in (32, 64) for w in (1, 2)]
ONNX_GRID = [("--batch_size", b, "--num_workers", w) for b in (16, 64) for w in (0, 1, 2)]
NEIGHBOURS = 10


def python(*argv, quiet=True):
    """Run one of the project's scripts as a whole process; its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=quiet, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{result.stderr[-2000:] if quiet else ''}")
    return seconds


def cpu_kind():
    """The CPU's model name and whether it runs bf16 (AMX or AVX512-BF16)."""
    name, flags = platform.processor() or "cpu", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
    return f"{name}, {os.cpu_count()} cores, " + (f"bf16 ({', '.join(bf16)})" if bf16 else "no bf16")


def prepare(work, data, repeat):
    """work/data: a TinyImageNet copy with val/ in class folders; work/big/train/<class>/: its train and
    val images hard-linked `repeat` times (a copy where links do not work); work/small: train only."""
    prepared = work / "data"
    if not prepared.is_dir():
        shutil.copytree(data, prepared)
        python("transform_validation.py", "--data", prepared)
    for name, splits, times in (("big", ("train", "val"), repeat), ("small", ("train",), 1)):
        root = work / name / "train"
        if root.is_dir():
            continue
        for split in splits:
            for image in sorted((prepared / split).glob("*/images/*")):
                folder = root / image.parts[-3]
                folder.mkdir(parents=True, exist_ok=True)
                for copy in range(times):
                    target = folder / f"{split}{copy}_{image.name}"
                    try:
                        os.link(image, target)
                    except OSError:
                        shutil.copy(image, target)
    return prepared


def embed_argv(model, extra, data, out):
    return ["gen_embeddings.py", "--model", model, "--data", data, "--split", "train", "--train_out", out, *extra]


def choose(name, model, extra, grid, small, out):
    """The grid setting whose whole process on the small set was fastest."""
    times = {}
    for setting in grid:
        times[setting] = python(*embed_argv(model, [*extra, *setting], small, out))
        print(f"  {name:<10} {' '.join(map(str, setting)):<30} {times[setting]:7.1f} s", flush=True)
    return min(times, key=times.get)


def read_vectors(path):
    sys.path.insert(0, str(ROOT))
    from deeprank.embedding_io import read_embeddings
    return read_embeddings(path)


def top_overlap(reference, other, k=NEIGHBOURS):
    """Mean share of each val image's k nearest train images (by reference's vectors) other also finds;
    reference, other: (train, val) embeddings."""
    from deeprank.quantize import neighbour_overlap
    return neighbour_overlap(reference[1].vectors, other[1].vectors, k, reference[0].vectors, other[0].vectors)


def quality(work, prepared, variants, tta):
    """MAP@R, P@1, test-triplet accuracy and top-10 overlap with eager fp32, per variant."""
    val_csv = work / "val_triplets.csv"
    if not val_csv.is_file():
        python("triplet_sampler.py", "--data", prepared, "--training", "0", "--out", val_csv)
    rows, files = {}, {}
    for name, (model, extra) in {"eager fp32": (variants["eager"][0], ["--no_amp", "--tta", tta]),
                                 **variants}.items():
        tag = name.replace(" ", "_")
        train, val = work / f"q_{tag}_train.txt", work / f"q_{tag}_val.txt"
        python("gen_embeddings.py", "--model", model, "--data", prepared, "--train_out", train, "--test_out", val,
               *extra)
        metrics = work / f"q_{tag}.json"
        python("eval.py", "--train_embeddings", train, "--test_embeddings", val, "--test_triplets", val_csv,
               "--json", metrics, "--show", "0")
        m = json.loads(metrics.read_text())
        files[name] = (read_vectors(train), read_vectors(val))
        rows[name] = {"map_at_r": m["map_at_r"], "precision_at_1": m["precision_at_1"],
                      "test_triplet_accuracy": m.get("test_triplet_accuracy")}
    for name in rows:
        rows[name]["top10_overlap_with_eager_fp32"] = top_overlap(files["eager fp32"], files[name])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint (the recommended recipe's, for the docs)")
    parser.add_argument("--data", default=str(MINI), help="a TinyImageNet-layout set (default: the mini set)")
    parser.add_argument("--work", default="bench_export_work", help="scratch folder (kept: reruns reuse it)")
    parser.add_argument("--tta", default="flip", choices=("none", "flip"), help="as the recipe embeds (default: flip)")
    parser.add_argument("--repeat", type=int, default=3, help="copies of the images in the timed folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (medians)")
    parser.add_argument("--calibrate_images", type=int, default=256, help="int8 calibration images")
    parser.add_argument("--int8_flags", default="", help="more export_model.py flags for the int8 model")
    parser.add_argument("--skip_speed", action="store_true", help="accuracy only")
    parser.add_argument("--skip_accuracy", action="store_true", help="speed only")
    parser.add_argument("--variants", default="eager,onnx fp32,onnx int8",
                        help="the variants timed, comma-separated: eager, onnx fp32, onnx int8, eager fp32 (--no_amp: "
                             "today's path on a CPU without bf16) (default: %(default)s)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=FLAGS",
                        help="a variant's gen_embeddings.py flags instead of the grid's choice (e.g. an earlier run's: "
                             "'onnx int8=--batch_size 64 --num_workers 2')")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(work, Path(args.data), args.repeat)
    fp32, int8 = work / "m.onnx", work / "m.int8.onnx"
    python("export_model.py", "--model", args.model, "--tta", args.tta, "--out", fp32)
    python("export_model.py", "--model", args.model, "--tta", args.tta, "--int8", "--calibrate", prepared / "train",
           "--calibrate_images", args.calibrate_images, "--out", int8, *args.int8_flags.split(), quiet=False)
    variants = {"eager": (args.model, ["--tta", args.tta]), "onnx fp32": (fp32, []), "onnx int8": (int8, []),
                "eager fp32": (args.model, ["--tta", args.tta, "--no_amp"])}  # what a CPU without bf16 runs
    timed = {name: variants[name] for name in args.variants.split(",")}
    result = {"cpu": cpu_kind(), "model": str(args.model), "tta": args.tta}
    print(f"CPU: {result['cpu']}")
    if not args.skip_speed:
        images = sum(1 for _ in (work / "big" / "train").rglob("*.*"))
        result["images"] = images
        print(f"choosing each variant's batch size and loader setting on {work / 'small'}:")
        given = dict(item.split("=", 1) for item in args.setting)
        chosen = {name: tuple(given[name].split()) if name in given else
                  choose(name, model, extra, EAGER_GRID if name.startswith("eager") else ONNX_GRID, work / "small",
                         work / "choose.txt") for name, (model, extra) in timed.items()}
        result["settings"] = {name: " ".join(map(str, setting)) for name, setting in chosen.items()}
        startup = {name: python(*embed_argv(model, [*extra, *chosen[name]], work / "one", work / "one.txt"))
                   for name, (model, extra) in timed.items()} if make_one(work) else {}
        times = {name: [] for name in timed}
        for _ in range(args.repeats):
            for name, (model, extra) in timed.items():
                times[name].append(python(*embed_argv(model, [*extra, *chosen[name]], work / "big", work / "big.txt")))
        median = {name: statistics.median(t) for name, t in times.items()}
        base = median.get("eager", next(iter(median.values())))
        result["speed"] = {name: {"median_s": median[name], "runs_s": times[name], "img_per_s": images / median[name],
                                  "startup_s": startup.get(name), "vs_eager": base / median[name],
                                  "settings": result["settings"][name]} for name in timed}
        print(f"\n{images} images, whole gen_embeddings.py processes, medians of {args.repeats}:")
        for name, row in result["speed"].items():
            print(f"  {name:<10} {row['median_s']:7.1f} s  {row['img_per_s']:7.1f} img/s  {row['vs_eager']:5.2f}x eager"
                  f"  (start-up {row['startup_s']:.1f} s; {row['settings']})")
    if args.skip_accuracy:
        return write_result(args.out, result)
    result["accuracy"] = quality(work, prepared, {k: v for k, v in variants.items() if k != "eager fp32"}, args.tta)
    print("\naccuracy on val against train:")
    for name, row in result["accuracy"].items():
        print(f"  {name:<10} MAP@R {row['map_at_r']:.4f}  P@1 {row['precision_at_1']:.4f}  test triplets "
              f"{row['test_triplet_accuracy']:.4f}  top-10 overlap with eager fp32 "
              f"{row['top10_overlap_with_eager_fp32']:.3f}")
    return write_result(args.out, result)


def write_result(path, result):
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def make_one(work):
    """work/one/train/<class>/: 32 images, for the start-up figure."""
    root = work / "one" / "train"
    if not root.is_dir():
        for image in sorted((work / "small" / "train").rglob("*.*"))[:32]:
            (root / image.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(image, root / image.parent.name / image.name)
    return True


if __name__ == "__main__":
    sys.exit(main())
