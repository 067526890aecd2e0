"""The task store: formats, atomic writes, and every bad file failing with StoreError (never another error)."""

from __future__ import annotations

import ast
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from store_fixtures import SPEC, edit_header, edit_meta, load_everything, make_store, reseal, tensor_span

from nws.cli import main
from nws.convert import nws_layers
from nws.packing import pack_codes
from nws.methods.nws import POOLS, TaskStore
from nws.store import (MANIFEST, SOURCE, StoreError, atomic_write, manifest_bytes, pack_file,
                       parse_manifest, task_file, unpack_file)
from nws.taskfile import TASK_VERSION, split_state

SEED = 1234
CUTS = 8  # truncations per file
FLIPS = 12  # bit flips per file


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "run").root


@pytest.fixture()
def run(pristine, tmp_path) -> Path:
    """A fresh copy of the store, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def store_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ----------------------------------------------------------------------------------- good stores


def test_roundtrip_rebuilds_the_stored_model(run):
    store = load_everything(run)
    x = torch.randn(4, 1, 8, 8)
    again = TaskStore(run)
    for t in store.tasks():
        assert torch.equal(store.model(t["index"])(x), again.model(t["index"])(x))
    assert store.model(0) is store.model(0)  # cached
    assert [t["index"] for t in store.tasks()] == [0, 1, 2, 3, 4]
    assert store.spec() == SPEC


def test_equal_content_gives_equal_bytes(run, tmp_path):
    """File bytes depend on content alone (safetensors' header order is not stable between processes)."""
    other = make_store(tmp_path / "again").root
    for name in store_files(run):
        if name != MANIFEST:
            assert (run / name).read_bytes() == (other / name).read_bytes(), name


def test_manifest_lists_every_file_with_size_and_sha256(run):
    import hashlib

    manifest = json.loads((run / MANIFEST).read_bytes())
    on_disk = set(store_files(run)) - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (run / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_atomic_write_leaves_no_temporary_and_keeps_permissions(tmp_path):
    atomic_write(tmp_path / "f.bin", b"one")
    atomic_write(tmp_path / "f.bin", b"two")
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (tmp_path / "f.bin").stat().st_mode & 0o044  # readable as any file the user creates, not 0600


def test_stale_temporaries_are_removed(run):
    (run / ".task_004.safetensors.0123abcd.tmp").write_bytes(b"half")
    (run / "keep.txt").write_bytes(b"user file")
    removed = TaskStore(run).remove_temporaries()
    assert [p.name for p in removed] == [".task_004.safetensors.0123abcd.tmp"]
    assert (run / "keep.txt").exists()


def test_create_refuses_an_existing_run(run):
    before = (run / MANIFEST).read_bytes()
    with pytest.raises(StoreError, match="already holds a run"):
        TaskStore(run, create=True)
    assert (run / MANIFEST).read_bytes() == before


# ----------------------------------------------------------------------------------- corruption


def _cuts(size: int, rng: random.Random) -> list[int]:
    return sorted({0, 1, 7, 8, size - 1, *(rng.randrange(size) for _ in range(CUTS))})


def _flips(size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(8 * size) for _ in range(FLIPS)]


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _same_meaning(root: Path, original: dict) -> bool:
    return json.loads((root / MANIFEST).read_bytes()) == original


@pytest.mark.parametrize("name", [MANIFEST, POOLS, SOURCE, *(task_file(i) for i in range(5))])
def test_truncated_and_bit_flipped_files_raise_store_error(pristine, tmp_path, name):
    """Every file truncated at seeded random offsets and bit-flipped at seeded random positions: loading the
    store raises StoreError. A flip in the manifest may keep its meaning (``4e-05`` and ``4E-05``), and
    then loads the same store."""
    rng = random.Random(f"{SEED}:{name}")
    good = (pristine / name).read_bytes()
    original = json.loads((pristine / MANIFEST).read_bytes())
    damaged = [good[:cut] for cut in _cuts(len(good), rng)] + [_flip(good, b) for b in _flips(len(good), rng)]
    for i, data in enumerate(damaged):
        root = Path(shutil.copytree(pristine, tmp_path / f"case{i}"))
        (root / name).write_bytes(data)
        try:
            load_everything(root)
        except StoreError as err:
            assert "\n" not in str(err)
            continue
        assert name == MANIFEST and len(data) == len(good) and _same_meaning(root, original), f"case {i} loaded"


@pytest.mark.parametrize("name", [POOLS, SOURCE, task_file(2)])
def test_resealed_damage_is_caught_by_the_readers(pristine, tmp_path, name):
    """The same damage with the manifest updated to match (so the size/sha256 check passes): the file's own
    reader must still refuse it with StoreError, or (a flip in tensor data) load it; never another error."""
    rng = random.Random(f"{SEED}:reseal:{name}")
    good = (pristine / name).read_bytes()
    cases = [(good[:cut], True) for cut in _cuts(len(good), rng)]
    cases += [(_flip(good, b), False) for b in _flips(len(good), rng)]
    for i, (data, must_fail) in enumerate(cases):
        root = Path(shutil.copytree(pristine, tmp_path / f"case{i}"))
        (root / name).write_bytes(data)
        reseal(root, name)
        try:
            load_everything(root)
        except StoreError:
            continue
        assert not must_fail, f"truncation {i} of {name} loaded"


def test_empty_files(run):
    for name in [MANIFEST, POOLS, task_file(0)]:
        root = Path(shutil.copytree(run, run.parent / f"empty-{name}"))
        (root / name).write_bytes(b"")
        with pytest.raises(StoreError, match="corrupt|empty"):
            load_everything(root)
        if name != MANIFEST:
            reseal(root, name)
            with pytest.raises(StoreError, match="empty or truncated"):
                load_everything(root)


def test_missing_directory_and_missing_files(run, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        TaskStore(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="not an nws run"):
        TaskStore(tmp_path)
    (run / task_file(3)).unlink()
    store = TaskStore(run)
    store.model(2)
    with pytest.raises(StoreError, match="cannot read"):
        store.model(3)
    with pytest.raises(StoreError, match="task_003"):
        store.check()
    with pytest.raises(StoreError, match="no task 9"):
        store.model(9)


def test_newer_format_versions_are_refused(run):
    data = edit_header((run / task_file(1)).read_bytes(), lambda h: h["__metadata__"].update(version="3"))
    (run / task_file(1)).write_bytes(data)
    reseal(run, task_file(1))
    with pytest.raises(StoreError, match="format version 3, newer"):
        TaskStore(run).model(1)
    manifest = json.loads((run / MANIFEST).read_bytes())
    manifest["version"] = 3
    (run / MANIFEST).write_bytes(manifest_bytes(manifest))
    with pytest.raises(StoreError, match="format version 3, newer"):
        TaskStore(run)


def test_task_encoded_against_other_pools(run, tmp_path):
    other = make_store(tmp_path / "other", num_tasks=1, seed=7).root
    shutil.copy(other / task_file(0), run / task_file(0))
    reseal(run, task_file(0))
    for read in (TaskStore(run).model, TaskStore(run).codes):
        with pytest.raises(StoreError, match="different pools"):
            read(0)


def test_task_record_with_other_classes(run):
    """A task's model is the run's with its own number of classes: a record naming three classes gives a
    classifier the codes and state do not fit, refused before decoding."""
    name = task_file(1)
    data = edit_meta((run / name).read_bytes(), "task", lambda t: {**t, "classes": t["classes"] + ["x"]})
    (run / name).write_bytes(data)
    reseal(run, name)
    for read in (TaskStore(run).model, TaskStore(run).codes):
        with pytest.raises(StoreError, match="corrupt codes.*other layers"):
            read(1)


def test_task_with_a_bad_reference_record(run):
    name = task_file(1)
    for against, needle in [(1, "bad reference"), (-1, "bad reference"), ("previous", "bad reference"),
                            (0, "corrupt codes.*reference")]:
        data = edit_meta((run / name).read_bytes(), "reference", lambda _: against)
        root = Path(shutil.copytree(run, run.parent / f"ref-{against}"))
        (root / name).write_bytes(data)
        reseal(root, name)
        with pytest.raises(StoreError, match=needle):
            TaskStore(root).model(1)


def test_codes_are_read_without_building_the_model(run):
    store = TaskStore(run)
    for t in store.tasks():
        codes = store.codes(t["index"])
        model = store.model(t["index"])
        assert list(codes) == [name for name, _ in nws_layers(model)]
        assert all(torch.equal(codes[name], layer.search()) for name, layer in nws_layers(model))


def test_task_codes_with_another_layout(run):
    """Codes that decode fine but hold one index too many for the classifier: refused by both readers
    before decoding (a crafted stream cannot make them allocate more than the model's own indices)."""
    name = task_file(1)
    tensors, meta = unpack_file((run / name).read_bytes(), "nws-task", name, TASK_VERSION)
    store = TaskStore(run)
    codes = store.codes(1)
    codes["fc"] = torch.cat([codes["fc"], torch.zeros(1, dtype=torch.long)])
    packed = pack_codes(codes, SPEC.pool_size, reference=store.reference_codes())
    tensors["codes"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    (run / name).write_bytes(pack_file("nws-task", tensors, meta, TASK_VERSION))
    reseal(run, name)
    for read in (TaskStore(run).model, TaskStore(run).codes):
        with pytest.raises(StoreError, match="corrupt codes.*other layers"):
            read(1)


def test_task_file_under_another_index(run):
    (run / task_file(1)).write_bytes((run / task_file(2)).read_bytes())
    reseal(run, task_file(1))
    with pytest.raises(StoreError, match="holds task 2"):
        TaskStore(run).model(1)


def test_non_finite_values_in_a_file_are_refused(run):
    name = task_file(0)
    key = "bn.float32"
    header_end = 8 + int.from_bytes((run / name).read_bytes()[:8], "little")
    data = bytearray((run / name).read_bytes())
    header = json.loads(data[8:header_end])
    start = header_end + header[key]["data_offsets"][0]
    data[start : start + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    (run / name).write_bytes(bytes(data))
    reseal(run, name)
    with pytest.raises(StoreError, match="non-finite"):
        TaskStore(run).model(0)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}), "bad file name"),
    (lambda m: m["tasks"][0].update(file=".hidden"), "bad task entry"),
    (lambda m: m["tasks"][0].update(acc_after_training="high"), "bad numbers"),
    (lambda m: m["tasks"].append(dict(m["tasks"][0])), "bad task entry"),
    (lambda m: m.update(config=[1, 2]), "bad config"),
    (lambda m: m["files"][POOLS].update(size=-1), "bad entry"),
    (lambda m: m.update(files=[]), "bad files"),
])
def test_manifest_entries_are_checked(run, edit, needle):
    manifest = json.loads((run / MANIFEST).read_bytes())
    edit(manifest)
    data = manifest_bytes(manifest)
    with pytest.raises(StoreError, match=needle):
        parse_manifest(data)
    tampered = json.loads(data)
    tampered["tasks"] = []
    with pytest.raises(StoreError, match="checksum"):
        parse_manifest(json.dumps(tampered).encode())


def test_read_refuses_paths_outside_the_run(run):
    with pytest.raises(StoreError, match="not a valid file name"):
        TaskStore(run).read("../manifest.json")


# ----------------------------------------------------------------------------------- the CLI


def test_eval_reports_a_corrupt_task_and_evaluates_the_others(run, capsys):
    data = bytearray((run / task_file(2)).read_bytes())
    data[len(data) // 2] ^= 0x10
    (run / task_file(2)).write_bytes(bytes(data))
    assert main(["eval", "--run", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert [line.startswith(f"task {i} ") for i, line in enumerate(lines)] == [True] * 5
    assert "FAILED" in lines[2] and "task_002.safetensors is corrupt" in lines[2]
    assert all("accuracy" in line for i, line in enumerate(lines) if i != 2)


def _damage_codes(run: Path, index: int) -> None:
    """Flip a bit in the middle of task ``index``'s codes and record the file as written so (the task file's
    own reader must find it, not the manifest's checksum)."""
    name = task_file(index)
    data = bytearray((run / name).read_bytes())
    start, end = tensor_span(bytes(data), "codes")
    data[(start + end) // 2] ^= 0x10
    (run / name).write_bytes(bytes(data))
    reseal(run, name)


def test_a_damaged_task_leaves_the_later_tasks_intact(run, capsys):
    """Coded against the run's reference (the default), every task decodes from the shared files and its own
    file alone: with task 1's codes damaged, tasks 2.. rebuild exactly as before and evaluate."""
    before = TaskStore(run)
    states = {i: before.model(i).state_dict() for i in range(5)}
    _damage_codes(run, 1)
    store = TaskStore(run)
    with pytest.raises(StoreError, match="task_001.safetensors: corrupt codes"):
        store.model(1)
    for i in (0, 2, 3, 4):
        state = store.model(i).state_dict()
        assert all(torch.equal(state[k], v) for k, v in states[i].items()), i
    assert main(["eval", "--run", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert ["FAILED" in line for line in lines] == [False, True, False, False, False]
    assert all("accuracy" in line for i, line in enumerate(lines) if i != 1)


def test_a_chain_of_tasks_breaks_until_the_next_key_task(tmp_path):
    """Coded against the previous task (key tasks 0 and 3 against the reference): task 1's damage takes task 2
    with it; the key task 3 and task 4 still rebuild exactly."""
    run = make_store(tmp_path / "chain", key_every=3).root
    store = TaskStore(run)
    assert [t["index"] for t in store.tasks()] == list(range(5))
    states = {i: store.model(i).state_dict() for i in range(5)}
    _damage_codes(run, 1)
    store = TaskStore(run)
    for i in (1, 2):
        with pytest.raises(StoreError, match="task_001.safetensors: corrupt codes"):
            store.model(i)
    for i in (0, 3, 4):
        state = store.model(i).state_dict()
        assert all(torch.equal(state[k], v) for k, v in states[i].items()), i


def test_a_chain_decodes_to_the_same_models_as_the_reference_coding(tmp_path):
    """The same tasks stored both ways rebuild to identical networks (lossless either way), from a fresh
    reader in any order."""
    by_source = TaskStore(make_store(tmp_path / "source").root)
    chained = TaskStore(make_store(tmp_path / "chain", key_every=2).root)
    for i in (4, 1, 3, 0, 2):
        a, b = by_source.model(i).state_dict(), chained.model(i).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), i
        assert all(torch.equal(by_source.codes(i)[k], chained.codes(i)[k]) for k in by_source.codes(i))
    metas = [unpack_file((chained.root / task_file(i)).read_bytes(), "nws-task", "t", TASK_VERSION)[1]["reference"]
             for i in range(5)]
    assert metas == ["source", 0, "source", 2, "source"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_stored_in_half_precision(tmp_path, dtype):
    """``model.bn_dtype``: BatchNorm comes back as its float32 values rounded to ``dtype``, in half the bytes;
    the indices and every other entry are unchanged."""
    exact = TaskStore(make_store(tmp_path / "exact").root)
    half = TaskStore(make_store(tmp_path / "half", bn_dtype=str(dtype).removeprefix("torch.")).root)
    name = f"bn.{str(dtype).removeprefix('torch.')}"
    for i in range(5):
        bn, other = split_state(exact.model(i))
        rebuilt = half.model(i).state_dict()
        assert all(torch.equal(rebuilt[k], v.to(dtype).float() if v.is_floating_point() else v) for k, v in bn.items())
        assert all(torch.equal(rebuilt[k], v) for k, v in other.items())
        assert any(not torch.equal(rebuilt[k], v) for k, v in bn.items())  # really rounded
        assert all(torch.equal(half.codes(i)[k], exact.codes(i)[k]) for k in exact.codes(i))
        sizes, exact_sizes = half.tasks()[i]["bytes"], exact.tasks()[i]["bytes"]
        assert 2 * sizes["batchnorm"] == exact_sizes["batchnorm"] and sizes["indices"] == exact_sizes["indices"]
        tensors = unpack_file((half.root / task_file(i)).read_bytes(), "nws-task", "t", TASK_VERSION)[0]
        assert name in tensors and "bn.float32" not in tensors


def test_batchnorm_beyond_float16_is_refused_before_writing(run):
    store = TaskStore(run)
    model = store.model(4)
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))) \
        .running_var.fill_(1e6)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(StoreError, match="beyond float16's range: store it as bfloat16"):
        store.save_task(5, model, "digits 0/1", ["0", "1"], bn_dtype="float16")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_batchnorm_in_two_precisions_is_refused(run):
    def split(header):
        meta = header["bn.float32"]
        start, end = meta["data_offsets"]
        half = start + (end - start) // 8 * 4
        header["bn.float32"] = {**meta, "shape": [(half - start) // 4], "data_offsets": [start, half]}
        header["bn.float16"] = {"dtype": "F16", "shape": [(end - half) // 2], "data_offsets": [half, end]}

    (run / task_file(2)).write_bytes(edit_header((run / task_file(2)).read_bytes(), split))
    reseal(run, task_file(2))
    with pytest.raises(StoreError, match="more than one precision"):
        TaskStore(run).model(2)


def test_eval_on_a_corrupt_manifest_is_one_line_and_exit_2(run, capsys):
    (run / MANIFEST).write_bytes((run / MANIFEST).read_bytes()[:100])
    assert main(["eval", "--run", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "manifest.json is corrupt" in captured.err


# ----------------------------------------------------------------------------------- no pickle


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _unsafe_calls(path: Path) -> list[str]:
    """Code in ``path`` that could unpickle (or otherwise run code from) a file: a plain unpickler, torch or
    NumPy loads that allow pickles, unsafe YAML loaders, Lightning checkpoints without ``weights_only``.
    A subclass of ``pickle.Unpickler`` that restricts ``find_class`` (as ``torch.load(weights_only=True)``
    does) is allowed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"{path.name}:{node.lineno} unpickler {node.name} does not restrict find_class")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = ast.unparse(node.func.value)
        attr = node.func.attr
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if owner in UNSAFE_MODULES and ("load" in attr or attr in ("Unpickler", "open")):
            found.append(f"{path.name}:{node.lineno} {owner}.{attr}")
        if owner == "torch" and attr == "load" and kwargs.get("weights_only") != "True":
            found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
        if owner in ("np", "numpy") and attr == "load" and kwargs.get("allow_pickle", "False") != "False":
            found.append(f"{path.name}:{node.lineno} np.load with allow_pickle")
        if owner == "yaml" and (attr in ("unsafe_load", "full_load", "unsafe_load_all")
                                or attr == "load" and "Safe" not in kwargs.get("Loader", "")):
            found.append(f"{path.name}:{node.lineno} yaml.{attr} without a safe loader")
        if attr == "fit" and "ckpt_path" in kwargs and kwargs.get("weights_only") != "True":
            found.append(f"{path.name}:{node.lineno} Lightning checkpoint loaded without weights_only=True")
    return found


def test_the_unpickling_check_finds_unsafe_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, yaml\nclass U(pickle.Unpickler):\n    pass\n"
                   "pickle.load(f)\ntorch.load(p)\nyaml.load(s)\ntrainer.fit(m, ckpt_path=c)\n")
    assert len(_unsafe_calls(bad)) == 5


def test_no_code_path_unpickles_a_file():
    package = Path(__file__).parent.parent / "nws"
    found = [f for path in sorted(package.rglob("*.py")) for f in _unsafe_calls(path)]
    assert found == []
