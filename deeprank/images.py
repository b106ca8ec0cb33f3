"""Image files into pixels, without torch: the one decoder every stage uses (load_rgb / decode),
the resize to the network's input (load_array), the --on_bad_image policy (BadImages), and
batches decoded on threads for runtimes that need no torch (decoded_batches, normalized).

    image = load_rgb("photo.jpg")                     # upright RGB PIL image, or one-line PipelineError
    array = load_array("photo.jpg", 224)              # (224, 224, 3) uint8, or an Unreadable
    for images, kept, unreadable in decoded_batches(paths, 224, batch_size=16, threads=2):
        x = normalized(images)                        # (n, 3, 224, 224) float32, ImageNet-normalised
"""

import collections
import concurrent.futures
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from deeprank.common import BAD_IMAGE_POLICIES, PipelineError, atomic_write, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 89_478_485  # larger images are refused, not decoded (Pillow's own warning level: ~256 MB as RGB)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path):
    """Any image file as an upright RGB PIL image: the EXIF orientation applied; grayscale, 16-bit,
    palette, CMYK and RGBA converted (alpha dropped). A file that cannot be decoded (missing,
    empty, truncated, not an image, more than MAX_PIXELS pixels) raises PipelineError naming it."""
    try:
        return decode(path)
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, EOFError, ...
        raise PipelineError(f"cannot read image {path} ({first_line(err)}); replace or remove it") from None


def decode(path, at_least=None):
    """load_rgb without the error translation: raises whatever the decoder raised. at_least: a JPEG
    larger than twice this side is decoded at 1/2, 1/4 or 1/8 scale, still at least this large on
    each side (Pillow's draft mode: the decoder skips the detail the resize would drop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own guard: an error too
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{image.width} x {image.height} pixels, more than {MAX_PIXELS:,}: "
                                 f"refused as a possible decompression bomb")
            if at_least and image.format == "JPEG":
                image.draft("RGB", (at_least, at_least))
            if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: rotate / mirror upright
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)


def _to_rgb(image):
    """An opened PIL image in RGB; 16-bit values scaled to 8 bits, not clipped."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode != "I" or values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P":
        image = image.convert("RGBA")  # palette transparency, converted as Pillow advises
    return image.convert("RGB")


class Unreadable(NamedTuple):
    """An image file that could not be decoded, and why."""
    path: str
    reason: str


def load_array(path, image_size, augment=None):
    """One image file -> (S, S, 3) uint8 array, resized bilinearly to S x S (no crop; augmented first
    when augment, a callable on the PIL image, is given; without one, a large JPEG is decoded in
    draft mode at no less than S), or an Unreadable saying why not."""
    try:
        image = decode(path, None if augment is not None else int(image_size))
    except Exception as err:  # noqa: BLE001 - any decoder failure: the caller applies --on_bad_image
        return Unreadable(str(path), first_line(err))
    if augment is not None:
        image = augment(image)
    size = (int(image_size), int(image_size))
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decoded_batches(paths, image_size, batch_size, threads):
    """Yield (images (n, S, S, 3) uint8 or None, rows of paths kept, [Unreadable]) per batch of
    batch_size paths, in order, decoded on `threads` threads (Pillow releases the GIL while it
    decodes and resizes) at most two batches ahead of the consumer; threads=0 decodes each batch in
    the caller's thread when it is asked for."""
    starts = range(0, len(paths), batch_size)
    if threads < 1:
        for start in starts:
            yield _batch(start, [load_array(p, image_size) for p in paths[start:start + batch_size]])
        return
    with concurrent.futures.ThreadPoolExecutor(int(threads)) as pool:
        pending = collections.deque()
        for start in starts:
            pending.append((start, [pool.submit(load_array, p, image_size) for p in paths[start:start + batch_size]]))
            if len(pending) == 3:
                yield _batch(*pending.popleft())
        while pending:
            yield _batch(*pending.popleft())


def _batch(start, items):
    items = [item.result() if isinstance(item, concurrent.futures.Future) else item for item in items]
    bad = [item for item in items if isinstance(item, Unreadable)]
    kept = [start + i for i, item in enumerate(items) if not isinstance(item, Unreadable)]
    images = np.stack([item for item in items if not isinstance(item, Unreadable)]) if kept else None
    return images, kept, bad


def normalized(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float32, (x / 255 - mean) / std per channel, as
    loaders.Normalize computes it (by a table of the 256 values per channel: one gather a value)."""
    table = ((np.arange(256, dtype=np.float32)[None, :] - np.asarray(mean, np.float32)[:, None] * 255)
             / (np.asarray(std, np.float32)[:, None] * 255))
    out = np.empty((images.shape[0], 3) + images.shape[1:3], dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], images[..., channel], out=out[:, channel])
    return out


class BadImages:
    """--on_bad_image: 'error' stops at the first unreadable image with one line naming it;
    'skip' leaves such images out, counts them, and lists them (path<TAB>reason) in `report`."""

    def __init__(self, policy, report):
        if policy not in BAD_IMAGE_POLICIES:
            raise PipelineError(f"unknown --on_bad_image {policy!r}; choose {', '.join(BAD_IMAGE_POLICIES)}")
        self.policy, self.report, self.found = policy, report, {}

    def add(self, unreadable):
        """Record a batch's unreadable images; in 'error' mode, stop at the first."""
        for item in unreadable:
            if self.policy == "error":
                raise PipelineError(f"cannot read image {item.path} ({item.reason}); replace or remove it, or "
                                    f"pass --on_bad_image skip to leave such files out")
            self.found.setdefault(item.path, item.reason)

    def merge(self, founds):
        """Add other processes' skipped images ({path: reason} each, e.g. every rank's under torchrun)."""
        for found in founds:
            self.found.update(found)

    def write_report(self):
        """Write the report file (atomically) if any image was skipped; returns its path or None."""
        if not self.found:
            return None
        with atomic_write(self.report) as handle:
            handle.write("".join(f"{path}\t{reason}\n" for path, reason in sorted(self.found.items())))
        return self.report

    def summary(self):
        """One line for the printout, or '' when nothing was skipped."""
        if not self.found:
            return ""
        return f"skipped {len(self.found)} unreadable image(s), listed in {self.report}"
