"""Rate-aware search in whole runs (``model.rate``): at 0 the demo writes the very files nws wrote before the
rate existed; above 0 a task keeps more of its reference's indices, its file is smaller, and accuracy from
storage still equals accuracy after training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nws.config_parser import stored_config
from nws.convert import nws_layers
from nws.methods.nws import TaskStore
from nws.runner import Runner

FIXTURE = Path(__file__).parent / "fixtures" / "demo_before_rate.json"
SHORT = ["--pretrain.epochs", "5", "--task.epochs", "5", "--trainer.logger", "none"]
TIMEOUT = 600


def demo(out: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), "--trainer.progress_bar",
                           "false", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_rate_zero_writes_the_files_written_before_the_rate_existed(tmp_path):
    """The demo as shipped then (``tests/fixtures/demo_before_rate.json``: its files' sha256, written by the
    code before the rate-aware search), with ``--model.rate 0``."""
    expected = json.loads(FIXTURE.read_text())["sha256"]
    demo(tmp_path / "demo", "--trainer.logger", "none", "--model.rate", "0")
    assert {name: hashlib.sha256((tmp_path / "demo" / name).read_bytes()).hexdigest() for name in expected} == expected


def changed_fraction(store: TaskStore, index: int) -> float:
    codes, reference = store.codes(index), store.reference_codes()
    changed = sum(int((codes[n][: len(reference[n])] != reference[n][: len(codes[n])]).sum()) for n in codes)
    return changed / sum(len(c) for c in codes.values())


def test_a_rate_keeps_more_indices_and_smaller_files_losslessly(tmp_path):
    demo(tmp_path / "plain", *SHORT, "--seed", "3")
    demo(tmp_path / "rate", *SHORT, "--seed", "3", "--model.rate", "3")
    stores = {kind: TaskStore(tmp_path / kind) for kind in ("plain", "rate")}
    assert stores["plain"].read("pools.safetensors") == stores["rate"].read("pools.safetensors")  # same source stage
    results = {kind: json.loads((tmp_path / kind / "results.json").read_text()) for kind in stores}
    for kind, r in results.items():
        assert all(t["acc_from_storage"] == t["acc_after_training"] for t in r["tasks"]), kind
    indices = {kind: [t["bytes"]["indices"] for t in r["tasks"]] for kind, r in results.items()}
    assert sum(indices["rate"]) < sum(indices["plain"]) / 2, indices
    changed = {kind: [changed_fraction(store, i) for i in range(5)] for kind, store in stores.items()}
    assert all(r < p for r, p in zip(changed["rate"], changed["plain"])), changed
    # The rebuilt network searches exactly the stored indices: its forward is the trained one's.
    model = stores["rate"].model(4)
    stored = stores["rate"].codes(4)
    from nws.codes import encode

    assert all(torch.equal(encode(model)[n], stored[n]) for n in stored)


@pytest.mark.parametrize("start", ["previous", "source"])
def test_a_task_starts_from_the_previous_task_or_from_the_source(tmp_path, start):
    """``model.task_start``: task 1's training starts from task 0 rebuilt from its files (previous, the paper)
    or from the source network (source), seen on the network task 1's training is handed (no epochs)."""
    out = tmp_path / "run"
    demo(out, *SHORT, "--data.num_tasks", "2", "--model.task_start", start)
    store = TaskStore(out)
    stored = stored_config(store.manifest["config"])
    config = dataclasses.replace(stored, task=dataclasses.replace(stored.task, epochs=0))
    begins = Runner(config, progress=False).method.learn(1)
    codes = {name: layer.search() for name, layer in nws_layers(begins) if name != "fc"}
    expected = store.reference_codes() if start == "source" else store.codes(0)
    assert codes and all(torch.equal(codes[name], expected[name]) for name in codes)
    assert any(not torch.equal(store.codes(0)[name], store.reference_codes()[name]) for name in codes)
