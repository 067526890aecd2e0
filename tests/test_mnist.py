"""MNIST / Fashion-MNIST: IDX reading and validation, folder acceptance, downloads, Split-Fashion-MNIST, the
CLI and configs on IDX files written here; one integration test on Debian's dataset-fashion-mnist files."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nws.cli import main
from nws.config_parser import parse_run_config
from nws.data import load_benchmark, mnist
from nws.data.arrays import channel_stats
from nws.data.digits import load_digits_arrays, mnist_layout
from nws.data.mnist import FASHION_CLASSES, FASHION_MNIST, MNIST, IDXError
from nws.models import create_model

CONFIGS = Path(__file__).parent.parent / "configs"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
NAMES = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
         "test-images": "t10k-images-idx3-ubyte", "test-labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, as the data sets' authors write them."""
    return bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_arrays(per_class: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Images and labels for each split, ``per_class`` images of each of the 10 classes; class ``c``'s
    images are brighter for larger ``c``, so a task's statistics depend on its classes."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        rng.shuffle(labels)
        images = rng.integers(0, 25 * (labels[:, None, None].astype(np.int64) + 1), (len(labels), 28, 28))
        out[f"{split}-images"], out[f"{split}-labels"] = images.astype(np.uint8), labels
    return out


def write_folder(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True, level: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{NAMES[key]}.gz").write_bytes(gzip.compress(raw, compresslevel=level, mtime=0))
        else:
            (folder / NAMES[key]).write_bytes(raw)
    return folder


def spec_for(folder: Path, mirrors: tuple[str, ...] = ()) -> mnist.IDXDataSet:
    """A data set whose "official" files are the ones in ``folder`` (checksums of those files)."""
    files = {}
    for key, name in NAMES.items():
        gz = (folder / f"{name}.gz").read_bytes()
        files[key] = mnist.IDXFile(name, hashlib.md5(gz).hexdigest(), hashlib.sha256(gzip.decompress(gz)).hexdigest())
    return dataclasses.replace(FASHION_MNIST, mirrors=mirrors, files=files)


@pytest.fixture
def official(tmp_path, monkeypatch):
    """A small stand-in for the official Fashion-MNIST: 20 train and 10 test images (2 and 1 per class),
    registered as the official files (counts and checksums)."""
    folder = write_folder(tmp_path / "official", make_arrays({"train": 2, "test": 1}))
    monkeypatch.setattr(mnist, "SPLITS", {"train": 20, "test": 10})
    spec = spec_for(folder)
    monkeypatch.setitem(mnist.DATA_SETS, "fashion-mnist", spec)
    return folder, spec


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = make_arrays({"train": 6, "test": 3})
    return write_folder(tmp_path_factory.mktemp("fashion"), arrays), arrays


# ------------------------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_gzipped_or_plain(tmp_path, gz):
    arrays = make_arrays({"train": 3, "test": 2})
    data = mnist.read_idx_data(write_folder(tmp_path, arrays, gz=gz), FASHION_MNIST, full=False)
    for split in ("train", "test"):
        assert data.images[split].dtype == np.uint8 and data.images[split].shape == (30 if split == "train" else 20,
                                                                                      1, 28, 28)
        assert np.array_equal(data.images[split][:, 0], arrays[f"{split}-images"])
        assert np.array_equal(data.labels[split], arrays[f"{split}-labels"]) and data.labels[split].dtype == np.int64


def _corrupt(folder: Path, how: str) -> None:
    labels = folder / "train-labels-idx1-ubyte.gz"
    images = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if how == "truncated gzip":
        data = images.read_bytes()
        images.write_bytes(data[: len(data) // 2])
    elif how == "not gzip":
        images.write_bytes(raw)  # plain bytes under the .gz name
    elif how == "truncated idx":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif how == "trailing bytes":
        images.write_bytes(gzip.compress(raw + b"\0"))
    elif how == "wrong magic":
        images.write_bytes(gzip.compress(bytes((0, 0, 0x08, 1)) + raw[4:]))
    elif how == "wrong type":
        images.write_bytes(gzip.compress(bytes((0, 0, 0x0D, 3)) + raw[4:]))
    elif how == "wrong size":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((20, 27, 29), np.uint8))))
    elif how == "count mismatch":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(19, np.uint8))))
    elif how == "label out of range":
        labels.write_bytes(gzip.compress(idx_bytes(np.full(20, 10, np.uint8))))
    elif how == "empty":
        images.write_bytes(gzip.compress(b""))
    elif how == "missing":
        labels.unlink()


@pytest.mark.parametrize("how, message", [
    ("truncated gzip", "not a readable gzip file"),
    ("not gzip", "not a readable gzip file"),
    ("truncated idx", r"holds 15596 bytes, its header \(20, 28, 28\) says 15696 \(truncated\)"),
    ("trailing bytes", r"holds 15697 bytes, its header \(20, 28, 28\) says 15696 \(trailing bytes\)"),
    ("wrong magic", "not an IDX file of unsigned bytes in 3 dimensions \\(magic number 2049, expected 2051\\)"),
    ("wrong type", "magic number 3331, expected 2051"),
    ("wrong size", "holds 27x29 images, Fashion-MNIST's are 28x28"),
    ("count mismatch", "the train split has 20 images but 19 labels"),
    ("label out of range", "holds label 10; labels are 0-9"),
    ("empty", "magic number None"),
    ("missing", r"lacks train-labels-idx1-ubyte.gz \(the official Fashion-MNIST files\); run `nws data fashion-mnist"),
])
def test_corrupt_files_are_one_line_errors(tmp_path, how, message, capsys):
    folder = write_folder(tmp_path / "d", make_arrays({"train": 2, "test": 1}))
    _corrupt(folder, how)
    with pytest.raises(IDXError, match=message) as err:
        mnist.read_idx_data(folder, FASHION_MNIST, full=False)
    assert "\n" not in str(err.value)
    assert main(["data", "check", "--root", str(folder), "--benchmark", "split_fashion_mnist"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_full_data_set_needs_the_official_counts_and_checksums(tmp_path, official):
    folder, spec = official
    assert len(mnist.read_idx_data(folder, spec).labels["train"]) == 20
    small = write_folder(tmp_path / "small", make_arrays({"train": 1, "test": 1}))
    with pytest.raises(IDXError, match="holds 10 images, Fashion-MNIST has 20"):
        mnist.read_idx_data(small, spec)
    # Same counts, other pixels: the checksum of the decompressed bytes tells them apart, full or not.
    other = write_folder(tmp_path / "other", make_arrays({"train": 2, "test": 1}, seed=1))
    for full in (True, False):
        with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz is not Fashion-MNIST's official "
                                           r"train-images-idx3-ubyte \(SHA-256 of its decompressed bytes"):
            mnist.read_idx_data(other, spec, full=full)


def test_a_file_of_the_official_count_must_be_the_official_file(tmp_path):
    # 10,000 test labels that are not Fashion-MNIST's: refused even as a subset (full=False).
    arrays = make_arrays({"train": 2, "test": 1})
    arrays["test-labels"] = np.zeros(10000, np.uint8)
    folder = write_folder(tmp_path, arrays)
    with pytest.raises(IDXError, match="not Fashion-MNIST's official t10k-labels-idx1-ubyte"):
        mnist.read_idx_data(folder, FASHION_MNIST, full=False)


def test_the_other_data_sets_files_are_named(tmp_path, monkeypatch):
    # A folder of (stand-in) MNIST files given as Fashion-MNIST: the error says whose files they are.
    folder = write_folder(tmp_path, make_arrays({"train": 2, "test": 1}))
    monkeypatch.setattr(mnist, "SPLITS", {"train": 20, "test": 10})
    monkeypatch.setitem(mnist.DATA_SETS, "mnist", dataclasses.replace(spec_for(folder), name="MNIST"))
    with pytest.raises(IDXError, match="not Fashion-MNIST's official .*: it is MNIST's"):
        mnist.read_idx_data(folder, FASHION_MNIST)


# ------------------------------------------------------------------------------------- folders, downloads


def test_a_folder_of_recompressed_files_is_accepted_and_left_alone(tmp_path, official):
    # Debian's situation in small: the same IDX bytes compressed differently (other .gz MD5s).
    folder, spec = official
    copy = tmp_path / "recompressed"
    copy.mkdir()
    for f in spec.files.values():
        raw = gzip.decompress((folder / f"{f.name}.gz").read_bytes())
        (copy / f"{f.name}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
        assert hashlib.md5((copy / f"{f.name}.gz").read_bytes()).hexdigest() != f.gz_md5
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.iterdir()}
    path, line = mnist.prepare(copy, progress=False)
    assert path == copy
    assert line == (f"{copy} is ready: used the 4 files already there, 4 recompressed (their .gz differs from the "
                    "official download's); 20 train, 10 test images, decompressed SHA-256 verified")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.iterdir()} == before


def test_gunzipped_files_are_accepted(tmp_path, official):
    folder, spec = official
    for f in spec.files.values():
        (tmp_path / f.name).write_bytes(gzip.decompress((folder / f"{f.name}.gz").read_bytes()))
    assert "used the 4 files already there;" in mnist.prepare(tmp_path, progress=False)[1]


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def test_missing_files_are_downloaded_with_md5_check(tmp_path, official, monkeypatch, capsys):
    folder, spec = official
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    # The first mirror is unreachable; the second (a local file:// URL) serves the files.
    mirrors = (_closed_port(), folder.as_uri() + "/")
    path, line = mnist.prepare(dest, mirrors=mirrors, progress=False)
    assert line == (f"{dest} is ready: used the 1 file already there and downloaded 3 from {mirrors[1]} "
                    "(MD5 verified); "
                    "20 train, 10 test images, decompressed SHA-256 verified")
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{f.name}.gz" for f in spec.files.values())
    for p in dest.iterdir():
        assert p.read_bytes() == (folder / p.name).read_bytes()
    # Through the CLI, a second time: nothing to download.
    monkeypatch.setitem(mnist.DATA_SETS, "fashion-mnist", dataclasses.replace(spec, mirrors=(_closed_port(),)))
    assert main(["data", "fashion-mnist", "--root", str(dest)]) == 0
    assert "used the 4 files already there; 20 train" in capsys.readouterr().out


def test_a_download_with_the_wrong_md5_is_refused(tmp_path, official, monkeypatch):
    folder, spec = official
    bad = dataclasses.replace(spec.files["train-images"], gz_md5="0" * 32)
    monkeypatch.setitem(mnist.DATA_SETS, "fashion-mnist",
                        dataclasses.replace(spec, files={**spec.files, "train-images": bad}))
    with pytest.raises(IDXError, match="downloaded with MD5 .* expected 0{32}"):
        mnist.prepare(tmp_path, mirrors=(folder.as_uri() + "/",), progress=False)
    assert not (tmp_path / "train-images-idx3-ubyte.gz").exists()
    assert not (tmp_path / "train-images-idx3-ubyte.gz.part").exists()


def test_offline_says_what_to_put_where(tmp_path, official, monkeypatch, capsys):
    folder, spec = official
    offline = dataclasses.replace(spec, mirrors=(_closed_port(), _closed_port()))
    monkeypatch.setitem(mnist.DATA_SETS, "fashion-mnist", offline)
    assert main(["data", "fashion-mnist", "--root", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline? Download train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz " \
        "t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz from" in err and str(tmp_path / "new") in err


def test_a_read_only_folder_with_missing_files_is_not_written(tmp_path, official, monkeypatch):
    folder, spec = official
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "train-images-idx3-ubyte.gz").write_bytes((folder / "train-images-idx3-ubyte.gz").read_bytes())
    monkeypatch.setattr(mnist.os, "access", lambda path, mode: False)  # as for a user in /usr/share (tests run as root)
    with pytest.raises(IDXError, match="lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                                       "t10k-labels-idx1-ubyte.gz and is not writable; choose another --root"):
        mnist.prepare(ro, progress=False)
    assert [p.name for p in ro.iterdir()] == ["train-images-idx3-ubyte.gz"]


def test_mnist_command_checks_mnist(official, capsys):
    folder, _ = official  # the (stand-in) Fashion-MNIST files are not MNIST's
    assert main(["data", "mnist", "--root", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not MNIST's official train-images-idx3-ubyte" in err and "it is Fashion-MNIST's" in err


# ------------------------------------------------------------------------------------ Split-Fashion-MNIST


def test_split_fashion_mnist_tasks(fashion):
    folder, arrays = fashion
    bench = load_benchmark("split_fashion_mnist", str(folder))
    assert bench.in_channels == 1 and len(bench.tasks) == 5
    assert [t.name for t in bench.tasks] == ["fashion-mnist 0/1", "fashion-mnist 2/3", "fashion-mnist 4/5",
                                             "fashion-mnist 6/7", "fashion-mnist 8/9"]
    assert [t.classes for t in bench.tasks] == [list(FASHION_CLASSES[i:i + 2]) for i in range(0, 10, 2)]
    assert FASHION_CLASSES[0] == "T-shirt/top" and FASHION_CLASSES[9] == "Ankle boot"
    for i, task in enumerate(bench.tasks):
        for split, n in (("train", 6), ("test", 3)):
            ds = getattr(task, split)
            mask = (arrays[f"{split}-labels"] == 2 * i) | (arrays[f"{split}-labels"] == 2 * i + 1)
            assert len(ds) == 2 * n
            assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays[f"{split}-images"][mask]))  # file order kept
            assert ds.labels.tolist() == (arrays[f"{split}-labels"][mask] == 2 * i + 1).astype(int).tolist()
        x = torch.stack([task.train[j][0] for j in range(len(task.train))])
        assert x.shape == (12, 1, 28, 28)
        assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4  # own statistics
    assert bench.tasks[0].train.transform.transforms[-1].mean != bench.tasks[4].train.transform.transforms[-1].mean


def test_fashion_mnist_pairs_is_every_pair_in_an_order_drawn_from_the_seed(fashion):
    folder, arrays = fashion
    bench = load_benchmark("fashion_mnist_pairs", str(folder), seed=1993)
    pairs = [tuple(FASHION_CLASSES.index(c) for c in t.classes) for t in bench.tasks]
    assert len(pairs) == 45 and sorted(pairs) == [(a, b) for a in range(10) for b in range(a + 1, 10)]
    assert [t.name for t in bench.tasks] == [f"fashion-mnist {a}/{b}" for a, b in pairs]
    assert [t.name for t in load_benchmark("fashion_mnist_pairs", str(folder), seed=1993).tasks] == \
        [t.name for t in bench.tasks]
    assert [t.name for t in load_benchmark("fashion_mnist_pairs", str(folder), seed=1994).tasks] != \
        [t.name for t in bench.tasks]
    a, b = pairs[0]
    mask = (arrays["test-labels"] == a) | (arrays["test-labels"] == b)
    assert bench.tasks[0].test.labels.tolist() == (arrays["test-labels"][mask] == b).astype(int).tolist()


def test_padding_to_32_for_the_cifar_stem(fashion):
    folder, arrays = fashion
    bench = load_benchmark("split_fashion_mnist", str(folder), image_size=32, num_tasks=1)
    task = bench.tasks[0]
    x, _ = task.test[0]
    assert x.shape == (1, 32, 32)
    background = task.test.transform.transforms[-1]
    pad = ((0 - background.mean) / background.std).item()  # pixel value 0 after normalisation
    assert torch.allclose(x[:, :2], torch.full((1, 2, 32), pad))
    assert torch.allclose(x[:, :, -2:], torch.full((1, 32, 2), pad))
    unpadded = load_benchmark("split_fashion_mnist", str(folder), num_tasks=1).tasks[0].test[0][0]
    assert torch.equal(x[:, 2:30, 2:30], unpadded)
    assert bench.source.train[0][0].shape == (1, 32, 32)
    with pytest.raises(mnist.NWSError, match="at least 28 .*got 24"):
        load_benchmark("split_fashion_mnist", str(folder), image_size=24)


def test_channel_stats_from_histograms_equal_the_float_computation():
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 7, 5)).astype(np.uint8)
    mean, std = channel_stats(images)
    x = images.astype(np.float64) / 255.0
    assert np.allclose(mean, x.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(std, x.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_digits_in_mnist_layout():
    images, labels = load_digits_arrays()
    x = mnist_layout(images)
    assert x.dtype == np.uint8 and x.shape == (1797, 1, 28, 28)
    border = np.ones((28, 28), bool)
    border[4:24, 4:24] = False
    assert (x[:, 0, border] == 0).all() and x.max() == 255
    # Bilinear upsampling keeps each image's layout: its 8x8 block means follow the 8x8 original.
    blocks = x[:, 0, 4:24, 4:24].astype(float).reshape(-1, 4, 5, 4, 5).mean(axis=(2, 4))
    small = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), small.ravel())[0, 1] > 0.95


def test_sources(fashion, tmp_path, official):
    folder, _ = fashion
    bench = load_benchmark("split_fashion_mnist", str(folder), seed=3)
    src = bench.source
    assert src.classes == [str(d) for d in range(10)] and len(src.train) + len(src.test) == 1797
    assert len(src.test) == 1797 // 5 and src.train[0][0].shape == (1, 28, 28)
    assert torch.equal(load_benchmark("split_fashion_mnist", str(folder), seed=3).source.test.labels, src.test.labels)
    assert not torch.equal(load_benchmark("split_fashion_mnist", str(folder), seed=4).source.test.labels,
                           src.test.labels)
    assert load_benchmark("split_fashion_mnist", str(folder), source="none").source is None
    with pytest.raises(IDXError, match="data.source_root must be the folder holding MNIST's four IDX files"):
        load_benchmark("split_fashion_mnist", str(folder), source="mnist")
    with pytest.raises(IDXError, match="lacks train-images-idx3-ubyte.gz, .* run `nws data mnist --root"):
        load_benchmark("split_fashion_mnist", str(folder), source="mnist", source_root=str(tmp_path / "none"))
    with pytest.raises(mnist.NWSError, match="must be digits, mnist or none, got 'imagenet'"):
        load_benchmark("split_fashion_mnist", str(folder), source="imagenet")
    with pytest.raises(IDXError, match="data.root must be the folder holding Fashion-MNIST's"):
        load_benchmark("split_fashion_mnist", None)
    digits = write_folder(tmp_path / "mnist", make_arrays({"train": 4, "test": 2}, seed=5))
    bench = load_benchmark("split_fashion_mnist", str(folder), source="mnist", source_root=str(digits))
    assert bench.source.name == "source: mnist 0-9" and len(bench.source.train) == 40 and len(bench.source.test) == 20


def test_data_check_counts(fashion, capsys):
    folder, _ = fashion
    assert main(["data", "check", "--root", str(folder), "--benchmark", "split_fashion_mnist"]) == 0
    assert "| fashion-mnist | 10 | 60 | 30 |" in capsys.readouterr().out


def test_convnet_config_end_to_end(fashion, tmp_path):
    folder, _ = fashion
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIGS / "split_fashion_mnist_convnet.yaml"), "--data.root", str(folder),
                 "--out", str(out), "--pretrain.epochs", "1", "--pretrain.batch_size", "256", "--task.epochs", "1",
                 "--data.num_tasks", "2", "--model.pool_size", "16", "--model.kwargs", '{"widths": [8, 16]}',
                 "--trainer.logger", "none", "--trainer.progress_bar", "false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(t["name"], t["classes"]) for t in results["tasks"]] == [
        ("fashion-mnist 0/1", ["T-shirt/top", "Trouser"]), ("fashion-mnist 2/3", ["Pullover", "Dress"])]
    assert results["source"]["name"] == "source: digits 0-9 (8x8 as 28x28)"


def test_resnet18_config_pads_to_32(fashion):
    c = parse_run_config(["--config", str(CONFIGS / "split_fashion_mnist_resnet18.yaml")])
    assert (c.data.name, c.data.image_size, c.data.source) == ("split_fashion_mnist", 32, "digits")
    bench = load_benchmark(c.data.name, str(fashion[0]), source=c.data.source, image_size=c.data.image_size)
    model = create_model(c.model.name, num_classes=2, in_channels=bench.in_channels, **c.model.kwargs).eval()
    x = torch.stack([bench.tasks[0].test[i][0] for i in range(2)])
    assert x.shape == (2, 1, 32, 32) and model(x).shape == (2, 2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # the CIFAR stem


# ------------------------------------------------------------------------------------ the real files


@pytest.mark.skipif(not DEBIAN.is_dir(), reason=f"{DEBIAN} is absent: `apt-get install dataset-fashion-mnist` "
                    "(Debian's package of the official files; .ci/run installs it)")
def test_debian_fashion_mnist_package(capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in DEBIAN.iterdir())
    assert main(["data", "fashion-mnist", "--root", str(DEBIAN)]) == 0
    assert capsys.readouterr().out == (
        f"{DEBIAN} is ready: used the 4 files already there, 4 recompressed (their .gz differs from the official "
        "download's); 60000 train, 10000 test images, decompressed SHA-256 verified\n")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in DEBIAN.iterdir()) == before
    bench = load_benchmark("split_fashion_mnist", str(DEBIAN), source="none")
    assert [(len(t.train), len(t.test)) for t in bench.tasks] == [(12000, 2000)] * 5
    assert [t.train.labels.bincount().tolist() for t in bench.tasks] == [[6000, 6000]] * 5
    with pytest.raises(IDXError, match="not MNIST's official .*: it is Fashion-MNIST's"):
        mnist.read_idx_data(DEBIAN, MNIST)
