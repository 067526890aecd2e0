"""BatchNorm on a grid (``model.bn_dtype: int8``, :mod:`nws.batchnorm`): folding keeps each layer's affine map up
to its grid; what is stored decodes to the folded network bit for bit; anything else is refused; a folded
network unfolded with a reference's statistics computes the same map; every method stores and rebuilds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from nws.batchnorm import LEVELS, decode_folded, encode_folded, fold_batchnorm, recompute_statistics, unfold_batchnorm
from nws.container import flatten_state, unflatten_state
from nws.errors import StoreError
from nws.methods import open_run
from nws.models import create_model


def trained_bn(channels: int = 24, seed: int = 0) -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=gen) * 2)
        bn.bias.copy_(torch.randn(channels, generator=gen))
        bn.running_mean.copy_(torch.randn(channels, generator=gen) * 3)
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 4 + 0.01)
    return bn.eval()


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm entries of ``model``'s state, as a task file's BatchNorm part holds them."""
    layers = [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return {k: v for k, v in model.state_dict().items() if k.startswith(tuple(layers))
            and not k.endswith("num_batches_tracked")}


def test_folding_keeps_the_map_up_to_the_grid():
    bn = trained_bn()
    x = torch.randn(8, 24, 3, 3) * 5
    before = bn(x)
    with torch.no_grad():
        a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        mean, beta = bn.running_mean.double().clone(), bn.bias.double().clone()
    fold_batchnorm(bn)
    assert not bn.running_mean.any() and bool((bn.running_var == 1).all())
    b = beta - bn.weight.detach().double() * mean  # the shift of the scale on the grid: the output's mean is kept
    steps = {}
    for value, exact in ((bn.weight, a), (bn.bias, b)):
        step = 2.0 ** torch.ceil(torch.log2(exact.abs().max() / LEVELS))  # no outlier: the largest value's step
        q = value.detach().double() / step
        assert torch.equal(q, q.round()) and q.abs().max() <= LEVELS and q.abs().max() >= LEVELS // 2 + 1
        assert (value.detach().double() - exact).abs().max() <= step / 2
        steps[value is bn.weight] = float(step)
    centred = (x.double() - mean.view(1, -1, 1, 1)).abs()
    bound = (centred * steps[True] / 2 + steps[False] / 2 + before.abs() * 1e-5).amax()  # 1e-5: running_var 1 + eps
    assert (bn(x) - before).detach().abs().max() <= bound


def test_a_channel_whose_input_does_not_vary_is_clipped_not_the_others_rounded_away():
    """A pruned filter's channel (PackNet): variance 1e-8, so a scale ~300x the others'. The grid keeps the live
    channels' precision and clips that one, whose output stays at its mean."""
    bn = trained_bn()
    with torch.no_grad():
        bn.running_var[5] = 1e-8
        bn.weight[5] = 0.5
        a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        live = torch.arange(24) != 5
        x = torch.randn(8, 24, 3, 3) * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
    before = bn(x)
    fold_batchnorm(bn)
    step = 2.0 ** torch.ceil(torch.log2(a[live].abs().max() / LEVELS))
    assert (bn.weight.double()[live] - a[live]).abs().max() <= step / 2  # as if the dead channel were not there
    assert abs(float(bn.weight[5].detach())) < abs(float(a[5])) / 10  # clipped
    err = (bn(x) - before).detach().abs()
    assert err[:, 5].max() < 6 * float(a[5]) * 1e-4 + 0.05  # its own output's spread (std a * 1e-4) + a shift step
    assert err[:, live].max() < 0.5


def test_what_is_stored_is_the_folded_network_bit_for_bit():
    model = create_model("convnet", num_classes=2, in_channels=1, widths=(8, 16))
    for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        trained = trained_bn(bn.num_features, seed=i)
        bn.load_state_dict(trained.state_dict())
    fold_batchnorm(model)
    state = bn_state(model.features)
    coded = encode_folded(state)
    assert coded["int8"].dtype == torch.int8 and coded["int8"].numel() == 2 * (8 + 16)
    assert coded["exp"].tolist() and len(coded["exp"]) == 4
    back = decode_folded(coded, state)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    flat = flatten_state("bn", state, "int8")
    assert sorted(flat) == ["bn.exp", "bn.int8"] and sum(t.numel() for t in flat.values()) == 2 * 24 + 4
    again = unflatten_state(flat, "bn", state, "task")
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_a_network_that_was_not_folded_is_refused():
    model = create_model("convnet", num_classes=2, in_channels=1, widths=(8,))
    with torch.no_grad():
        model.features[1].running_var.fill_(2.0)
    with pytest.raises(StoreError, match="not folded"):
        flatten_state("bn", bn_state(model.features), "int8")
    fold_batchnorm(model)
    state = bn_state(model.features)
    state["1.weight"] = state["1.weight"] + 1e-3  # off the grid
    with pytest.raises(ValueError, match="not on the grid"):
        encode_folded(state)


@pytest.mark.parametrize("damage", ["short", "minus_128", "exponents"])
def test_damaged_folded_tensors_are_refused(damage):
    model = create_model("convnet", num_classes=2, in_channels=1, widths=(8,))
    fold_batchnorm(model)
    state = bn_state(model.features)
    coded = encode_folded(state)
    if damage == "short":
        coded["int8"] = coded["int8"][:-1]
    elif damage == "minus_128":
        coded["int8"][0] = -128
    else:
        coded["exp"] = coded["exp"][:1]
    with pytest.raises(ValueError):
        decode_folded(coded, state)


def test_unfolding_on_the_next_tasks_data_keeps_the_map_and_takes_its_statistics():
    model = create_model("convnet", num_classes=2, in_channels=1, widths=(8, 16))
    for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.load_state_dict(trained_bn(bn.num_features, seed=i).state_dict())
    fold_batchnorm(model)
    model.eval()
    data = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(3)]
    folded = model(data[0]).detach()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: inputs.setdefault(name, []).append(args[0]))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for x in data:
        model(x)
    for h in hooks:
        h.remove()
    unfold_batchnorm(model, iter(data))
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            x = torch.cat(inputs[name]).double().transpose(0, 1).reshape(bn.num_features, -1)
            torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bn.running_var.double(), x.var(1, unbiased=False), rtol=1e-4, atol=1e-5)
    # The same map, but for float rounding and the folded layers' 1 / sqrt(1 + eps).
    torch.testing.assert_close(model(data[0]).detach(), folded, rtol=1e-4, atol=1e-4 * float(folded.abs().max()))
    # In training the layers normalise with batch statistics close to the ones taken: the same map again.
    model.train()
    torch.testing.assert_close(model(torch.cat(data)).detach()[:16], folded, rtol=0.05,
                               atol=0.05 * float(folded.abs().max()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unfold_batchnorm(model, iter(data))  # no longer folded: left as it is
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if "num_batches" not in k)


def test_statistics_recomputed_are_the_exact_mean_of_the_batches_with_the_final_weights():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    batches = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    model.train()
    for x in batches:  # running averages of training
        model(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # the weights jump after the last step (a kernel searched anew, a mask flipped)
    stale = bn.running_mean.clone()
    recompute_statistics(model.eval(), iter(batches))
    assert not model.training
    with torch.no_grad():
        inputs = [conv(x).double() for x in batches]
    mean = torch.stack([y.mean((0, 2, 3)) for y in inputs]).mean(0)
    var = torch.stack([y.transpose(0, 1).reshape(8, -1).var(1) for y in inputs]).mean(0)  # unbiased per batch
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stale, bn.running_mean, atol=1e-3)
    again = {k: v.clone() for k, v in model.state_dict().items()}
    recompute_statistics(model, iter(batches))  # the same weights and images: the same statistics
    for k, v in model.state_dict().items():
        assert torch.equal(v, again[k]), k


@pytest.mark.parametrize("method", ["nws", "piggyback", "packnet", "finetune", "individual"])
def test_every_method_stores_its_folded_tasks_exactly(tmp_path, method):
    out = tmp_path / method
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), "--method", method,
                           "--model.bn_dtype", "int8", "--model.bn_stats", "300",
                           "--pretrain.epochs", "1", "--task.epochs", "2",
                           "--model.pool_size", "32", "--trainer.logger", "none", "--trainer.progress_bar", "false",
                           "--model.kwargs", '{"widths": [8, 16]}', "--data.num_tasks", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert all(t["acc_from_storage"] == t["acc_after_training"] for t in results["tasks"])
    store = open_run(str(out))
    for t in store.tasks():
        rebuilt = store.model(t["index"])
        for m in rebuilt.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert not m.running_mean.any() and bool((m.running_var == 1).all())  # folded as trained
        if method in ("piggyback", "packnet", "individual"):
            assert t["bytes"]["batchnorm"] == 2 * (8 + 16) + 4  # int8 steps and one exponent per tensor
