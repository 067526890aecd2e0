"""Reports: metrics, seed aggregation, tables and plot files, pool usage of an NWS run, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from nws.cli import main
from nws.compare import compare
from nws.config import ModelConfig, RunConfig, TrainConfig, TrainerConfig
from nws.convert import nws_layers
from nws.data.digits import digits_benchmark
from nws.errors import NWSError
from nws.metrics import continual_metrics, extrapolate
from nws.groups import aggregate, find_runs
from nws.methods.nws import NWS, TaskStore
from nws.report import comparison_table, time_table, write_report
from nws.runner import run
from nws.tables import markdown_table, run_markdown


def fake_results(method: str, seed: int, final: list[float], after: list[float], task_bytes: int,
                 shared: int = 0, names: tuple[str, ...] = ("task 0", "task 1"), **config) -> dict:
    tasks = [{"name": names[i], "classes": ["a", "b"], "acc_after_training": a, "acc_from_storage": a,
              "acc_final": f, "bytes": {"weights": task_bytes, "batchnorm": 0, "other": 0}, "float32_model": 400}
             for i, (f, a) in enumerate(zip(final, after))]
    return {"format": "nws-results", "version": 3, "method": method, "seed": seed,
            "config": {"seed": seed, "out": f"x/{seed}", "method": method, **config},
            **continual_metrics(tasks), "tasks": tasks,
            "accuracy_matrix": [[t["acc_from_storage"] if i == j else None for i, t in enumerate(tasks)]
                                for j in range(len(tasks) - 1)] + [list(final)],
            "memory": {"shared": shared, "shared_files": {"network.safetensors": shared} if shared else {},
                       "tasks_total": task_bytes * len(tasks), "float32_model": 400},
            "memory_after_task": [shared + task_bytes * (i + 1) for i in range(len(tasks))]}


def write_run(path, results):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_continual_metrics_exact():
    tasks = [{"acc_after_training": 1.0, "acc_final": 0.5, "acc_from_storage": 1.0},
             {"acc_after_training": 0.75, "acc_final": 1.0, "acc_from_storage": 0.75},
             {"acc_after_training": 0.5, "acc_final": 0.5, "acc_from_storage": 0.5}]
    m = continual_metrics(tasks)
    assert m["backward_transfer"] == (-0.5 + 0.25) / 2
    assert m["forgetting"] == 0.5 / 2
    assert m["average_accuracy"] == (0.5 + 1.0 + 0.5) / 3
    assert continual_metrics(tasks[:1])["backward_transfer"] == 0.0


def test_extrapolation_grows_by_the_mean_task_and_never_multiplies_the_shared_files():
    assert extrapolate([100, 150, 200], shared=50) == 200 + 50 * 97  # tasks of 50 bytes each
    assert extrapolate([300], shared=200) == 300 + 100 * 99  # one task of 100 bytes; the 200 shared stay 200
    assert extrapolate([1000, 1000, 1000], shared=1000) == 1000  # tasks that cost nothing
    assert extrapolate([], shared=7) == 7


def test_seed_aggregation_mean_and_std(tmp_path):
    finals = [[0.5, 1.0], [0.75, 0.5], [1.0, 0.75]]
    for seed, (final, size) in enumerate(zip(finals, [1000, 2000, 3000])):
        write_run(tmp_path / f"packnet_{seed}", fake_results("packnet", seed, final, [1.0, 1.0], size,
                                                             baseline={"prune_ratio": 0.75}))
    write_run(tmp_path / "packnet_half", fake_results("packnet", 0, [1.0, 1.0], [1.0, 1.0], 10,
                                                      baseline={"prune_ratio": 0.5}))
    write_run(tmp_path / "nws", fake_results("nws", 0, [0.5, 0.5], [0.5, 0.5], 10, shared=100))
    groups = aggregate(find_runs([tmp_path]))
    assert [g.method for g in groups] == ["nws", "packnet", "packnet"]
    g = next(g for g in groups if len(g.runs) == 3)
    assert g.label == "packnet (packnet_0)" and sorted(g.seeds) == [0, 1, 2]
    assert g.acc_final[0] == (0.75, 0.25)  # mean and sample standard deviation of 0.5, 0.75, 1.0
    assert g.acc_final[1] == (0.75, 0.25)
    averages = [(0.5 + 1.0) / 2, (0.75 + 0.5) / 2, (1.0 + 0.75) / 2]
    assert g.average_accuracy[0] == pytest.approx(np.mean(averages), abs=1e-15)
    assert g.average_accuracy[1] == pytest.approx(np.std(averages, ddof=1), abs=1e-15)
    assert g.memory == (4000.0, 2000.0)  # totals 2000, 4000, 6000
    assert g.memory_after_task == [2000.0, 4000.0]
    single = next(g for g in groups if g.method == "nws")
    assert single.acc_final[0] == (0.5, 0.0) and single.memory == (120.0, 0.0)
    table = comparison_table(groups)
    assert "75.00 ± 25.00" in table and "| nws | 1 | 50.00 | 50.00 |" in table


def test_a_setting_a_run_lacks_counts_at_its_default(tmp_path):
    """A run made before a setting existed groups with runs that have it at its default, not with others."""
    default = RunConfig().model.bn_dtype
    write_run(tmp_path / "old", fake_results("nws", 0, [1.0, 0.5], [1.0, 0.5], 10, model={"pool_size": 512}))
    write_run(tmp_path / "new", fake_results("nws", 1, [0.5, 1.0], [0.5, 1.0], 10,
                                             model={"pool_size": 512, "bn_dtype": default}))
    write_run(tmp_path / "half", fake_results("nws", 2, [0.5, 1.0], [0.5, 1.0], 10,
                                              model={"pool_size": 512, "bn_dtype": "float16"}))
    groups = aggregate(find_runs([tmp_path]))
    assert sorted(sorted(g.seeds) for g in groups) == [[0, 1], [2]]


def test_training_time_per_task_mean_over_seeds(tmp_path):
    for seed, (cpu, wall) in enumerate([([10.0, 20.0], [30.0, 50.0]), ([20.0, 42.0], [40.0, 72.0])]):
        results = fake_results("piggyback", seed, [1.0, 1.0], [1.0, 1.0], 10)
        for task, c, w in zip(results["tasks"], cpu, wall):
            task.update(train_cpu_seconds=c, train_seconds=w)
        write_run(tmp_path / f"piggyback_{seed}", results)
    write_run(tmp_path / "old" / "finetune", fake_results("finetune", 0, [1.0, 1.0], [1.0, 1.0], 10))  # no times
    groups = aggregate(find_runs([tmp_path, tmp_path / "old"]))
    piggyback = next(g for g in groups if g.method == "piggyback")
    assert piggyback.train_cpu_seconds == [(15.0, math.sqrt(50)), (31.0, math.sqrt(242))]
    assert piggyback.train_seconds[1] == (61.0, math.sqrt(242))
    assert next(g for g in groups if g.method == "finetune").train_seconds == []
    table = time_table(groups)
    assert "| piggyback | 2 | 15 (35) | 31 (61) | 23 (48) | 46 (96) |" in table and "finetune" not in table
    summary = write_report([tmp_path, tmp_path / "old"], tmp_path / "report")
    assert summary["groups"][0]["train_cpu_seconds"][0] == {"mean": 15.0, "std": math.sqrt(50)}
    assert "| piggyback | 2 | 15 (35) |" in (tmp_path / "report" / "report.md").read_text()
    assert time_table(aggregate(find_runs([tmp_path / "old"]))) == ""


def test_report_rejects_missing_and_malformed_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{\"tasks\": 3}")
    assert main(["report", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a results file" in err
    results = fake_results("packnet", 0, [1.0, 1.0], [1.0, 1.0], 10)
    del results["memory"]["shared_files"]
    write_run(tmp_path / "broken", results)
    assert main(["report", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a results file" in err and "shared_files" in err


def test_report_refuses_results_of_an_earlier_nws_naming_the_upgrade(tmp_path, capsys):
    """Results as nws wrote them before results.json had a format (memory as ``pools``, no config): one line,
    exit 2, naming the command that converts them; newer results: upgrade nws."""
    results = fake_results("nws", 0, [1.0, 1.0], [1.0, 1.0], 10, shared=100)
    for key in ("format", "version", "config", "memory_after_task"):
        del results[key]
    results["memory"]["pools"] = results["memory"].pop("shared")
    write_run(tmp_path / "old", results)
    assert main(["report", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nws upgrade {tmp_path / 'old'}" in err
    write_run(tmp_path / "new", {**fake_results("nws", 0, [1.0], [1.0], 10), "version": 4})
    assert main(["report", str(tmp_path / "new")]) == 2
    assert "newer than this nws reads (3); upgrade nws" in capsys.readouterr().err


@pytest.fixture(scope="module")
def nws_run(tmp_path_factory):
    b = digits_benchmark(seed=0)
    benchmark = dataclasses.replace(b, tasks=b.tasks[:2])
    out = tmp_path_factory.mktemp("nws") / "run"
    config = RunConfig(seed=0, out=str(out), model=ModelConfig(kwargs={"widths": [8, 16]}, pool_size=16),
                       pretrain=TrainConfig(epochs=1), task=TrainConfig(epochs=1),
                       trainer=TrainerConfig(logger="none", progress_bar=False, checkpoint=False))
    run(config, benchmark, progress=False)
    return out, benchmark


def test_nws_results_have_final_accuracy_and_memory_after_task(nws_run):
    """``nws.runner.run`` from Python writes results.json and its table results.md."""
    out, _ = nws_run
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text() == run_markdown(results)
    assert results["method"] == "nws" and (results["format"], results["version"]) == ("nws-results", 3)
    assert all(t["acc_final"] == t["acc_from_storage"] for t in results["tasks"])
    sizes = [sum(t["bytes"].values()) for t in results["tasks"]]
    files = json.loads((out / "manifest.json").read_text())["files"]
    shared = {name: files[name]["size"] for name in ("pools.safetensors", "reference.safetensors")}
    pools = sum(shared.values())  # the pools and the reference every task is coded against
    assert results["memory"]["shared"] == pools and results["memory"]["shared_files"] == shared
    assert results["memory_after_task"] == [pools + sizes[0], pools + sizes[0] + sizes[1]]
    # the 100-task extrapolation grows by the mean of the real task files, the shared files counted once
    from nws.metrics import EXTRAPOLATE_TO, memory_after_task, shared_bytes

    at = extrapolate(memory_after_task(results), shared_bytes(results))
    assert at == pools + sum(sizes) + (sizes[0] + sizes[1]) / 2 * (EXTRAPOLATE_TO - 2)
    table = markdown_table(results)
    assert "| acc. final |" in table
    assert (f"Memory: pools {shared['pools.safetensors'] / 1024:.1f} KB + reference "
            f"{shared['reference.safetensors'] / 1024:.1f} KB = {pools / 1024:.1f} KB + tasks") in table


def test_pool_usage_counts_distinct_indices(nws_run):
    """Checked against the rebuilt networks: the entries a task uses are its distinct searched kernels."""
    out, _ = nws_run
    usage = NWS.pool_usage(str(out))
    store = TaskStore(out)
    books, _ = store.pools()
    assert usage["layers"] == list(books)
    used = []  # per task, per layer: the distinct searched kernels of the network rebuilt from storage
    for t in range(2):
        layers = dict(nws_layers(store.model(t)))
        used.append([{tuple(k.tolist()) for k in layers[name].kernels(layers[name].searched_weight())}
                     for name in usage["layers"]])
    sizes = [books[name].shape[0] for name in usage["layers"]]
    assert usage["utilisation"] == [[len(used[t][i]) / sizes[i] for t in range(2)] for i in range(len(sizes))]
    assert usage["task_fraction"] == pytest.approx([sum(len(u) for u in per) / sum(sizes) for per in used])
    union = sum(len(used[0][i] | used[1][i]) for i in range(len(sizes)))
    assert usage["all_tasks_fraction"] == pytest.approx(union / sum(sizes))
    # Off the reference: the rebuilt networks' kernels against the source network's searched kernels.
    source = dict(nws_layers(store.load_source()))
    for i, name in enumerate(usage["layers"]):
        for t in range(2):
            layer = dict(nws_layers(store.model(t)))[name]
            if layer.num_kernels != source[name].num_kernels:
                assert usage["off_reference"][i][t] is None
                continue
            moved = (layer.search() != source[name].search()).double().mean()
            assert usage["off_reference"][i][t] == float(moved)


def test_write_report_files(nws_run, tmp_path):
    out, _ = nws_run
    names = tuple(t["name"] for t in json.loads((out / "results.json").read_text())["tasks"])
    write_run(tmp_path / "individual", fake_results("individual", 0, [1.0, 0.5], [1.0, 0.5], 400, names=names))
    summary = write_report([out, tmp_path / "individual"], tmp_path / "report")
    report = tmp_path / "report"
    for stem in ("accuracy_per_task", "memory_vs_tasks", "accuracy_vs_memory", "nws_pool_usage"):
        for ext in ("png", "svg"):
            assert (report / f"{stem}.{ext}").stat().st_size > 1000, (stem, ext)
    text = (report / "report.md").read_text()
    assert "| nws | 1 |" in text and "| individual | 1 |" in text and "![memory_vs_tasks]" in text
    stored = json.loads((report / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    individual = next(g for g in stored["groups"] if g["method"] == "individual")
    assert individual["memory_at_100_tasks"] == 400 * 100
    assert math.isclose(individual["average_accuracy"]["mean"], 0.75)


def test_compare_runs_every_method_and_reports(tmp_path, monkeypatch):
    b = digits_benchmark(seed=0)
    small = dataclasses.replace(b, tasks=b.tasks[:2])
    monkeypatch.setattr("nws.compare.benchmark_from_config", lambda data, seed: small)
    config = RunConfig(seed=0, model=ModelConfig(kwargs={"widths": [8]}, pool_size=8),
                       pretrain=TrainConfig(epochs=1), task=TrainConfig(epochs=1),
                       trainer=TrainerConfig(logger="none", progress_bar=False, checkpoint=False))
    config.baseline.retrain_epochs = 1
    result = compare(config, tmp_path / "cmp", progress=False)
    assert set(result["runs"]) == {"nws", "finetune", "individual", "packnet", "piggyback"}
    text = (tmp_path / "cmp" / "report" / "report.md").read_text()
    for method in result["runs"]:
        assert f"| {method} | 1 |" in text
    assert (tmp_path / "cmp" / "report" / "nws_pool_usage.png").is_file()
    shas = {json.loads((tmp_path / "cmp" / m / "manifest.json").read_text())["files"]["source.safetensors"]["sha256"]
            for m in ("finetune", "individual", "packnet", "piggyback")}
    assert len(shas) == 1  # one plain backbone, trained once, shared
    with pytest.raises(NWSError, match="already holds a run"):
        compare(config, tmp_path / "cmp", progress=False)


def test_plots_of_seed_groups_lay_out_cleanly(tmp_path):
    """Two seeds, one task, nearly equal memory: the log-scale plots must still lay out (no matplotlib warning)."""
    write_run(tmp_path / "a", fake_results("packnet", 1, [1.0], [1.0], 20000, shared=40000, names=("t",)))
    write_run(tmp_path / "b", fake_results("packnet", 2, [0.5], [1.0], 20100, shared=40000, names=("t",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report([tmp_path], tmp_path / "report")
    assert "75.00 ± 35.36" in (tmp_path / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------------- the accuracy matrix


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    config = RunConfig(seed=0, out=str(out), method="finetune", model=ModelConfig(kwargs={"widths": [8, 16]}),
                       pretrain=TrainConfig(epochs=3), task=TrainConfig(epochs=3, lr=0.05),
                       trainer=TrainerConfig(logger="none", progress_bar=False, checkpoint=False))
    run(config, digits_benchmark(seed=0), progress=False)
    return out


def test_the_accuracy_matrix_of_a_finetune_run_shows_forgetting(finetune_run, tmp_path):
    """Row j: every task rebuilt from storage right after task j was stored. Fine-tuning changes the shared
    network, so earlier tasks' accuracies move (and fall): forgetting, in results.json and the report."""
    results = json.loads((finetune_run / "results.json").read_text())
    matrix, tasks = results["accuracy_matrix"], results["tasks"]
    n = len(tasks)
    assert all(matrix[j][i] is None for j in range(n) for i in range(j + 1, n))
    assert [matrix[j][j] for j in range(n)] == [t["acc_from_storage"] for t in tasks]
    assert matrix[-1] == [t["acc_final"] for t in tasks]
    drops = [max(matrix[j][i] for j in range(i, n)) - matrix[-1][i] for i in range(n - 1)]
    assert max(drops) > 0.1  # a column that falls: what a task had learned, later tasks overwrote
    write_report([finetune_run], tmp_path / "report")
    assert (tmp_path / "report" / "accuracy_matrix_finetune.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["groups"][0]["accuracy_matrix"] == matrix
    assert "| after task | 0 | 1 | 2 | 3 | 4 |" in (finetune_run / "results.md").read_text()


def test_an_nws_runs_earlier_tasks_never_move(nws_run):
    """NWS keeps every task's indices: each column of the matrix is one value, exactly."""
    out, _ = nws_run
    matrix = json.loads((out / "results.json").read_text())["accuracy_matrix"]
    assert all(len({matrix[j][i] for j in range(i, len(matrix))}) == 1 for i in range(len(matrix)))


def test_results_of_version_2_are_refused_then_upgraded(finetune_run, tmp_path, capsys):
    """Results without the matrix (nws-results 2), from a run whose manifest has no matrix rows: the report
    names nws upgrade; after it, the matrix holds what the run recorded (the diagonal, the last row)."""
    import shutil

    from nws.store import RunStore
    from nws.upgrade import upgrade

    old = Path(shutil.copytree(finetune_run, tmp_path / "old"))
    store = RunStore(old)
    for t in store.manifest["tasks"]:
        del t["acc_so_far"]
    store.write_manifest()
    results = json.loads((old / "results.json").read_text())
    del results["accuracy_matrix"]
    results["version"] = 2
    (old / "results.json").write_text(json.dumps(results))
    assert main(["report", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nws upgrade {old}" in err
    assert upgrade(old) == ["results.json, results.md: written in today's format from the recorded accuracies"]
    matrix = json.loads((old / "results.json").read_text())["accuracy_matrix"]
    n = len(matrix)
    assert matrix[-1] == [t["acc_final"] for t in results["tasks"]]
    assert [matrix[j][j] for j in range(n - 1)] == [t["acc_from_storage"] for t in results["tasks"][:-1]]
    assert all(matrix[j][i] is None for j in range(n - 1) for i in range(n) if i != j)
    assert main(["report", str(old)]) == 0
    assert (old / "report" / "report.md").is_file()  # the default: inside the run given
