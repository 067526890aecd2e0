"""Your own task sequence: ``data.name: folders``, each task a folder of ``train/<class>/<image>`` and
``test/<class>/<image>`` (PNG and JPEG files the test writes), end to end through the CLI."""

from __future__ import annotations

import json
import re

import pytest
from scale_data import make_image_folders

from nws.cli import main

SMALL = ["--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "16", "--model.kwargs",
         "{widths: [8, 16]}", "--data.image_size", "8", "--trainer.logger", "none", "--trainer.progress_bar", "false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folders(root / "source", ["a", "b", "c", "d"], {"train": 4, "test": 2}, seed=0)
    make_image_folders(root / "birds", ["sparrow", "robin"], {"train": 4, "test": 2}, seed=1)
    make_image_folders(root / "cars", ["sedan", "van", "truck"], {"train": 4, "test": 2}, seed=2)
    return root


def test_own_task_folders_run_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "run"
    tasks = f"[{folders / 'birds'}, {folders / 'cars'}]"
    assert main(["run", "--config", "configs/digits_convnet.yaml", "--out", str(out), "--data.name", "folders",
                 "--data.tasks", tasks, "--data.source", str(folders / "source"), *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == ["birds", "cars"]
    assert [t["classes"] for t in results["tasks"]] == [["robin", "sparrow"], ["sedan", "truck", "van"]]
    assert results["source"]["name"] == "source"
    assert all(t["acc_from_storage"] == t["acc_after_training"] for t in results["tasks"])
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    accs = [float(a) / 100 for a in re.findall(r"accuracy ([\d.]+)%", capsys.readouterr().out)]
    assert accs == pytest.approx([t["acc_after_training"] for t in results["tasks"]], abs=5e-5)  # printed: 2 decimals
    assert main(["data", "check", "--benchmark", "folders", "--root", str(folders / "birds"),
                 str(folders / "cars")]) == 0
    assert "| cars | 3 | 12 | 6 |" in capsys.readouterr().out


@pytest.mark.parametrize("damage, needle", [
    ("missing", "does not exist"),
    ("no test split", "test does not exist"),
    ("empty class", "holds no images"),
    ("other classes", "different classes"),
])
def test_a_missing_or_malformed_task_folder_is_one_line(folders, tmp_path, capsys, damage, needle):
    bad = tmp_path / "bad"
    if damage != "missing":
        make_image_folders(bad, ["x", "y"], {"train": 2, "test": 1})
    if damage == "no test split":
        for f in (bad / "test").rglob("*"):
            if f.is_file():
                f.unlink()
        for d in sorted((bad / "test").rglob("*"), reverse=True):
            d.rmdir()
        (bad / "test").rmdir()
    elif damage == "empty class":
        for f in (bad / "train" / "y").iterdir():
            f.unlink()
    elif damage == "other classes":
        (bad / "test" / "y").rename(bad / "test" / "z")
    out = tmp_path / "run"
    assert main(["run", "--config", "configs/digits_convnet.yaml", "--out", str(out), "--data.name", "folders",
                 "--data.tasks", f"[{folders / 'birds'}, {bad}]", "--data.source", str(folders / "source"),
                 *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not out.exists()


def test_one_folder_relative_paths_and_eval_from_elsewhere(folders, tmp_path, monkeypatch, capsys):
    """``--data.tasks birds`` (one folder, relative): stored absolute, so ``nws eval`` works from any directory;
    without --data.image_size the images' shorter side (all 20x14: 14) is the input side, with light augmentation."""
    from nws.config_parser import parse_run_config
    from nws.data import load_benchmark

    monkeypatch.chdir(folders)
    small = [a for a in SMALL if a not in ("--data.image_size", "8")]
    config = parse_run_config(["--data.name", "folders", "--data.tasks", "birds", "--data.source", "source"])
    assert config.data.tasks == [str(folders / "birds")] and config.data.source == str(folders / "source")
    bench = load_benchmark("folders", tasks="birds", source="source")
    assert bench.tasks[0].train[0][0].shape == (3, 14, 14)
    assert "RandomCrop" in repr(bench.tasks[0].train.transform)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--data.name", "folders", "--data.tasks", "birds", "--data.source",
                 "source", *small]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    assert "task 0 (birds): accuracy" in capsys.readouterr().out
