"""Synthetic copies of images, the kinds of change that make a near-duplicate: resized, re-encoded as
JPEG, cropped a little, mirrored or colour-shifted. find_duplicates.py --calibrate_copies makes them
(one kind a copy) to choose its threshold; bench/bench_duplicates.py plants them in a real set (by
default two kinds a copy, at OTHER strengths: not the calibration's own recipe).

    copy, quality = modified(picture, "crop", random.Random(0))
    copy.save("copy.jpg", format="JPEG", quality=quality)
"""

from PIL import Image, ImageEnhance

KINDS = ("resize", "jpeg", "crop", "flip", "colour")
# the strengths of each kind: CALIBRATION for --calibrate_copies (one kind a copy), OTHER for the
# benchmark's combined copies (two kinds a copy), so that a threshold calibrated on the first is
# scored on copies it was not made from
CALIBRATION = {"scale": (0.5, 0.9),     # resize: the share of each side kept
               "quality": (60, 90),     # jpeg: the quality re-encoded at (other kinds: SAVE_QUALITY)
               "crop": 0.1,             # crop: at most this share off each side
               "colour": (0.8, 1.2)}    # colour: brightness, contrast and saturation factors
OTHER = {"scale": (0.35, 0.6), "quality": (40, 60), "crop": 0.15, "colour": (0.7, 1.3)}
SAVE_QUALITY = 95


def modified(picture, kind, rng, strengths=CALIBRATION):
    """(a copy of a PIL RGB image with one kind of modification, the JPEG quality to save it at);
    rng: a random.Random; strengths: CALIBRATION or OTHER."""
    if kind == "resize":
        scale = rng.uniform(*strengths["scale"])
        return picture.resize((max(8, int(picture.width * scale)), max(8, int(picture.height * scale)))), SAVE_QUALITY
    if kind == "jpeg":
        return picture, rng.randint(*strengths["quality"])
    if kind == "crop":
        w, h, crop = *picture.size, strengths["crop"]
        left, top = int(w * rng.uniform(0, crop)), int(h * rng.uniform(0, crop))
        box = (left, top, w - int(w * rng.uniform(0, crop)), h - int(h * rng.uniform(0, crop)))
        return picture.crop(box), SAVE_QUALITY
    if kind == "flip":
        return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), SAVE_QUALITY
    if kind == "colour":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            picture = enhance(picture).enhance(rng.uniform(*strengths["colour"]))
        return picture, SAVE_QUALITY
    raise ValueError(f"unknown kind of copy {kind!r}; choose {', '.join(KINDS)}")


def combined_kinds(number):
    """The two kinds of the benchmark's copy number `number`: each kind with the one two places on,
    in turn (resize+crop, jpeg+flip, crop+colour, flip+resize, colour+jpeg)."""
    return KINDS[number % len(KINDS)], KINDS[(number + 2) % len(KINDS)]


def save_copy(source, kinds, target, rng, strengths=CALIBRATION):
    """Write a copy of the image file `source` to `target` as JPEG, modified by each of `kinds` (a
    kind or a tuple of them) in turn, saved at the lowest quality any of them asks for."""
    with Image.open(source) as picture:
        copy, quality = picture.convert("RGB"), SAVE_QUALITY
        for kind in (kinds,) if isinstance(kinds, str) else kinds:
            copy, asked = modified(copy, kind, rng, strengths)
            quality = min(quality, asked)
    copy.save(target, format="JPEG", quality=quality)
