"""BatchNorm on a grid: a task's BatchNorm in an eighth of float32's bytes, stored exactly.

In evaluation a BatchNorm layer is one affine map per channel, ``y = a x + b`` with ``a = gamma / sqrt(var +
eps)`` and ``b = beta - a mean``. :func:`fold_batchnorm` ends a task's training by folding every BatchNorm
layer into that map and rounding ``a`` and ``b`` each to a grid of 255 levels (``q * 2**e``, ``|q| <= 127``,
one power-of-two step per tensor): the layer then holds
``weight = a``, ``bias = b``, ``running_mean = 0``, ``running_var = 1``. The task *is* this network: it is
what is evaluated after training, and :func:`encode_folded` stores it losslessly as one int8 per value and
one exponent per tensor (:func:`decode_folded` gives back the same floats, bit for bit), so accuracy from
storage equals accuracy after training. What the rounding costs shows in that accuracy.

A tensor's step is the one that minimises the error it adds to the layer's output, values beyond the grid
clipped: for ``a`` each channel's error weighted by its input's variance (``running_var``), for ``b`` alike.
Mostly that is the step that keeps the largest value (64 to 127 levels); but a channel whose input hardly
varies (a pruned filter's, PackNet) can have a scale hundreds of times the others', which would round every
other channel to zero: it is clipped instead (its shift keeps its output's mean), at no cost to the output.

A folded network that starts another task is first :func:`unfold_batchnorm`-ed on a few batches of that
task's data: each layer gets the statistics of its input there, and the scale and shift that keep its map,
so it computes the same function in evaluation and, normalising with batch statistics close to these, starts
training where the folded network is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

LEVELS = 127  # |q| <= LEVELS: one int8 per value
FOLDED = ("weight", "bias", "running_mean", "running_var")  # the state entries a folded layer stores


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _check_foldable(name: str, layer: _BatchNorm) -> None:
    if not (layer.affine and layer.track_running_stats):
        raise ValueError(f"BatchNorm {name or 'layer'} has no affine parameters or no running statistics: it cannot "
                         "be folded into a scale and shift")


def _exponent(values: Tensor) -> int:
    """The grid step's exponent ``e`` for ``values``: the largest magnitude lands on 64..127 steps of ``2**e``."""
    top = float(values.abs().max()) if values.numel() else 0.0
    return math.ceil(math.log2(top / LEVELS)) if top > 0 else 0


def _steps(values: Tensor, e: int) -> Tensor:
    return torch.round(values * 2.0**-e).clamp_(-LEVELS, LEVELS)


def _on_grid(values: Tensor, weights: Tensor, finer: int = 24) -> tuple[Tensor, int]:
    """``values`` (float64) on the grid whose step minimises ``sum(weights * error**2)`` (rounding, and clipping
    beyond ``LEVELS`` steps), among the step keeping the largest value and the ``finer`` ones below it (ties:
    the coarser step); int8 steps and the exponent."""
    top = _exponent(values)
    best, best_error = top, None
    for e in range(top, top - finer - 1, -1):
        error = float((weights * (_steps(values, e) * 2.0**e - values).pow(2)).sum())
        if best_error is None or error < best_error:
            best, best_error = e, error
    return _steps(values, best).to(torch.int8), best


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> None:
    """Fold every BatchNorm layer of ``model`` into its per-channel scale and shift, on the grid (in place)."""
    for name, layer in batchnorm_layers(model):
        _check_foldable(name, layer)
        var = layer.running_var.double()
        a = layer.weight.double() / torch.sqrt(var + layer.eps)
        q, e = _on_grid(a, var)
        a = q.double() * 2.0**e
        b = layer.bias.double() - a * layer.running_mean.double()  # the clipped scale's shift keeps the mean
        layer.weight.copy_(a.to(layer.weight.dtype))
        q, e = _on_grid(b, torch.ones_like(b))
        layer.bias.copy_(q.to(layer.bias.dtype) * 2.0**e)
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0)


def folded_keys(layers: list[str]) -> list[str]:
    """The state-dict keys a folded encoding covers, for BatchNorm layers named ``layers``."""
    return [f"{name}.{entry}" if name else entry for name in layers for entry in FOLDED]


def batchnorm_names(state: Mapping[str, Tensor]) -> list[str]:
    """The BatchNorm layers of a state dict: those with running statistics."""
    return [key.rpartition(".")[0] for key in state if key.rpartition(".")[2] == "running_mean"]


def encode_folded(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The BatchNorm ``state`` of folded layers (their ``weight``, ``bias``, ``running_mean`` and ``running_var``,
    layer by layer) as ``int8`` (every layer's scale steps, then its shift steps) and ``exp`` (int8, two per
    layer). :class:`ValueError` if the state is not on the grid (the layers were not folded): what is stored
    always decodes to exactly the state given."""
    layers = batchnorm_names(state)
    if list(state) != folded_keys(layers):
        raise ValueError("BatchNorm state of folded layers needs weight, bias, running_mean, running_var per layer")
    steps, exps = [], []
    for name in layers:
        key = f"{name}." if name else ""
        if state[key + "running_mean"].any() or not bool((state[key + "running_var"] == 1).all()):
            raise ValueError(f"BatchNorm {name or 'layer'} is not folded (running statistics are not 0 and 1)")
        for entry in ("weight", "bias"):
            value = state[key + entry]
            e = _exponent(value.double())
            q = torch.round(value.double() * 2.0**-e)
            if q.numel() and float(q.abs().max()) > LEVELS:
                raise ValueError(f"BatchNorm {name or 'layer'}: {entry} is not on the grid")
            q = q.to(torch.int8)
            if not torch.equal(q.to(value.dtype) * 2.0**e, value):
                raise ValueError(f"BatchNorm {name or 'layer'}: {entry} is not on the grid (not folded)")
            steps.append(q)
            exps.append(e)
    if any(not -128 <= e <= 127 for e in exps):
        raise ValueError("BatchNorm values beyond the grid's exponent range")
    return {"int8": torch.cat(steps) if steps else torch.zeros(0, dtype=torch.int8),
            "exp": torch.tensor(exps, dtype=torch.int8)}


def decode_folded(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`encode_folded` for a model whose BatchNorm state is ``expected`` (keys, shapes and
    dtypes); :class:`ValueError` if the tensors do not fit it."""
    layers = batchnorm_names(expected)
    if list(expected) != folded_keys(layers):
        raise ValueError("the model's BatchNorm state is not weight, bias, running_mean, running_var per layer")
    steps, exps = tensors.get("int8"), tensors.get("exp")
    if steps is None or exps is None or steps.dtype != torch.int8 or exps.dtype != torch.int8 \
            or steps.dim() != 1 or exps.dim() != 1:
        raise ValueError("folded BatchNorm needs 1-D int8 tensors int8 and exp")
    widths = [expected[f"{name}.weight" if name else "weight"].numel() for name in layers]
    if len(exps) != 2 * len(layers) or len(steps) != 2 * sum(widths):
        raise ValueError(f"folded BatchNorm holds {len(steps)} values and {len(exps)} exponents, the model needs "
                         f"{2 * sum(widths)} and {2 * len(layers)}")
    if steps.numel() and int(steps.min()) < -LEVELS:
        raise ValueError("folded BatchNorm holds a value off the grid (-128)")
    state, pos = {}, 0
    for i, (name, width) in enumerate(zip(layers, widths)):
        key = f"{name}." if name else ""
        for j, entry in enumerate(("weight", "bias")):
            ref = expected[key + entry]
            state[key + entry] = (steps[pos : pos + width].to(ref.dtype) * 2.0 ** int(exps[2 * i + j])).reshape(ref.shape)
            pos += width
        state[key + "running_mean"] = torch.zeros_like(expected[key + "running_mean"])
        state[key + "running_var"] = torch.ones_like(expected[key + "running_var"])
    return {key: state[key] for key in expected}


def _is_folded(layer: _BatchNorm) -> bool:
    return layer.track_running_stats and not layer.running_mean.any() and bool((layer.running_var == 1).all())


@torch.no_grad()
def recompute_statistics(model: nn.Module, inputs: Iterable[Tensor]) -> None:
    """Every BatchNorm layer's running statistics computed afresh over ``inputs`` (batches, moved to the
    model's device), as exact averages of the batches' statistics with the model's current weights
    (:func:`torch.optim.swa_utils.update_bn`, the averaged-weights recipe); parameters unchanged. A network
    whose weights jumped in its last training steps (searched kernels, thresholded masks) otherwise evaluates
    with running averages over several networks. Call it before :func:`fold_batchnorm` (a folded layer
    keeps no statistics)."""
    update_bn(inputs, model, device=next(model.parameters()).device)


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, inputs: Iterable[Tensor]) -> None:
    """Give every folded BatchNorm layer of ``model`` (running statistics 0 and 1) the statistics of its input
    on ``inputs`` (batches of the next task's training data), and the scale and shift that make it compute the
    same map in evaluation (up to rounding): the start of another task. In training, a layer normalises with
    its batch's statistics, close to these, so it starts where the folded network is (see the module
    docstring). Layers not folded are left as they are."""
    layers = [(name, m) for name, m in batchnorm_layers(model) if _is_folded(m)]
    if not layers:
        return
    sums: dict[str, list[Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            total = sums.setdefault(name, [torch.zeros(len(x), dtype=torch.float64, device=x.device)] * 2 + [0])
            sums[name] = [total[0] + x.sum(1), total[1] + x.pow(2).sum(1), total[2] + x.shape[1]]
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for x in inputs:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, layer in layers:
        if name not in sums:
            continue
        first, second, count = sums[name]
        mean = first / count
        var = (second / count - mean.pow(2)).clamp_min(0)
        std = torch.sqrt(var + layer.eps)
        a, b = layer.weight.double(), layer.bias.double()
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.weight.copy_(a * std)
        layer.bias.copy_(b + a * mean)
