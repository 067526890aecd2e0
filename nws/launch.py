"""``nws launch``: one run per seed as submitit jobs (SLURM, or local processes), then ``nws report``.

The settings are parsed and checked once, here, and written to ``OUT/launch/config.yaml``; each job runs
``nws run --config OUT/launch/config.yaml --seed S --out OUT/seed_S`` in a fresh Python process,
so Lightning's DDP launcher (which re-runs the command once per extra GPU) and its SLURM environment (one
task per GPU, as submitit starts them) work as for a run started by hand. Every run writes its own run
directory with the usual ``results.json``; ``nws report OUT/seed_*`` aggregates them (mean and std over the
seeds).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nws.config import RunConfig
from nws.config_parser import validate
from nws.errors import NWSError

# --slurm keys: our name -> (submitit parameter, type).
SLURM_KEYS = {
    "partition": ("slurm_partition", str), "gpus": ("gpus_per_node", int), "nodes": ("nodes", int),
    "hours": ("timeout_min", float), "cpus": ("cpus_per_task", int), "mem": ("mem_gb", int),
    "account": ("slurm_account", str), "qos": ("slurm_qos", str), "constraint": ("slurm_constraint", str),
}


class LaunchError(NWSError):
    """A launch that cannot be submitted as asked, or a job that failed."""


@dataclass
class SlurmSpec:
    """The resources of each SLURM job (per seed)."""

    gpus: int = 0
    nodes: int = 1
    params: dict | None = None

    def trainer(self) -> dict:
        """The run's trainer settings that follow what the job asks for: GPUs (one process each, on every node)
        where it asks for them, the CPU where it asks for none."""
        if not self.gpus:
            return {"accelerator": "cpu"}
        return {"accelerator": "gpu", "devices": self.gpus, "num_nodes": self.nodes}


def parse_slurm(text: str) -> SlurmSpec:
    """``partition=gpu,gpus=8,hours=48,...`` as submitit parameters (one task per GPU, as Lightning expects; no
    ``gpus``: a CPU job)."""
    params: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SLURM_KEYS:
            raise LaunchError(f"--slurm: bad item {item!r}; use key=value with keys {', '.join(SLURM_KEYS)}")
        name, kind = SLURM_KEYS[key]
        try:
            params[name] = kind(value)
        except ValueError:
            raise LaunchError(f"--slurm: {key} must be a {kind.__name__}, got {value!r}") from None
    if "timeout_min" in params:
        params["timeout_min"] = max(1, round(params["timeout_min"] * 60))
    gpus, nodes = params.get("gpus_per_node", 0), params.get("nodes", 1)
    if gpus < 0 or nodes < 1:
        raise LaunchError("--slurm: gpus must be at least 0 and nodes at least 1")
    params["tasks_per_node"] = max(gpus, 1)
    if gpus == 0:
        params.pop("gpus_per_node", None)
    return SlurmSpec(gpus=gpus, nodes=nodes, params=params)


# How a job's log says what ended its run (the run's last line on stderr follows).
RUN_FAILED = "nws launch: the run failed: "


def run_job(argv: list[str]) -> str:
    """The job of one seed: ``nws run ARGV`` in a child Python process; returns its run directory. The run's
    stderr goes to the job's log as it comes; if the run fails, its last line is repeated after
    :data:`RUN_FAILED`, so the launcher can show it."""
    out = argv[argv.index("--out") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "nws.cli", "run", *argv], env=os.environ.copy(),
                            stderr=subprocess.PIPE, text=True, errors="replace")
    last = ""
    for line in proc.stderr:
        sys.stderr.write(line)
        last = line.strip() or last
    if proc.wait() != 0:
        sys.stderr.write(f"{RUN_FAILED}{last or f'exit code {proc.returncode}'}\n")
        sys.stderr.flush()
        raise LaunchError(f"nws run for {out} exited with code {proc.returncode}")
    return out


def finished(run_dir: Path) -> bool:
    """Whether the seed's run finished (its results are written)."""
    return (run_dir / "results.json").is_file()


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed_{seed}"


def launch(config: RunConfig, seeds: Sequence[int], slurm: str | None = None, parallel: bool = False,
           wait: bool = True, resume: bool = False) -> list[Path]:
    """Submit one ``nws run`` of ``config`` per seed, into ``config.out``/seed_<S>; returns the run directories
    (finished, when ``wait``).

    Without ``slurm``, jobs run as local processes (submitit's ``LocalExecutor``), one after another, or all
    at once with ``parallel``. With ``slurm``, they are submitted together as a SLURM job array; the runs
    train on what the jobs ask for (``trainer.accelerator``, ``devices`` and ``num_nodes`` from ``gpus`` and
    ``nodes``; no ``gpus``: the CPU). With ``resume``, only the seeds whose run has not finished are submitted
    (``nws run --resume``: an interrupted or failed run continues where it stopped); the finished ones are
    kept as they are and returned with the others.
    """
    import submitit

    if len(set(seeds)) != len(seeds) or not seeds:
        raise LaunchError("--seeds needs one or more distinct seeds")
    out = Path(config.out)
    spec = parse_slurm(slurm) if slurm is not None else None
    if spec is not None:
        config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, **spec.trainer()))
    config = validate(config)
    folder = out / "launch"
    settings = folder / "config.yaml"
    argvs = {}
    for seed in seeds:
        run_dir = seed_dir(out, seed)
        if resume and finished(run_dir):
            print(f"seed {seed}: finished -> {run_dir}", flush=True)
            continue
        if (run_dir / "manifest.json").exists() and not resume:
            raise LaunchError(f"{run_dir} already holds a run; continue the seeds that did not finish with "
                              "--resume, or choose another --out")
        again = ["--resume"] if (run_dir / "manifest.json").exists() else []
        argvs[seed] = ["--config", str(settings), "--seed", str(seed), "--out", str(run_dir), *again]
    if not argvs:
        return [seed_dir(out, s) for s in seeds]
    failures: dict[int, str] = {}

    def settle(seed: int, job, accounting: bool = True) -> None:
        try:
            if not accounting:
                _await_without_accounting(seed, job)
            _wait(seed, job)
        except LaunchError as err:
            failures[seed] = str(err)
            print(f"seed {seed}: failed", flush=True)

    if spec is not None:
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError:
            raise LaunchError("--slurm: no SLURM here (srun not found); submit from a SLURM login node, or drop "
                              "--slurm to run the seeds as local processes") from None
        executor.update_parameters(name=f"nws-{out.name}", **{k: v for k, v in spec.params.items()})
        _write_settings(settings, config)
        with executor.batch():
            jobs = {seed: executor.submit(run_job, argv) for seed, argv in argvs.items()}
        for seed, job in jobs.items():
            print(f"seed {seed}: SLURM job {job.job_id} -> {seed_dir(out, seed)}", flush=True)
        if not wait:
            return [seed_dir(out, s) for s in seeds]
        no_accounting = _accounting_error(next(iter(jobs.values())).job_id)
        if no_accounting:
            print(f"SLURM keeps no job accounting here ({no_accounting}): job states come from squeue", flush=True)
        for seed, job in jobs.items():
            settle(seed, job, accounting=not no_accounting)
    else:
        if not wait:
            raise LaunchError("--no_wait needs --slurm: local jobs end with this command")
        executor = submitit.LocalExecutor(folder=folder)
        _write_settings(settings, config)
        executor.update_parameters(timeout_min=60 * 24 * 365, **_local_gpus())
        jobs = {}
        for seed, argv in argvs.items():
            jobs[seed] = executor.submit(run_job, argv)
            print(f"seed {seed}: job {jobs[seed].job_id} -> {seed_dir(out, seed)}", flush=True)
            if not parallel:
                settle(seed, jobs[seed])
        if parallel:
            for seed, job in jobs.items():
                settle(seed, job)
    if failures:
        first = next(iter(failures.values()))
        more = f" (seeds {', '.join(map(str, failures))} failed)" if len(failures) > 1 else ""
        raise LaunchError(f"{first}{more}; rerun the same command with --resume to finish the seeds that did not")
    return [seed_dir(out, s) for s in seeds]


def _write_settings(path: Path, config: RunConfig) -> None:
    """The settings every job runs with, as a config file."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _failure(seed: int, job, what: str) -> LaunchError:
    """A seed's failed job: what went wrong (its run's last line on stderr, else the job log's last line) and
    the file that holds the traceback."""
    err = Path(job.paths.stderr)
    text = err.read_text(errors="replace") if err.is_file() else ""
    said = re.findall(rf"^{re.escape(RUN_FAILED)}(.*)$", text, re.M)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = said[-1] if said else lines[-1] if lines else None
    return LaunchError(f"seed {seed} (job {job.job_id}) {what}" + (f": {last}" if last else "")
                       + f"; traceback in {err}")


def _local_gpus() -> dict:
    """Let local jobs see this machine's GPUs (submitit's local executor hides those it is not given)."""
    import torch

    count = torch.cuda.device_count()
    if not count:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(v) for v in visible.split(",")] if visible and all(v.strip().isdigit() for v in visible.split(",")) \
        else list(range(count))
    return {"gpus_per_node": len(ids), "visible_gpus": ids}


def _accounting_error(job_id: str) -> str | None:
    """sacct's error where SLURM keeps no job accounting (submitit's job states come from sacct), else None."""
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "-j", job_id], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"sacct: {err}"
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return None if proc.returncode == 0 else f"sacct: {lines[-1] if lines else f'exit code {proc.returncode}'}"


# squeue states of a job that may still write its result.
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def _squeue_state(job_id: str) -> str | None:
    """The job's state from squeue (``GONE`` once SLURM has forgotten it), or None if squeue cannot tell now."""
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T", "-j", job_id], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode == 0 and proc.stdout.split():
        return proc.stdout.split()[0]
    return "GONE" if "Invalid job id" in proc.stderr else None


def _await_without_accounting(seed: int, job, grace_s: float = 10.0) -> None:
    """Wait for a SLURM job without sacct (where submitit would ask it every few seconds, warn each time, and
    wait forever for a job that died without writing its result): until its result file exists, or squeue
    says it ended (cancelled, timed out, killed) and no result came within ``grace_s``."""
    import time

    start = asked = time.monotonic()
    ended = None
    while not job.paths.result_pickle.exists():
        time.sleep(1)
        now = time.monotonic()
        if now - asked < min(30.0, max(2.0, (now - start) / 10)):  # squeue less often as the wait grows
            continue
        asked, state = now, _squeue_state(job.job_id)
        if state is not None and state not in SLURM_ACTIVE:
            ended = ended or (state, now)
            if now - ended[1] > grace_s:
                raise _failure(seed, job, f"ended {ended[0]} without a result")


def _wait(seed: int, job) -> None:
    try:
        job.result()
    except Exception:  # submitit wraps the job's own exception in a FailedJobState/UncompletedJobError
        raise _failure(seed, job, "failed") from None
