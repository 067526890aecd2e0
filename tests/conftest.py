"""One compute thread per test worker: the suite runs with `-n 2` on 2 cores, and oversubscribed threads
slow small tensor ops several times over. Subprocesses inherit the setting through the environment.
The summary ends with a line on the tests marked `slurm`, so a log shows whether they ran or were skipped."""

import collections
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("slurm"):
        item.user_properties.append(("marker", "slurm"))  # travels with the reports, from xdist workers too


def pytest_terminal_summary(terminalreporter) -> None:
    outcomes: dict[str, str] = {}
    for report in (r for reports in terminalreporter.stats.values() for r in reports):
        if isinstance(report, pytest.TestReport) and ("marker", "slurm") in report.user_properties:
            if report.failed or (report.nodeid not in outcomes and (report.when == "call" or report.skipped)):
                outcomes[report.nodeid] = report.outcome
    if outcomes:
        counts = collections.Counter(outcomes.values())
        terminalreporter.write_line("tests marked slurm: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
