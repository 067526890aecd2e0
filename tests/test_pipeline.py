"""The task-incremental pipeline end to end: demo with small settings, storage, results contract."""

from __future__ import annotations

import copy
import io
import json
import lzma
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from nws.cli import main
from nws.convert import nws_layers
from nws.methods.nws import TaskStore
from nws.store import CRASH_ENV, task_file

SMALL = ["--pretrain.epochs", "2", "--task.epochs", "2", "--model.pool_size", "64", "--trainer.logger", "none"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    return out


def test_results_contract(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert len(results["tasks"]) == 5
    for t in results["tasks"]:
        assert set(t) >= {"name", "classes", "acc_after_training", "acc_from_storage", "bytes"}
        assert 0 <= t["acc_after_training"] <= 1
        assert t["acc_from_storage"] == t["acc_after_training"]
        assert set(t["bytes"]) == {"indices", "batchnorm", "other"}
    avg = sum(t["acc_from_storage"] for t in results["tasks"]) / 5
    assert results["average_accuracy"] == pytest.approx(avg, abs=1e-12)
    assert set(results["memory"]) == {"shared", "shared_files", "tasks_total", "float32_model",
                                      "reference_equivalent"}
    files = json.loads((demo_run / "manifest.json").read_text())["files"]
    shared = {name: files[name]["size"] for name in ("pools.safetensors", "reference.safetensors")}
    assert results["memory"]["shared"] == sum(shared.values())
    assert results["memory"]["shared_files"] == shared
    assert results["memory"]["tasks_total"] == sum(files[task_file(i)]["size"] for i in range(5))
    for t, i in zip(results["tasks"], range(5)):
        assert sum(t["bytes"].values()) == files[task_file(i)]["size"]
    assert (demo_run / "results.md").read_text().count("| digits") == 5


def test_rebuilt_in_fresh_process_matches(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "nws.cli", "eval", "--run", str(demo_run)],
                          capture_output=True, text=True, check=True)
    accs = [float(a) / 100 for a in re.findall(r"accuracy ([\d.]+)%", proc.stdout)]
    assert accs == pytest.approx([t["acc_after_training"] for t in results["tasks"]], abs=5e-5)


def test_each_task_starts_from_its_predecessor_rebuilt_from_storage(tmp_path, monkeypatch):
    """The network each task's training starts from equals the previous task rebuilt from its files (task 0:
    the stored source network), weights, BatchNorm and frozen pools alike; only the classifier is resized."""
    import nws.methods.base

    starts, ends, fit = {}, {}, nws.methods.base.fit

    def spy(model, data, cfg, trainer_cfg, log_dir, name, **kwargs):
        starts[name] = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(not layer.pool.trainable for _, layer in nws_layers(model)) or name == "pretrain"
        fitted = fit(model, data, cfg, trainer_cfg, log_dir, name, **kwargs)
        ends[name] = {k: v.clone() for k, v in fitted.model.state_dict().items()}
        return fitted

    monkeypatch.setattr(nws.methods.base, "fit", spy)
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), *SMALL, "--data.num_tasks", "3"]) == 0
    store = TaskStore(out)
    for i in range(3):
        expected = (store.load_source() if i == 0 else store.model(i - 1)).state_dict()
        start = starts[f"task_{i:03d}"]
        assert start.keys() == expected.keys()
        for key, value in expected.items():
            if key.startswith("fc."):  # resized to the task's 2 classes: the rows it keeps
                value = value[: start[key].shape[0]]
            assert torch.equal(start[key], value), (i, key)
    # Training leaves the temporary weights off their entries: the next task does not start from those.
    assert not torch.equal(ends["task_000"]["features.4.weight"], starts["task_001"]["features.4.weight"])


def test_existing_run_is_not_overwritten(demo_run, capsys):
    """Another run into a finished run's directory is refused (the same one shows its results:
    tests/test_unattended.py)."""
    before = (demo_run / task_file(0)).read_bytes()
    assert main(["demo", "--out", str(demo_run), *SMALL, "--seed", "7"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (demo_run / task_file(0)).read_bytes() == before


def _torch_saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def test_reference_equivalent_sizes(demo_run, monkeypatch):
    """``results.json`` reports beside ours what the reference implementation would store, here computed again
    the reference's way from the stored run: each task's stored indices as int16, concatenated over layers,
    written with ``lzma.open(...).write(lzma.compress(...))``; its BatchNorm modules (the rebuilt network's,
    copied) pickled by ``torch.save``; and the pools as a list of the reference's quantiser modules (a class of
    its layout, at its import path ``models.quantizer.Quantize``) pickled by ``torch.save``."""
    results = json.loads((demo_run / "results.json").read_text())
    store = TaskStore(demo_run)
    for i, task in enumerate(results["tasks"]):
        raw = np.concatenate([c.numpy() for c in store.codes(i).values()]).astype(np.int16).tobytes()
        buffer = io.BytesIO()
        with lzma.open(buffer, "wb") as f:
            f.write(lzma.compress(raw))
        norms = [copy.deepcopy(m).cpu() for m in store.model(i).modules() if isinstance(m, nn.BatchNorm2d)]
        assert task["reference_bytes"] == {"indices": len(buffer.getvalue()), "batchnorm": _torch_saved_size(norms)}

    class Quantize(nn.Module):
        def __init__(self, dim: int, n_embed: int):
            super().__init__()
            self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, 0.99, 1e-5
            self.register_buffer("embed", torch.randn(dim, n_embed))
            self.register_buffer("cluster_size", torch.zeros(n_embed))
            self.register_buffer("embed_avg", self.embed.clone())
            self.register_buffer("acum_embed_sum", torch.zeros_like(self.embed))
            self.register_buffer("acum_embed_onehot_sum", torch.zeros(n_embed))

    Quantize.__module__, Quantize.__qualname__ = "models.quantizer", "Quantize"
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    monkeypatch.setitem(sys.modules, "models.quantizer", types.SimpleNamespace(Quantize=Quantize))
    books, _ = store.pools()
    pools = _torch_saved_size([Quantize(book.shape[1], book.shape[0]) for book in books.values()])
    reference = results["memory"]["reference_equivalent"]
    assert abs(reference["pools"] - pools) <= 64  # the class paths differ; torch aligns records to 64 bytes
    tasks_total = sum(sum(t["reference_bytes"].values()) for t in results["tasks"])
    assert reference == {"pools": reference["pools"], "tasks_total": tasks_total,
                         "total": reference["pools"] + tasks_total}
    assert pools > 3 * sum(4 * book.numel() for book in books.values())  # three d x K buffers per layer
    assert "As the reference implementation stores it" in (demo_run / "results.md").read_text()


def test_demo_at_group_size_2_runs_stores_resumes_and_evaluates(tmp_path, capsys):
    """``nws demo --model.group_size 2`` through the command line, its pools pretrained in the run at g = 2
    (tests/test_pool_sources.py starts a g = 2 run from k-means pools instead): a run killed after writing task
    1's file, resumed, writes the files of an uninterrupted run, and ``nws eval`` rebuilds every task from them
    with the accuracies recorded."""
    import os

    argv = ["--model.group_size", "2", "--model.kwargs", "{widths: [8, 16]}", "--model.pool_size", "16",
            "--pretrain.epochs", "1", "--task.epochs", "1", "--data.num_tasks", "2", "--trainer.logger", "none",
            "--trainer.progress_bar", "false"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["demo", "--out", str(whole), *argv]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: f"{task_file(1)}:written"}
    killed = subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), *argv], env=env,
                            capture_output=True, timeout=600)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert [t["index"] for t in TaskStore(out).tasks()] == [0]
    assert main(["demo", "--out", str(out), *argv, "--resume"]) == 0
    files = json.loads((whole / "manifest.json").read_text())["files"]
    assert files == json.loads((out / "manifest.json").read_text())["files"]  # sizes and sha256 of every file
    store = TaskStore(out)
    books, _ = store.pools()
    assert store.spec().group_size == 2
    assert {n: tuple(b.shape) for n, b in books.items()} == {"features.0": (16, 9), "features.4": (16, 18),
                                                             "fc": (16, 1)}
    assert {n: layer.group_size for n, layer in nws_layers(store.model(1))} == {"features.0": 1, "features.4": 2,
                                                                                  "fc": 1}
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    accs = [float(a) / 100 for a in re.findall(r"accuracy ([\d.]+)%", capsys.readouterr().out)]
    assert accs == pytest.approx([t["acc_from_storage"] for t in results["tasks"]], abs=5e-5) and len(accs) == 2
