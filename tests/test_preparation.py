"""How inputs are prepared, as data (nws.data.preparation): every benchmark's test images, written as image files
and put through the preparation its tasks describe, give exactly the tensors its test sets give; the steps
survive JSON; a malformed preparation is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scale_data import make_cifar100_archive, make_cub2sketches, make_image_folders

from nws.data import load_benchmark
from nws.data.preparation import Preparation, PreparationError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def prepared_files(task, tmp_path: Path, count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(from the file, from the test set)`` for the first ``count`` test images, each written as a PNG file
    (in-memory images) or read from its own file (image folders)."""
    preparation = Preparation.from_json(json.loads(json.dumps(task.input_preparation().to_json())))
    pairs = []
    for i in range(min(count, len(task.test))):
        if hasattr(task.test, "paths"):
            image = Image.open(task.test.paths[i].decode())
        else:
            raw = task.test.images[i].numpy()
            image = Image.fromarray(raw[0] if raw.shape[0] == 1 else raw.transpose(1, 2, 0))
            image.save(tmp_path / f"{i}.png")
            image = Image.open(tmp_path / f"{i}.png")
        pairs.append((preparation(image), task.test[i][0]))
    return pairs


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST files not installed")
@pytest.mark.parametrize("size", [None, 32])
def test_split_fashion_mnist_files_prepare_to_the_test_tensors(tmp_path, size):
    bench = load_benchmark("split_fashion_mnist", str(FASHION), image_size=size, source="none")
    for task in (bench.tasks[0], bench.tasks[3]):  # each normalised with its own mean and std
        for from_file, from_set in prepared_files(task, tmp_path):
            assert torch.equal(from_file, from_set)
    described = bench.tasks[0].input_preparation().to_json()
    assert described["mode"] == "L" and described["size"] == [28, 28]
    assert described["input_shape"] == [1, size or 28, size or 28]


def test_split_cifar100_files_prepare_to_the_test_tensors(tmp_path):
    make_cifar100_archive(tmp_path / "cifar", train=2, test=1)
    bench = load_benchmark("split_cifar100", str(tmp_path / "cifar"), source="none")
    for from_file, from_set in prepared_files(bench.tasks[4], tmp_path):
        assert torch.equal(from_file, from_set)
    assert bench.tasks[4].input_preparation().to_json()["input_shape"] == [3, 32, 32]


@pytest.mark.parametrize("size, augment", [(None, "auto"), (64, "auto"), (16, "none"), (40, "standard")])
def test_image_folder_files_prepare_to_the_test_tensors(tmp_path, size, augment):
    make_image_folders(tmp_path / "birds", ["robin", "sparrow"], {"train": 2, "test": 3})
    bench = load_benchmark("folders", tasks=str(tmp_path / "birds"), source="none", image_size=size, augment=augment)
    for from_file, from_set in prepared_files(bench.tasks[0], tmp_path):
        assert torch.equal(from_file, from_set)
    side = size or 14  # the images' own shorter side
    assert bench.tasks[0].input_preparation().input_shape == [3, side, side]


def test_cub2sketches_files_prepare_to_the_test_tensors(tmp_path):
    bench = load_benchmark("cub2sketches", str(make_cub2sketches(tmp_path / "c2s")), source="none", image_size=32)
    for task in (bench.tasks[0], bench.tasks[2]):  # cropped: a square resize; others: resize and centre crop
        for from_file, from_set in prepared_files(task, tmp_path, count=3):
            assert torch.equal(from_file, from_set)


def test_digits_as_8_bit_files_prepare_to_within_their_rounding():
    """The digits are values 0-16; as 8-bit files (pixel 255 = 16) they differ by the rounding alone."""
    task = load_benchmark("digits").tasks[0]
    preparation = task.input_preparation()
    for i in range(20):
        x = task.test[i][0]
        pixels = torch.round((x * 0.5 + 0.5) * 255).to(torch.uint8).numpy()[0]
        from_file = preparation(Image.fromarray(pixels))
        assert (from_file - x).abs().max() <= 1 / 255 + 1e-6  # (p / 255 - 0.5) / 0.5, p off by at most 0.5
    assert preparation.to_json()["input_shape"] == [1, 8, 8]


def test_a_file_of_another_size_or_mode_is_converted_first():
    preparation = load_benchmark("digits").tasks[0].input_preparation()
    rgb = Image.fromarray(np.full((32, 24, 3), 255, np.uint8))
    assert torch.equal(preparation(rgb), torch.ones(1, 8, 8))  # grayscale, resized to 8x8, (1 - 0.5) / 0.5


@pytest.mark.parametrize("bad, needle", [
    ({"mode": "CMYK", "steps": [{"step": "to_tensor"}]}, "mode must be one of L, RGB"),
    ({"mode": "L", "steps": [{"step": "rotate", "angle": 3}]}, "unknown step"),
    ({"mode": "L", "steps": [{"step": "resize", "size": "big"}, {"step": "to_tensor"}]}, "malformed step"),
    ({"mode": "L", "steps": [{"step": "normalize", "mean": [0.5], "std": [0.5]}]}, "no to_tensor step"),
    ({"mode": "L", "steps": [{"step": "to_tensor"}], "size": [8]}, "bad size"),
    ({"steps": []}, "mode"),
    ([1, 2], "not a preparation"),
])
def test_a_malformed_preparation_is_refused(bad, needle):
    with pytest.raises(PreparationError, match=needle) as err:
        Preparation.from_json(bad, "run/manifest.json: task 0's preparation")
    assert "\n" not in str(err.value) and "task 0's preparation" in str(err.value)
