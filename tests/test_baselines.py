"""Baselines under the NWS protocol: storage accounting, exact recovery, forgetting measured after the sequence."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from nws.cli import main
from nws.config import BaselineConfig, ConfigError, ModelConfig, RunConfig, TrainConfig, TrainerConfig
from nws.data.digits import digits_benchmark
from nws.engine import evaluate
from nws.methods import METHODS, NWS, method_class, open_run
from nws.methods.plain import masked_layers, network_file, pack_masks, unpack_masks
from nws.runner import Runner
from nws.store import task_file

TASKS = 3


@pytest.fixture(scope="module")
def benchmark():
    b = digits_benchmark(seed=0)
    return dataclasses.replace(b, tasks=b.tasks[:TASKS])


def small_config(out, method: str) -> RunConfig:
    return RunConfig(seed=0, out=str(out), model=ModelConfig(kwargs={"widths": [8, 16]}, pool_size=16),
                     pretrain=TrainConfig(epochs=2, lr=0.05), task=TrainConfig(epochs=2),
                     trainer=TrainerConfig(logger="none"), method=method, baseline=BaselineConfig(retrain_epochs=1))


def run_with_spy(tmp_path_factory, benchmark, method: str):
    """Run ``method``; capture each task's trained network (outputs on fixed inputs and state) right after it."""
    out = tmp_path_factory.mktemp(method) / "run"
    runner = Runner(small_config(out, method), benchmark, progress=False)
    x = benchmark.tasks[0].test.tensors[0][:32]
    captured = []
    learn = runner.method.learn

    def spy(index):
        model = learn(index).eval()
        with torch.no_grad():
            captured.append((model(x).clone(), {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    runner.method.learn = spy
    results = runner.run()
    return out, results, captured, x


@pytest.fixture(scope="module")
def individual(tmp_path_factory, benchmark):
    return run_with_spy(tmp_path_factory, benchmark, "individual")


@pytest.fixture(scope="module")
def packnet(tmp_path_factory, benchmark):
    return run_with_spy(tmp_path_factory, benchmark, "packnet")


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, benchmark):
    return run_with_spy(tmp_path_factory, benchmark, "finetune")


@pytest.fixture(scope="module")
def piggyback(tmp_path_factory, benchmark):
    return run_with_spy(tmp_path_factory, benchmark, "piggyback")


def manifest_files(out):
    return json.loads((out / "manifest.json").read_text())["files"]


def check_contract(out, results, shared: tuple[str, ...]):
    """The results schema and memory counted from the files actually written."""
    assert len(results["tasks"]) == TASKS
    files = manifest_files(out)
    for i, t in enumerate(results["tasks"]):
        assert set(t) >= {"name", "classes", "acc_after_training", "acc_from_storage", "acc_final", "bytes"}
        assert sum(t["bytes"].values()) == files[task_file(i)]["size"]
        assert t["acc_from_storage"] == t["acc_after_training"]
    assert results["memory"]["tasks_total"] == sum(files[task_file(i)]["size"] for i in range(TASKS))
    assert set(files) == {"source.safetensors", *shared, *(task_file(i) for i in range(TASKS))}  # nothing stale
    assert results["memory"]["shared"] == sum(files[f]["size"] for f in shared)
    assert results["memory"]["shared_files"] == {f: files[f]["size"] for f in shared}
    total = results["memory"]["shared"] + results["memory"]["tasks_total"]
    assert results["memory_after_task"][-1] == total
    steps = [b - a for a, b in zip(results["memory_after_task"], results["memory_after_task"][1:])]
    assert steps == [files[task_file(i)]["size"] for i in range(1, TASKS)]
    avg = sum(t["acc_final"] for t in results["tasks"]) / TASKS
    assert results["average_accuracy"] == pytest.approx(avg, abs=1e-12)


def test_individual_memory_is_tasks_times_float32_model(individual):
    out, results, captured, x = individual
    check_contract(out, results, shared=())
    f32 = results["memory"]["float32_model"]
    tensors = [t["bytes"]["weights"] + t["bytes"]["batchnorm"] for t in results["tasks"]]
    assert tensors == [f32] * TASKS
    assert sum(tensors) == TASKS * f32
    assert all(t["bytes"]["masks"] == 0 for t in results["tasks"])
    store = open_run(out)
    for i, (outputs, _) in enumerate(captured):
        assert torch.equal(store.model(i)(x), outputs)
        assert results["tasks"][i]["acc_final"] == results["tasks"][i]["acc_after_training"]


def test_packnet_masks_recover_each_tasks_exact_weights(packnet):
    out, results, captured, x = packnet
    check_contract(out, results, shared=(network_file(TASKS - 1),))
    store = open_run(out)
    for i, (outputs, state) in enumerate(captured):
        model = store.model(i)
        rebuilt = model.state_dict()
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.equal(rebuilt[key], value), (i, key)
        assert torch.equal(model(x), outputs)
        assert results["tasks"][i]["acc_final"] == results["tasks"][i]["acc_after_training"]
    # Each weight is owned by at most one task; each task owns (1 - prune ratio) of the weights free before it.
    _, shapes = store.network_layers()
    owned = [store.owned(i, shapes) for i in range(TASKS)]
    free = {name: math.prod(shape) for name, shape in shapes.items()}
    for masks in owned:
        for name, mask in masks.items():
            assert int(mask.sum()) == round(0.25 * free[name])
            free[name] -= int(mask.sum())
    for name in shapes:
        assert int(sum(m[name].int() for m in owned).max()) <= 1
    bits = sum(math.prod(s) for s in shapes.values())
    assert all(t["bytes"]["masks"] == math.ceil(bits / 8) for t in results["tasks"])
    assert [t["mask_density"] for t in results["tasks"]] == [sum(int(m.sum()) for m in o.values()) / bits
                                                             for o in owned]


def test_finetune_old_tasks_are_measured_after_the_last(finetune, benchmark):
    out, results, captured, x = finetune
    check_contract(out, results, shared=(network_file(TASKS - 1),))
    store = open_run(out)
    last = TASKS - 1
    assert torch.equal(store.model(last)(x), captured[last][0])
    for i in range(TASKS - 1):
        model = store.model(i)
        assert not torch.equal(model(x), captured[i][0])  # later tasks changed the shared weights
        assert results["tasks"][i]["acc_final"] == evaluate(model, benchmark.tasks[i].test)
    bwt = sum(t["acc_final"] - t["acc_after_training"] for t in results["tasks"][:-1]) / (TASKS - 1)
    assert results["backward_transfer"] == pytest.approx(bwt, abs=1e-12)


def test_piggyback_keeps_the_backbone_and_recovers_each_task(piggyback):
    out, results, captured, x = piggyback
    check_contract(out, results, shared=("backbone.safetensors",))
    store = open_run(out)
    for i, (outputs, _) in enumerate(captured):
        assert torch.equal(store.model(i)(x), outputs)
    model = store.model(0)
    bits = sum(m.weight.numel() for _, m in masked_layers(model))
    assert all(t["bytes"]["masks"] == math.ceil(bits / 8) for t in results["tasks"])
    assert all(t["bytes"]["weights"] < results["memory"]["float32_model"] / 10 for t in results["tasks"])


def test_source_pretraining_is_the_same_for_every_baseline(individual, packnet):
    """Same data, seed and schedule give the same plain backbone, so ``--compare`` may train it once."""
    sources = [manifest_files(run[0])["source.safetensors"]["sha256"] for run in (individual, packnet)]
    assert sources[0] == sources[1]


def test_masks_pack_one_bit_per_weight():
    gen = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(3, 5, generator=gen) > 0.5, "b": torch.rand(7, generator=gen) > 0.5}
    bits = pack_masks(masks)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(22 / 8)
    back = unpack_masks(bits, {"a": [3, 5], "b": [7]}, "test")
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_method_registry(tmp_path, benchmark):
    assert {"nws", "finetune", "individual", "packnet", "piggyback"} <= set(METHODS)
    assert method_class("nws") is NWS and all(METHODS[m].name == m for m in METHODS)
    assert method_class("nws.methods.nws:NWS") is NWS
    with pytest.raises(ConfigError, match="unknown method"):
        method_class("ewc")
    with pytest.raises(ConfigError, match="cannot load"):
        method_class("nws.methods.nws:EWC")


def test_cli_method_errors_are_one_line(capsys, tmp_path):
    assert main(["demo", "--method", "ewc", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'ewc'" in err


def test_eval_serves_a_baseline_run(finetune, capsys):
    out, results, _, _ = finetune
    data = json.loads((out / "manifest.json").read_text())
    assert data["method"] == "finetune"
    assert main(["eval", "--run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("accuracy") == TASKS and "FAILED" not in printed
