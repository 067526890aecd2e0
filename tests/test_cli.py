"""User errors end with one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from nws.cli import main, parse_run_config
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
