"""``nws demo --compare``: NWS and every baseline on the same benchmark, one run directory each, then the report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nws.config import RunConfig
from nws.data import benchmark_from_config
from nws.errors import NWSError
from nws.methods import METHODS
from nws.report import write_report
from nws.runner import Runner
from nws.store import MANIFEST


def compare(config: RunConfig, out: str | Path, methods: Sequence[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run ``methods`` (default: all) with ``config`` into ``out/<method>`` and write the report to
    ``out/report``; returns ``{"runs": {method: results}, "seconds": {method: s}, "report": summary}``.

    Every method gets the same benchmark object, seed, backbone and schedules; the baselines share one plain
    backbone trained on the source task (it is the same for all of them: same data, seed and schedule).
    Every method's settings are checked, and any run directory that already holds a run refuses the whole
    comparison, before anything is written.
    """
    out = Path(out)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise NWSError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    taken = [str(out / m) for m in methods if (out / m / MANIFEST).exists()]
    if taken:
        raise NWSError(f"{taken[0]} already holds a run; choose another output directory")
    benchmark = benchmark_from_config(config.data, config.seed)
    configs = {m: dataclasses.replace(config, method=m, out=str(out / m)) for m in methods}
    for m in methods:  # every method's settings, before the first run writes anything
        Runner(configs[m], benchmark, progress=False)
    runs, seconds = {}, {}
    plain_source = None  # the plain backbone trained on the source task: trained once, shared by the baselines
    for method in methods:
        start = time.perf_counter()
        options = {} if method == "nws" else {"plain_source": plain_source}
        runner = Runner(configs[method], benchmark, progress=progress, **options)
        runs[method] = runner.run()
        if method != "nws" and plain_source is None:
            plain_source = runner.method.source_network
        seconds[method] = time.perf_counter() - start
        if progress:
            print(f"[{method}] average accuracy {100 * runs[method]['average_accuracy']:.2f}% "
                  f"({seconds[method]:.0f} s)", flush=True)
    summary = write_report([out / m for m in methods], out / "report")
    return {"runs": runs, "seconds": seconds, "report": summary}
