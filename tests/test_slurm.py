"""The cluster path against a real SLURM (CI starts a one-node cluster with ``bash .ci/local_slurm.sh``):
``nws launch --slurm`` runs the seeds as one array job and reports them; a two-rank CPU DDP run under
``srun`` holds identical states on both ranks and stores what one process stores; a job cancelled with
``scancel`` mid-task resumes with ``--resume`` to the files of an uninterrupted run.

Skipped where no SLURM answers (``NWS_REQUIRE_SLURM=1``, set by ``.ci/run``, makes that a failure). Each job
asks for one CPU per task, so they fit a two-core node.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nws.launch import SLURM_ACTIVE

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "digits_convnet.yaml")
FIT_STATES = str(Path(__file__).resolve().parent / "fit_states.py")
TINY = ["--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "16", "--trainer.logger", "none",
        "--trainer.progress_bar", "false", "--model.kwargs", '{"widths": [8, 16]}']
TIMEOUT = 600


@functools.cache
def slurm_missing() -> str | None:
    """Why SLURM jobs cannot run here, or None."""
    missing = [c for c in ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} not on PATH); as root, `bash .ci/local_slurm.sh` starts one"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as err:
        return f"SLURM does not answer ({' '.join(err.cmd)} timed out)"
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        return f"SLURM's controller does not answer (scontrol ping: {said[0] if said else ping.returncode})"
    if not re.search(r"^(idle|mix|alloc)", nodes.stdout, re.M):
        return f"no SLURM node takes jobs (sinfo states: {' '.join(nodes.stdout.split()) or 'none'})"
    return None


@pytest.fixture(autouse=True)
def slurm():
    reason = slurm_missing()
    if reason and os.environ.get("NWS_REQUIRE_SLURM"):
        pytest.fail(f"NWS_REQUIRE_SLURM is set but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


def env() -> dict[str, str]:
    """This environment without an enclosing job's SLURM variables; one thread, unbuffered output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def slurm_spec() -> str:
    """``--slurm`` for one task per seed on the default partition, asking for one CPU and no GPU (none named:
    the runs train on the CPU, as on a cluster without GPUs)."""
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    default = [p[:-1] for p in partitions if p.endswith("*")]
    return ",".join([*(f"partition={p}" for p in default[:1]), "cpus=1", "hours=0.5"])


def nws(*args: str, srun: list[str] | None = None, wait: bool = True, **kwargs):
    """``python -m nws.cli ARGS`` (under ``srun SRUN`` if given); finished, or started when not ``wait``."""
    cmd = [*(["srun", *srun] if srun is not None else []), sys.executable, *args]
    if not wait:
        return subprocess.Popen(cmd, env=env(), text=True, **kwargs)
    return subprocess.run(cmd, env=env(), text=True, capture_output=True, timeout=TIMEOUT, **kwargs)


def states(job_id: str) -> list[str]:
    """``ID STATE`` of each task of the job once none is active or COMPLETING any more (a launcher returns as
    soon as a job's result exists, while SLURM may still be cleaning up): squeue polled until then, failing
    with the last states seen after ``TIMEOUT``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", job_id], capture_output=True,
                              text=True, timeout=60)
        seen = sorted(proc.stdout.splitlines())
        if proc.returncode == 0 and seen and not any(line.split()[1] in SLURM_ACTIVE for line in seen):
            return seen
        assert time.monotonic() < deadline, f"job {job_id} still active after {TIMEOUT} s: {seen or proc.stderr}"
        time.sleep(0.2)


def read_line(stream, timeout: float = TIMEOUT) -> str:
    """The next line of a child's ``stream``, failing after ``timeout`` seconds instead of blocking forever."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no line from the child within {timeout} s", pytrace=False)


def listed(run: Path) -> list[int]:
    return [t["index"] for t in json.loads((run / "manifest.json").read_text())["tasks"]]


def test_launch_runs_the_seeds_as_one_array_job_and_reports_them(tmp_path):
    out = tmp_path / "runs"
    proc = nws("-m", "nws.cli", "launch", "--config", CONFIG, "--seeds", "1", "2", "--out", str(out), "--slurm", slurm_spec(),
               *TINY, "--data.num_tasks", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"^seed (\d+): SLURM job (\d+)_(\d+) -> ", proc.stdout, re.M)
    assert [(seed, task) for seed, _, task in jobs] == [("1", "0"), ("2", "1")]
    array = {job for _, job, _ in jobs}
    assert len(array) == 1  # one array job
    assert states(array.pop()) == [f"{jobs[0][1]}_0 COMPLETED", f"{jobs[0][1]}_1 COMPLETED"]
    for seed in (1, 2):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        assert results["seed"] == seed and [t["name"] for t in results["tasks"]] == ["digits 0/1"]
    assert "±" in proc.stdout and (out / "report" / "report.md").is_file()
    # The quiet path: without job accounting, one line says so, instead of a warning per sacct call.
    printed = proc.stdout + proc.stderr
    assert "sacct" not in printed.replace("(sacct: ", "")
    assert sum("accounting" in line for line in printed.splitlines()) <= 1


def test_a_failed_seed_names_its_log_and_resume_finishes_only_the_seeds_that_did_not(tmp_path):
    """Seed 2's run cannot write its directory (a file is in the way): the launch fails with one line naming
    the file that holds the traceback and the run's last line; seed 1 finishes. With the obstacle gone,
    ``--resume`` runs seed 2 alone and reports both."""
    out = tmp_path / "runs"
    (out / "seed_2").parent.mkdir()
    (out / "seed_2").write_text("in the way")
    launch = ["-m", "nws.cli", "launch", "--config", CONFIG, "--seeds", "1", "2", "--out", str(out), "--slurm", slurm_spec(),
              *TINY, "--data.num_tasks", "1"]
    failed = nws(*launch)
    assert failed.returncode == 2 and len(failed.stderr.splitlines()) == 1, failed.stdout + failed.stderr
    log = re.search(r"traceback in (\S+\.err)", failed.stderr)
    assert log and Path(log.group(1)).is_file() and re.match(r"nws: error: seed 2 \(job \S+\) failed: ", failed.stderr)
    last_line = failed.stderr.split(" failed: ", 1)[1].split("; traceback in ")[0]
    assert last_line in Path(log.group(1)).read_text() and "seed_2" in last_line
    assert (out / "seed_1" / "results.json").is_file()
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "seed_1").iterdir() if p.is_file()}

    (out / "seed_2").unlink()
    resumed = nws(*launch, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"^seed 1: finished -> ", resumed.stdout, re.M)
    assert re.findall(r"^seed (\d+): SLURM job ", resumed.stdout, re.M) == ["2"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "seed_1").iterdir() if p.is_file()} \
        == first  # seed 1 was not run again
    assert (out / "seed_2" / "results.json").is_file() and "±" in resumed.stdout


def test_ddp_under_srun_holds_identical_ranks_and_stores_what_one_process_stores(tmp_path):
    """Two CPU ranks (gloo) started by ``srun``, Lightning's SLURM environment, rank 0 writing: after every
    fit both ranks hold the same state, bit for bit; the pools, source network and task files equal those
    of one process on the same global batch, up to float rounding, and the task codes exactly.

    The model is the demo's convnet without BatchNorm (registered by ``tests/fit_states.py``): with
    BatchNorm, each rank normalises its own half of the global batch and keeps its own running statistics
    (SyncBatchNorm needs GPUs), so pools and weights, still identical on the ranks, drift from one process's,
    and the ranks' running statistics differ (rank 0's are stored)."""
    run = ["run", "--config", CONFIG, *TINY, "--data.num_tasks", "2", "--model.name", "convnet_without_bn"]
    ddp = nws(FIT_STATES, str(tmp_path / "ddp_states"), *run, "--out", str(tmp_path / "ddp"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
              srun=["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--job-name=nws-ddp"], wait=False,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    one = nws(FIT_STATES, str(tmp_path / "one_states"), *run, "--out", str(tmp_path / "one"),
              "--trainer.accelerator", "cpu")
    stdout, stderr = ddp.communicate(timeout=TIMEOUT)
    assert ddp.returncode == 0, stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert stdout.count("[task_001] learning") == 1  # only rank 0 reports

    for fit in range(3):  # pretraining, task 0, task 1
        rank0, rank1, single = (torch.load(tmp_path / d / f"rank{r}_fit{fit}.pt", weights_only=True)
                                for d, r in (("ddp_states", 0), ("ddp_states", 1), ("one_states", 0)))
        assert rank0.keys() == rank1.keys() == single.keys()
        assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
        for key, value in rank0.items():
            if key.endswith("cluster_size") or not value.is_floating_point():
                assert torch.equal(value, single[key]), (fit, key)
            else:
                torch.testing.assert_close(value, single[key], rtol=0, atol=1e-6, msg=f"fit {fit}: {key}")

    ddp_run, one_run = tmp_path / "ddp", tmp_path / "one"
    files = json.loads((ddp_run / "manifest.json").read_text())["files"]
    assert files.keys() == json.loads((one_run / "manifest.json").read_text())["files"].keys()
    for name in files:
        ours, theirs = load_file(ddp_run / name), load_file(one_run / name)
        assert ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
            else:
                assert torch.equal(value, theirs[key]), (name, key)  # the codes
    accuracies = [[(t["acc_after_training"], t["acc_from_storage"]) for t in json.loads(
        (r / "results.json").read_text())["tasks"]] for r in (ddp_run, one_run)]
    assert accuracies[0] == accuracies[1]


def test_job_cancelled_mid_task_resumes_to_the_uninterrupted_files(tmp_path):
    """``scancel`` while task 1 trains (after its first epoch checkpoint): the launcher ends with one line,
    the run keeps task 0 and task 1's checkpoint, and ``nws run --resume`` under ``srun`` finishes it to the
    same files as an uninterrupted run of the same seed."""
    run = [*TINY, "--task.epochs", "20", "--data.num_tasks", "2"]
    reference = nws("-m", "nws.cli", "run", "--config", CONFIG, *run, "--seed", "7", "--out", str(tmp_path / "ref"),
                    srun=["--ntasks=1", "--cpus-per-task=1", "--job-name=nws-reference"], wait=False,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "runs"
    seed_dir = out / "seed_7"
    launch = nws("-m", "nws.cli", "launch", "--config", CONFIG, "--seeds", "7", "--out", str(out), "--slurm", slurm_spec(), *run,
                 wait=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = read_line(launch.stdout)
    job = re.match(r"seed 7: SLURM job (\S+) -> ", line)
    assert job, line + launch.stderr.read()[-3000:] if launch.poll() is not None else line
    job = job.group(1)
    checkpoint = seed_dir / "checkpoints" / "task_001" / "last.ckpt"
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists():
        assert launch.poll() is None and time.monotonic() < deadline, launch.stderr.read()[-3000:]
        time.sleep(0.05)
    subprocess.run(["scancel", job], check=True)

    stdout, stderr = launch.communicate(timeout=TIMEOUT)
    assert launch.returncode == 2 and stderr.count("\n") == 1 and re.search(r"seed[ _]7", stderr), stdout + stderr
    assert [s.split()[1] for s in states(job)] == ["CANCELLED"]
    assert listed(seed_dir) == [0] and checkpoint.exists() and not (seed_dir / "results.json").exists()
    kept = {n: (seed_dir / n).read_bytes() for n in ("pools.safetensors", "source.safetensors", "task_000.safetensors")}

    resumed = nws("-m", "nws.cli", "run", "--config", CONFIG, *run, "--seed", "7", "--out", str(seed_dir), "--resume",
                  srun=["--ntasks=1", "--cpus-per-task=1", "--job-name=nws-resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {n: (seed_dir / n).read_bytes() for n in kept} == kept  # finished files untouched
    assert reference.wait(timeout=TIMEOUT) == 0, reference.stderr.read()[-3000:]
    names = [*kept, "task_001.safetensors"]
    assert {n: (seed_dir / n).read_bytes() for n in names} == {n: (tmp_path / "ref" / n).read_bytes() for n in names}
    results, expected = (json.loads((d / "results.json").read_text()) for d in (seed_dir, tmp_path / "ref"))
    timing = ("train_seconds", "train_cpu_seconds")  # how long it took legitimately differs
    for r in (results, expected):
        r["config"], r["tasks"] = None, [{k: v for k, v in t.items() if k not in timing} for t in r["tasks"]]
    assert results == expected
    assert not (seed_dir / "checkpoints").exists()
