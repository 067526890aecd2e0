"""User errors end with one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from nws.cli import main
from nws.config import RunConfig
from nws.config_parser import parse_run_config

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


# ------------------------------------------------------------------------------------------------ help


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def every_command() -> list[list[str]]:
    from nws.cli import COMMANDS, NESTED, build_parser

    parser = build_parser()
    commands = [[name] for name in COMMANDS if name not in NESTED]
    for name in NESTED:
        sub = parser._subcommands_action._name_parser_map[name]
        commands += [[name, action] for action in sub._subcommands_action._name_parser_map]
    return commands


def test_every_help_shows_an_example_and_what_each_option_allows(capsys):
    for argv in every_command():
        text = help_text(capsys, argv)
        assert "example: nws " in text, argv
        if argv != ["configs"]:
            assert "type: " in text, argv


def test_run_help_names_every_setting_with_its_meaning_and_allowed_values(capsys):
    from nws.config import setting_types
    from nws.config_types import allowed

    text = help_text(capsys, ["run"])
    for key, typehint in setting_types().items():
        assert f"--{key} " in text and allowed(typehint) in text, key
    assert "<class '" not in text and "model: the network and its pools:" in text
    assert "one of sgd, adam" in text and "one of nws, " in text


def test_demo_help_mentions_compare_and_compare_lists_only_its_options(capsys):
    assert "--compare" in help_text(capsys, ["demo"])
    text = help_text(capsys, ["demo", "--compare"])
    assert "[--resume]" not in text and "[--method METHOD]" not in text and "--task.epochs" in text


def test_abbreviated_options_are_refused(capsys):
    assert main(["run", "--task.epoch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task.epoch 2" in err


def test_version(capsys):
    from nws import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"nws {__version__}"


def test_configs_lists_the_packaged_configs_by_name(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("digits_convnet ") and "embedded demo" in line for line in lines)
    assert len([line for line in lines if line.split(" ")[0].endswith(("_resnet18", "_convnet", "_bn", "_v2"))]) == 12


@pytest.mark.parametrize("name", ["digits_convnet", "digits_convnet.yaml"])
def test_a_config_is_found_by_its_name(name):
    assert parse_run_config(["--config", name]) == parse_run_config(["--config", str(CONFIGS / "digits_convnet.yaml")])


def test_run_without_config_starts_from_the_defaults():
    assert parse_run_config([]) == RunConfig(data=dataclasses.replace(RunConfig().data))


def test_a_stored_config_is_read_by_the_same_parser():
    from nws.config import ConfigError
    from nws.config_parser import stored_config

    stored = dataclasses.asdict(RunConfig())
    del stored["data"]["augment"]  # a run made before the setting existed: the default
    assert stored_config(stored) == RunConfig()
    stored["model"]["dropped"] = 1
    with pytest.raises(ConfigError, match="model.dropped.*nws upgrade"):
        stored_config(stored)
    with pytest.raises(ConfigError, match="task.epochs: -1 is not allowed"):
        stored_config({"task": {"epochs": -1}})
