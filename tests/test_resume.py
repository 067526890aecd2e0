"""Fault injection: a run SIGKILLed during saves and during training resumes with ``--resume`` to the same
files as an uninterrupted run; finished tasks are never rewritten; a non-finite loss or weight stops the
run with one line and exit code 2, with every earlier task intact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nws.methods import open_run
from nws.cli import main
from nws.methods.nws import POOLS, REFERENCE, TaskStore
from nws.store import CRASH_ENV, MANIFEST, SOURCE, task_file
from nws.taskfile import read_task_file

TINY = ["--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "32", "--trainer.logger", "none",
        "--model.kwargs", '{"widths": [8, 16]}']
TASKS = [task_file(i) for i in range(5)]


@pytest.fixture(autouse=True)
def one_thread():
    """Runs in this process use one thread, as the subprocesses do: on a busy machine, torch's thread pool
    makes these tiny networks train tens of times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo(out: Path, *extra: str, crash_at: str | None = None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), *TINY, *extra], env=env,
                            stderr=subprocess.DEVNULL, text=True, **kwargs)


def comparable(results: dict) -> dict:
    """Results without what legitimately differs between two runs of one config: where it ran and how long."""
    timing = ("train_seconds", "train_cpu_seconds")
    return {**results, "config": None, "tasks": [{k: v for k, v in t.items() if k not in timing}
                                                   for t in results["tasks"]]}


def listed(out: Path) -> list[int]:
    return [t["index"] for t in json.loads((out / MANIFEST).read_bytes())["tasks"]]


def snapshot(out: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in names}


def assert_consistent(out: Path) -> None:
    """What a crash may leave: every listed file verifies, the listed tasks load, nothing half-written is
    under a final name (only hidden temporaries)."""
    store = TaskStore(out)
    store.check()
    for t in store.tasks():
        store.model(t["index"])
    names = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert names - {MANIFEST} - set(store.manifest["files"]) <= set(TASKS)  # a renamed, not yet listed task
    for name in names - {MANIFEST} - set(store.manifest["files"]):
        assert int(name[5:8]) not in listed(out)


def killed_in_task_3(out: Path, *extra: str) -> None:
    """Run the demo into ``out`` and SIGKILL it once it starts training task 3: tasks 0-2 are finished and
    listed, and what the kill left is consistent."""
    proc = demo(out, *extra, stdout=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("[task_003]"):
            proc.kill()
            break
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert_consistent(out)
    assert listed(out)[:3] == [0, 1, 2]


def test_killed_run_resumes_to_the_uninterrupted_files(tmp_path):
    reference = demo(tmp_path / "reference", stdout=subprocess.DEVNULL)
    out = tmp_path / "run"

    # 1. killed while saving the source network: the pools are saved, the source only as a temporary
    proc = demo(out, crash_at=f"{SOURCE}:written", stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert_consistent(out)
    assert set(json.loads((out / MANIFEST).read_bytes())["files"]) == {POOLS} and listed(out) == []
    assert any(p.name.startswith(f".{SOURCE}.") for p in out.iterdir())

    # 2. resumed, killed after task 1's file is in place but before the manifest lists it
    proc = demo(out, "--resume", crash_at=f"{task_file(1)}:renamed", stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert_consistent(out)
    assert listed(out) == [0] and (out / task_file(1)).exists()
    assert not any(p.name.startswith(f".{SOURCE}.") for p in out.iterdir())  # stale temporaries cleared
    kept = snapshot(out, [POOLS, SOURCE, task_file(0)])

    # 3. resumed, killed while training task 3
    killed_in_task_3(out, "--resume")
    assert snapshot(out, list(kept)) == kept
    kept = snapshot(out, [POOLS, SOURCE, *(task_file(i) for i in listed(out))])

    # 4. resumed to the end: finished tasks untouched, results complete, files equal to an uninterrupted run
    assert demo(out, "--resume", stdout=subprocess.DEVNULL).wait(timeout=300) == 0
    assert snapshot(out, list(kept)) == kept
    results = json.loads((out / "results.json").read_bytes())
    assert [t["name"] for t in results["tasks"]] == [f"digits {2 * i}/{2 * i + 1}" for i in range(5)]
    assert all(t["acc_from_storage"] == t["acc_after_training"] for t in results["tasks"])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert reference.wait(timeout=300) == 0
    names = [POOLS, SOURCE, *TASKS]
    assert snapshot(out, names) == snapshot(tmp_path / "reference", names)
    expected = json.loads((tmp_path / "reference" / "results.json").read_bytes())
    assert comparable(results) == comparable(expected)


def test_killed_chain_run_resumes_to_the_uninterrupted_files(tmp_path):
    """``model.code_reference: previous`` codes each task against the one before it (a key task every 2 here;
    the rate-aware search prices each choice against it):
    killed while training task 3, the resumed run rebuilds its predecessor from the chain and writes the
    same files as an uninterrupted run."""
    chain = ("--model.code_reference", "previous", "--model.key_every", "2", "--model.rate", "1")
    reference = demo(tmp_path / "reference", *chain, stdout=subprocess.DEVNULL)
    out = tmp_path / "run"
    killed_in_task_3(out, *chain)
    kept = snapshot(out, [POOLS, SOURCE, REFERENCE, *(task_file(i) for i in listed(out))])
    assert demo(out, *chain, "--resume", stdout=subprocess.DEVNULL).wait(timeout=300) == 0
    assert snapshot(out, list(kept)) == kept
    assert reference.wait(timeout=300) == 0
    names = [POOLS, SOURCE, REFERENCE, *TASKS]
    assert snapshot(out, names) == snapshot(tmp_path / "reference", names)
    pools_sha = TaskStore(out).pools()[1]
    references = [read_task_file((out / n).read_bytes(), pools_sha, n).reference for n in TASKS]
    assert references == ["source", 0, "source", 2, "source"]
    results = json.loads((out / "results.json").read_bytes())
    assert all(t["acc_from_storage"] == t["acc_after_training"] for t in results["tasks"])
    assert comparable(results) == comparable(json.loads((tmp_path / "reference" / "results.json").read_bytes()))


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    import dataclasses

    from store_fixtures import make_store

    from nws.config_parser import parse_run_config

    out = make_store(tmp_path / "run", num_tasks=1).root
    store = TaskStore(out)
    store.manifest["config"] = dataclasses.asdict(parse_run_config(["--out", str(out), *TINY], require_config=False))
    store.write_manifest()
    before = snapshot(out, [MANIFEST, POOLS, task_file(0)])
    assert main(["demo", "--out", str(out), *TINY, "--resume", "--task.lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task.lr: 0.01 -> 0.5" in err
    assert snapshot(out, list(before)) == before


def test_resume_refuses_a_damaged_finished_task(tmp_path, capsys):
    from store_fixtures import make_store

    out = make_store(tmp_path / "run", num_tasks=2).root
    (out / task_file(0)).write_bytes(b"damaged")
    assert main(["demo", "--out", str(out), *TINY, "--resume"]) == 2
    assert "task_000.safetensors is corrupt" in capsys.readouterr().err
    assert (out / task_file(0)).read_bytes() == b"damaged"


@pytest.mark.parametrize("fault, message", [
    ("loss", r"non-finite loss .* at epoch 0 step \d+"),
    ("weight", r"non-finite weight [\w.]+ at epoch \d+ step \d+"),
])
def test_non_finite_values_stop_the_task_and_keep_earlier_ones(tmp_path, capsys, monkeypatch, fault, message):
    """Task 2 is poisoned (NaN inputs, or an infinite learning rate): exit code 2 and one line naming the
    step (and the layer), tasks 0 and 1 untouched, nothing of task 2 stored; a resume then completes."""
    import dataclasses

    import torch

    import nws.methods.base

    out = tmp_path / "run"
    real_fit = nws.methods.base.fit

    class NaNInputs(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return torch.full_like(x, float("nan")), y

    def poisoned_fit(model, data, cfg, *args, name, **kwargs):
        if name == "task_002" and fault == "loss":
            data = NaNInputs(data)
        if name == "task_002" and fault == "weight":
            cfg = dataclasses.replace(cfg, lr=float("inf"))
        return real_fit(model, data, cfg, *args, name=name, **kwargs)

    monkeypatch.setattr(nws.methods.base, "fit", poisoned_fit)
    # (--resume with no run in --out starts a new run)
    assert main(["demo", "--out", str(out), *TINY, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nws: error: ")
    assert re.search(message, err), err
    assert listed(out) == [0, 1] and not (out / task_file(2)).exists() and not (out / "results.json").exists()
    kept = snapshot(out, [POOLS, SOURCE, task_file(0), task_file(1)])
    TaskStore(out).check()

    monkeypatch.setattr(nws.methods.base, "fit", real_fit)
    assert main(["demo", "--out", str(out), *TINY, "--resume"]) == 0
    assert snapshot(out, list(kept)) == kept
    assert listed(out) == [0, 1, 2, 3, 4]


BASELINE_CRASHES = {
    "finetune": "network_001.safetensors:renamed",  # the network after task 1 in place, task 1 not listed
    "packnet": "network_002.safetensors:written",  # the network after task 2 not yet renamed
    "piggyback": "backbone.safetensors:written",  # before any task
    "individual": "task_001.safetensors:renamed",
}


@pytest.mark.parametrize("method", list(BASELINE_CRASHES))
def test_killed_baseline_resumes_to_the_uninterrupted_files(tmp_path, method):
    """A baseline killed while saving keeps every listed task servable; ``--resume`` reads the method's state
    back (the network after the last listed task, PackNet's weight owners) and ends with the files and
    results of an uninterrupted run. A network that changes per task is never rewritten in place."""
    args = ("--method", method, "--baseline.retrain_epochs", "1", "--data.num_tasks", "4")
    reference = demo(tmp_path / "reference", *args, stdout=subprocess.DEVNULL)
    out = tmp_path / "run"
    assert demo(out, *args, crash_at=BASELINE_CRASHES[method], stdout=subprocess.DEVNULL).wait(timeout=300) \
        == -signal.SIGKILL
    store = open_run(str(out))
    store.check()
    for t in store.tasks():
        store.model(t["index"])
    proc = demo(out, "--resume", *args, stdout=subprocess.PIPE)  # killed again while training task 3
    for line in proc.stdout:
        if line.startswith("[task_003]"):
            proc.kill()
            break
    assert proc.wait(timeout=300) == -signal.SIGKILL
    kept = snapshot(out, [SOURCE, *(task_file(i) for i in listed(out))])
    assert len(kept) >= 3
    assert demo(out, "--resume", *args, stdout=subprocess.DEVNULL).wait(timeout=300) == 0
    assert snapshot(out, list(kept)) == kept
    assert reference.wait(timeout=300) == 0
    files = sorted(json.loads((tmp_path / "reference" / MANIFEST).read_bytes())["files"])
    assert sorted(json.loads((out / MANIFEST).read_bytes())["files"]) == files
    assert snapshot(out, files) == snapshot(tmp_path / "reference", files)
    assert {p.name for p in out.iterdir()} == {MANIFEST, "results.json", "results.md", *files}
    results, expected = (json.loads((d / "results.json").read_bytes()) for d in (out, tmp_path / "reference"))
    assert comparable(results) == comparable(expected)


def test_resuming_a_baseline_run_as_another_method_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    proc = demo(out, "--method", "individual", "--data.num_tasks", "1", stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 0
    before = snapshot(out, sorted(p.name for p in out.iterdir()))
    assert main(["demo", "--out", str(out), *TINY, "--method", "finetune", "--resume"]) == 2
    assert "holds a run of method individual, not finetune" in capsys.readouterr().err
    assert snapshot(out, list(before)) == before

