"""Data: CIFAR-100 (real archive format, download/resume/MD5/safe extraction, restricted unpickling),
Split-CIFAR-100, the CUB-to-Sketches folders and the reference transforms."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scale_data import (CIFAR100_HIERARCHY, COARSE_NAMES, FINE_NAMES, make_cifar100_archive, make_cub2sketches,
                        make_image_folders)
from torch.utils.data import DataLoader

from nws.cli import main
from nws.data import load_benchmark
from nws.data import cifar100 as cifar
from nws.data.download import DownloadError, download, safe_extract
from nws.data.folders import CUB2SKETCHES, LayoutError, check_cub2sketches, imagenet_task
from nws.data.transforms import Cutout, RandomResizedCrop, folder_transforms
from nws.errors import NWSError

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100_archive(root, train=3, test=1)
    return root


@pytest.fixture(scope="module")
def cifar_folder(cifar_root) -> Path:
    return cifar.locate(cifar_root)  # extracts the archive


# ------------------------------------------------------------------------------------------- CIFAR-100


def test_archive_files_load_with_the_restricted_unpickler(cifar_folder):
    meta = cifar.load_pickle(cifar_folder / "meta")
    assert meta["coarse_label_names"] == COARSE_NAMES and meta["fine_label_names"] == FINE_NAMES
    train = cifar.load_pickle(cifar_folder / "train")
    assert train["data"].dtype == np.uint8 and train["data"].shape == (300, 3072)
    assert len(train["fine_labels"]) == len(train["coarse_labels"]) == 300


def test_restricted_unpickler_refuses_other_classes(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "meta"
    path.write_bytes(pickle.dumps({"fine_label_names": Exploit()}, protocol=2))
    with pytest.raises(cifar.CIFARError, match="refusing to load"):
        cifar.load_pickle(path)
    path.write_bytes(pickle.dumps({"x": Path("/")}, protocol=2))
    with pytest.raises(cifar.CIFARError, match="refusing to load"):
        cifar.load_pickle(path)


def test_split_cifar100_has_the_reference_tasks(cifar_root):
    bench = load_benchmark("split_cifar100", str(cifar_root), source="none")
    assert bench.source is None and bench.in_channels == 3
    assert [t.name for t in bench.tasks] == list(cifar.SUPERCLASSES) == COARSE_NAMES
    for task in bench.tasks:
        assert task.classes == sorted(CIFAR100_HIERARCHY[task.name])  # fine-label order
        assert len(task.train) == 15 and len(task.test) == 5
        labels = sorted(int(y) for _, y in task.train)
        assert labels == [c for c in range(5) for _ in range(3)]
        x, _ = task.train[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_labels_follow_the_fine_classes(cifar_root, cifar_folder):
    data = cifar.read_cifar100(cifar_folder, full=False)
    tasks = cifar.split_tasks(data)
    fish = tasks[1]
    fine_of = {FINE_NAMES.index(c): i for i, c in enumerate(fish.classes)}
    train = cifar.load_pickle(cifar_folder / "train")
    expected = sorted(fine_of[f] for f in train["fine_labels"] if f in fine_of)
    assert sorted(int(v) for v in fish.train.labels) == expected


def test_per_task_normalisation(cifar_folder):
    data = cifar.read_cifar100(cifar_folder, full=False)
    task = cifar.split_tasks(data)[3]
    # The test transform (no augmentation) applied to the task's own training images: mean 0, std 1.
    test_transform = task.test.transform
    x = torch.stack([test_transform(img) for img in task.train.images])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    other = cifar.split_tasks(data)[4]
    assert not torch.equal(task.test.transform.transforms[-1].mean, other.test.transform.transforms[-1].mean)


def test_training_augmentation_crops_and_flips(cifar_folder):
    data = cifar.read_cifar100(cifar_folder, full=False)
    task = cifar.split_tasks(data)[0]
    torch.manual_seed(0)
    views = torch.stack([task.train[0][0] for _ in range(40)])
    assert views.shape == (40, 3, 32, 32)
    assert len({v.numpy().tobytes() for v in views}) > 10  # random crops (padding 4) and flips differ


def test_source_options(cifar_root, tmp_path):
    bench = load_benchmark("split_cifar100", str(cifar_root), source="cifar100", num_tasks=2)
    assert len(bench.source.classes) == 100 and len(bench.source.train) == 300 and len(bench.tasks) == 2
    with pytest.raises(LayoutError, match="source_root"):
        load_benchmark("split_cifar100", str(cifar_root))  # the default source is ImageNet folders
    make_image_folders(tmp_path / "imagenet", ["n01", "n02"], {"train": 2, "val": 1})
    bench = load_benchmark("split_cifar100", str(cifar_root), source_root=str(tmp_path / "imagenet"), image_size=32)
    assert bench.source.classes == ["n01", "n02"] and bench.source.train[0][0].shape == (3, 32, 32)


def test_missing_or_wrong_data_is_one_line(tmp_path, capsys):
    with pytest.raises(cifar.CIFARError, match="nws data cifar100"):
        load_benchmark("split_cifar100", str(tmp_path), source="none")
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    (bad / "meta").write_bytes(b"not a pickle")
    (bad / "train").write_bytes(b"")
    (bad / "test").write_bytes(b"")
    with pytest.raises(cifar.CIFARError, match="not a CIFAR-100 file"):
        load_benchmark("split_cifar100", str(tmp_path), source="none")
    assert main(["run", "--config", str(CONFIGS / "split_cifar100_resnet18.yaml"), "--data.root", str(tmp_path / "x"),
                 "--pretrained", "null", "--data.source", "cifar100", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CIFAR-100 under" in err


# ------------------------------------------------------------------------------------------- downloads


class _Server:
    """A local HTTP server for one file that honours ``Range`` and can break the first transfer midway."""

    def __init__(self, payload: bytes, break_first: bool = False):
        self.payload, self.break_first, self.requests = payload, break_first, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.break_first and len(server.requests) == 1:
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-100-python.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"


def test_download_resumes_a_broken_transfer_and_checks_md5(cifar_root, tmp_path):
    payload = (cifar_root / "cifar-100-python.tar.gz").read_bytes()
    md5 = hashlib.md5(payload).hexdigest()
    server = _Server(payload, break_first=True)
    try:
        folder, line = cifar.prepare(tmp_path, url=server.url, md5=md5, progress=False, full=False)
    finally:
        server.close()
    assert server.requests[0] is None and server.requests[1].startswith("bytes=") and server.requests[1] != "bytes=0-"
    assert (tmp_path / "cifar-100-python.tar.gz").read_bytes() == payload
    assert not (tmp_path / "cifar-100-python.tar.gz.part").exists()
    assert "downloaded" in line and "MD5 verified" in line and (folder / "train").is_file()
    # A second call uses what is there, without the network.
    assert "is ready" in cifar.prepare(tmp_path, url=_closed_port_url(), md5=md5, full=False)[1]


def test_download_with_a_wrong_md5_keeps_nothing(cifar_root, tmp_path):
    server = _Server((cifar_root / "cifar-100-python.tar.gz").read_bytes())
    try:
        with pytest.raises(DownloadError, match="expected 0123"):
            download(server.url, tmp_path / "a.tar.gz", "0123", progress=False)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_offline_says_where_to_put_the_archive(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cifar, "URL", _closed_port_url())
    assert main(["data", "cifar100", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline?" in err and str(tmp_path / "cifar-100-python.tar.gz") in err


def test_an_archive_already_there_is_used(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cifar, "URL", _closed_port_url())
    (tmp_path / "cifar-100-python.tar.gz").write_bytes((cifar_root / "cifar-100-python.tar.gz").read_bytes())
    with pytest.raises(cifar.CIFARError, match="holds 300 images, CIFAR-100 has 50000"):
        cifar.prepare(tmp_path)  # the real structure check: a full CIFAR-100 has 50,000 training images
    assert main(["data", "check", "--benchmark", "cub2sketches", "--root", str(tmp_path), "--benchmark", "split_cifar100"]) == 0
    assert "| cifar100 | 100 | 300 | 100 |" in capsys.readouterr().out


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


@pytest.mark.parametrize("name, kind", [("cifar-100-python/../../evil", tarfile.REGTYPE),
                                        ("/tmp/evil", tarfile.REGTYPE), ("cifar-100-python/link", tarfile.SYMTYPE),
                                        ("other/meta", tarfile.REGTYPE)])
def test_extraction_refuses_unsafe_members(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 1 if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    archive = _tar(tmp_path / "a.tar.gz", [info])
    with pytest.raises(NWSError, match="unexpected member"):
        safe_extract(archive, tmp_path / "out", "cifar-100-python")
    assert not (tmp_path / "out" / "cifar-100-python").exists() and not (tmp_path.parent / "evil").exists()


# ------------------------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def fine_root(tmp_path_factory) -> Path:
    return make_cub2sketches(tmp_path_factory.mktemp("fine"))


def test_cub2sketches_layout_check(fine_root, capsys):
    rows = check_cub2sketches(fine_root)
    assert [(r["name"], r["classes"], r["train"], r["test"]) for r in rows] == [(n, c, c, c) for n, c in CUB2SKETCHES]
    assert main(["data", "check", "--benchmark", "cub2sketches", "--root", str(fine_root)]) == 0
    out = capsys.readouterr().out
    assert "| stanford_cars_cropped | 196 | 196 | 196 |" in out and "layout and class counts OK" in out


def test_cub2sketches_layout_errors(tmp_path, capsys):
    make_image_folders(tmp_path / "cubs_cropped", [f"c{i}" for i in range(199)], {"train": 1, "test": 1}, (8, 8))
    with pytest.raises(LayoutError, match="has 199 classes, expected 200"):
        check_cub2sketches(tmp_path)
    make_image_folders(tmp_path / "cubs_cropped", ["c199"], {"train": 1}, (8, 8))
    with pytest.raises(LayoutError, match="different classes"):
        check_cub2sketches(tmp_path)
    assert main(["data", "check", "--benchmark", "cub2sketches", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_cub2sketches_benchmark(fine_root):
    bench = load_benchmark("cub2sketches", str(fine_root), source="none", image_size=32)
    assert [t.name for t in bench.tasks] == [n for n, _ in CUB2SKETCHES]
    assert [len(t.classes) for t in bench.tasks] == [c for _, c in CUB2SKETCHES]
    x, y = bench.tasks[2].train[5]
    assert x.shape == (3, 32, 32) and int(y) == 5


def test_folder_transform_shapes():
    torch.manual_seed(0)
    for size in ((500, 375), (200, 311), (64, 64)):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        for cropped in (True, False):
            for train in (True, False):
                x = folder_transforms(224, cropped, train)(img)
                assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_cutout_and_random_resized_crop():
    torch.manual_seed(1)
    x = Cutout(16)(torch.ones(3, 40, 40))
    zeros = (x == 0).all(0)
    rows, cols = zeros.any(1).nonzero().flatten(), zeros.any(0).nonzero().flatten()
    assert 0 < zeros.sum() <= 256 and len(rows) <= 16 and len(cols) <= 16
    assert zeros[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one square, clipped at the border
    crop = RandomResizedCrop(224)
    for _ in range(200):
        left, top, w, h = crop.box(300, 200)
        assert 0 <= left and 0 <= top and left + w <= 300 and top + h <= 200 and w > 0 and h > 0


def test_images_are_decoded_in_workers(tmp_path):
    root = make_image_folders(tmp_path / "imagenet", ["a", "b", "c"], {"train": 4, "val": 2}, size=(40, 30))
    task = imagenet_task(root, image_size=24)
    batches = list(DataLoader(task.train, batch_size=4, num_workers=2))
    assert sum(len(y) for _, y in batches) == 12 and batches[0][0].shape == (4, 3, 24, 24)
    assert len(task.test) == 6 and task.test[0][0].shape == (3, 24, 24)
    (root / "train" / "a" / "0.jpg").write_bytes(b"broken")
    with pytest.raises(LayoutError, match="cannot decode image"):
        task.train[0]
