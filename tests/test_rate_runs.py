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

from types import SimpleNamespace

import pytest
import torch

import nws
from nws.config_parser import stored_config
from nws.convert import nws_layers
from nws.methods.nws import RateWarmup, TaskStore
from nws.models import create_model
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
    """At lambda 3, from the first step or warmed up over half of each task's steps (``model.rate_warmup``)."""
    demo(tmp_path / "plain", *SHORT, "--seed", "3")
    demo(tmp_path / "rate", *SHORT, "--seed", "3", "--model.rate", "3")
    demo(tmp_path / "warm", *SHORT, "--seed", "3", "--model.rate", "3", "--model.rate_warmup", "0.5")
    stores = {kind: TaskStore(tmp_path / kind) for kind in ("plain", "rate", "warm")}
    assert stores["plain"].read("pools.safetensors") == stores["rate"].read("pools.safetensors")  # same source stage
    results = {kind: json.loads((tmp_path / kind / "results.json").read_text()) for kind in stores}
    for kind, r in results.items():
        assert all(t["acc_from_storage"] == t["acc_after_training"] for t in r["tasks"]), kind
    indices = {kind: [t["bytes"]["indices"] for t in r["tasks"]] for kind, r in results.items()}
    assert max(sum(indices["rate"]), sum(indices["warm"])) < sum(indices["plain"]) / 2, indices
    changed = {kind: [changed_fraction(store, i) for i in range(5)] for kind, store in stores.items()}
    assert all(r < p and w < p for r, w, p in zip(changed["rate"], changed["warm"], changed["plain"])), changed
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


def test_rate_warmup_raises_lambda_in_sixteen_levels_from_the_step_count():
    """Lambda 0 (no rate) for the first sixteenth of the warm-up, then a sixteenth more every sixteenth, held
    at lambda from the warm-up's end; a new penalty only when the level changes, raising the one before (the
    first layer's shown); a task resumed mid-way (a callback made afresh) takes up the level of the step it
    starts at."""
    torch.manual_seed(0)
    model = nws.freeze_pools(nws.convert(create_model("convnet", num_classes=3), pool_size=16, init="kernels"))
    reference = nws.encode(model)
    total, lam = 200, 0.8
    warmup = RateWarmup(reference, lam, 0.4)  # 80 steps, a level every 5
    seen, penalties = [], [None]
    for step in range(total):
        warmup.on_train_batch_start(SimpleNamespace(global_step=step, estimated_stepping_batches=total),
                                    SimpleNamespace(model=model), None, step)
        rates = [layer.rate for _, layer in nws_layers(model)]
        if rates[0] is not penalties[-1]:
            penalties.append(rates[0])
        lams = {0.0 if r is None else r.lam for r in rates}
        assert len(lams) == 1
        seen.append(lams.pop())
    assert seen == [lam * min(16, step // 5) / 16 for step in range(total)]
    assert len(penalties) == 17  # no rate, then one penalty per level
    # From the second level on, each is the one before at a higher price: the search keeps its bounds.
    assert all(b.raises(a) and b.bits is penalties[1].bits for a, b in zip(penalties[1:], penalties[2:]))
    resumed = RateWarmup(reference, lam, 0.4)
    resumed.on_train_batch_start(SimpleNamespace(global_step=42, estimated_stepping_batches=total),
                                 SimpleNamespace(model=model), None, 0)
    assert all(layer.rate.lam == lam * 8 / 16 for _, layer in nws_layers(model))
