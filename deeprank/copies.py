"""Synthetic copies of images, the kinds of change that make a near-duplicate: resized, re-encoded as
JPEG, cropped a little, mirrored or colour-shifted. find_duplicates.py --calibrate_copies makes them
to choose its threshold; bench/bench_duplicates.py plants them in a real set.

    copy, quality = modified(picture, "crop", random.Random(0))
    copy.save("copy.jpg", format="JPEG", quality=quality)
"""

from PIL import Image, ImageEnhance

KINDS = ("resize", "jpeg", "crop", "flip", "colour")
SCALE = (0.5, 0.9)     # resize: the share of each side kept
QUALITY = (60, 90)     # jpeg: the quality re-encoded at (the other kinds are saved at SAVE_QUALITY)
CROP = 0.1             # crop: at most this share off each side
COLOUR = (0.8, 1.2)    # colour: brightness, contrast and saturation factors
SAVE_QUALITY = 95


def modified(picture, kind, rng):
    """(a copy of a PIL RGB image with one kind of modification, the JPEG quality to save it at);
    rng: a random.Random."""
    if kind == "resize":
        scale = rng.uniform(*SCALE)
        return picture.resize((max(8, int(picture.width * scale)), max(8, int(picture.height * scale)))), SAVE_QUALITY
    if kind == "jpeg":
        return picture, rng.randint(*QUALITY)
    if kind == "crop":
        w, h = picture.size
        left, top = int(w * rng.uniform(0, CROP)), int(h * rng.uniform(0, CROP))
        box = (left, top, w - int(w * rng.uniform(0, CROP)), h - int(h * rng.uniform(0, CROP)))
        return picture.crop(box), SAVE_QUALITY
    if kind == "flip":
        return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), SAVE_QUALITY
    if kind == "colour":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            picture = enhance(picture).enhance(rng.uniform(*COLOUR))
        return picture, SAVE_QUALITY
    raise ValueError(f"unknown kind of copy {kind!r}; choose {', '.join(KINDS)}")


def save_copy(source, kind, target, rng):
    """Write a modified copy of the image file `source` to `target` as JPEG."""
    with Image.open(source) as picture:
        copy, quality = modified(picture.convert("RGB"), kind, rng)
    copy.save(target, format="JPEG", quality=quality)
