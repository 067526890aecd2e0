"""A method defined here, outside nws/, runs through everything the built-in ones do: ``nws run`` (as
``--method test_own_method:FrozenSource``), a SIGKILL in the middle of a task and ``--resume`` to the files of
an uninterrupted run, ``nws eval``, ``nws report``, and ``nws demo --compare`` (registered with
:func:`nws.methods.register_method`, or installed under the ``nws.methods`` entry-point group).

The method: the network trained on the source task stays frozen (its BatchNorm too); each task trains a new
classifier on it. Stored: the source network once (shared) and one classifier per task.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.cli import main
from nws.container import check_state, nbytes, pack_file
from nws.engine import task_seed
from nws.errors import StoreError
from nws.methods import METHODS, Method, Saved, method_class, open_run, register_method
from nws.methods.base import classifier_name
from nws.models import create_model
from nws.store import MANIFEST, SOURCE, RunStore, task_file

HEAD = "frozen-source-head"  # the kind of a task file: one classifier
NETWORK = "frozen-source-network"


class FrozenBatchNorm(L.Callback):
    """Keeps every BatchNorm in eval mode while the classifier trains: the source network stays as stored."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


class FrozenSourceStore(RunStore):
    """The reader: a task's network is the stored source network with the task's classifier."""

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        model = manifest.get("model")
        if not (isinstance(model, dict) and isinstance(model.get("name"), str)
                and isinstance(model.get("kwargs"), dict)):
            return "bad model entry"
        return None

    def shared_files(self) -> list[str]:
        return [SOURCE]

    def network(self, num_classes: int) -> nn.Module:
        spec = self.manifest["model"]
        try:
            return create_model(spec["name"], num_classes=num_classes, **spec["kwargs"])
        except (TypeError, ValueError) as err:
            raise StoreError(f"{self.root}: cannot build the run's model ({err})") from None

    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        what = str(self.root / entry["file"])
        head, meta = self.file(entry["file"], HEAD)
        if meta.get("index") != index:
            raise StoreError(f"{what} holds another task than the manifest lists as task {index}")
        model = self.network(len(entry["classes"]))
        prefix = classifier_name(model) + "."
        body = {k: v for k, v in self.file(SOURCE, NETWORK)[0].items() if not k.startswith(prefix)}
        check_state({**body, **head}, model.state_dict(), what)
        model.load_state_dict({**body, **head})
        return model


class FrozenSource(Method):
    """A frozen source network, a new classifier per task."""

    name = "frozen_source"
    store_class = FrozenSourceStore
    source_files = (SOURCE,)
    colour, marker = "#8c564b", "P"

    @classmethod
    def source_key(cls, config) -> str:
        return "plain backbone"  # the baselines' start: the plain network trained on the source task

    def manifest_fields(self) -> dict[str, Any]:
        m = self.config.model
        return {"model": {"name": m.name, "kwargs": {"in_channels": self.ctx.benchmark.in_channels, **m.kwargs}}}

    def pretrain(self, store: FrozenSourceStore) -> nn.Module:
        task = self.ctx.benchmark.source
        if self.shared_source is not None:
            model = copy.deepcopy(self.shared_source)
        else:
            model = self.fit(store.network(len(task.classes)), task, self.config.pretrain, "pretrain",
                             self.config.seed, what="training the source network on")
        store.put(SOURCE, NETWORK, model.state_dict(), {})
        self.record_source(store, model)
        return model

    def load_source(self, store: FrozenSourceStore) -> nn.Module:
        model = store.network(len(self.ctx.benchmark.source.classes))
        model.load_state_dict(store.file(SOURCE, NETWORK)[0])
        return model

    def start(self, store: RunStore, source: nn.Module) -> None:
        self.source = source

    def learn(self, index: int) -> nn.Module:
        model = self.head_for(copy.deepcopy(self.source), index)
        head = model.get_submodule(classifier_name(model))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        return self.fit(model, self.ctx.benchmark.tasks[index], self.config.task, f"task_{index:03d}",
                        task_seed(self.config.seed, index), params=list(head.parameters()),
                        callbacks=[FrozenBatchNorm()])

    def save(self, store: RunStore, index: int, model: nn.Module) -> Saved:
        prefix = classifier_name(model) + "."
        head = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        data = pack_file(HEAD, head, {"index": index, "name": self.ctx.benchmark.tasks[index].name})
        weights = nbytes(head.values())
        return Saved({task_file(index): data},
                     {"file": task_file(index), "bytes": {"weights": weights, "other": len(data) - weights}})

    def describe(self, rebuilt: nn.Module) -> dict[str, Any]:
        return {"head_norm": float(rebuilt.get_submodule(classifier_name(rebuilt)).weight.detach().norm())}


SPEC = "test_own_method:FrozenSource"
TINY = ["--pretrain.epochs", "1", "--task.epochs", "2", "--trainer.logger", "none", "--model.kwargs",
        '{"widths": [8, 16]}', "--data.num_tasks", "4"]


def nws(*args: str, **kwargs) -> subprocess.Popen:
    """``nws ARGS`` in a subprocess that finds this module (as any user's module would be found)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "nws.cli", *args], env=env, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def comparable(results: dict) -> dict:
    timing = ("train_seconds", "train_cpu_seconds")
    return {**results, "config": None, "tasks": [{k: v for k, v in t.items() if k not in timing}
                                                   for t in results["tasks"]]}


def listed_files(out: Path) -> list[str]:
    return sorted(json.loads((out / MANIFEST).read_bytes())["files"])


def test_run_kill_resume_eval_and_report(tmp_path, capsys):
    reference = nws("demo", "--out", str(tmp_path / "reference"), "--method", SPEC, *TINY, stdout=subprocess.DEVNULL)
    out = tmp_path / "run"
    proc = nws("demo", "--out", str(out), "--method", SPEC, *TINY, stdout=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("[task_002]"):  # tasks 0 and 1 stored, task 2 training
            proc.kill()
            break
    assert proc.wait(timeout=300) == -signal.SIGKILL
    store = open_run(str(out))
    assert type(store) is FrozenSourceStore and [t["index"] for t in store.tasks()] == [0, 1]
    kept = {name: (out / name).read_bytes() for name in listed_files(out)}
    proc = nws("demo", "--out", str(out), "--method", SPEC, *TINY, "--resume", stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert {name: (out / name).read_bytes() for name in kept} == kept  # finished files never rewritten
    files = listed_files(tmp_path / "reference")
    assert listed_files(out) == files and len(files) == 5
    assert all((out / n).read_bytes() == (tmp_path / "reference" / n).read_bytes() for n in files)
    results = json.loads((out / "results.json").read_text())
    assert comparable(results) == comparable(json.loads((tmp_path / "reference" / "results.json").read_text()))
    assert results["method"] == "frozen_source" and (out / "results.md").is_file()
    assert all(t["acc_from_storage"] == t["acc_after_training"] == t["acc_final"] for t in results["tasks"])
    assert all(t["head_norm"] > 0 for t in results["tasks"])  # the method's describe() extras
    assert results["memory"]["shared_files"] == {SOURCE: (out / SOURCE).stat().st_size}

    assert main(["eval", "--run", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("accuracy" in line and "FAILED" not in line for line in lines)
    assert main(["report", str(out), str(tmp_path / "reference"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| frozen_source | 2 |" in report  # two seeds' worth: the same settings, grouped


def test_registered_and_installed_methods_are_found(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "frozen_source", FrozenSource)
    assert method_class("frozen_source") is FrozenSource and method_class(SPEC) is FrozenSource
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (FrozenSource,), {}))
    dist = tmp_path / "frozen_method-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: frozen-method\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[nws.methods]\nfrozen_installed = {SPEC}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert method_class("frozen_installed") is FrozenSource


def test_demo_compare_runs_a_registered_method_with_the_others(tmp_path, monkeypatch, capsys):
    """``nws demo --compare`` runs every registered method, this one too; it takes the baselines' source
    network (the same source key), trained once."""
    monkeypatch.setitem(METHODS, "frozen_source", FrozenSource)
    out = tmp_path / "cmp"
    assert main(["demo", "--compare", "--out", str(out), "--pretrain.epochs", "1", "--task.epochs", "1",
                 "--model.pool_size", "16", "--model.kwargs", '{"widths": [8]}', "--data.num_tasks", "2",
                 "--baseline.retrain_epochs", "1", "--trainer.logger", "none", "--trainer.progress_bar", "false",
                 "--trainer.checkpoint", "false"]) == 0
    report = (out / "report" / "report.md").read_text()
    for method in ("nws", "piggyback", "packnet", "finetune", "individual", "frozen_source"):
        assert f"| {method} | 1 |" in report, method
    ours = open_run(str(out / "frozen_source"))
    source, _ = ours.file(SOURCE, NETWORK)
    plain = open_run(str(out / "finetune")).file(SOURCE, "nws-source-plain")[0]
    assert source.keys() == plain.keys() and all(torch.equal(source[k], plain[k]) for k in source)
