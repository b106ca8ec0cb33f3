"""--preprocess device: the workers only decode, the device resizes, augments and normalises
whole batches (the GPU path; its logic runs on the CPU here)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gen_embeddings
import image_search
import train_net
from conftest import FAST
from deeprank.embedding_io import read_embeddings, read_header
from deeprank.loaders import ImageList, Normalize, load_size, preprocess_on_device

CPU = torch.device("cpu")


def photo(seed, side=64):
    """A smooth random picture (gradients and blobs), as uint8 (side, side, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in "rgb"]
    return (127.5 + 127 * np.stack(channels, -1)).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 96])
def test_device_resize_matches_the_workers_resize(tmp_path, size):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(photo(i)).save(paths[-1])
    workers = torch.stack([ImageList(paths, size).load(p) for p in paths])  # PIL resize in the worker
    on_device = torch.stack([ImageList(paths, load_size(paths, size)).load(p) for p in paths])
    assert on_device.shape[-1] == min(64, size)  # decoded at the source size, never upscaled by the worker
    ours = Normalize(CPU, size)(on_device)
    reference = Normalize(CPU)(workers)
    assert ours.shape == reference.shape == (4, 3, size, size)
    # in pixel levels: PIL rounds to uint8 and uses its own filter weights; the device keeps floats
    difference = ((ours - reference) * Normalize(CPU).std).abs()
    assert difference.mean() < 0.6 and difference.max() < 3.0


def test_device_augmentation_is_per_image_and_replays_from_its_seed():
    half = torch.zeros(64, 3, 40, 40, dtype=torch.uint8)
    half[..., 20:] = 255  # left black, right white
    flip = Normalize(CPU, 40, "flip", seed=5)
    out = flip(half)
    mirrored = out[..., :20].mean((1, 2, 3)) > out[..., 20:].mean((1, 2, 3))
    assert 10 < int(mirrored.sum()) < 54  # each image draws its own flip
    assert torch.equal(flip(half, train=False), Normalize(CPU, 40)(half))  # no augmentation outside training
    flip.reseed(5)
    assert torch.equal(flip(half), out)  # the same draws again after reseeding
    standard = Normalize(CPU, 32, "standard", seed=1)
    pictures = torch.from_numpy(photo(3)).permute(2, 0, 1).expand(64, 3, 64, 64)  # one picture, 64 times
    crops = standard(pictures)
    assert crops.shape == (64, 3, 32, 32) and torch.isfinite(crops).all()
    per_image = crops.flatten(1)
    assert len({tuple(row.tolist()) for row in per_image}) == 64  # every image its own crop and jitter
    standard.reseed(1)
    assert torch.equal(standard(pictures), crops)
    pixels = crops * Normalize(CPU).std + Normalize(CPU).mean
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_preprocess_choice():
    assert preprocess_on_device("auto", torch.device("cuda")) and not preprocess_on_device("auto", CPU)
    assert preprocess_on_device("device", CPU) and not preprocess_on_device("cpu", torch.device("cuda"))


def test_train_and_embed_with_device_preprocessing(triplets, tmp_path):
    train, val = triplets
    flags = list(FAST)
    flags[flags.index("--image_size") + 1] = "48"  # 64 px sources: the device resizes every batch
    flags[flags.index("--conv_dim") + 1] = "4096"  # the paper's width: no two images embed a hair apart
    model = tmp_path / "m.model"
    assert train_net.main(flags + ["--triplets", str(train), "--out", str(model), "--augment", "standard",
                                   "--preprocess", "device", "--max_steps", "4", "--val_triplets", str(val)]) == 0
    vectors = {}
    for where in ("device", "cpu"):
        out = tmp_path / where
        out.mkdir()
        assert gen_embeddings.main(["--model", str(model), "--train_triplets", str(train), "--test_triplets", str(val),
                                    "--train_out", str(out / "train.txt"), "--test_out", str(out / "test.txt"),
                                    "--num_workers", "0", "--preprocess", where]) == 0
        vectors[where] = read_embeddings(out / "test.txt")
    assert vectors["device"].paths == vectors["cpu"].paths
    cosine = (vectors["device"].vectors * vectors["cpu"].vectors).sum(1)
    assert cosine.min() > 0.99  # the same images, resized by another filter implementation
    searched = tmp_path / "hits.json"
    for where in ("device", "cpu"):  # image_search.py reads the way from the gallery's header
        assert read_header(tmp_path / where / "test.txt")["preprocess"] == where
        query = vectors[where].paths[2]
        assert image_search.main(["--model", str(model), "--gallery", str(tmp_path / where / "test.txt"),
                                  "--json", str(searched), "--num_workers", "0", query]) == 0
        first = json.loads(searched.read_text())[0]["results"][0]
        assert first["path"] == query and first["distance"] < 1e-9
