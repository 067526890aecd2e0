"""``nws demo --compare``: every method (or those named) on the same benchmark, one run directory each, then the
report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from nws.config import RunConfig
from nws.data import benchmark_from_config
from nws.errors import NWSError
from nws.methods import METHODS, method_class
from nws.report import write_report
from nws.runner import Runner
from nws.store import MANIFEST


def compare(config: RunConfig, out: str | Path, methods: Sequence[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run ``methods`` (default: every registered one; any name :func:`nws.methods.method_class` finds) with
    ``config`` into ``out/<method name>`` and write the report to ``out/report``; returns
    ``{"runs": {name: results}, "seconds": {name: s}, "report": summary}``.

    Every method gets the same benchmark object, seed, backbone and schedules. Methods that make the same source
    network (the same :meth:`~nws.methods.Method.source_key`, e.g. the baselines' plain backbone) share it: the
    first trains it, the others store a copy. Every method's settings are checked, and any run directory that
    already holds a run refuses the whole comparison, before anything is written.
    """
    out = Path(out)
    classes = {m: method_class(m) for m in (methods or METHODS)}
    names = {m: cls.name for m, cls in classes.items()}
    taken = [str(out / n) for n in names.values() if (out / n / MANIFEST).exists()]
    if taken:
        raise NWSError(f"{taken[0]} already holds a run; choose another output directory")
    benchmark = benchmark_from_config(config.data, config.seed)
    configs = {m: dataclasses.replace(config, method=m, out=str(out / names[m])) for m in classes}
    for m in classes:  # every method's settings, before the first run writes anything
        Runner(configs[m], benchmark, progress=False)
    runs, seconds = {}, {}
    sources: dict[str, nn.Module] = {}  # source key -> the source network the first method of that key made
    for m, cls in classes.items():
        start = time.perf_counter()
        key = cls.source_key(configs[m])
        runner = Runner(configs[m], benchmark, progress=progress, shared_source=sources.get(key))
        runs[names[m]] = runner.run()
        if key is not None and key not in sources:
            sources[key] = runner.source
        seconds[names[m]] = time.perf_counter() - start
        if progress:
            print(f"[{names[m]}] average accuracy {100 * runs[names[m]]['average_accuracy']:.2f}% "
                  f"({seconds[names[m]]:.0f} s)", flush=True)
    summary = write_report([out / n for n in names.values()], out / "report")
    return {"runs": runs, "seconds": seconds, "report": summary}
