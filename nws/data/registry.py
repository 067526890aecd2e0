"""The benchmark registry (as nws.models' for builders): each benchmark registered by name with its builder,
a one-line description and, where it has files, the check behind ``nws data check``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nws.data.base import Benchmark
from nws.errors import NWSError


@dataclass(frozen=True)
class DataRequest:
    """What a benchmark is asked for (the ``data`` settings, and the run's seed)."""

    root: str | None = None
    seed: int = 0
    source: str | None = None
    source_root: str | None = None
    image_size: int | None = None
    tasks: list[str] | None = None
    augment: str = "auto"


Builder = Callable[[DataRequest], Benchmark]
Check = Callable[[list[Path]], list[dict]]


@dataclass(frozen=True)
class BenchmarkEntry:
    """A registered benchmark: ``build`` makes it; ``check`` (benchmarks with files) validates the files at
    the roots given and returns one row per data set (``name``, ``classes``, ``train`` and ``test`` image
    counts), whose held-out split is called ``test_split``."""

    name: str
    build: Builder
    about: str
    check: Check | None = None
    test_split: str = "test"
    many_roots: bool = False


_BENCHMARKS: dict[str, BenchmarkEntry] = {}


def register_benchmark(name: str, about: str, check: Check | None = None, test_split: str = "test",
                       many_roots: bool = False) -> Callable[[Builder], Builder]:
    """Register the decorated builder as benchmark ``name`` (``data.name``)."""

    def register(build: Builder) -> Builder:
        _BENCHMARKS[name] = BenchmarkEntry(name, build, about, check, test_split, many_roots)
        return build

    return register


def list_benchmarks() -> list[str]:
    """Names of all registered benchmarks, in registration order."""
    return list(_BENCHMARKS)


def benchmark_entry(name: str) -> BenchmarkEntry:
    """The registered benchmark ``name``; :class:`NWSError` naming the known ones otherwise."""
    if name not in _BENCHMARKS:
        raise NWSError(f"data.name: unknown benchmark {name!r}; choose one of {', '.join(_BENCHMARKS)}")
    return _BENCHMARKS[name]
