"""The examples under examples/ run as documented (docs/integrate.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_own_model_example(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "own_model.py"), "--out", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("served task") == 2
    assert (tmp_path / "store" / "task_001.safetensors").is_file()


def test_own_tasks_example(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "own_tasks.py"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("accuracy from storage") == 3 and "served task 2: 4 classes" in proc.stdout
