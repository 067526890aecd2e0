"""Property-based fuzzing of the task-file, pools-file and manifest readers (a modest budget; the long run is
``fuzz/fuzz_store.py``): whatever the bytes, a reader returns or raises StoreError, nothing else."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fixtures import make_store

from nws.methods.nws import POOLS, TaskStore
from nws.store import MANIFEST, StoreError, manifest_bytes, parse_manifest, task_file
from nws.taskfile import model_from_task, read_pools

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("fuzz") / "run", num_tasks=1)


def _read_task(store, data: bytes) -> None:
    books, fingerprint = store.pools()
    try:
        model_from_task(data, books, fingerprint, store.spec(), "task", references=lambda _: store.reference_codes())
    except StoreError:
        pass


def _read_pools(data: bytes) -> None:
    try:
        read_pools(data, "pools")
    except StoreError:
        pass


def _read_manifest(data: bytes) -> None:
    try:
        TaskStore.manifest_problem(parse_manifest(data))
    except StoreError:
        pass


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def _with_meta(data: bytes, key: str, value) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"][key] = json.dumps(value)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


POSITION = st.integers(0, 4000) | st.integers(0, 2**31)  # the header and codes, or anywhere
MUTATIONS = st.lists(st.tuples(POSITION, st.integers(0, 255)), min_size=1, max_size=4)
CUT = st.none() | st.integers(0, 20000)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(store, data):
    _read_task(store, data)
    _read_pools(data)
    _read_manifest(data)


@FUZZ
@given(edits=MUTATIONS, cut=CUT)
def test_mutated_task_file(store, edits, cut):
    _read_task(store, _mutate((store.root / task_file(0)).read_bytes(), edits, cut))


@FUZZ
@given(key=st.sampled_from(["reference", "task", "pools_fingerprint", "other"]), value=JSON)
def test_task_metadata_of_any_shape(store, key, value):
    _read_task(store, _with_meta((store.root / task_file(0)).read_bytes(), key, value))


@FUZZ
@given(edits=MUTATIONS, cut=CUT, key=st.sampled_from(["spec", "layers", "fingerprint"]), value=JSON)
def test_mutated_pools_file(store, edits, cut, key, value):
    data = (store.root / POOLS).read_bytes()
    _read_pools(_mutate(data, edits, cut))
    _read_pools(_with_meta(data, key, value))


@FUZZ
@given(edits=MUTATIONS, cut=CUT)
def test_mutated_manifest(store, edits, cut):
    _read_manifest(_mutate((store.root / MANIFEST).read_bytes(), edits, cut))


@FUZZ
@given(path=st.lists(st.sampled_from(["files", "tasks", 0, "index", "file", "classes", "bytes", "config", "data",
                                      "source", "spec", "task_000.safetensors", "size"]), min_size=1, max_size=4),
       value=JSON)
def test_manifest_content_of_any_shape(store, path, value):
    """Valid checksums over arbitrary content: the entry checks, not the checksum, must catch it."""
    manifest = json.loads((store.root / MANIFEST).read_bytes())
    node = manifest
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    if isinstance(node, dict):
        node[str(path[-1])] = value
    elif isinstance(node, list) and node:
        node[0] = value
    _read_manifest(manifest_bytes(manifest))


@pytest.mark.parametrize("field, value", [("method", 5), ("method", ["packnet"]), ("method", "ewc"),
                                          ("model", "convnet"), ("model", {"name": 3, "kwargs": {}})])
def test_a_bad_method_or_model_entry_is_a_store_error(tmp_path, field, value):
    """The method entry, and fields only the baselines' manifests use (checked by their reader): one error type,
    never a crash."""
    from nws.methods import open_run

    run = tmp_path / "run"
    run.mkdir()
    manifest = {"format": "nws-run", "version": 1, "files": {}, "tasks": [], "method": "packnet", field: value}
    (run / MANIFEST).write_bytes(manifest_bytes(manifest))
    with pytest.raises(StoreError):
        open_run(str(run))
