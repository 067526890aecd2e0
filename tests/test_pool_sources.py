"""Pools without pretraining: k-means, ordinary checkpoints, the reference implementation's layout, the CLI."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nws
from nws.cli import main
from nws.convert import nws_layers
from nws.models import create_model
from nws.pool_sources import (CheckpointError, import_reference, kmeans, model_from_state_dict, pools_from_model,
                              read_checkpoint, reference_module_name, reference_pools)
from nws.exhaustive import brute_force_nearest
from nws.methods.nws import TaskStore
from nws.taskfile import layer_shapes


def blobs(n_per: int = 200, k: int = 6, d: int = 9, spread: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen) * 3
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(k * n_per, d, generator=gen)
    return x[torch.randperm(len(x), generator=gen)], centres


# ------------------------------------------------------------------------------------------------ k-means


def test_kmeans_is_deterministic_and_independent_of_chunking():
    x, _ = blobs()
    a = kmeans(x, 16, iters=10, seed=3)
    assert torch.equal(a, kmeans(x, 16, iters=10, seed=3))
    assert torch.equal(a, kmeans(x, 16, iters=10, seed=3, chunk_elements=2048))
    assert not torch.equal(a, kmeans(x, 16, iters=10, seed=4))


def test_kmeans_recovers_separated_clusters():
    x, centres = blobs()
    found = kmeans(x, len(centres), iters=20, seed=0)
    dist = torch.cdist(found, centres)
    assert sorted(dist.argmin(1).tolist()) == list(range(len(centres)))  # one centre per cluster
    assert dist.min(1).values.max() < 0.02  # each at its cluster's mean (noise 0.05 / sqrt(200))


def test_kmeans_is_a_fixed_point_of_lloyd():
    x, _ = blobs(spread=0.5)
    c = kmeans(x, 12, iters=100, seed=0)
    assign = brute_force_nearest(x, c)
    means = torch.stack([x[assign == j].double().mean(0) for j in range(12)]).float()
    torch.testing.assert_close(c, means, rtol=0, atol=1e-6)


def test_kmeans_with_fewer_distinct_vectors_than_entries():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(50, 1)
    c = kmeans(x, 8, seed=0)
    assert c.shape == (8, 2) and torch.isfinite(c).all()
    assert len(torch.unique(c, dim=0)) == 8  # extra entries differ
    assert {tuple(r) for r in c[brute_force_nearest(x, c)].tolist()} == {(1.0, 0.0), (0.0, 1.0)}  # exact fit


def test_kmeans_fixed_rows_stay():
    x, _ = blobs()
    c = kmeans(x, 10, seed=0, fixed=torch.zeros(1, 9))
    assert torch.equal(c[0], torch.zeros(9))
    with pytest.raises(ValueError):
        kmeans(x, 1, fixed=torch.zeros(1, 9))
    with pytest.raises(ValueError):
        kmeans(torch.zeros(0, 3), 4)


def small_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=4, widths=(8, 16))


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """The reference's ``o (g i) h w -> (o i) (g h w)``, written independently of the library."""
    o, cin = w.shape[:2]
    w = w.reshape(o, g, cin // g, -1).permute(0, 2, 1, 3)
    return w.reshape(o * (cin // g), -1)


def _ungrouped(vectors: torch.Tensor, shape: tuple[int, ...], g: int) -> torch.Tensor:
    """The reference's ``o i (g h w) -> o (g i) h w`` (its ``rearrange`` of searched kernels into a weight)."""
    o, cin = shape[:2]
    spatial = tuple(shape[2:])
    w = vectors.reshape(o, cin // g, g, *spatial).transpose(1, 2)
    return w.reshape(shape)


def test_pools_from_model_quantises_each_layer():
    model = small_convnet()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")
               and isinstance(m, (nn.Conv2d, nn.Linear))}
    model, report = nws.pools_from_model(model, pool_size=32, seed=1)
    layers = dict(nws_layers(model))
    assert [r.name for r in report] == list(layers) == list(weights)
    for r in report:
        layer = layers[r.name]
        assert torch.equal(layer.weight, weights[r.name])  # temporary weights stay the source weights
        assert not layer.pool.trainable
        expected = (layer.weight - layer.searched_weight()).pow(2).mean().item()
        assert r.mse == pytest.approx(expected, rel=1e-6)
    first = report[0]
    assert first.kernels == 8 and first.mse == 0.0  # fewer kernels than entries: each kernel is an entry


@pytest.mark.parametrize("g", [1, 2])
def test_pools_from_model_are_lloyd_fixed_points(g):
    """Each pool, checked by brute force against the grouped kernels (grouped here, not by the library): every
    kernel's nearest entry is the one the layer searches, and every used entry is the mean of its kernels."""
    model, _ = pools_from_model(small_convnet(), pool_size=16, group_size=g, iters=200, seed=0)
    dims = {n: layer.pool.dim for n, layer in nws_layers(model)}
    assert dims == {"features.0": 9, "features.4": 9 * g, "fc": 1}  # 1 input channel; 8; the Linear at g = 1
    for name, layer in nws_layers(model):
        w, book = layer.weight.detach(), layer.pool.codebook
        kernels = _grouped(w, dims[name] // (w[0, 0].numel() if w.ndim > 2 else 1))
        assign = brute_force_nearest(kernels, book)
        assert torch.equal(layer.search(), assign), name
        for j in assign.unique().tolist():
            torch.testing.assert_close(book[j], kernels[assign == j].double().mean(0).float(), rtol=0, atol=1e-6)


def test_pools_from_model_at_group_size_2_by_hand():
    """Grouped kernels built as copies of three 18-vectors (and a Linear of three values): k-means with K = 3
    finds exactly those, and every searched weight is the source weight."""
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 18, generator=gen)
    conv_idx = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 2, 1])  # (o, i) for 6 outputs x 2 groups of 2 channels
    values = torch.tensor([-0.5, 0.25, 1.0])
    net = nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(_ungrouped(vectors[conv_idx], (6, 4, 3, 3), 2))
        net[4].weight.copy_(values[torch.arange(18) % 3].reshape(3, 6))
    model, report = pools_from_model(net, pool_size=3, group_size=2, seed=0)
    conv, lin = model[0], model[4]
    assert (conv.group_size, lin.group_size) == (2, 1)
    assert sorted(map(tuple, conv.pool.codebook.tolist())) == sorted(map(tuple, vectors.tolist()))
    assert sorted(lin.pool.codebook.flatten().tolist()) == values.tolist()
    assert torch.equal(vectors[conv_idx], conv.pool.codebook[conv.search()])
    assert all(torch.equal(layer.searched_weight(), layer.weight) for layer in (conv, lin))
    assert [r.mse for r in report] == [0.0, 0.0]


# ----------------------------------------------------------------------------- the reference's checkpoints


def reference_name(ours: str) -> str:
    """Inverse of :func:`reference_module_name`, for building reference-layout checkpoints."""
    if ours in ("conv1", "bn1", "fc"):
        return {"conv1": "conv1.0", "bn1": "conv1.1", "fc": "last_layer"}[ours]
    stage, block, *sub = ours.split(".")
    sub = ".".join(sub)
    part = {"conv1": "residual_function.0", "bn1": "residual_function.1", "conv2": "residual_function.3",
            "bn2": "residual_function.4", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}[sub]
    return f"conv{int(stage[5:]) + 1}_x.NwsRes{block}.{part}"


def reference_checkpoint(k: int = 8, classes: int = 10, seed: int = 0, group_size: int = 1) -> tuple[dict, dict, nn.Module,
                                                                                                  dict]:
    """A checkpoint in the reference layout at group size g: ({model, optimizer, scheduler, epochs}, its (d, K)
    pools, the plain network whose weights it holds, and the entry each grouped kernel is).

    Layers follow the reference's policy: the 3x3 convs at g, the 1x1 shortcuts and classifier at 1, and the
    7x7 stem at gcd(g, 3) (the reference cannot build g = 2 there; nws uses 1). Every temporary weight is
    made of pool entries at random indices, laid out by the reference's rearrangement.
    """
    gen = torch.Generator().manual_seed(seed)
    net = create_model("resnet18", num_classes=classes, stem="imagenet", maxpool=False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
            m.weight.data.normal_(generator=gen)
    state, pools, indices = {}, {}, {}
    for key, value in net.state_dict().items():
        module, _, leaf = key.rpartition(".")
        ref = reference_name(module)
        if leaf == "weight" and isinstance(net.get_submodule(module), (nn.Conv2d, nn.Linear)):
            shape = value.shape if value.ndim == 4 else (*value.shape, 1, 1)
            g = {9: group_size, 49: math.gcd(group_size, 3), 1: 1}[shape[2] * shape[3]]
            d = g * shape[2] * shape[3]
            embed = torch.randn(d, k, generator=gen)
            idx = torch.randint(k, (shape[0] * shape[1] // g,), generator=gen)
            value = _ungrouped(embed.t()[idx], tuple(shape), g)
            net.get_submodule(module).weight.data.copy_(value.reshape(net.get_submodule(module).weight.shape))
            pools[module], indices[module] = embed, idx
            q = f"module.{ref}.qtz."
            state.update({q + "embed": embed, q + "cluster_size": torch.rand(k, generator=gen),
                          q + "embed_avg": torch.randn(d, k, generator=gen), q + "acum_embed_sum": torch.zeros(d, k),
                          q + "acum_embed_onehot_sum": torch.zeros(k)})
        state[f"module.{ref}.{leaf}"] = value
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [100])
    ckpt = {"model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epochs": 160}
    return ckpt, pools, net, indices


def test_reference_names_follow_the_layout():
    assert reference_module_name("conv1.0") == "conv1"
    assert reference_module_name("conv2_x.NwsRes1.residual_function.3") == "layer1.1.conv2"
    assert reference_module_name("conv4_x.NwsRes0.shortcut.0") == "layer3.0.downsample.0"
    assert reference_module_name("last_layer") == "fc"
    assert reference_module_name("conv6_x.NwsRes0.residual_function.0") is None


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    ckpt, pools, net, _ = reference_checkpoint()
    path = tmp_path_factory.mktemp("ref") / "pretrain.pth"
    torch.save(ckpt, path)
    return path, pools, net


@pytest.mark.parametrize("g", [1, 2])
def test_import_reference_reproduces_pools_exactly(tmp_path, g):
    ckpt, pools, net, indices = reference_checkpoint(group_size=g)
    torch.save(ckpt, tmp_path / "pretrain.pth")
    model, settings = import_reference(tmp_path / "pretrain.pth")
    assert settings == {"pool_size": 8, "group_size": g, "num_classes": 10, "in_channels": 3}
    layers = dict(nws_layers(model))
    assert set(layers) == set(pools) and len(layers) == 21
    codes = nws.encode(model)
    for name, layer in layers.items():
        assert torch.equal(layer.pool.codebook, pools[name].t())  # the (d, K) buffers transposed
        assert not layer.pool.trainable
        assert layer.group_size == pools[name].shape[0] // layer.weight[0, 0].numel()
        assert torch.equal(codes[name], indices[name]), name  # the reference's grouped-kernel layout
    assert {n for n, layer in layers.items() if layer.group_size == 2} == (
        {f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)} if g == 2 else set())
    plain = net.state_dict()
    assert set(plain) == {k for k in model.state_dict() if ".pool." not in k}  # the classifier has no bias
    for key, value in model.state_dict().items():  # temporary weights, BatchNorm and classifier carried over
        if ".pool." not in key:
            assert torch.equal(value, plain[key]), key
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (2, 2)
    _, spec, _ = reference_pools(tmp_path / "pretrain.pth")
    assert spec.group_size == g and layer_shapes(spec.build()) == layer_shapes(model)  # what a run rebuilds


def test_import_reference_refuses_a_group_size_off_the_policy():
    ckpt, _, _, _ = reference_checkpoint(group_size=2)
    ckpt["model"]["module.conv3_x.NwsRes0.shortcut.0.qtz.embed"] = torch.zeros(2, 8)  # a 1x1 shortcut at g = 2
    with pytest.raises(CheckpointError, match="1x1 layers must have 1"):
        import_reference(ckpt)
    ckpt, _, _, _ = reference_checkpoint(group_size=2)
    ckpt["model"]["module.conv2_x.NwsRes1.residual_function.0.qtz.embed"] = torch.zeros(9, 8)  # one 3x3 at g = 1
    with pytest.raises(CheckpointError, match="not one policy"):
        import_reference(ckpt)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_import_reference_refuses_code_and_wrong_layouts(tmp_path, reference_file):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="weights only"):
        import_reference(evil)
    torch.save({"model": {"module.features.0.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not part of the reference"):
        import_reference(tmp_path / "other.pth")
    ckpt, _, _, _ = reference_checkpoint()
    ckpt["model"]["module.conv1.0.qtz.embed"] = torch.zeros(49, 9)
    with pytest.raises(CheckpointError, match="pool sizes"):
        import_reference(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_reference(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------- ordinary state dicts


def test_model_from_state_dict_strips_prefixes_and_checks_keys():
    net = create_model("convnet", num_classes=3)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    from nws.pool_sources import state_dict_of

    model = model_from_state_dict("convnet", state_dict_of({"state_dict": state}, "x"))
    assert model.fc.out_features == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CheckpointError, match="unexpected"):
        model_from_state_dict("convnet", {**net.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        model_from_state_dict("nonet", net.state_dict())


def test_torchvision_biases_need_bias_true():
    """torchvision's ResNet has a classifier bias, the reference's (and the builder's default) none."""
    tv = create_model("resnet18", num_classes=3, bias=True).state_dict()
    with pytest.raises(CheckpointError, match="bias: true"):
        model_from_state_dict("resnet18", tv)
    model = model_from_state_dict("resnet18", tv, bias=True)
    assert torch.equal(model.fc.bias, tv["fc.bias"])


def test_new_head_drops_a_foreign_classifier():
    net = create_model("convnet", num_classes=3)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state.update({"fc.0.weight": torch.zeros(64, 128), "fc.3.weight": torch.zeros(3, 64)})  # a two-layer head
    with pytest.raises(CheckpointError, match="no fc.weight"):
        model_from_state_dict("convnet", state)
    model = model_from_state_dict("convnet", state, new_head=True, num_classes=5)
    assert model.fc.out_features == 5
    assert torch.equal(model.features[0].weight, net.features[0].weight)


def test_from_checkpoint_cli_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    net = create_model("convnet", num_classes=10, widths=(8, 16))
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    torch.save(net.state_dict(), tmp_path / "net.pth")
    out = tmp_path / "pools"
    argv = ["pools", "from-checkpoint", str(tmp_path / "net.pth"), "--model.name", "convnet", "--model.kwargs",
            "{widths: [8, 16]}", "--model.pool_size", "16", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "features.0" in printed and "--pretrained" in printed
    store = TaskStore(out)
    spec = store.spec()
    assert (spec.name, spec.pool_size, spec.kwargs) == ("convnet", 16, {"in_channels": 1, "widths": [8, 16]})
    source = store.load_source()
    expected, _ = pools_from_model(copy.deepcopy(net), 16)
    for (name, a), (_, b) in zip(nws_layers(source), nws_layers(expected)):
        assert torch.equal(a.pool.codebook, b.pool.codebook), name
        assert torch.equal(a.weight, b.weight), name
    report = json.loads((out / "manifest.json").read_text())["source"]["quantisation"]
    assert [r["name"] for r in report] == [n for n, _ in nws_layers(source)]
    # a run starts its first task from the directory
    run = tmp_path / "run"
    assert main(["demo", "--out", str(run), "--pretrained", str(out), "--model.pool_size", "16", "--model.kwargs",
                 "{widths: [8, 16]}", "--data.num_tasks", "1", "--task.epochs", "1", "--trainer.logger", "none",
                 "--trainer.progress_bar", "false", "--trainer.checkpoint", "false"]) == 0
    assert (run / "pools.safetensors").read_bytes() == (out / "pools.safetensors").read_bytes()
    assert len(json.loads((run / "results.json").read_text())["tasks"]) == 1
    # .safetensors files read the same; an existing output directory is never overwritten
    from_st = read_checkpoint(tmp_path / "net.safetensors")
    assert from_st.keys() == net.state_dict().keys()
    assert all(torch.equal(from_st[k], v) for k, v in net.state_dict().items())
    before = (out / "pools.safetensors").read_bytes()
    assert main([*argv[:2], str(tmp_path / "net.safetensors"), *argv[3:]]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "pools.safetensors").read_bytes() == before


RUN = ["--model.pool_size", "16", "--model.kwargs", "{widths: [8, 16]}", "--task.epochs", "1", "--trainer.logger",
       "none", "--trainer.progress_bar", "false", "--trainer.checkpoint", "false"]


def test_group_size_2_from_checkpoint_to_eval(tmp_path, capsys):
    """g = 2 end to end: k-means pools of a checkpoint, a run from them killed after writing task 1, resumed,
    and every task evaluated from storage, as recorded."""
    import os
    import re
    import subprocess
    import sys

    from nws.store import CRASH_ENV, task_file

    torch.manual_seed(0)
    save_file(create_model("convnet", num_classes=10, widths=(8, 16)).state_dict(), tmp_path / "net.safetensors")
    pools = tmp_path / "pools"
    assert main(["pools", "from-checkpoint", str(tmp_path / "net.safetensors"), "--model.name", "convnet", "--model.kwargs",
                 "{widths: [8, 16]}", "--model.pool_size", "16", "--model.group_size", "2", "--out", str(pools)]) == 0
    assert "--model.group_size 2" in capsys.readouterr().out
    books, _ = TaskStore(pools).pools()
    assert {n: b.shape for n, b in books.items()} == {"features.0": (16, 9), "features.4": (16, 18), "fc": (16, 1)}
    assert TaskStore(pools).spec().group_size == 2

    out = tmp_path / "run"
    argv = ["demo", "--out", str(out), "--pretrained", str(pools), "--model.group_size", "2", "--data.num_tasks", "2",
            *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: f"{task_file(1)}:written"}
    killed = subprocess.run([sys.executable, "-m", "nws.cli", *argv], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    first = (out / task_file(0)).read_bytes()
    assert main([*argv, "--resume"]) == 0
    assert (out / task_file(0)).read_bytes() == first  # a finished task is never rewritten
    store = TaskStore(out)
    assert store.spec().group_size == 2
    assert {n: layer.group_size for n, layer in nws_layers(store.model(1))} == {"features.0": 1, "features.4": 2,
                                                                                  "fc": 1}
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    accs = [float(a) / 100 for a in re.findall(r"accuracy ([\d.]+)%", capsys.readouterr().out)]
    assert accs == pytest.approx([t["acc_from_storage"] for t in results["tasks"]], abs=5e-5)
    assert len(accs) == 2


def test_import_reference_cli(tmp_path, reference_file, capsys):
    path, pools, _ = reference_file
    assert main(["pools", "import-reference", str(path), "--out", str(tmp_path / "ref")]) == 0
    assert "last_layer" not in capsys.readouterr().out
    store = TaskStore(tmp_path / "ref")
    books, _ = store.pools()
    assert all(torch.equal(books[n], pools[n].t()) for n in pools)
    assert store.spec().kwargs == {"in_channels": 3, "stem": "imagenet", "maxpool": False}


@pytest.mark.parametrize("args, needle", [
    (["from-checkpoint", "{missing}", "--model.name", "convnet", "--out", "{out}"], "does not exist"),
    (["from-checkpoint", "{garbage}", "--model.name", "convnet", "--out", "{out}"], "cannot be loaded"),
    (["from-checkpoint", "{net}", "--model.name", "resnet18", "--out", "{out}"], "does not match"),
    (["from-checkpoint", "{net}", "--model.name", "convnet", "--model.kwargs", "[1]", "--out", "{out}"], "mapping"),
    (["from-checkpoint", "{net}", "--model.name", "convnet", "--model.pool_size", "0", "--out", "{out}"], "model.pool_size"),
    (["from-checkpoint", "{net}", "--out", "{out}"], "model.name"),
    (["import-reference", "{net}", "--out", "{out}"], "reference"),
    (["bogus"], "invalid choice"),
])
def test_pools_cli_bad_inputs_are_one_line(tmp_path, capsys, args, needle):
    torch.save(create_model("convnet", num_classes=2).state_dict(), tmp_path / "net.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    paths = {"missing": tmp_path / "nope.pth", "garbage": tmp_path / "garbage.pth", "net": tmp_path / "net.pth",
             "out": tmp_path / "out"}
    assert main(["pools", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nws: error:") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_already_converted_model_gets_kmeans_pools():
    converted = nws.convert(small_convnet(), pool_size=32, init="kernels")
    model, _ = pools_from_model(converted, pool_size=32, seed=1)
    assert model is converted
    expected, _ = pools_from_model(small_convnet(), pool_size=32, seed=1)
    for (_, a), (_, b) in zip(nws_layers(model), nws_layers(expected)):
        assert torch.equal(a.pool.codebook, b.pool.codebook)


def test_run_with_kmeans_pools(tmp_path):
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--model.init", "kmeans", "--pretrain.epochs", "1", "--task.epochs", "1",
                 "--model.pool_size", "16", "--model.kwargs", "{widths: [8, 16]}", "--data.num_tasks", "1",
                 "--trainer.logger", "none", "--trainer.progress_bar", "false", "--trainer.checkpoint", "false"]) == 0
    store = TaskStore(out)
    source = store.manifest["source"]
    assert source["pools"] == "kmeans" and 0 <= source["accuracy_plain"] <= 1
    assert [r["name"] for r in source["quantisation"]] == ["features.0", "features.4", "fc"]
    # the pools are k-means (seeded by the run seed) of the stored starting network's own kernels
    start = store.load_source()
    rebuilt, _ = pools_from_model(copy.deepcopy(start), 16, seed=store.manifest["config"]["seed"])
    for (name, a), (_, b) in zip(nws_layers(start), nws_layers(rebuilt)):
        assert torch.equal(a.pool.codebook, b.pool.codebook), name
