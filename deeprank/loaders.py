"""Images into batches: decoding, the torch Datasets of training and embedding, the P x K
batch sampler of online mining, train-time augmentation, the DataLoader settings, and the
normalisation that runs on the device after batching.

Workers decode and resize to uint8 (3, S, S) tensors; Normalize turns a batch into floats on
the device, so workers ship bytes, not floats, and one decode path (load_rgb) serves every
stage. A file that cannot be decoded never raises inside a worker: the Dataset returns an
Unreadable marker, the collate functions below set it aside, and the main process applies
--on_bad_image (BadImages). Every batch is (images, labels, unreadable):
  image_batch     (images (N, 3, S, S) uint8, row of each image in the batch, [Unreadable])
  labelled_batch  (images (N, 3, S, S) uint8, labels (N,), [Unreadable])   P x K batches
  triplet_batch   (images (3B, 3, S, S) uint8, None, [Unreadable])         triplet CSV rows:
                  all queries, then all positives, then all negatives; a row with an
                  unreadable image is left out
  pair_batch      (images (2B, 3, S, S) uint8, same (B,), [Unreadable])    pair CSV rows:
                  all first images, then all second images

    loader = make_loader(ImageList(paths, 224), 64, num_workers=2, device=device, collate_fn=image_batch)
"""

import numpy as np
import torch
from PIL import Image

from deeprank.common import PREPROCESS_CHOICES, PipelineError
from deeprank.images import IMAGENET_MEAN, IMAGENET_STD, Unreadable, load_array

AUGMENTS = ("none", "flip", "standard")


class ImageList(torch.utils.data.Dataset):
    """Image paths -> uint8 (3, S, S) tensors, resized in the worker; an Unreadable for a file
    that cannot be decoded. `augment` is an optional callable on the PIL image (training)."""

    def __init__(self, paths, image_size, augment=None):
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.augment = augment

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.load(self.paths[index])

    def load(self, path):
        """One image file -> (3, S, S) uint8 tensor (augmented when the list has augment), or an
        Unreadable."""
        array = load_array(path, self.image_size, self.augment)
        if isinstance(array, Unreadable):
            return array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, S, S) uint8

    def load_row(self, paths):
        """The images of one CSV row stacked, (k, 3, S, S) uint8, or the first that is Unreadable."""
        images = [self.load(path) for path in paths]
        bad = [image for image in images if isinstance(image, Unreadable)]
        return bad[0] if bad else torch.stack(images)


class LabelledImages(torch.utils.data.Dataset):
    """Image i -> ((3, S, S) uint8 or Unreadable, class code); batch with labelled_batch."""

    def __init__(self, paths, codes, image_size, augment=None):
        self.images = ImageList(paths, image_size, augment)
        self.codes = codes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.codes[index])


class TripletImages(torch.utils.data.Dataset):
    """Row i of a triplet CSV -> (3, 3, S, S) uint8: query, positive, negative; or the first of
    them that is Unreadable. Batch them with triplet_batch."""

    def __init__(self, q, p, n, image_size, augment=None):
        self.images = ImageList([], image_size, augment)
        self.rows = list(zip(q, p, n, strict=True))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.images.load_row(self.rows[index])


class PairImages(torch.utils.data.Dataset):
    """Row i of a pair CSV -> ((2, 3, S, S) uint8: both images, same 1/0); or the first of them
    that is Unreadable. Batch them with pair_batch."""

    def __init__(self, first, second, same, image_size, augment=None):
        self.images = ImageList([], image_size, augment)
        self.rows = list(zip(first, second, strict=True))
        self.same = [int(x) for x in same]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.images.load_row(self.rows[index]), self.same[index]


def _split_unreadable(items, image_of=lambda item: item):
    """(rows of the readable items, the Unreadable markers) of a batch's items."""
    keep, bad = [], []
    for row, item in enumerate(items):
        image = image_of(item)
        if isinstance(image, Unreadable):
            bad.append(image)
        else:
            keep.append(row)
    return keep, bad


def _collate(items):
    """default_collate (which builds the batch in shared memory inside a worker), or None when empty."""
    return torch.utils.data.default_collate(items) if items else None


def _columns_first(batch):
    """(B, k, 3, S, S) rows -> (k * B, 3, S, S): every row's first image, then every second, ..."""
    return batch.transpose(0, 1).reshape(-1, *batch.shape[2:])


def image_batch(items):
    """Images -> (uint8 (N, 3, S, S) of the readable ones or None, their rows in the batch, [Unreadable])."""
    keep, bad = _split_unreadable(items)
    return _collate([items[row] for row in keep]), keep, bad


def labelled_batch(items):
    """(image, code) pairs -> (uint8 (N, 3, S, S) or None, labels (N,), [Unreadable])."""
    keep, bad = _split_unreadable(items, lambda item: item[0])
    images, labels = _collate([items[row] for row in keep]) or (None, None)
    return images, labels, bad


def triplet_batch(items):
    """B triplets -> (images (3B, 3, S, S): B queries | B positives | B negatives, None, [Unreadable])."""
    keep, bad = _split_unreadable(items)
    if not keep:
        return None, None, bad
    return _columns_first(_collate([items[row] for row in keep])), None, bad


def pair_batch(items):
    """B pairs -> (images (2B, 3, S, S): B first images | B second images, same (B,), [Unreadable])."""
    keep, bad = _split_unreadable(items, lambda item: item[0])
    if not keep:
        return None, None, bad
    batch, same = _collate([items[row] for row in keep])
    return _columns_first(batch), same, bad


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P classes x K images ("In Defense of the Triplet Loss").

    Each batch: P distinct classes (of those with >= 2 images), K images of each, distinct
    unless the class has fewer than K. An epoch has len(labels) // (P * K) batches. The
    draw depends only on (seed, epoch): set_epoch() makes resumed runs replay it.
    """

    def __init__(self, labels, classes_per_batch, images_per_class, seed=0, source="--data"):
        names, codes = np.unique(np.asarray(labels), return_inverse=True)
        self.members = [np.flatnonzero(codes == c) for c in range(len(names))]
        self.eligible = np.array([c for c, m in enumerate(self.members) if len(m) >= 2])
        if images_per_class < 2:
            raise PipelineError("--images_per_class must be at least 2 (a positive needs a partner)")
        found = len(self.eligible)
        if found < 2:
            raise PipelineError(f"{source} has {found} class(es) with 2 or more images; P x K batches need at least "
                                f"2: check --data")
        if classes_per_batch < 2 or found < classes_per_batch:
            raise PipelineError(f"--classes_per_batch {classes_per_batch}: P x K batches need 2 to {found} classes "
                                f"(the classes of {source} with 2 or more images); pass --classes_per_batch {found} "
                                f"or less")
        self.p, self.k, self.seed, self.epoch = classes_per_batch, images_per_class, seed, 0
        self.batches = max(1, len(labels) // (classes_per_batch * images_per_class))

    def set_epoch(self, epoch):
        """Choose the epoch whose batches __iter__ yields."""
        self.epoch = epoch

    def __len__(self):
        return self.batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches):
            batch = []
            for c in rng.choice(self.eligible, self.p, replace=False):
                m = self.members[c]
                batch.extend(rng.choice(m, self.k, replace=len(m) < self.k).tolist())
            yield batch


class RankSlices(torch.utils.data.Sampler):
    """This process's contiguous share of each batch of a batch sampler, under torchrun: every
    rank walks the same global batches (same seed), so together the ranks see exactly the batches
    of one process, in its order. P x K batches are grouped by class, so with P a multiple of
    the number of processes each rank gets P / world_size classes of its own."""

    def __init__(self, batches, rank, world_size):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            n = len(batch)
            yield batch[n * self.rank // self.world_size:n * (self.rank + 1) // self.world_size]


def make_augment(name, image_size):
    """Train-only augmentation on PIL images (None for 'none')."""
    import torchvision.transforms as T

    if name == "none":
        return None
    if name == "flip":
        return T.RandomHorizontalFlip()
    if name == "standard":
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
                          T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2)])
    raise PipelineError(f"unknown --augment {name}; choose {', '.join(AUGMENTS)}")


def make_loader(dataset, batch_size, num_workers, device, shuffle=False, generator=None, batch_sampler=None,
                collate_fn=None):
    """DataLoader with the settings every stage wants (pinned memory on CUDA, prefetching workers)."""
    kwargs = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": batch_size, "shuffle": shuffle}
    return torch.utils.data.DataLoader(
        dataset, generator=generator, num_workers=num_workers, pin_memory=(device.type == "cuda"),
        prefetch_factor=(4 if num_workers > 0 else None), collate_fn=collate_fn, **kwargs)


class Normalize:
    """uint8 (B, 3, L, L) batch -> float (B, 3, S, S), ImageNet-normalised, channels_last, on the
    device. With image_size (--preprocess device) the batch is resized there from the load size
    L and, with augment, augmented there per image (flip: mirrored at random; standard: a random
    crop of 60-100% of the area at aspect 3/4-4/3, resized, mirrored at random, and brightness,
    contrast and saturation jittered by up to 20%, as the worker-side torchvision pipeline)."""

    def __init__(self, device, image_size=None, augment="none", seed=0):
        if augment not in AUGMENTS:
            raise PipelineError(f"unknown --augment {augment}; choose {', '.join(AUGMENTS)}")
        self.device, self.image_size, self.augment = device, image_size, augment
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.generator = torch.Generator(device=device)
        self.reseed(seed)

    def reseed(self, seed):
        """The augmentation's random draws from here on follow seed (each epoch reseeds: --resume replays it)."""
        self.generator.manual_seed(int(seed))

    def __call__(self, batch, train=True):
        batch = batch.to(self.device, non_blocking=True).float()
        if self.image_size is not None:
            batch = self._augmented(batch) if train and self.augment != "none" else self._resized(batch)
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last)

    def _resized(self, batch):
        size = self.image_size
        if batch.shape[-1] == size and batch.shape[-2] == size:
            return batch
        down = batch.shape[-1] > size or batch.shape[-2] > size
        return torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False,
                                               antialias=down)

    def _uniform(self, n, low, high):
        return low + (high - low) * torch.rand(n, device=self.device, generator=self.generator)

    def _augmented(self, batch):
        n = len(batch)
        flip = torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        if self.augment == "flip":
            out = self._resized(batch)
            return torch.where(flip.view(n, 1, 1, 1) < 0, out.flip(3), out)
        area = self._uniform(n, 0.6, 1.0)  # RandomResizedCrop(scale=(0.6, 1)), in the unit square of the image
        ratio = torch.exp(self._uniform(n, np.log(3 / 4), np.log(4 / 3)))
        width, height = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
        cx = self._uniform(n, 0, 1) * (1 - width) + width / 2
        cy = self._uniform(n, 0, 1) * (1 - height) + height / 2
        theta = torch.zeros(n, 2, 3, device=self.device)  # output grid -> input coordinates in [-1, 1]
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, 2 * cx - 1
        theta[:, 1, 1], theta[:, 1, 2] = height, 2 * cy - 1
        grid = torch.nn.functional.affine_grid(theta, [n, 3, self.image_size, self.image_size], align_corners=False)
        out = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # ColorJitter(0.2, 0.2, 0.2): brightness, contrast, saturation factors in [0.8, 1.2], each
        # a blend with black, the image's mean grey, and its grey image
        luma = torch.tensor([0.299, 0.587, 0.114], device=self.device).view(1, 3, 1, 1)
        factor = lambda: self._uniform(n, 0.8, 1.2).view(n, 1, 1, 1)  # noqa: E731 - a one-line helper, named for the lines below
        out = out * factor()
        mean_gray = (out * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        out = mean_gray + (out - mean_gray) * factor()
        gray = (out * luma).sum(1, keepdim=True)
        out = gray + (out - gray) * factor()
        return out.clamp(0, 255)


def preprocess_on_device(mode, device):
    """--preprocess: where images are resized and augmented. device: the workers only decode (to
    the load size) and the GPU resizes, augments and normalises whole batches; cpu: the workers
    do it all. auto: device on CUDA, cpu on a CPU (there the workers run beside the network)."""
    if mode not in PREPROCESS_CHOICES:
        raise PipelineError(f"unknown --preprocess {mode!r}; choose {', '.join(PREPROCESS_CHOICES)}")
    return device.type == "cuda" if mode == "auto" else mode == "device"


def load_size(paths, image_size):
    """The side the workers resize to when the device does the rest: the first readable image's
    longer side, at most image_size (TinyImageNet: its 64 px, whatever --image_size)."""
    for path in paths[:16]:
        try:
            with Image.open(path) as image:
                return min(int(image_size), max(image.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported where it is loaded
            continue
    return int(image_size)
