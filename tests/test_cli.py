"""User errors end with one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from nws.cli import main
from nws.config import parse_run_config
from nws.config import RunConfig

CONFIGS = Path(__file__).parent.parent / "configs"


def test_demo_config_file_is_the_default():
    parsed = parse_run_config(["--config", str(CONFIGS / "digits_convnet.yaml")])
    assert dataclasses.replace(parsed, out=RunConfig().out) == RunConfig()


def test_overrides_apply():
    cfg = parse_run_config(["--config", str(CONFIGS / "digits_convnet.yaml"), "--task.epochs", "3",
                            "--model.exclude", "[fc]"])
    assert cfg.task.epochs == 3 and cfg.model.exclude == ["fc"]


@pytest.mark.parametrize("yaml, args, needle", [
    (None, ["--config", "/does/not/exist.yaml"], "does not exist"),
    ("task:\n  epohcs: 3\n", [], "epohcs"),
    ("task:\n  epochs: many\n", [], "task.epochs"),
    ("model:\n  pool_size: [1, 2]\n", [], "model.pool_size"),
    ("bogus: 1\n", [], "bogus"),
    ("task: [\n", [], "pars"),
    (None, ["--task.lr", "fast"], "task.lr"),
])
def test_config_errors_are_one_line(tmp_path, capsys, yaml, args, needle):
    argv = ["run"]
    if yaml is not None:
        (tmp_path / "c.yaml").write_text(yaml)
        argv += ["--config", str(tmp_path / "c.yaml")]
    elif "--config" not in args:
        argv += ["--config", str(CONFIGS / "digits_convnet.yaml")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nws: error:") and needle in err


def test_missing_run_directory(capsys, tmp_path):
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_no_traceback_from_the_console_script(tmp_path):
    (tmp_path / "c.yaml").write_text("task:\n  epochs: x\n")
    proc = subprocess.run([sys.executable, "-m", "nws.cli", "run", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args, needle", [
    (["--model.name", "foo"], "model.name"),
    (["--model.pool_size", "0"], "model.pool_size"),
    (["--model.group_size", "0"], "model.group_size"),
    (["--task.lr", "-1"], "task.lr"),
    (["--task.epochs", "-1"], "task.epochs"),
    (["--model.init", "foo"], "model.init"),
    (["--model.code_reference", "last"], "model.code_reference"),
    (["--model.key_every", "0"], "model.key_every"),
    (["--model.bn_dtype", "float8"], "model.bn_dtype"),
    (["--model.kwargs", "{nonsense: 1}"], "model.kwargs"),
    (["--method", "foo"], "method"),
    (["--data.name", "foo"], "data.name"),
    (["--data.name", "folders", "--data.tasks", "[/no/such/task]"], "data.tasks"),
    (["--pretrained", "/no/such/run"], "/no/such/run"),
    (["--method", "packnet", "--trainer.devices", "2"], "trainer.devices"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, args, needle):
    """One line naming the key, exit 2, no traceback, and no output directory."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("content, needle", [
    ("just some text, not settings\n" * 50, "not a YAML mapping"),
    ("- a\n- list\n", "not a YAML mapping"),
    ("key: [unclosed\n", "cannot parse it as YAML"),
    (b"\xff\xfe\x00binary", "cannot be read as text"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_one_short_line(tmp_path, capsys, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and len(err) < 200 and "just some text" not in err
    assert not (tmp_path / "out").exists()
