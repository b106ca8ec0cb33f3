"""Images into batches: decoding, the torch Datasets of training and embedding, the P x K
batch sampler of online mining, train-time augmentation, the DataLoader settings, and the
normalisation that runs on the device after batching.

Workers decode and resize to uint8 (3, S, S) tensors; Normalize turns a batch into floats on
the device, so workers ship bytes, not floats, and one decode path serves every stage.
Every training batch is (images (N, 3, S, S) uint8, labels (N,) or None): labels for P x K
batches, None for triplet-CSV batches, whose rows are all queries, then all positives, then
all negatives.

    loader = make_loader(ImageList(paths, 224), batch_size=64, num_workers=2, device=device)
"""

import numpy as np
import torch
from PIL import Image

from common import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("none", "flip", "standard")


def load_rgb(path):
    """Open an image file as RGB (TinyImageNet has grayscale images)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageList(torch.utils.data.Dataset):
    """Image paths -> uint8 (3, S, S) tensors, resized in the worker.

    `augment` is an optional callable on the PIL image (train-only augmentation).
    """

    def __init__(self, paths, image_size, augment=None):
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.augment = augment

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.load(self.paths[index])

    def load(self, path):
        """One image file -> (3, S, S) uint8 tensor (augmented when the list has augment)."""
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as err:
            raise PipelineError(f"cannot read image {path} ({err}); replace or remove it") from None
        if self.augment is not None:
            image = self.augment(image)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, S, S) uint8


class LabelledImages(torch.utils.data.Dataset):
    """Image i -> ((3, S, S) uint8, class code); batches collate to (images, labels)."""

    def __init__(self, paths, codes, image_size, augment=None):
        self.images = ImageList(paths, image_size, augment)
        self.codes = codes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.codes[index])


class TripletImages(torch.utils.data.Dataset):
    """Row i of a triplet CSV -> (3, 3, S, S) uint8: query, positive, negative.
    Batch them with collate_fn=triplet_batch."""

    def __init__(self, q, p, n, image_size, augment=None):
        self.images = ImageList([], image_size, augment)
        self.rows = list(zip(q, p, n))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return torch.stack([self.images.load(path) for path in self.rows[index]])


def triplet_batch(items):
    """B triplets -> (images (3B, 3, S, S): B queries | B positives | B negatives, labels None)."""
    batch = torch.stack(items)  # (B, 3, 3, S, S)
    return batch.transpose(0, 1).reshape(3 * len(items), *batch.shape[2:]), None


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P classes x K images ("In Defense of the Triplet Loss").

    Each batch: P distinct classes (of those with >= 2 images), K images of each, distinct
    unless the class has fewer than K. An epoch has len(labels) // (P * K) batches. The
    draw depends only on (seed, epoch): set_epoch() makes resumed runs replay it.
    """

    def __init__(self, labels, classes_per_batch, images_per_class, seed=0):
        names, codes = np.unique(np.asarray(labels), return_inverse=True)
        self.members = [np.flatnonzero(codes == c) for c in range(len(names))]
        self.eligible = np.array([c for c, m in enumerate(self.members) if len(m) >= 2])
        if images_per_class < 2:
            raise PipelineError("--images_per_class must be at least 2 (a positive needs a partner)")
        if classes_per_batch < 2 or len(self.eligible) < classes_per_batch:
            raise PipelineError(f"--classes_per_batch {classes_per_batch} needs that many classes with >= 2 images "
                                f"(found {len(self.eligible)}) and at least 2")
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
    """uint8 (B, 3, S, S) batch -> float, ImageNet-normalised, channels_last, on the device."""

    def __init__(self, device):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch):
        batch = batch.to(self.device, non_blocking=True).float()
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last)
