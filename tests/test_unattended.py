"""Runs that behave well unattended: a real SIGINT or SIGTERM to ``nws demo`` mid-task ends with one line naming
the stage and the exact command that resumes it (exit 130 / 143); the resumed run writes an uninterrupted run's
files and its task log keeps the epochs from before the interrupt; output to a file is short lines, no progress
bars; the same command run again on a finished run shows its results."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nws import interrupts
from nws.store import MANIFEST

# Batches of 8 and 24 epochs: task 1 lasts long enough that the signal, sent once its first epoch is stored,
# lands inside the task even on a loaded machine; where it still lands after the task, the line must name the
# run instead (the test reads which from the stored run).
EPOCHS = 24
TINY = ["--pretrain.epochs", "1", "--model.pool_size", "16", "--model.kwargs", '{"widths": [8, 16]}',
        "--data.num_tasks", "2", "--task.batch_size", "8"]
TIMEOUT = 600


def nws(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nws.cli", *args], env=env, text=True, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Poll until ``path`` exists, failing if ``proc`` ends first or after ``TIMEOUT`` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {TIMEOUT} s"
        time.sleep(0.05)


def epochs_logged(log: Path) -> list[int]:
    with open(log, newline="") as file:
        return sorted({int(float(row["epoch"])) for row in csv.DictReader(file) if row.get("epoch")})


def run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert nws("demo", "--out", str(out), *TINY, "--task.epochs", str(EPOCHS),
               stdout=subprocess.DEVNULL).wait(TIMEOUT) == 0
    return out


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_task_stops_with_the_resume_command_and_resume_finishes_the_run(tmp_path, uninterrupted,
                                                                                      signum, code):
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), *TINY, "--task.epochs", str(EPOCHS)]
    proc = nws(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(out / "checkpoints" / "task_001" / "last.ckpt", proc)  # task 1 has finished an epoch
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, stderr[-3000:]
    listed = [t["index"] for t in json.loads((out / MANIFEST).read_text())["tasks"]]
    where = "the run" if 1 in listed else "task_001"  # stopped after task 1 was stored: between stages
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nws: stopped by {signum.name} during {where};"), stderr
    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert command == ["nws", *args, "--resume"]
    log = out / "logs" / "task_001" / "metrics.csv"
    before = epochs_logged(log)
    assert before and before[0] == 0  # the epochs trained before the interrupt

    resumed = nws(*command[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert resumed.wait(TIMEOUT) == 0, resumed.stderr.read()[-3000:]
    assert run_files(out) == run_files(uninterrupted)
    assert epochs_logged(log) == list(range(EPOCHS))  # appended to, not replaced
    assert epochs_logged(log) == epochs_logged(uninterrupted / "logs" / "task_001" / "metrics.csv")


def test_a_signal_while_held_is_raised_on_release_naming_the_stage():
    """An epoch's checkpoint and its log row are written under :func:`interrupts.hold`: a signal in between waits
    for both."""
    previous = signal.getsignal(signal.SIGINT)
    interrupts.handle_signals((signal.SIGINT,))
    try:
        with interrupts.stage("task_004"):
            interrupts.hold()
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(interrupts.Interrupted) as stopped:
                interrupts.release()
            stop = stopped.value
            assert (stop.signum, stop.stage, stop.exit_code) == (signal.SIGINT, "task_004", 130)
            interrupts.release()  # nothing held any more
            with pytest.raises(interrupts.Interrupted):
                os.kill(os.getpid(), signal.SIGINT)  # not held: raised at once
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_while_a_stage_completes_is_raised_after_it_naming_the_stage_around():
    """A stage's completing write (listing a task) is the stage's last step: a signal during it names what
    follows; one before it names the stage; an error during it goes first and drops the held signal."""
    previous = signal.getsignal(signal.SIGTERM)
    interrupts.handle_signals((signal.SIGTERM,))
    try:
        with pytest.raises(interrupts.Interrupted) as stopped:
            with interrupts.stage("task_001") as complete:
                complete()
                os.kill(os.getpid(), signal.SIGTERM)
                written = True
        assert written and stopped.value.stage is None
        with pytest.raises(OSError):
            with interrupts.stage("task_001") as complete:
                complete()
                os.kill(os.getpid(), signal.SIGTERM)
                raise OSError("disk full")
        with pytest.raises(interrupts.Interrupted) as stopped:
            with interrupts.stage("task_001"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.stage == "task_001" and interrupts.current_stage() is None
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("when, where", [("coded", "task_001"), ("listed", "the run")])
def test_the_line_names_the_task_until_the_run_lists_it(tmp_path, capsys, monkeypatch, when, where):
    """The window between a task's training and its listing (evaluation, coding, writing its file): SIGTERM once
    task 1 is coded, not yet listed, names task 1; SIGTERM just after the manifest lists it (before the runner
    goes on) names the run. The manifest agrees with the line, and the resume command finishes the run."""
    import torch

    from nws.cli import main
    from nws.methods.nws import NWS
    from nws.store import RunStore

    def signal_after(function, point, index_of):
        def signalled(self, *args):
            done = function(self, *args)
            if when == point and index_of(*args) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return done
        return signalled

    monkeypatch.setattr(NWS, "save", signal_after(NWS.save, "coded", lambda store, index, model: index))
    monkeypatch.setattr(RunStore, "add_task", signal_after(RunStore.add_task, "listed",
                                                           lambda entry, files: entry["index"]))
    threads, handlers = torch.get_num_threads(), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    torch.set_num_threads(1)
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), *TINY, "--task.epochs", "1", "--trainer.logger", "none"]
    try:
        assert main(args) == 143
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"nws: stopped by SIGTERM during {where};") and "\n" not in line
        listed = [t["index"] for t in json.loads((out / MANIFEST).read_text())["tasks"]]
        assert listed == ([0, 1] if where == "the run" else [0])
        monkeypatch.undo()
        assert main(shlex.split(line.split("Resume with: ", 1)[1])[1:]) == 0
        assert [t["index"] for t in json.loads((out / MANIFEST).read_text())["tasks"]] == [0, 1]
    finally:
        torch.set_num_threads(threads)
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), handlers):
            signal.signal(signum, handler)


def test_the_same_command_on_a_finished_run_shows_its_results(tmp_path, uninterrupted):
    files, manifest = run_files(uninterrupted), (uninterrupted / MANIFEST).read_bytes()
    again = nws("demo", "--out", str(uninterrupted), *TINY, "--task.epochs", str(EPOCHS), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    stdout, stderr = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, stderr
    assert "already holds this run, finished" in stdout and "| digits 2/3 |" in stdout and "epoch" not in stdout
    assert run_files(uninterrupted) == files and (uninterrupted / MANIFEST).read_bytes() == manifest
    other = nws("demo", "--out", str(uninterrupted), *TINY, "--task.epochs", "3", stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    stdout, stderr = other.communicate(timeout=TIMEOUT)
    assert other.returncode == 2 and len(stderr.splitlines()) == 1 and "already holds a run" in stderr


def test_the_demo_logged_to_a_file_is_short_lines_without_progress_bars(tmp_path):
    """``nws demo > log 2>&1``, the whole demo as shipped."""
    log = tmp_path / "log"
    with open(log, "w") as file:
        assert nws("demo", "--out", str(tmp_path / "demo"), stdout=file, stderr=subprocess.STDOUT).wait(TIMEOUT) == 0
    text = log.read_text()
    assert len(text.encode()) < 10_000 and "\r" not in text
    assert max(len(line) for line in text.splitlines()) <= 200
    assert "[task_004] epoch 15/15: loss " in text and "Average accuracy" in text
    assert "Training" not in text and "Epoch 0" not in text and "it/s" not in text


def test_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    import torch

    from nws.config import TrainerConfig
    from nws.devices import available_cpus, use_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert available_cpus() == len(os.sched_getaffinity(0))
    one_cpu = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
                              "from nws.devices import available_cpus; print(available_cpus())"],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert one_cpu.stdout.split() == ["1"], one_cpu.stderr
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    try:
        assert available_cpus() == 1
        assert use_threads(TrainerConfig()) == 1 and torch.get_num_threads() == 1
        assert use_threads(TrainerConfig(threads=3)) == 3 and torch.get_num_threads() == 3  # a setting wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does the environment's
        torch.set_num_threads(2)
        assert use_threads(TrainerConfig()) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
