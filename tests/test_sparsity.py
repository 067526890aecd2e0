"""Sparsification: an all-zero pool entry, a group-lasso pull towards it, kernel sparsity; search stays exact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nws
from nws.cli import main
from nws.convert import nws_layers
from nws.models import create_model
from nws.pool import KernelPool
from nws.exhaustive import brute_force_nearest
from nws.sparsity import has_zero_entry, kernel_sparsity, sparsity_loss


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=3, widths=(8, 16))


@pytest.mark.parametrize("init", ["normal", "kernels"])
def test_convert_adds_a_zero_entry_that_ema_keeps(init):
    model = nws.convert(small(), pool_size=16, init=init, zero_entry=True)
    x = torch.randn(8, 1, 8, 8)
    for _ in range(3):
        model(x).sum().backward()
        nws.update_pools(model)
    for _, layer in nws_layers(model):
        book = layer.pool.codebook
        assert layer.pool.zero_entry and torch.equal(book[0], torch.zeros(book.shape[1]))
        assert not (book[1:] == 0).all(1).any()  # only entry 0 is zero
    assert has_zero_entry(model)
    assert not has_zero_entry(nws.convert(small(), pool_size=16))
    with pytest.raises(ValueError):
        KernelPool(1, 4, zero_entry=True)


def test_kmeans_pools_with_zero_entry():
    model, _ = nws.pools_from_model(small(), pool_size=16, zero_entry=True)
    for _, layer in nws_layers(model):
        assert torch.equal(layer.pool.codebook[0], torch.zeros(layer.pool.dim)) and layer.pool.zero_entry


def test_kernel_sparsity_counts_kernels_at_the_zero_entry():
    """Kernels set exactly on chosen entries: 2 of the 8 kernels of features.0 (d 9), 40 of the 128 of
    features.4 (d 9) and 6 of the 48 of fc (d 1) on the zero entry."""
    model = nws.convert(small(), pool_size=16, zero_entry=True)
    nws.freeze_pools(model)
    zeros = {"features.0": 2, "features.4": 40, "fc": 6}
    codes = {}
    for name, layer in nws_layers(model):
        indices = torch.arange(layer.num_kernels) % 15 + 1  # nonzero entries (random normal vectors)
        indices[: zeros[name]] = 0
        codes[name] = indices[torch.randperm(layer.num_kernels, generator=torch.Generator().manual_seed(1))]
    nws.decode(model, codes)
    report = kernel_sparsity(model)
    assert report["layers"] == {"features.0": 2 / 8, "features.4": 40 / 128, "fc": 6 / 48}
    assert report["total"] == (2 * 9 + 40 * 9 + 6 * 1) / (8 * 9 + 128 * 9 + 48 * 1)
    assert kernel_sparsity(nws.convert(small(), pool_size=16, init="kernels"))["total"] == 0.0


def test_sparsity_loss_is_group_lasso_with_finite_gradient_at_zero():
    """features.0 all zero, every other weight 1: kernel norms 0 (8 kernels), 3 (128 kernels of 9 ones) and
    1 (48 fc kernels of one weight)."""
    model = nws.convert(small(), pool_size=16, zero_entry=True)
    with torch.no_grad():
        for name, layer in nws_layers(model):
            layer.weight.fill_(0.0 if name == "features.0" else 1.0)
    loss = sparsity_loss(model)
    assert loss.item() == pytest.approx((8 * 0 + 128 * 3 + 48 * 1) / (8 + 128 + 48), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(l.weight.grad).all() for _, l in nws_layers(model))
    assert torch.equal(model.features[0].weight.grad, torch.zeros_like(model.features[0].weight))
    with pytest.raises(ValueError):
        sparsity_loss(small())


def train_with_pull(weight: float) -> nn.Module:
    torch.manual_seed(0)
    model = nws.convert(small(), pool_size=32, init="kernels", zero_entry=True)
    nws.freeze_pools(model)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        loss = F.cross_entropy(model(x), y) + 0.5 * nws.commitment_loss(model) + weight * sparsity_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_training_with_the_pull_makes_a_sparse_network_and_search_stays_exact():
    plain, pulled = kernel_sparsity(train_with_pull(0.0)), kernel_sparsity(train_with_pull(5.0))
    assert pulled["total"] > plain["total"] + 0.3  # measured: 0.13 without the pull, 0.63 with it
    model = train_with_pull(5.0)
    for name, layer in nws_layers(model):
        assert torch.equal(layer.search(), brute_force_nearest(layer.kernels().detach(), layer.pool.codebook)), name
        searched = layer.searched_weight()
        pruned = layer.kernels(searched).abs().sum(1) == 0
        assert pruned.float().mean().item() == pytest.approx(pulled["layers"][name])


def test_demo_reports_sparsity(tmp_path):
    out = tmp_path / "run"
    argv = ["demo", "--out", str(out), "--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "16",
            "--model.kwargs", "{widths: [8, 16]}", "--model.zero_entry", "true", "--task.sparsity", "0.5",
            "--data.num_tasks", "1",
            "--trainer.logger", "none", "--trainer.progress_bar", "false", "--trainer.checkpoint", "false"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["tasks"]) == 1
    for t in results["tasks"]:
        assert 0 <= t["sparsity"]["total"] <= 1 and set(t["sparsity"]["layers"]) == {"features.0", "features.4", "fc"}
    assert "kernel sparsity" in (out / "results.md").read_text()
