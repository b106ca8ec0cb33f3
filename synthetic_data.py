"""Generate the embedded default dataset: a small, learnable TinyImageNet-layout tree.

Reads nothing; writes <out>/ with wnids.txt, words.txt, train/<wnid>/images/*.JPEG (+ a
boxes file), val/images/*.JPEG + val/val_annotations.txt, and test/images/*.JPEG. Each
class is a shape with its own colour and background texture; position, size, rotation,
colour and noise vary inside a class, and a few images are grayscale, as in TinyImageNet.

    python synthetic_data.py --out synthetic-tiny-imagenet --classes 6
"""

import argparse
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from deeprank.common import PipelineError, non_negative_int, positive_int, print_args, run_cli

# ---------------------------------------------------------------- hyperparameters
CLASSES = 6            # number of classes (at most len(SHAPES) * len(TEXTURES))
TRAIN_PER_CLASS = 40   # train images per class
VAL_PER_CLASS = 10     # val images per class
TEST_IMAGES = 10       # unlabelled test images
IMAGE_SIZE = 64        # pixels, as TinyImageNet
GRAY_SHARE = 0.05      # share of images saved as grayscale (TinyImageNet has some)
SEED = 0
# ----------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
TEXTURES = ("plain", "stripes", "checker", "dots")
PALETTE = ((220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40),
           (200, 60, 200), (40, 200, 210), (240, 130, 30), (140, 140, 140))


def class_recipes(count):
    """(wnid, name, shape, colour, texture) for each class; distinct shape/colour/texture mixes."""
    if count < 2:
        raise PipelineError("--classes must be at least 2")
    if count > len(SHAPES) * len(TEXTURES):
        raise PipelineError(f"--classes must be at most {len(SHAPES) * len(TEXTURES)}")
    recipes = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        texture = TEXTURES[(index // len(SHAPES) + index) % len(TEXTURES)]
        colour = PALETTE[(index * 3) % 4]  # classes share colours: shape and texture matter too
        wnid = f"n9{index:07d}"
        recipes.append((wnid, f"synthetic {shape} on {texture}", shape, colour, texture))
    return recipes


def _shape_points(shape, cx, cy, r, angle):
    """Polygon vertices of a shape centred at (cx, cy) with radius r, rotated by angle."""
    def rotate(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        return rotate([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "triangle":
        return rotate([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "diamond":
        return rotate([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])
    if shape == "bar":
        return rotate([(-r, -0.3 * r), (r, -0.3 * r), (r, 0.3 * r), (-r, 0.3 * r)])
    if shape == "cross":
        w = 0.35 * r
        return rotate([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                       (-w, w), (-r, w), (-r, -w), (-w, -w)])
    if shape == "star":
        return rotate([((r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5 - math.pi / 2),
                        (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5 - math.pi / 2))
                       for k in range(10)])
    raise ValueError(shape)


def draw_image(recipe, rng, size=IMAGE_SIZE):
    """One random image of a class: textured background, jittered shape, pixel noise."""
    from PIL import Image, ImageDraw

    _, _, shape, colour, texture = recipe
    base = rng.integers(150, 230)
    background = np.full((size, size, 3), base, dtype=np.float32)
    period = int(rng.integers(6, 11))
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "stripes":
        background[((xx + yy) // period) % 2 == 0] *= 0.55
    elif texture == "checker":
        background[((xx // period) + (yy // period)) % 2 == 0] *= 0.55
    elif texture == "dots":
        background[((xx % period) < 3) & ((yy % period) < 3)] *= 0.4
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, size - r, size=2)
    jitter = rng.integers(-30, 31, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(colour) + jitter, 0, 255))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r * 0.35)))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    box = [int(max(0, cx - r)), int(max(0, cy - r)), int(min(size - 1, cx + r)), int(min(size - 1, cy + r))]
    if rng.random() < GRAY_SHARE:
        image = image.convert("L")
    return image, box


def generate(out, classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
             test_images=TEST_IMAGES, seed=SEED, size=IMAGE_SIZE):
    """Write the dataset to out (which must not exist yet, or be empty); returns its Path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} already exists and is not empty; remove it or pick another --out")
    recipes = class_recipes(classes)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "wnids.txt").write_text("".join(f"{r[0]}\n" for r in recipes))
    (tmp / "words.txt").write_text("".join(f"{r[0]}\t{r[1]}\n" for r in recipes))
    for recipe in recipes:
        wnid = recipe[0]
        folder = tmp / "train" / wnid / "images"
        folder.mkdir(parents=True)
        boxes = []
        for index in range(train_per_class):
            image, box = draw_image(recipe, rng, size)
            name = f"{wnid}_{index}.JPEG"
            image.save(folder / name, quality=90)
            boxes.append(f"{name}\t" + "\t".join(map(str, box)) + "\n")
        (tmp / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_images = tmp / "val" / "images"
    val_images.mkdir(parents=True)
    order = [recipe for recipe in recipes for _ in range(val_per_class)]
    rng.shuffle(order)
    annotations = []
    for index, recipe in enumerate(order):
        image, box = draw_image(recipe, rng, size)
        name = f"val_{index}.JPEG"
        image.save(val_images / name, quality=90)
        annotations.append(f"{name}\t{recipe[0]}\t" + "\t".join(map(str, box)) + "\n")
    (tmp / "val" / "val_annotations.txt").write_text("".join(annotations))
    test_folder = tmp / "test" / "images"
    test_folder.mkdir(parents=True)
    for index in range(test_images):
        image, _ = draw_image(recipes[int(rng.integers(len(recipes)))], rng, size)
        image.save(test_folder / f"test_{index}.JPEG", quality=90)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="synthetic-tiny-imagenet", help="folder to create (default: %(default)s)")
    parser.add_argument("--classes", type=positive_int, default=CLASSES,
                        help="number of classes (default: %(default)s)")
    parser.add_argument("--train_per_class", type=positive_int, default=TRAIN_PER_CLASS,
                        help="train images per class (default: %(default)s)")
    parser.add_argument("--val_per_class", type=positive_int, default=VAL_PER_CLASS,
                        help="val images per class (default: %(default)s)")
    parser.add_argument("--test_images", type=non_negative_int, default=TEST_IMAGES,
                        help="unlabelled test images (default: %(default)s)")
    parser.add_argument("--image_size", type=positive_int, default=IMAGE_SIZE, help="pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    print_args("synthetic_data.py", args)
    out = generate(args.out, args.classes, args.train_per_class, args.val_per_class, args.test_images,
                   args.seed, args.image_size)
    print(f"wrote {args.classes} classes x ({args.train_per_class} train + {args.val_per_class} val) images "
          f"and {args.test_images} test images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
