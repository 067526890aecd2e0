"""Two ``nws demo`` runs side by side against one alone: the wall time a user sees when a second CPU-bound job
shares the machine (issue: "two runs on one machine are 12x slower, not 2x").

Each setting runs the demo as shipped (digits, the embedded default) alone, then two copies started together,
``--rounds`` times in alternation, each in a fresh process and a fresh output directory, and prints the
median wall times and the ratio pair / alone. Settings are environments given to the processes: ``default``
(what a user gets: nws lets idle OpenMP threads spin 1,000 times before they sleep) and, beside it,
libgomp's own default (300,000 spins: what nws ran with before), other ways for idle threads to wait, and
one thread per process. Run it on a quiet machine: anything else running distorts every figure.

    python benchmarks/bench_side_by_side.py [--rounds 2] [--settings default libgomp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "default": {},  # nws sets GOMP_SPINCOUNT=1000 where the environment sets no wait policy (nws/__init__.py)
    "libgomp": {"GOMP_SPINCOUNT": "300000"},  # libgomp's own default: what nws ran with before
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
}


def demos(count: int, env: dict[str, str], root: Path) -> float:
    """Wall seconds until ``count`` demos started together have all finished (each must succeed)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    start = time.perf_counter()
    outs = [root / f"demo{i}_{time.time_ns()}" for i in range(count)]
    procs = [subprocess.Popen([sys.executable, "-m", "nws.cli", "demo", "--out", str(out)],
                              env={**base, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode:
            raise SystemExit(f"nws demo failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    print("| setting | environment | one alone (s) | two side by side (s) | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            env = SETTINGS[name]
            alone, pair = [], []
            for _ in range(args.rounds):
                alone.append(demos(1, env, Path(tmp)))
                pair.append(demos(2, env, Path(tmp)))
            a, p = statistics.median(alone), statistics.median(pair)
            shown = " ".join(f"{k}={v}" for k, v in env.items()) or "(none)"
            print(f"| {name} | {shown} | {a:.1f} | {p:.1f} | {p / a:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
