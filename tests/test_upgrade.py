"""``nws upgrade``: runs of every earlier format (task format 1, models with biases, old codes, manifests and
results) are refused by the readers with one line naming the command, and after it evaluate exactly as they
recorded; the upgrade is atomic (a kill at any point leaves the run as it was, or one rerun finishes it) and
verified; the readers of the earlier formats it holds refuse damage with StoreError."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from store_fixtures import edit_header, edit_meta, reseal

from nws.bitcodes import CodesError, varint
from nws.cli import main
from nws.config import DataConfig
from nws.container import read_file
from nws.data import benchmark_from_config
from nws.errors import StoreError
from nws.methods import open_run
from nws.methods.nws import TaskStore
from nws.packing import MAGIC
from nws.results import collect_results
from nws.store import CRASH_ENV, MANIFEST, SOURCE, manifest_bytes, task_file
from nws.upgrade import STAGING, EarlierNWSRun, legacy_codes, upgrade

FIXTURES = Path(__file__).parent / "fixtures"
FORMAT1 = FIXTURES / "run_format1"  # written by nws d56138d: task format 1, codes coded alone
BIASES = FIXTURES / "run_biases"  # written by nws ea046b4: the convnet's classifier had a bias, codes of format 2


def files_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def copy(fixture: Path, to: Path) -> Path:
    return Path(shutil.copytree(fixture, to))


def upgrade_cli(run: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "nws.cli", "upgrade", str(run)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory) -> dict[Path, Path]:
    """Each fixture, upgraded once (in a copy)."""
    out = {}
    for fixture in (FORMAT1, BIASES):
        run = copy(fixture, tmp_path_factory.mktemp("upgraded") / fixture.name)
        assert upgrade(run)
        out[fixture] = run
    return out


# ----------------------------------------------------------------------------------- refused, then upgraded


@pytest.mark.parametrize("fixture", [FORMAT1, BIASES], ids=["format1", "biases"])
def test_an_earlier_run_is_refused_with_one_line_naming_the_upgrade(fixture, tmp_path, capsys):
    run = copy(fixture, tmp_path / "run")
    before = files_of(run)
    with pytest.raises(StoreError, match=f"nws upgrade {run}"):
        TaskStore(run)
    for argv in (["eval", "--run", str(run)], ["report", str(run)],
                 ["demo", "--out", str(run), "--resume", "--task.epochs", "1", "--pretrain.epochs", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"nws upgrade {run}" in err, (argv, err)
    assert files_of(run) == before


@pytest.mark.parametrize("fixture", [FORMAT1, BIASES], ids=["format1", "biases"])
def test_an_upgraded_run_evaluates_exactly_as_recorded(fixture, upgraded):
    """Every task rebuilt from the upgraded files scores exactly the accuracy the run recorded; the new
    results.json is today's, with the upgraded files' memory; the codes are the earlier files' codes."""
    run = upgraded[fixture]
    recorded = json.loads((fixture / "results.json").read_text())
    store = open_run(str(run))
    store.check()
    benchmark = benchmark_from_config(DataConfig(**recorded["config"]["data"]), recorded["config"]["seed"])
    results = collect_results(store, benchmark)
    assert [t["acc_final"] for t in results["tasks"]] == [t["acc_final"] for t in recorded["tasks"]]
    assert results == json.loads((run / "results.json").read_text())
    assert results["memory"]["shared_files"] == {"pools.safetensors": store.size(["pools.safetensors"]),
                                                 "reference.safetensors": store.size(["reference.safetensors"])}
    assert results["memory"]["tasks_total"] < recorded["memory"]["tasks_total"]  # coded against the reference
    earlier = EarlierNWSRun(fixture, {name: (fixture / name).read_bytes() for name in
                                      json.loads((fixture / MANIFEST).read_text())["files"]})
    for t in store.tasks():
        earlier.task(t["file"])
        assert all(torch.equal(store.codes(t["index"])[k], v) for k, v in earlier.codes[t["index"]].items())
    assert not (run / STAGING).exists()


def test_the_biases_the_models_had_are_kept(upgraded):
    run = upgraded[BIASES]
    store = TaskStore(run)
    assert store.spec().biases == ("fc",)
    old = read_file((BIASES / task_file(1)).read_bytes(), "nws-task", "t")[0]["other.fc.bias"]
    assert torch.equal(store.model(1).fc.bias, old)
    source = read_file((BIASES / SOURCE).read_bytes(), "nws-source", "s")[0]
    assert torch.equal(store.load_source().fc.bias, source["fc.bias"])


def test_an_upgraded_run_is_not_upgraded_again(upgraded, capsys):
    run = upgraded[FORMAT1]
    before = files_of(run)
    assert upgrade(run) == []
    assert main(["upgrade", str(run)]) == 0
    assert "already of today's format" in capsys.readouterr().out
    assert files_of(run) == before


# ----------------------------------------------------------------------------------- atomic


@pytest.mark.parametrize("crash_at, finished", [(f"{task_file(1)}:written", False),  # while writing aside
                                                ("results.json:written", False),
                                                (f"{task_file(0)}:moved", True)])  # while moving in
def test_a_killed_upgrade_loses_nothing_and_one_rerun_finishes_it(tmp_path, upgraded, crash_at, finished):
    run = copy(FORMAT1, tmp_path / "run")
    before = files_of(run)
    proc = upgrade_cli(run, crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if not finished:
        assert files_of(run) == before  # nothing replaced before the upgraded run was verified
    with pytest.raises(StoreError, match="nws upgrade"):  # until the rerun, the earlier manifest: refused
        TaskStore(run)
    proc = upgrade_cli(run)
    assert proc.returncode == 0, proc.stderr
    assert ("finished the interrupted upgrade" in proc.stdout) == finished
    assert files_of(run) == files_of(upgraded[FORMAT1])
    assert not (run / STAGING).exists()


def test_a_damaged_earlier_run_is_refused_with_nothing_changed(tmp_path, capsys):
    run = copy(FORMAT1, tmp_path / "run")
    data = bytearray((run / task_file(1)).read_bytes())
    data[100] ^= 1
    (run / task_file(1)).write_bytes(bytes(data))
    before = files_of(run)
    assert main(["upgrade", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task_001.safetensors is corrupt" in err and "nothing was changed" in err
    assert files_of(run) == before and not (run / STAGING).exists()
    assert main(["upgrade", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_format_1_task_for_another_architecture_is_refused(tmp_path):
    run = copy(FORMAT1, tmp_path / "run")
    name = task_file(1)
    data = (run / name).read_bytes()
    for edited, needle in ((edit_meta(data, "spec", lambda s: {**s, "kwargs": {**s["kwargs"], "widths": [8, 32]}}),
                            "another architecture"),
                           (edit_meta(data, "layers", lambda ls: {**ls, "fc": {**ls["fc"], "shape": [3, 16]}}),
                            "layer shapes do not match")):
        (run / name).write_bytes(edited)
        reseal(run, name)
        before = files_of(run)
        with pytest.raises(StoreError, match=needle):
            upgrade(run)
        assert files_of(run) == before and not (run / STAGING).exists()


def test_a_stored_bias_of_no_bias_free_layer_is_refused(tmp_path):
    """Only the bias of a bias-free Conv2d or Linear is taken for one the model had; any other extra entry is
    refused."""
    run = copy(BIASES, tmp_path / "run")
    for name, key, renamed in ((task_file(1), "other.fc.bias", "other.features.2.bias"),
                               (SOURCE, "fc.bias", "features.2.bias")):  # features.2: a ReLU
        (run / name).write_bytes(edit_header((run / name).read_bytes(),
                                             lambda header, k=key, r=renamed: header.update({r: header.pop(k)})))
        reseal(run, name)
    with pytest.raises(StoreError, match="unexpected"):
        upgrade(run)


def test_earlier_baseline_results_and_manifest_upgrade_to_what_they_were(tmp_path):
    """A run of today's written as an earlier nws wrote it (manifest version 1 without ``memory_after``,
    results without a format, their memory as ``pools``, no config, no ``memory_after_task``): refused, and
    ``nws upgrade`` gives back today's manifest and results exactly."""
    from nws.config import ModelConfig, RunConfig, TrainConfig, TrainerConfig
    from nws.data.digits import digits_benchmark
    from nws.runner import run as run_config

    b = digits_benchmark(seed=0)
    out = tmp_path / "run"
    config = RunConfig(seed=0, out=str(out), method="individual", model=ModelConfig(kwargs={"widths": [8]}),
                       pretrain=TrainConfig(epochs=1), task=TrainConfig(epochs=1),
                       trainer=TrainerConfig(logger="none", progress_bar=False, checkpoint=False))
    run_config(config, dataclasses.replace(b, tasks=b.tasks[:2]), progress=False)
    today = files_of(out)
    manifest = json.loads(today[MANIFEST])
    manifest["version"] = 1
    for t in manifest["tasks"]:
        del t["memory_after"]
    (out / MANIFEST).write_bytes(manifest_bytes(manifest))
    results = json.loads(today["results.json"])
    for key in ("format", "version", "config", "memory_after_task"):
        del results[key]
    results["memory"] = {"pools": results["memory"]["shared"], "tasks_total": results["memory"]["tasks_total"],
                         "float32_model": results["memory"]["float32_model"]}
    (out / "results.json").write_text(json.dumps(results))
    (out / "results.md").unlink()
    with pytest.raises(StoreError, match="nws upgrade"):
        open_run(str(out))
    assert upgrade(out)
    again = files_of(out)
    assert json.loads(again.pop(MANIFEST)) == json.loads(today.pop(MANIFEST))  # the same content (key order aside)
    assert again == today


# ----------------------------------------------------------------------------------- codes of format 2

# Written by the format 2 coder (nws before conditional coding): conv1 entropy-coded, an empty layer and a
# small layer stored as fixed width.
V2_STREAM = bytes.fromhex(
    "4e575343020305636f6e76314096010205656d707479040000026663030a001b1571e117f01eeb84815f9ff83f0b35fd2002"
    "09097080208054064825c83dd40210912685b32f278a9a420cbf6ad1672d58bd4626090cde298a59a26be87dca257a8765"
    "8027462d94e52a9c76096905660b14e260c8af97db8ab87813afde3515c85acc1ac187f509b023e16a2bbb2d00")
V2_CODES = {
    "conv1": [52, 43, 36, 28, 52, 26, 53, 4, 28, 36, 55, 19, 48, 38, 43, 38, 57, 21, 23, 12, 4, 16, 52, 52, 11, 38,
              35, 38, 38, 20, 55, 35, 38, 38, 12, 4, 26, 43, 50, 43, 11, 52, 48, 52, 36, 52, 2, 1, 1, 19, 19, 12, 36,
              1, 38, 12, 38, 1, 20, 53, 36, 50, 38, 38, 12, 36, 1, 48, 55, 52, 4, 22, 20, 11, 38, 47, 20, 52, 47, 12,
              43, 52, 12, 36, 38, 38, 8, 38, 38, 50, 48, 21, 43, 52, 52, 12, 1, 38, 19, 36, 53, 22, 19, 34, 38, 8, 22,
              12, 38, 51, 22, 22, 36, 19, 19, 21, 34, 4, 43, 36, 20, 4, 43, 12, 12, 12, 4, 52, 19, 20, 51, 38, 12, 28,
              52, 22, 43, 8, 43, 44, 50, 38, 22, 4, 36, 43, 12, 19, 36, 43],
    "empty": [],
    "fc": [1, 2, 1, 0, 2, 0, 0, 2, 1, 1],
}
V2_LAYOUT = {"conv1": (64, 150), "empty": (4, 0), "fc": (3, 10)}


def test_a_format_2_stream_decodes_for_the_upgrade() -> None:
    out = legacy_codes(V2_STREAM, V2_LAYOUT)
    assert list(out) == list(V2_CODES)
    for name, values in V2_CODES.items():
        assert torch.equal(out[name], torch.tensor(values, dtype=torch.long))
    # ... and its layout is checked before decoding, as before.
    for wrong in ({**V2_LAYOUT, "fc": (3, 11)}, {"conv1": (64, 150), "fc": (3, 10)}):
        with pytest.raises(CodesError, match="other layers"):
            legacy_codes(V2_STREAM, wrong)
    for end in range(len(V2_STREAM)):
        with pytest.raises(CodesError):
            legacy_codes(V2_STREAM[:end], V2_LAYOUT)


def _v2_crafted(*layers: tuple[bytes, int, int, int], table: bytes = b"") -> bytes:
    head = [varint(len(layers))]
    for name, k, n, mode in layers:
        head += [varint(len(name)), name, varint(k), varint(n), bytes([mode])]
    return MAGIC + b"\x02" + b"".join(head) + varint(len(table)) + varint(0) + table


def test_format_2_stream_claiming_huge_layers_is_refused_before_decoding() -> None:
    huge = _v2_crafted((b"a", 2, (1 << 31) - 1, 32))
    with pytest.raises(CodesError, match="other layers"):
        legacy_codes(huge, {"a": (2, 100)})
