"""The task-incremental pipeline end to end: demo with small settings, storage, results contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nws.cli import main
from nws.store import TaskStore, task_file

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
    assert set(results["memory"]) == {"pools", "tasks_total", "float32_model"}
    files = json.loads((demo_run / "manifest.json").read_text())["files"]
    assert results["memory"]["pools"] == files["pools.safetensors"]["size"]
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


def test_tasks_start_from_previous_and_pools_frozen(demo_run):
    store = TaskStore(demo_run)
    books, _ = store.pools()
    source = store.load_source()
    for name, layer in source.named_modules():
        if hasattr(layer, "pool"):
            assert torch.equal(layer.pool.codebook, books[name])
    outputs = [store.model(i)(torch.zeros(1, 1, 8, 8)) for i in range(5)]
    assert all(o.shape == (1, 2) for o in outputs)


def test_existing_run_is_not_overwritten(demo_run, capsys):
    before = (demo_run / task_file(0)).read_bytes()
    assert main(["demo", "--out", str(demo_run), *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (demo_run / task_file(0)).read_bytes() == before
