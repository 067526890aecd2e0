"""The wheel: it holds the configs and the licence, builds without warnings, and once installed in a fresh
environment (reusing this one's pinned torch), ``nws configs`` and a run from a packaged config work from an
empty directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_wheel_installs_and_runs_a_packaged_config(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "deprecat" not in (build.stdout + build.stderr).lower()
    wheel, = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = {Path(n).name for n in names if n.startswith("nws/configs/")}
    assert configs == {p.name for p in (ROOT / "nws" / "configs").glob("*.yaml")} and "digits_convnet.yaml" in configs
    assert any(n.endswith("licenses/LICENSE") for n in names)

    # A fresh environment that sees this one's packages (torch, ...) but not its editable nws.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "host.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import nws; print(nws.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib), where
    nws = env_dir / "bin" / "nws"
    listed = subprocess.run([nws, "configs"], cwd=empty, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "digits_convnet " in listed.stdout, listed.stderr[-2000:]
    run = subprocess.run([nws, "run", "--config", "digits_convnet", "--out", "r", "--task.epochs", "1",
                          "--pretrain.epochs", "1", "--trainer.progress_bar", "false"], cwd=empty, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (empty / "r" / "results.json").is_file() and (empty / "r" / "results.md").is_file()
