"""From a run to predictions: ``nws predict`` (image files prepared as the run recorded), ``nws export`` (a
network that runs without nws, in three formats) and ``nws.serve.TaskServer`` (every task from one process, a
bounded cache of plain networks), for every method's runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scale_data import make_image_folders

from nws.cli import main
from nws.compare import compare
from nws.config import ModelConfig, RunConfig, TrainConfig, TrainerConfig
from nws.config_parser import stored_config
from nws.data import benchmark_from_config
from nws.data.digits import digits_benchmark
from nws.methods import open_run
from nws.runner import run
from nws.serve import ServeError, TaskServer, tensor_bytes

SMALL = dict(pretrain=TrainConfig(epochs=1), task=TrainConfig(epochs=1),
             trainer=TrainerConfig(logger="none", progress_bar=False, checkpoint=False))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """An NWS run of the demo's digits (three tasks, a small convnet)."""
    b = digits_benchmark(seed=0)
    out = tmp_path_factory.mktemp("demo") / "run"
    config = RunConfig(seed=0, out=str(out), model=ModelConfig(kwargs={"widths": [8, 16]}, pool_size=16), **SMALL)
    run(config, dataclasses.replace(b, tasks=b.tasks[:3]), progress=False)
    return out


@pytest.fixture(scope="module")
def folders_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    make_image_folders(root / "source", ["a", "b", "c"], {"train": 4, "test": 2}, seed=0)
    make_image_folders(root / "birds", ["sparrow", "robin"], {"train": 4, "test": 3}, seed=1)
    make_image_folders(root / "cars", ["sedan", "van", "truck"], {"train": 4, "test": 3}, seed=2)
    out = root / "run"
    assert main(["run", "--out", str(out), "--data.name", "folders", "--data.tasks",
                 f"[{root / 'birds'}, {root / 'cars'}]", "--data.source", str(root / "source"),
                 "--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "16", "--model.kwargs",
                 "{widths: [8, 16]}", "--trainer.logger", "none", "--trainer.progress_bar", "false"]) == 0
    return out


def predicted(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def softmax(logits: torch.Tensor) -> list[list[float]]:
    return logits.float().softmax(1).tolist()


# ----------------------------------------------------------------------------------- nws predict


def test_predict_on_the_demo_run_equals_the_stored_model(demo_run, tmp_path, capsys):
    """The digits (8x8 arrays, 0-16) written as 8-bit PNG files: nws predict gives the stored model's class and
    probability for each, and the same classes as the stored model on the test set's own tensors."""
    store = open_run(str(demo_run))
    test = digits_benchmark(seed=0).tasks[1].test
    x = torch.stack([test[i][0] for i in range(len(test))])
    pixels = torch.round((x * 0.5 + 0.5) * 255).to(torch.uint8)
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / f"digit_{i}.png"))
        Image.fromarray(image[0].numpy()).save(files[-1])
    out = predicted(capsys, "--run", str(demo_run), "--task", "1", *files)
    with torch.no_grad():
        expected = softmax(store.model(1)((pixels.float() / 255 - 0.5) / 0.5))
        on_tensors = store.model(1)(x).argmax(1).tolist()
    classes = store.task_entry(1)["classes"]
    assert [o["file"] for o in out] == files
    assert [o["class"] for o in out] == [classes[int(np.argmax(p))] for p in expected]
    assert [o["probability"] for o in out] == [max(p) for p in expected]
    assert [o["label"] for o in out] == on_tensors  # 8-bit rounding changes no prediction
    capsys.readouterr()
    assert main(["predict", "--run", str(demo_run), "--task", "digits 2/3", *files[:2]]) == 0  # by name, as text
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{o['file']}\t{o['class']}\t{o['probability']:.4f}" for o in out[:2]]


def test_predict_on_a_folders_run_equals_evaluating_the_stored_model(folders_run, capsys):
    """The test images of each task, by file: the stored model's probabilities on the test set's tensors (its
    own transform), and the accuracy the run recorded from storage."""
    store = open_run(str(folders_run))
    benchmark = benchmark_from_config(stored_config(store.manifest["config"]).data, 0)
    for t in store.tasks():
        test = benchmark.tasks[t["index"]].test
        files = [p.decode() for p in test.paths]
        out = predicted(capsys, "--run", str(folders_run), "--task", t["name"], *files)
        x = torch.stack([test[i][0] for i in range(len(test))])
        with torch.no_grad():
            expected = softmax(store.model(t["index"])(x))
        assert [o["probability"] for o in out] == [max(p) for p in expected]
        assert [o["class"] for o in out] == [t["classes"][int(np.argmax(p))] for p in expected]
        correct = sum(o["label"] == int(label) for o, label in zip(out, test.labels))
        assert correct / len(files) == t["acc_from_storage"]


@pytest.mark.parametrize("args, needle", [
    (["--task", "7"], "has no task 7 (tasks: 0 (digits 0/1); 1 (digits 2/3); 2 (digits 4/5))"),
    (["--task", "shapes"], "has no task 'shapes'"),
    (["--task", "0", "missing.png"], "missing.png: no such file"),
    (["--task", "0", "not_an_image.png"], "cannot read it as an image"),
    (["--task", "0", "--batch_size", "0"], "batch_size"),
])
def test_predict_user_errors_are_one_line(demo_run, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    Path("not_an_image.png").write_text("hello")
    Image.new("L", (8, 8)).save("good.png")
    files = [] if any(a.endswith(".png") for a in args) else ["good.png"]
    assert main(["predict", "--run", str(demo_run), *args, *files]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and needle in captured.err and captured.out == ""
    assert main(["predict", "--run", str(tmp_path / "nothing"), "--task", "0", "good.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_without_a_recorded_preparation_says_so(demo_run, tmp_path, capsys):
    """A run of an earlier nws records no preparation: predict refuses with one line; tensors still serve."""
    import shutil

    from nws.store import RunStore

    old = Path(shutil.copytree(demo_run, tmp_path / "old"))
    store = RunStore(old)
    for t in store.manifest["tasks"]:
        del t["preparation"]
    store.write_manifest()
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    assert main(["predict", "--run", str(old), "--task", "0", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not record how task 0's inputs are prepared" in err
    assert TaskServer(old).predict(0, torch.zeros(2, 1, 8, 8)).labels.shape == (2,)


# ----------------------------------------------------------------------------------- nws export

NO_NWS = """
import json, sys
sys.modules["nws"] = None  # importing nws now fails: the file must run without it
import numpy as np, torch
fmt, path, inputs, out = sys.argv[1:]
x = np.load(inputs)
if fmt == "torchscript":
    files = {"preparation.json": ""}
    model = torch.jit.load(path, _extra_files=files)
    logits = model(torch.from_numpy(x)).detach().numpy()
    meta = json.loads(files["preparation.json"])
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["nws_export"])
np.save(out, logits)
print(json.dumps(meta["preparation"]))
"""


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_reproduces_the_stored_logits(demo_run, tmp_path, capsys, fmt):
    """Every format gives the stored model's logits within 1e-5 on a batch of another size than the traced one;
    TorchScript and ONNX in a process where nws cannot be imported; the preparation travels with the file."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install .[onnx])")
        pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install .[onnx])")
    out = tmp_path / f"digits23.{fmt}"
    assert main(["export", "--run", str(demo_run), "--task", "1", "--format", fmt, "--out", str(out)]) == 0
    described = json.loads((tmp_path / "digits23.json").read_text())
    assert described["task"] == {"index": 1, "name": "digits 2/3", "classes": ["2", "3"]}
    assert described["input"] == {"name": "input", "shape": ["batch", 1, 8, 8]}
    assert described["architecture"] == {"builder": "convnet", "kwargs": {"in_channels": 1, "widths": [8, 16]},
                                         "num_classes": 2}
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        stored = open_run(str(demo_run)).model(1)(x)
    if fmt == "safetensors":  # a state dict: loaded into the architecture its metadata names
        from safetensors import safe_open

        from nws.models import create_model

        with safe_open(str(out), "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        arch = json.loads(meta["architecture"])
        model = create_model(arch["builder"], num_classes=arch["num_classes"], **arch["kwargs"]).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(x)
        preparation = json.loads(meta["preparation"])
    else:
        np.save(tmp_path / "x.npy", x.numpy())
        done = subprocess.run([sys.executable, "-c", NO_NWS, fmt, str(out), str(tmp_path / "x.npy"),
                               str(tmp_path / "logits.npy")], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
        preparation = json.loads(done.stdout)
    assert preparation == described["preparation"]
    assert (logits - stored).abs().max() <= 1e-5


def test_export_user_errors_are_one_line(demo_run, tmp_path, capsys, monkeypatch):
    base = ["export", "--run", str(demo_run), "--format", "torchscript"]
    cases = [([*base, "--task", "9", "--out", str(tmp_path / "a.pt")], "has no task 9"),
             ([*base, "--task", "0", "--out", str(tmp_path / "no" / "a.pt")], "does not exist"),
             ([*base, "--task", "0", "--out", str(tmp_path)], "is a directory"),
             ([*base, "--task", "0", "--out", str(tmp_path / "a.json")], "a .json name"),
             (["export", "--run", str(tmp_path / "none"), "--task", "0", "--format", "onnx", "--out",
               str(tmp_path / "a.onnx")], "does not exist"),
             ([*base[:-2], "--format", "pickle", "--task", "0", "--out", str(tmp_path / "a.pt")],
              "one of safetensors, torchscript, onnx")]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (args, err)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the onnx extra were not installed
    assert main(["export", "--run", str(demo_run), "--task", "0", "--format", "onnx", "--out",
                 str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'neural-weight-search[onnx]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------------- serving many tasks


def test_task_server_keeps_a_bounded_cache_of_plain_networks(demo_run):
    server = TaskServer(demo_run, cache_size=2)
    results = json.loads((demo_run / "results.json").read_text())
    assert server.held == results["memory"]["shared"] + results["memory"]["tasks_total"]  # the run's memory
    x = torch.randn(3, 1, 8, 8)
    reference = open_run(str(demo_run))
    for task in (0, 1, "digits 0/1", 2, 0):
        with torch.no_grad():
            assert torch.equal(server.logits(task, x), reference.model(server.index(task))(x))
    assert (server.hits, server.misses) == (2, 3)  # "digits 0/1" and the last 0 hit; 2 evicts 1
    assert server.cached() == [2, 0]  # least recently used first
    network = server.network(0)
    assert not any(type(m).__name__.startswith("NWS") for m in network.modules())  # materialised
    assert not any(p.requires_grad for p in network.parameters())
    assert server.memory()["networks"] == 2 * tensor_bytes(network)
    server.drop(2)
    assert server.cached() == [0]
    server.cache_size = 0
    assert server.cached() == [] and server.memory()["networks"] == 0
    server.predict(1, x)
    assert server.cached() == []  # nothing kept at size 0
    server.cache_size = 3
    for task in range(3):
        server.predict(task, x)
    server.drop()
    assert server.cached() == []
    prediction = server.predict(1, x)
    assert prediction.names == [["2", "3"][i] for i in prediction.labels.tolist()]
    assert torch.equal(prediction.confidence, prediction.probabilities.max(1).values)
    with pytest.raises(ServeError, match="has no task 5"):
        server.predict(5, x)


@pytest.fixture(scope="module")
def every_method(tmp_path_factory) -> Path:
    b = digits_benchmark(seed=0)
    config = RunConfig(seed=0, model=ModelConfig(kwargs={"widths": [8]}, pool_size=8), **SMALL)
    config.baseline.retrain_epochs = 1
    import unittest.mock

    out = tmp_path_factory.mktemp("methods") / "cmp"
    with unittest.mock.patch("nws.compare.benchmark_from_config",
                             lambda data, seed: dataclasses.replace(b, tasks=b.tasks[:2])):
        compare(config, out, progress=False)
    return out


@pytest.mark.parametrize("method", ["nws", "piggyback", "packnet", "finetune", "individual"])
def test_every_method_serves_its_stored_networks(every_method, method):
    """The server (and the reader's plain_model) gives exactly the logits of the network the method's reader
    rebuilds; a run's files are held once, as the results count them."""
    server = TaskServer(every_method / method, cache_size=1)
    reader = open_run(str(every_method / method))
    x = torch.stack([digits_benchmark(seed=0).tasks[0].test[i][0] for i in range(6)])
    for task in (0, 1):
        with torch.no_grad():
            assert torch.equal(server.logits(task, x), reader.model(task)(x))
            assert torch.equal(reader.plain_model(task)(x), reader.model(task)(x))
    results = json.loads((every_method / method / "results.json").read_text())
    assert server.held == results["memory"]["shared"] + results["memory"]["tasks_total"]
    assert server.preparation(0).input_shape == [1, 8, 8]


def test_the_readers_cache_is_bounded_and_can_be_dropped(demo_run):
    store = open_run(str(demo_run))
    store.cache_size = 2
    first = store.model(0)
    assert store.model(0) is first
    store.plain_model(1)
    store.plain_model(2)
    assert list(store.cached()) == [("plain", 1), ("plain", 2)]
    assert store.model(0) is not first  # dropped as the least recently used
    store.drop()
    assert store.cached() == {}
