"""``nws upgrade RUN``: a run of any earlier nws format rewritten into today's, atomically, verified after writing.

Readers read today's formats only and refuse an earlier one with one line naming this command. What an
earlier nws wrote, and how it becomes today's:

- the manifest of version 1: version 2, with the run's ``method`` (before nws recorded it every run was NWS)
  and each task's ``memory_after`` (what serving tasks ``0..t`` takes: the shared files and the tasks so far);
- NWS runs: task files of format 1 (the spec and layer shapes in the metadata, indices coded alone, one tensor
  per state entry) rewritten in format 2, coded against the run's reference (written from the source
  network's indices where the run has none), with each task's ``reference_bytes``; packed codes of format 2
  (layer names in the stream) read here and written in today's format; a model whose Conv2d or Linear layers
  had biases when the builders made them (before 2026-12-02) gets them listed in its spec (``biases``), in the
  pools and source files too;
- ``results.json`` without a ``format`` entry (memory recorded as ``pools`` instead of ``shared``, no
  ``memory_after_task``, tasks without ``acc_final``, no config), or of version 2 (no ``accuracy_matrix``):
  written again from the upgraded run's manifest and the accuracies it recorded (``acc_final``, else
  ``acc_from_storage``), with ``results.md``; the accuracy matrix holds what was recorded (each task's accuracy
  right after it was stored, and every task's after the whole sequence), the rest null.

Atomic: the upgraded run is first written aside, into ``RUN/.upgrade/`` (files that do not change linked in),
and verified there with today's readers: every file, every task rebuilt, and every rewritten task's codes and
state equal to what the earlier files hold. Only then is ``.upgrade/COMMIT`` written and the new files moved
over the old ones, the manifest last. Interrupted before ``COMMIT``, the run is untouched and ``.upgrade`` is
started again; after it, the next ``nws upgrade RUN`` finishes moving the verified files in (until then, readers
see the earlier manifest and name this command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import constriction
import numpy as np
import torch
from torch import Tensor, nn

from nws.bitcodes import CodesError, Reader, categorical, rice_decode, width
from nws.codes import code_layout, decode, encode
from nws.container import check_state, first_line, meta_entry, pack_file, read_file
from nws.errors import StoreError
from nws.methods import open_run
from nws.methods.nws import POOLS, REFERENCE, TaskStore
from nws.packing import MAGIC, Layout
from nws.results import RESULTS, RESULTS_MD, RESULTS_VERSION, check_results, results_from, write_results
from nws.spec import ModelSpec, is_int, str_list
from nws.store import MANIFEST, MANIFEST_VERSION, SOURCE, atomic_write, crash_point, manifest_bytes, manifest_checksum
from nws.store import sha256
from nws.taskfile import (SOURCE_REFERENCE, TASK_VERSION, build_model, build_task, layer_shapes, load_pools_into,
                          read_pools, read_reference, read_task_file, reference_bytes, reference_task_bytes,
                          split_state, stored_state, task_bytes, task_codes)
from nws.unpacking import unpack_codes

STAGING = ".upgrade"  # inside the run: the upgraded run, written and verified before anything is replaced
COMMIT = "COMMIT"  # inside the staging directory: the files to move in, once they are verified


# ----------------------------------------------------------------------------------- earlier NWS formats


def _read_codes_v2(reader: Reader, layout: Layout) -> dict[str, Tensor]:
    """Packed codes of format 2: per layer its name, pool size, count and mode (0: fixed-width indices, else the
    Rice parameter of its histogram + 1), then the Rice tables and one rANS stream."""
    specs, names = [], set()
    for _ in range(reader.varint()):
        try:
            name = reader.take(reader.varint()).decode()
        except UnicodeDecodeError:
            raise CodesError("packed codes have a corrupt header (layer name)") from None
        k, n, mode = reader.varint(), reader.varint(), reader.take(1)[0]
        if not (1 <= k < 1 << 31 and n < 1 << 31 and mode <= 32) or name in names:
            raise CodesError("packed codes have a corrupt header (bad layer entry)")
        specs.append((name, k, n, mode))
        names.add(name)
    if {name: (k, n) for name, k, n, _ in specs} != dict(layout):
        raise CodesError("packed codes are for other layers, pool sizes or layer sizes than expected")
    n_table, n_words = reader.varint(), reader.varint()
    table, stream = reader.take(n_table), reader.take(4 * n_words)
    if reader.pos != len(reader.data):
        raise CodesError("packed codes have trailing bytes")
    bits = np.unpackbits(np.frombuffer(table, np.uint8))
    zeros = np.flatnonzero(bits == 0)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4").astype(np.uint32))
    out, pos = {}, 0
    for name, k, n, mode in specs:
        if mode == 0:
            w = width(k)
            if pos + n * w > len(bits):
                raise CodesError("packed codes are truncated (fixed-width indices)")
            raw = bits[pos : pos + n * w].reshape(n, w).astype(np.int64) @ (1 << np.arange(w - 1, -1, -1))
            pos += n * w
            if n and raw.max() >= k:
                raise CodesError(f"{name}: index out of range")
            out[name] = torch.from_numpy(raw.astype(np.int64))
            continue
        counts, pos = rice_decode(bits, zeros, pos, k, mode - 1)
        if counts.sum() != n:
            raise CodesError(f"{name}: histogram does not match the number of indices")
        if n == 0 or k == 1:
            out[name] = torch.zeros(n, dtype=torch.long)
            continue
        try:
            idx = coder.decode(categorical(counts), n)
        except Exception as err:  # constriction raises its own error types on a corrupt stream
            raise CodesError(f"{name}: corrupt index stream ({err})") from None
        if np.bincount(idx, minlength=k)[:k].tolist() != counts.tolist() or idx.max() >= k:
            raise CodesError(f"{name}: corrupt index stream (decoded histogram differs)")
        out[name] = torch.from_numpy(idx.astype(np.int64))
    if len(bits) - pos >= 8 or bits[pos:].any():
        raise CodesError("packed codes have trailing data in the tables")
    if not coder.is_empty():
        raise CodesError("packed codes have trailing data in the index stream")
    return {name: out[name] for name in layout}


def legacy_codes(data: bytes, layout: Layout) -> dict[str, Tensor]:
    """Codes packed alone by an earlier nws: format 2, or today's format without a reference."""
    reader = Reader(bytes(data), 0)
    if len(reader.data) > len(MAGIC) and reader.data[: len(MAGIC)] == MAGIC and reader.data[len(MAGIC)] == 2:
        reader.take(len(MAGIC) + 1)
        return _read_codes_v2(reader, layout)
    return unpack_codes(data, layout)


def legacy_biases(model: nn.Module, state: dict[str, Tensor]) -> tuple[str, ...]:
    """The bias-free Conv2d and Linear layers of ``model`` whose bias ``state`` holds (float32, one value per
    output): the biases its builder made when the run was written."""
    modules = dict(model.named_modules())
    found = []
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        module = modules.get(name)
        if (leaf == "bias" and isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None
                and value.dtype == torch.float32 and tuple(value.shape) == (module.weight.shape[0],)):
            found.append(name)
    return tuple(sorted(found))


class EarlierNWSRun:
    """An NWS run as an earlier nws wrote it (files already verified against its manifest): its pools, its spec
    with the biases its models had, its source network, and each task's codes and model, from task files of
    format 1 or 2."""

    def __init__(self, root: Path, files: dict[str, bytes]):
        self.root, self.files = root, files
        self.books, self.fingerprint, spec = read_pools(files[POOLS], self.what(POOLS))
        self.source: dict[str, Tensor] | None = None
        if SOURCE in files:
            self.source = read_file(files[SOURCE], "nws-source", self.what(SOURCE))[0]
        biases = legacy_biases(build_model(spec, self.what(POOLS)), self.source or {})
        self.spec = dataclasses.replace(spec, biases=biases)
        self.codes: dict[int, dict[str, Tensor]] = {}
        self._reference: dict[str, Tensor] | None = None

    def what(self, name: str) -> str:
        return str(self.root / name)

    def source_model(self) -> nn.Module:
        if self.source is None:
            raise StoreError(f"{self.root} has no {SOURCE}, which its tasks need")
        model = build_model(self.spec, self.what(SOURCE))
        check_state(self.source, model.state_dict(), self.what(SOURCE))
        model.load_state_dict(self.source)
        load_pools_into(model, self.books, self.what(SOURCE))
        return model

    def reference(self) -> dict[str, Tensor]:
        """The indices tasks are coded against: the run's reference file, or the source network's own."""
        if self._reference is None:
            if REFERENCE in self.files:
                layout = code_layout(build_model(self.spec, self.what(REFERENCE)))
                self._reference = read_reference(self.files[REFERENCE], layout, self.fingerprint, self.what(REFERENCE))
            else:
                self._reference = encode(self.source_model())
        return self._reference

    def task(self, name: str) -> tuple[nn.Module, dict[str, Any], int]:
        """Task file ``name``'s model (eval mode), task record and format version."""
        data, what = self.files[name], self.what(name)
        version = read_file(data, "nws-task", what)[2]
        if version == TASK_VERSION:
            tf = read_task_file(data, self.fingerprint, what)
            layout = code_layout(build_model(dataclasses.replace(self.spec, num_classes=len(tf.task["classes"])), what))
            codes = task_codes(tf, layout, self.books, lambda r: self.reference() if r == SOURCE_REFERENCE
                               else self.codes[int(r)])
            model, task = build_task(tf, self.books, self.spec, codes=codes), tf.task
        elif version == 1:
            model, task, codes = self._format_1(data, what)
        else:
            raise StoreError(f"{what} has format version {version}, newer than this nws reads; upgrade nws")
        self.codes[task["index"]] = codes
        return model, task, version

    def _format_1(self, data: bytes, what: str) -> tuple[nn.Module, dict[str, Any], dict[str, Tensor]]:
        """A task file of format 1: its spec and layer shapes in the metadata, its codes alone, one tensor per
        state entry."""
        tensors, meta, _ = read_file(data, "nws-task", what)
        task = meta_entry(meta, "task", what)
        if not (isinstance(task, dict) and is_int(task.get("index")) and task["index"] >= 0
                and isinstance(task.get("name"), str) and str_list(task.get("classes")) and task["classes"]):
            raise StoreError(f"{what} has a bad task record")
        if meta_entry(meta, "pools_fingerprint", what) != self.fingerprint:
            raise StoreError(f"{what} was encoded against different pools than this run's")
        spec = ModelSpec.from_json(meta_entry(meta, "spec", what), what)
        if spec.num_classes != len(task["classes"]):
            raise StoreError(f"{what}: its model has {spec.num_classes} classes, its task {len(task['classes'])}")
        spec = dataclasses.replace(spec, biases=self.spec.biases)
        if dataclasses.replace(spec, num_classes=self.spec.num_classes) != self.spec:
            raise StoreError(f"{what} is for another architecture or NWS settings than this run's")
        model = build_model(spec, what)
        if layer_shapes(model) != meta_entry(meta, "layers", what):
            raise StoreError(f"{what}: its layer shapes do not match the architecture {spec.name!r}")
        load_pools_into(model, self.books, what)
        packed = tensors.get("codes")
        if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
            raise StoreError(f"{what} has no codes (a 1-D uint8 tensor)")
        try:
            codes = legacy_codes(packed.numpy().tobytes(), code_layout(model))
        except CodesError as err:
            raise StoreError(f"{what}: corrupt codes ({first_line(err)})") from None
        decode(model, codes)
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(("bn.", "other."))}
        if len(state) + 1 != len(tensors):
            raise StoreError(f"{what} holds unexpected tensors")
        bn, other = split_state(model)
        check_state(state, {**bn, **other}, what)
        model.load_state_dict(state, strict=False)
        return model.eval(), task, codes


def _stored(model: nn.Module) -> dict[str, Tensor]:
    """What a task file holds of a model besides its codes (``num_batches_tracked`` aside: nothing reads it)."""
    bn, other = stored_state(model)
    return {k: v for k, v in {**bn, **other}.items() if not k.endswith("num_batches_tracked")}


def _convert_nws(run: EarlierNWSRun, manifest: dict[str, Any], changed: dict[str, bytes], notes: list[str]) -> None:
    """Today's files and task records of an NWS run: the spec with its models' biases, a reference, every task
    in format 2 with its ``reference_bytes``."""
    if run.spec.biases:
        _, meta, _ = read_file(run.files[POOLS], "nws-pools", run.what(POOLS))
        changed[POOLS] = pack_file("nws-pools", run.books, {**meta, "spec": run.spec.to_json()})
        changed[SOURCE] = pack_file("nws-source", run.source, {"spec": run.spec.to_json()})
        notes.append(f"spec: the biases of {', '.join(run.spec.biases)} recorded (the models had them)")
    if "spec" in manifest or run.spec.biases:
        manifest["spec"] = run.spec.to_json()
    if REFERENCE not in run.files and manifest["tasks"]:
        changed[REFERENCE] = reference_bytes(run.source_model(), run.fingerprint)
        notes.append(f"{REFERENCE}: written (the source network's indices, which tasks are now coded against)")
    for entry in manifest["tasks"]:
        model, task, version = run.task(entry["file"])
        if task["index"] != entry["index"] or task["name"] != entry["name"]:
            raise StoreError(f"{run.what(entry['file'])} holds another task than the manifest lists")
        if version == 1:
            data, sizes = task_bytes(model, task, run.fingerprint, run.reference(), SOURCE_REFERENCE)
            changed[entry["file"]] = data
            entry["bytes"] = sizes
        entry.setdefault("reference_bytes", reference_task_bytes(model))
    rewritten = [name for name in changed if name.startswith("task_")]
    if rewritten:
        notes.append(f"{len(rewritten)} task file(s) rewritten in format {TASK_VERSION} (coded against the reference)")


def _verify_nws(run: EarlierNWSRun, staged: TaskStore, rewritten: set[str]) -> None:
    """Every rewritten task decodes to the codes and state its earlier file holds."""
    for entry in staged.tasks():
        if entry["file"] not in rewritten:
            continue
        old, _, _ = run.task(entry["file"])
        new = staged.model(entry["index"])
        codes = staged.codes(entry["index"])
        a, b = _stored(old), _stored(new)
        same = (set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
                and all(torch.equal(codes[k], v) for k, v in run.codes[entry["index"]].items()))
        if not same:
            raise StoreError(f"upgrade of {staged.root.parent}: {entry['file']} does not rebuild to its earlier "
                             "model; nothing was changed")


# ----------------------------------------------------------------------------------- the run


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise StoreError(f"run directory {root} does not exist")
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StoreError(f"{root} is not an nws run (no {MANIFEST})") from None
    except (OSError, ValueError, RecursionError) as err:
        raise StoreError(f"{path} is corrupt or unreadable ({first_line(err)})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == "nws-run" and is_int(manifest.get("version"))):
        raise StoreError(f"{path} is not an nws run manifest")
    if manifest["version"] > MANIFEST_VERSION:
        raise StoreError(f"{path} has format version {manifest['version']}, newer than this nws reads; upgrade nws")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise StoreError(f"{path} is corrupt (its checksum does not match its content); nothing was changed")
    if not (isinstance(manifest.get("files"), dict) and isinstance(manifest.get("tasks"), list)):
        raise StoreError(f"{path} is corrupt (bad files or tasks entry)")
    return manifest


def _read_listed(root: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every listed file, verified against the manifest's size and sha256."""
    files = {}
    for name, entry in manifest["files"].items():
        try:
            data = (root / name).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {root / name} ({err.strerror}); nothing was changed") from None
        if not isinstance(entry, dict) or len(data) != entry.get("size") or sha256(data) != entry.get("sha256"):
            raise StoreError(f"{root / name} is corrupt (size or sha256 differs from the manifest); nothing was "
                             "changed")
        files[name] = data
    return files


def _earlier_results(root: Path, manifest: dict[str, Any]) -> list[float] | None:
    """Each task's accuracy after the whole sequence as the run's ``results.json`` records it, in the manifest's
    task order (None: the run has no results yet)."""
    file = root / RESULTS
    if not file.is_file():
        return None
    try:
        results = json.loads(file.read_text())
        names = [t["name"] for t in results["tasks"]]
        finals = [float(t.get("acc_final", t["acc_from_storage"])) for t in results["tasks"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{file} is not a results file of nws ({first_line(err)}); nothing was changed") from None
    if names != [t["name"] for t in manifest["tasks"]]:
        raise StoreError(f"{file} records other tasks than the manifest lists; nothing was changed")
    return finals


def _earlier_format(results: dict[str, Any]) -> bool:
    """Whether ``results`` (a ``results.json``) is of an earlier format than today's."""
    return "format" not in results or (isinstance(results.get("version"), int)
                                       and results["version"] < RESULTS_VERSION)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _finish(root: Path, staging: Path) -> None:
    """Move the verified files listed in ``COMMIT`` into the run (the manifest last), then drop the staging."""
    names = json.loads((staging / COMMIT).read_text())
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, root / name)
            crash_point(name, "moved")
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(staging)


def upgrade(path: str | os.PathLike) -> list[str]:
    """Rewrite the run at ``path`` into today's formats (see the module docstring); returns what changed, one
    line each (empty: the run was already of today's formats). :class:`StoreError` for a run that cannot be
    upgraded (damaged, unknown, or newer), with nothing changed."""
    root = Path(path)
    staging = root / STAGING
    if (staging / COMMIT).is_file():  # verified, partly moved in: finish
        _finish(root, staging)
        return [f"finished the interrupted upgrade of {root}"]
    if staging.exists():  # interrupted before it was verified: the run is untouched
        shutil.rmtree(staging)
    manifest = _read_manifest(root)
    finals = _earlier_results(root, manifest)
    old_results = finals is not None and _earlier_format(json.loads((root / RESULTS).read_text()))
    if manifest["version"] == MANIFEST_VERSION and not old_results:
        return []
    files = _read_listed(root, manifest)
    notes: list[str] = []
    changed: dict[str, bytes] = {}
    if manifest["version"] < MANIFEST_VERSION:
        notes.append(f"{MANIFEST}: version {manifest['version']} -> {MANIFEST_VERSION}")
        if "method" not in manifest:
            manifest["method"] = "nws"  # before nws recorded the method, every run was NWS's
            notes.append(f"{MANIFEST}: method nws recorded")
        if manifest["method"] == "nws":
            run = EarlierNWSRun(root, files)
            _convert_nws(run, manifest, changed, notes)
    manifest["version"] = MANIFEST_VERSION
    staging.mkdir()
    for name, data in changed.items():
        atomic_write(staging / name, data)
    for name in manifest["files"]:
        if name not in changed:
            _link(root / name, staging / name)
    for name, data in changed.items():
        manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
    atomic_write(staging / MANIFEST, manifest_bytes(manifest))
    store = open_run(str(staging))
    if changed or any("memory_after" not in t for t in store.tasks()):
        shared, total = store.size(store.shared_files()), 0
        for t in store.tasks():
            total += store.size([t["file"]])
            store.task_entry(t["index"])["memory_after"] = shared + total
        store.write_manifest()
        notes.append(f"{MANIFEST}: what serving tasks 0..t takes recorded for every task (memory_after)")
    store = open_run(str(staging))  # verify: every file, every task rebuilt by today's readers
    store.check()
    for t in store.tasks():
        store.model(t["index"])
    if changed and manifest["method"] == "nws":
        _verify_nws(run, store, {name for name in changed if name.startswith("task_")})
    moved = [*changed]
    if finals is not None:
        results = check_results(results_from(store, finals), str(staging / RESULTS))
        write_results(staging, results)
        moved += [RESULTS, RESULTS_MD]
        notes.append(f"{RESULTS}, {RESULTS_MD}: written in today's format from the recorded accuracies")
    atomic_write(staging / COMMIT, json.dumps([*moved, MANIFEST]).encode())
    _finish(root, staging)
    return notes
