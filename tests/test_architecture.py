"""The package's layers (docs/architecture.md): no module imports one of a higher layer, and no imports run in
a circle. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "nws"
# A module has one job: past this many lines it has several (split it by job, named in the paper's words).
MAX_LINES = 450
# The exact search: usable with torch and NumPy alone.
SEARCH = ["nws.search", "nws.exhaustive", "nws.scalar_search", "nws.bounded_search", "nws.rate_bounds",
          "nws.rate_penalty"]

# Lowest first; a module may import its own layer and those below it. Keep in step with docs/architecture.md.
LAYERS = [
    ("base", ["nws.errors", "nws.interrupts"]),
    ("core", ["nws", *SEARCH, "nws.pool", "nws.layers", "nws.convert", "nws.codes", "nws.bitcodes", "nws.packing",
              "nws.unpacking", "nws.rate", "nws.batchnorm", "nws.sparsity", "nws.spec", "nws.kmeans",
              "nws.pool_sources", "nws.models", "nws.models.*"]),
    ("storage and data", ["nws.container", "nws.taskfile", "nws.store", "nws.data", "nws.data.*"]),
    ("training and protocol", ["nws.config", "nws.config_types", "nws.config_parser", "nws.devices", "nws.logs",
                               "nws.engine", "nws.metrics", "nws.tables", "nws.results", "nws.methods", "nws.methods.*",
                               "nws.runner", "nws.upgrade", "nws.launch"]),
    ("serving", ["nws.serve", "nws.export"]),
    ("reporting", ["nws.groups", "nws.plots", "nws.report", "nws.compare"]),
    ("command line", ["nws.cli", "nws.subcommand", "nws.run_commands", "nws.serve_commands", "nws.setup_commands"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer: place it in LAYERS and docs/architecture.md")


def imports(path: Path, known: set[str]) -> set[str]:
    """The nws modules ``path`` imports (``from nws.x import y`` counts as nws.x.y where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nws"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nws":
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_runs_up_a_layer():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, deps in graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_imports_in_a_circle():
    g, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_what_they_must():
    """The checker finds imports inside functions and resolves submodules imported by name."""
    g = graph()
    assert "nws.methods" in g["nws.report"]  # imported inside a function body or at the top
    assert "nws.pool_sources" in g["nws.setup_commands"]  # `from nws import pool_sources as ps`, inside a function


def test_no_module_is_over_the_line_limit():
    long = [f"{name}: {n} lines" for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)


def test_the_search_needs_only_torch_and_numpy():
    """The search's modules import the standard library, torch, NumPy and one another, nothing else."""
    mods = modules()
    for name in SEARCH:
        found = set()
        for node in ast.walk(ast.parse(mods[name].read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        outside = {m for m in found if m.split(".")[0] not in {*sys.stdlib_module_names, "torch", "numpy", "nws"}}
        assert not outside, f"{name} imports {sorted(outside)}"
        assert graph()[name] <= set(SEARCH), f"{name} imports {sorted(graph()[name] - set(SEARCH))}"
