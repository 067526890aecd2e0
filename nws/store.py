"""The run directory of any method: its files, written atomically, and the manifest that lists and verifies them.

A run directory holds safetensors files (the container: :mod:`nws.taskfile`) and ``manifest.json``. Writes
are atomic (temporary file in the same directory, fsync, rename, fsync of the directory); a file is listed in
the manifest only once it is complete under its final name; the manifest records each file's size and sha256
and carries a checksum of its own content. Every read is verified, and every problem with a directory or file
raises :class:`StoreError`. :class:`RunStore` is this; a method's reader subclasses it (NWS's:
:class:`nws.methods.nws_store.TaskStore`). ``docs/reliability.md`` describes the formats and guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from nws.convert import materialize
from nws.errors import StoreError
from nws.container import check_version, is_number, pack_file, unpack_file
from nws.container import first_line as _first_line
from nws.spec import is_int, str_list

MANIFEST_VERSION = 2  # 1: before nws 0.2 (upgrade with `nws upgrade RUN`)
MANIFEST = "manifest.json"
SOURCE = "source.safetensors"  # the network the first task starts from, whatever the method
CRASH_ENV = "NWS_CRASH_AT"

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Numbers the runner records for a task (a method's own extras are checked by its reader).
_TASK_NUMBERS = ("acc_after_training", "acc_from_storage", "float32_model", "train_seconds", "train_cpu_seconds",
                 "skipped_steps")


def task_file(index: int) -> str:
    return f"task_{index:03d}.safetensors"


def crash_point(name: str, stage: str) -> None:
    """Test hook of the fault-injection tests: SIGKILL this process when ``$NWS_CRASH_AT`` is ``name:stage``.

    :func:`atomic_write` calls it at stage ``written`` (temporary file complete and fsynced, not yet renamed)
    and ``renamed`` (file in place, the manifest not yet updated); ``nws upgrade`` at ``moved`` (a verified file
    moved into the run). Unset in normal use, it does nothing.
    """
    if os.environ.get(CRASH_ENV) == f"{name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a mix.

    The bytes go to a temporary file next to ``path`` (``.NAME.XXXXXXXX.tmp``), which is flushed, fsynced
    and renamed over ``path``; then the directory is fsynced so the rename itself is durable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(path.name, "written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    crash_point(path.name, "renamed")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_file_name(name: Any) -> str:
    """``name`` if it is a plain file name inside a run directory (no path, not hidden); else :class:`StoreError`."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise StoreError(f"{name!r} is not a valid file name in a run directory")
    return name


# ----------------------------------------------------------------------------------- the manifest


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (all but its ``checksum``) in canonical JSON: any change of meaning
    shows, whatever the layout of the file."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file's bytes: readable JSON, its checksum last."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "checksum"}))
    return json.dumps({**body, "checksum": manifest_checksum(body)}, indent=1).encode()


def parse_manifest(data: bytes, what: str = MANIFEST) -> dict[str, Any]:
    """A manifest's content, checked in full as far as every method shares it (format, version, checksum, the
    entries the runner writes); :class:`StoreError` for anything else."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} is corrupt ({_first_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "nws-run":
        raise StoreError(f"{what} is not an nws run manifest")
    version = manifest.get("version")
    if not is_int(version) or version < 1:
        raise StoreError(f"{what} has a corrupt format version")
    if version != MANIFEST_VERSION:
        check_version(version, MANIFEST_VERSION, what)
    try:
        intact = manifest.get("checksum") == manifest_checksum(manifest)
    except (ValueError, RecursionError):
        intact = False
    if not intact:
        raise StoreError(f"{what} is corrupt (its checksum does not match its content)")
    problem = _manifest_problem(manifest)
    if problem:
        raise StoreError(f"{what} is corrupt ({problem})")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's entries, or None."""
    files, tasks = m.get("files"), m.get("tasks")
    if not isinstance(files, dict) or not isinstance(tasks, list):
        return "bad files or tasks entry"
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name):
            return f"bad file name {name!r}"
        if not (isinstance(entry, dict) and is_int(entry.get("size")) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            return f"bad entry for {name}"
    seen = set()
    for t in tasks:
        if not (isinstance(t, dict) and is_int(t.get("index")) and t["index"] >= 0 and t["index"] not in seen
                and isinstance(t.get("file"), str) and t["file"] in files and isinstance(t.get("name"), str)
                and str_list(t.get("classes"))):
            return "bad task entry"
        seen.add(t["index"])
        if not all(is_number(t[k]) for k in _TASK_NUMBERS if k in t) or not is_int(t.get("memory_after", 0)):
            return f"bad numbers in task {t['index']}"
        sizes = t.get("bytes", {})
        if not (isinstance(sizes, dict) and all(is_int(v) for v in sizes.values())):
            return f"bad sizes in task {t['index']}"
        row = t.get("acc_so_far", [])
        if not (isinstance(row, list) and len(row) <= t["index"] + 1 and all(is_number(a) for a in row)):
            return f"bad accuracies so far in task {t['index']}"
        if not isinstance(t.get("preparation", {}), dict):
            return f"bad preparation in task {t['index']}"
    if not isinstance(m.get("method"), str):
        return "bad or missing method entry"
    source = m.get("source", {})
    if not (isinstance(source, dict) and isinstance(source.get("name", ""), str)
            and is_number(source.get("accuracy", 0))):
        return "bad source entry"
    config = m.get("config", {})
    data = config.get("data", {}) if isinstance(config, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get("name", ""), str)
            and isinstance(data.get("root"), (str, type(None))) and is_int(config.get("seed", 0))):
        return "bad config entry"
    return None

# ----------------------------------------------------------------------------------- the run directory


class RunStore:
    """A run directory of any method: verified files, and the manifest listing them and the tasks.

    ``RunStore(path)`` opens an existing run (``create=True`` makes a new one of ``method``, its manifest
    holding ``fields`` from the first write, and refuses a directory that already holds a run). A method's
    reader subclasses it with :meth:`build` (a task's network from the files alone) and :meth:`shared_files`
    (the files every task needs, counted once as shared memory), and may check its own manifest entries
    (:meth:`manifest_problem`) and add to the results' memory (:meth:`memory_extras`).

    Networks rebuilt by :meth:`model` (the method's own layers, e.g. to train on) and :meth:`plain_model` (plain
    torch layers, for inference) are kept in one cache of the ``cache_size`` most recently used; :meth:`drop`
    empties it. :meth:`hold` keeps every file's verified bytes in memory, so that rebuilding reads no disk.
    """

    cache_size: int = 4

    def __init__(self, root: str | os.PathLike, create: bool = False, method: str | None = None, **fields: Any):
        self.root = Path(root)
        self._cache: OrderedDict[tuple[str, int], nn.Module] = OrderedDict()
        self._held: dict[str, bytes] = {}
        if create:
            if not isinstance(method, str):
                raise ValueError("a new run directory needs the name of its method")
            if (self.root / MANIFEST).exists():
                raise StoreError(f"{self.root} already holds a run; pass --resume to continue it or choose"
                                 " another output directory")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(f"cannot create the run directory {self.root} ({err.strerror})") from None
            self.manifest: dict[str, Any] = {"format": "nws-run", "version": MANIFEST_VERSION, "method": method,
                                             **fields, "files": {}, "tasks": []}
            self.write_manifest()
        else:
            self.manifest = self._read_manifest()

    # -- manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise StoreError(f"run directory {self.root} does not exist")
        if not path.is_file():
            raise StoreError(f"{self.root} is not an nws run (no {MANIFEST})")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {path} ({err.strerror})") from None
        manifest = parse_manifest(data, str(path))
        problem = self.manifest_problem(manifest)
        if problem:
            raise StoreError(f"{path} is corrupt ({problem})")
        return manifest

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        """What is wrong with the entries of ``manifest`` that this reader's method writes (its
        :meth:`~nws.methods.Method.manifest_fields` and task records), or None; the entries every method shares
        are checked by :func:`parse_manifest`."""
        return None

    def write_manifest(self) -> None:
        atomic_write(self.root / MANIFEST, manifest_bytes(self.manifest))

    @property
    def method(self) -> str:
        """The name of the run's method."""
        return self.manifest["method"]

    # -- files
    def write(self, name: str, data: bytes) -> None:
        """Write a file atomically, then list it in the manifest (also atomically)."""
        atomic_write(self.root / check_file_name(name), data)
        self.manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
        self.write_manifest()

    def put(self, name: str, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> int:
        """Write a safetensors file of ``kind`` (:func:`nws.container.pack_file`) and list it; returns its size."""
        data = pack_file(kind, tensors, meta)
        self.write(name, data)
        return len(data)

    def read(self, name: str) -> bytes:
        """A file's bytes, verified against the manifest's size and sha256 (held ones: when they were read)."""
        entry = self.manifest["files"].get(check_file_name(name))
        if entry is None:
            raise StoreError(f"{self.root / name} is not recorded in the run's manifest")
        if name in self._held:
            return self._held[name]
        try:
            data = (self.root / name).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {self.root / name} ({err.strerror})") from None
        if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
            raise StoreError(f"{self.root / name} is corrupt (size or sha256 differs from the manifest)")
        return data

    def file(self, name: str, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of a verified safetensors file of ``kind``."""
        return unpack_file(self.read(name), kind, str(self.root / name))

    def hold(self) -> int:
        """Read the files that serve the listed tasks (:meth:`shared_files` and each task's file) once, verified,
        and keep their bytes in memory: later reads, and so every network rebuilt, touch no disk. Returns the
        bytes held: the run's memory as ``results.json`` counts it."""
        names = [*self.shared_files(), *(t["file"] for t in self.manifest["tasks"])]
        self._held = {name: self.read(name) for name in dict.fromkeys(names)}
        return sum(map(len, self._held.values()))

    def remove(self, name: str) -> None:
        """Unlist a file (atomically), then delete it: a crash in between leaves an unlisted file, never a
        listed one that is missing."""
        self._held.pop(name, None)
        if self.manifest["files"].pop(check_file_name(name), None) is not None:
            self.write_manifest()
        (self.root / name).unlink(missing_ok=True)

    def keep_only(self, names: set[str]) -> None:
        """Remove every listed file not in ``names`` (a superseded network, the files of an unfinished task)."""
        for name in [f for f in self.manifest["files"] if f not in names]:
            self.remove(name)

    def check(self) -> None:
        """Verify every file the manifest lists (size and sha256); :class:`StoreError` names the first bad one."""
        for name in self.manifest["files"]:
            self.read(name)

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files an interrupted :func:`atomic_write` left behind; returns their paths."""
        stale = [p for p in self.root.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def size(self, names: list[str]) -> int:
        """Bytes of the listed files among ``names``."""
        return sum(self.manifest["files"][n]["size"] for n in names if n in self.manifest["files"])

    # -- tasks
    def tasks(self) -> list[dict[str, Any]]:
        """Every stored task: index, name, classes, file, bytes, and what was recorded for it."""
        return [dict(t) for t in self.manifest["tasks"]]

    def task_entry(self, index: int) -> dict[str, Any]:
        for t in self.manifest["tasks"]:
            if t["index"] == index:
                return t
        raise StoreError(f"{self.root} has no task {index} (tasks: {[t['index'] for t in self.manifest['tasks']]})")

    def add_task(self, entry: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        """Write ``files`` (atomically, not yet listed), then list them and the task ``entry`` in one manifest
        write: a crash in between leaves complete unlisted files (the task is learned again on resume), never a
        listed task that cannot be read. ``entry`` holds ``index``, ``name``, ``classes`` and ``file``."""
        for name, data in files.items():
            atomic_write(self.root / check_file_name(name), data)
        for name, data in files.items():
            self.manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
            self._held.pop(name, None)
        tasks = [t for t in self.manifest["tasks"] if t["index"] != entry["index"]] + [dict(entry)]
        self.manifest["tasks"] = sorted(tasks, key=lambda t: t["index"])
        self.write_manifest()
        self.drop(entry["index"])
        return dict(entry)

    def update_task(self, index: int, **record: Any) -> None:
        self.task_entry(index).update(record)
        self.write_manifest()

    def record_memory(self, index: int) -> None:
        """Record ``memory_after`` for task ``index``, the last listed: what serving tasks ``0..index`` takes (the
        shared files and the tasks' own)."""
        self.update_task(index, memory_after=self.size(self.shared_files() + [t["file"] for t in self.tasks()]))

    # -- what a method's reader provides
    def shared_files(self) -> list[str]:
        """The files every listed task needs, stored once (shared memory)."""
        return []

    def build(self, index: int) -> nn.Module:
        """Task ``index``'s network from the files alone."""
        raise NotImplementedError

    def build_plain(self, index: int) -> nn.Module:
        """Task ``index``'s network from the files alone, with plain torch layers (:meth:`build`'s, materialised
        by :func:`nws.materialize`); a reader that knows a faster way overrides it."""
        return materialize(self.build(index), inplace=True)

    def memory_extras(self) -> dict[str, Any]:
        """What the results' ``memory`` records besides the files' sizes (e.g. what another implementation
        would store for the same run)."""
        return {}

    def model(self, index: int) -> nn.Module:
        """Task ``index``'s network rebuilt from storage alone, with the method's own layers (e.g. NWS layers,
        which search their pools in every forward): what a task starts from. Cached, eval mode."""
        return self._cached("model", index, lambda: self.build(index).eval())

    def plain_model(self, index: int) -> nn.Module:
        """Task ``index``'s network for inference: rebuilt from storage alone with plain torch layers (NWS layers
        materialised: :func:`nws.materialize`), the same outputs as :meth:`model`'s, no gradients. Cached, eval
        mode."""
        return self._cached("plain", index, lambda: self.build_plain(index).eval().requires_grad_(False))

    def _cached(self, kind: str, index: int, make) -> nn.Module:
        key = (kind, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self.task_entry(index)  # an unknown task: StoreError naming the tasks there are
        network = make()
        if self.cache_size > 0:
            self._cache[key] = network
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return network

    def cached(self) -> dict[tuple[str, int], nn.Module]:
        """The networks in the cache by ``(kind, index)`` (kind: ``model`` or ``plain``), least recently used
        first."""
        return dict(self._cache)

    def drop(self, index: int | None = None) -> None:
        """Drop task ``index``'s networks from the cache (None: every network)."""
        for key in [k for k in self._cache if index is None or k[1] == index]:
            del self._cache[key]
