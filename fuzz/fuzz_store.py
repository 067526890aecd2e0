"""Long fuzz run of the run readers of every method: seeded mutations of real runs' files.

Each case takes one file of a real run (a task, the pools, a source or shared network, or the manifest), damages
it with one or more seeded mutations (bit flips, byte overwrites, truncation, extension, deleted or duplicated
chunks, splices with another file, metadata replaced by random JSON), and reads it with the method's own
reader, past the manifest's size/sha256 check (which would catch nearly all of them first): an NWS file with
its file reader; a baseline's file, or any run's manifest, by rebuilding every task of the run with it in
place; a file of a run of an earlier format (tests/fixtures) with ``nws upgrade``'s reader of it. A reader must
return or raise ``StoreError``; any other exception is a crash, printed and saved under ``--crashes``.

    python fuzz/fuzz_store.py --cases 10000 --seed 0                  # tiny runs of every method first (~1 min),
                                                                      # and an NWS run coded in a chain, float16 BatchNorm
    python fuzz/fuzz_store.py --cases 10000 --methods nws --run runs/demo   # or an existing NWS run's files

Exit status 1 if any case crashed. ``docs/reliability.md`` records a run's output.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from nws.methods import open_run
from nws.methods.nws import POOLS, REFERENCE, TaskStore
from nws.store import MANIFEST, SOURCE, manifest_bytes
from nws.errors import StoreError
from nws.taskfile import SOURCE_REFERENCE, model_from_source, model_from_task, read_pools, read_reference
from nws.upgrade import EarlierNWSRun

EARLIER = {"nws-format1": Path(__file__).parent.parent / "tests" / "fixtures" / "run_format1",
           "nws-biases": Path(__file__).parent.parent / "tests" / "fixtures" / "run_biases"}
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord("}"), ord('"'), ord("["), ord("0"), ord("9"), ord(" ")]


def tiny_run(out: Path, method: str = "nws", tasks: int = 5, chain: bool = False, grid: bool = False) -> Path:
    """A real run of ``method`` with tiny settings: its source files, shared files and ``tasks`` tasks (with
    ``chain``, NWS tasks coded against the previous task, a key task every 3, and BatchNorm stored as float16;
    with ``grid``, BatchNorm folded onto its int8 grid and NWS's search rate-aware)."""
    from nws.config import BaselineConfig, DataConfig, RunConfig, TrainConfig, TrainerConfig
    from nws.runner import run

    config = RunConfig(out=str(out), method=method, pretrain=TrainConfig(epochs=1, lr=0.05), task=TrainConfig(epochs=1),
                       trainer=TrainerConfig(logger="none", checkpoint=False, progress_bar=False),
                       data=DataConfig(num_tasks=tasks), baseline=BaselineConfig(retrain_epochs=1))
    config.model.pool_size = 32
    config.model.kwargs = {"widths": [8, 16]} if method != "nws" else {}
    if chain:
        config.model.code_reference, config.model.key_every, config.model.bn_dtype = "previous", 3, "float16"
    if grid:
        config.model.bn_dtype, config.model.rate = "int8", 1.0
    run(config, progress=False)
    return out


TOP = 25


def reason(message: str, name: str) -> str:
    """A StoreError message without its file name, numbers, quoted values and most of its details."""
    text = re.sub(r"\S*" + re.escape(name), "FILE", message)
    text = re.sub(r"\((.*)\)", lambda m: "(" + " ".join(m.group(1).split()[:4]) + " ...)", text)
    text = re.sub(r"'[^']*'|\[[^\]]*\]", "_", text)
    return re.sub(r"\d+", "N", text)[:110]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 10**12, -(2**63), 2**64, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e308, float("inf"), float("nan"), rng.uniform(-10, 10)])
    if kind in (4, 5):
        return rng.choice(["", "convnet", "nws-task", "x" * rng.randrange(40), "\u00e9\u0000", "1"])
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["name", "index", "classes", "shape", "kwargs", "k"]): random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


def replace_json_value(rng: random.Random, node: Any) -> Any:
    """``node`` with one value somewhere inside replaced by random JSON (or a key deleted)."""
    if isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(list(node))
        if rng.random() < 0.15:
            return {k: v for k, v in node.items() if k != key}
        return {**node, key: replace_json_value(rng, node[key])}
    if isinstance(node, list) and node and rng.random() < 0.7:
        i = rng.randrange(len(node))
        return node[:i] + [replace_json_value(rng, node[i])] + node[i + 1 :]
    return random_json(rng)


def mutate_bytes(rng: random.Random, data: bytes, other: bytes, header_size: int) -> tuple[bytes, str]:
    """``data`` damaged by one seeded byte-level mutation (``other``: another file, for splices)."""
    out = bytearray(data)
    op = rng.choice(["flip", "flip", "byte", "byte", "truncate", "extend", "delete", "duplicate", "splice"])

    def pos() -> int:  # half the positions fall in the header and the codes (the parsed part), half anywhere
        return rng.randrange(min(len(out), header_size + 4096) if rng.random() < 0.5 else len(out))

    if not out:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64))), "random"
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            p = pos()
            out[p] ^= 1 << rng.randrange(8)
    elif op == "byte":
        for _ in range(rng.choice([1, 2, 4])):
            out[pos()] = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
    elif op == "truncate":
        del out[pos():]
    elif op == "extend":
        out += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
    elif op == "delete":
        p = pos()
        del out[p : p + rng.choice([1, 4, 64])]
    elif op == "duplicate":
        p = pos()
        out[p:p] = out[p : p + rng.choice([1, 4, 64])]
    else:
        p = pos()
        out[p:] = other[p:]
    return bytes(out), op


def mutate(rng: random.Random, name: str, data: bytes, other: bytes) -> tuple[bytes, str]:
    """One damaged version of file ``name``, and what was done to it."""
    if name == MANIFEST:
        if rng.random() < 0.4:  # content change under a valid checksum: the entry checks must catch it
            manifest = replace_json_value(rng, json.loads(data))
            if isinstance(manifest, dict):
                return manifest_bytes(manifest), "json"
        return mutate_bytes(rng, data, other, len(data))
    header, body = header_of(data)
    if rng.random() < 0.3:
        meta = dict(header["__metadata__"])
        key = rng.choice(list(meta))
        if key in ("format", "version"):
            meta[key] = rng.choice(["", "2", "0", "-1", "nws-task", "nws-pools", "nws-source", "1 ", "\u0661"])
        else:
            meta[key] = json.dumps(replace_json_value(rng, json.loads(meta[key])))
        return with_header({**header, "__metadata__": meta}, body), "meta"
    if rng.random() < 0.15:  # tensor entries: dtype, shape, offsets
        key = rng.choice([k for k in header if k != "__metadata__"])
        return with_header({**header, key: replace_json_value(rng, header[key])}, body), "tensor-entry"
    return mutate_bytes(rng, data, other, 8 + struct.unpack("<Q", data[:8])[0])


def rebuild_all(run: Path, name: str):
    """A reader of file ``name`` of ``run`` that rebuilds every task with the given bytes in its place (the
    manifest is written into a copy of the run; any other file replaces what the store reads)."""
    def read(data: bytes) -> None:
        root = run
        if name == MANIFEST:
            root = Path(tempfile.mkdtemp(prefix="fuzz-"))
            for f in run.iterdir():
                if f.is_file() and f.name != MANIFEST:
                    (root / f.name).symlink_to(f)
            (root / MANIFEST).write_bytes(data)
        try:
            store = open_run(str(root))
            original = store.read
            store.read = lambda n: data if n == name else original(n)
            if name == SOURCE:
                store.source(10)  # the digits source task's classes
            for t in store.tasks():
                store.model(t["index"])
        finally:
            if root != run:
                shutil.rmtree(root)
    return read


def reader(store: TaskStore, name: str):
    """The store's reader of file ``name``, taking the file's bytes."""
    if store.method != "nws" or name == MANIFEST:
        return rebuild_all(store.root, name)
    books, fingerprint = store.pools()
    spec = store.spec()
    if name == POOLS:
        return lambda data: read_pools(data, name)
    if name == SOURCE:
        return lambda data: model_from_source(data, books, spec, name)
    if name == REFERENCE:
        return lambda data: read_reference(data, store.layout(spec.num_classes), fingerprint, name)

    def references(against: str | int):  # the pristine reference, or the pristine earlier task's codes
        return store.reference_codes() if against == SOURCE_REFERENCE else store.codes(int(against))

    return lambda data: model_from_task(data, books, fingerprint, spec, name, references)


def earlier_reader(run: Path, name: str):
    """``nws upgrade``'s reader of a run of an earlier format (tests/fixtures), file ``name`` replaced by the given
    bytes: the pools and source network, then every task (task format 1, codes of format 2, biases)."""
    files = {n: (run / n).read_bytes() for n in json.loads((run / MANIFEST).read_text())["files"]}
    tasks = [t["file"] for t in json.loads((run / MANIFEST).read_text())["tasks"]]

    def read(data: bytes) -> None:
        earlier = EarlierNWSRun(run, {**files, name: data})
        earlier.source_model()
        for task in tasks:
            earlier.task(task)
    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="nws,finetune,individual,packnet,piggyback",
                        help="tiny runs of these methods are fuzzed")
    parser.add_argument("--run", type=Path, default=None, help="fuzz this run's files instead (any method)")
    parser.add_argument("--crashes", type=Path, default=Path("fuzz/crashes"), help="where crashing inputs go")
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    start = time.perf_counter()
    methods = args.methods.split(",")
    runs = {"run": args.run} if args.run else {m: tiny_run(Path(tmp.name) / m, m, tasks=5 if m == "nws" else 3)
                                              for m in methods}
    if not args.run and "nws" in methods:  # and NWS tasks coded in a chain (model.code_reference: previous)
        runs["nws-chain"] = tiny_run(Path(tmp.name) / "nws-chain", "nws", tasks=5, chain=True)
    for method in ("nws", "piggyback"):  # BatchNorm on its grid (and NWS rate-aware)
        if not args.run and method in methods:
            runs[f"{method}-grid"] = tiny_run(Path(tmp.name) / f"{method}-grid", method, tasks=3, grid=True)
    files, readers = {}, {}
    for label, run in runs.items():
        store = open_run(str(run))
        store.check()
        for name in [MANIFEST, *store.manifest["files"]]:
            key = f"{label}/{name}"
            files[key] = (run / MANIFEST).read_bytes() if name == MANIFEST else store.read(name)
            readers[key] = reader(store, name)
            readers[key](files[key])  # every pristine file reads
    if not args.run and "nws" in methods:  # the files of runs of an earlier format, as nws upgrade reads them
        for label, run in EARLIER.items():
            for name in json.loads((run / MANIFEST).read_text())["files"]:
                key = f"{label}/{name}"
                files[key] = (run / name).read_bytes()
                readers[key] = earlier_reader(run, name)
                readers[key](files[key])
    names = list(files)
    print(f"fuzzing {len(names)} files of {len(runs)} runs ({', '.join(names)}); built in "
          f"{time.perf_counter() - start:.1f} s")

    rng = random.Random(args.seed)
    outcomes: Counter[tuple[str, str]] = Counter()
    reasons: Counter[str] = Counter()
    crashes, slowest = [], (0.0, "")
    start = time.perf_counter()
    for case in range(args.cases):
        key = rng.choice(names)
        name = key.split("/", 1)[1]
        other = files[rng.choice(names)]
        data, op = mutate(rng, name, files[key], other)
        t0 = time.perf_counter()
        try:
            readers[key](data)
            outcome = "read"
        except StoreError as err:
            outcome = "StoreError"
            reasons[reason(str(err), name)] += 1
        except Exception as err:  # noqa: BLE001 - a crash is what this script looks for
            outcome = f"CRASH {type(err).__name__}"
            args.crashes.mkdir(parents=True, exist_ok=True)
            path = args.crashes / f"case{case}-{key.replace('/', '-')}"
            path.write_bytes(data)
            crashes.append(f"case {case} ({key}, {op}): {type(err).__name__}: {err} -> {path}")
            traceback.print_exc()
        elapsed = time.perf_counter() - t0
        slowest = max(slowest, (elapsed, f"case {case} ({key}, {op})"))
        method = key.split("/", 1)[0]
        outcomes[(f"{method}/" + ("task" if name.startswith("task_") else name), outcome)] += 1
    total = time.perf_counter() - start

    print(f"{args.cases} cases, seed {args.seed}, {total:.1f} s ({1000 * total / args.cases:.2f} ms a case; "
          f"slowest {1000 * slowest[0]:.0f} ms, {slowest[1]})")
    for (target, outcome), count in sorted(outcomes.items()):
        print(f"  {target:36s} {outcome:12s} {count:6d}")
    print(f"the {sum(reasons.values())} StoreErrors, by the check that caught them (most common {TOP}):")
    for text, count in reasons.most_common(TOP):
        print(f"  {count:6d}  {text}")
    print(f"crashes: {len(crashes)}")
    for line in crashes[:20]:
        print(f"  {line}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
