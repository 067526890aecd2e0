"""NWS layers, model conversion, commitment loss, pool EMA, codes and the search cache."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nws
import nws.exhaustive
from nws import NWSConv2d, NWSLayer, NWSLinear, brute_force_nearest
from nws.models import create_model


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: one thread avoids the synchronisation cost that dominates on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """``o (g i) h w -> (o i) (g h w)``, written independently of the library."""
    o, cin = w.shape[:2]
    spatial = w.shape[2:]
    k = w.reshape(o, g, cin // g, *spatial)
    k = k.permute(0, 2, 1, *range(3, 3 + len(spatial)))
    return k.reshape(o * (cin // g), -1)


def _ungrouped(v: torch.Tensor, shape: torch.Size, g: int) -> torch.Tensor:
    o, cin = shape[:2]
    spatial = tuple(shape[2:])
    w = v.reshape(o, cin // g, g, *spatial)
    return w.permute(0, 2, 1, *range(3, 3 + len(spatial))).reshape(shape)


def _expected_weight(layer: NWSLayer) -> torch.Tensor:
    """The searched weight from scratch: group, brute-force search, gather, ungroup."""
    w = layer.weight.detach()
    idx = brute_force_nearest(_grouped(w, layer.group_size), layer.pool.codebook)
    return _ungrouped(layer.pool.codebook[idx], w.shape, layer.group_size)


def _pools(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, layer in nws.nws_layers(model) for k, v in layer.pool.named_buffers()}


def test_grouped_kernel_layout() -> None:
    """Vector ``(o, c)`` gathers the kernels of input channels ``c, c + in/g, c + 2 in/g, ...``."""
    torch.manual_seed(0)
    layer = NWSConv2d(6, 2, (2, 3), group_size=3, pool_size=4)
    w, kernels = layer.weight.detach(), layer.kernels().detach()
    assert kernels.shape == (2 * 2, 3 * 2 * 3)
    for o in range(2):
        for c in range(2):
            assert torch.equal(kernels[o * 2 + c], torch.cat([w[o, c + j * 2].flatten() for j in range(3)]))
    assert torch.equal(layer.weight_from_kernels(kernels), w)
    assert torch.equal(_grouped(w, 3), kernels)


@pytest.mark.parametrize("group_size, in_per_group, expected", [(1, 6, 1), (3, 6, 3), (4, 6, 2), (5, 6, 1), (8, 1, 1)])
def test_group_size_falls_back_to_a_divisor(group_size: int, in_per_group: int, expected: int) -> None:
    layer = NWSConv2d(in_per_group, 4, 3, group_size=group_size, pool_size=4)
    assert layer.group_size == expected and layer.pool.dim == expected * 9
    assert layer.num_kernels == 4 * in_per_group // expected


def _policy_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, bias=False),
        conv=nn.Conv2d(8, 8, 3, bias=False),
        pw=nn.Conv2d(8, 16, 1, bias=False),
        dw=nn.Conv2d(16, 16, 3, groups=16, bias=False),
        grouped=nn.Conv2d(16, 16, (1, 3), groups=2, bias=False),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(16, 6, bias=False),
    ))


@pytest.mark.parametrize("g, group_1x1, expected", [
    # stem: 3 inputs; conv: 8; pw: 1x1, 8 inputs; dw: depthwise, 1 input per group; grouped: 1x3, 8 inputs per
    # group; head: Linear, 16 inputs
    (2, False, {"stem": 1, "conv": 2, "pw": 1, "dw": 1, "grouped": 2, "head": 1}),
    (2, True, {"stem": 1, "conv": 2, "pw": 2, "dw": 1, "grouped": 2, "head": 2}),
    (3, False, {"stem": 3, "conv": 1, "pw": 1, "dw": 1, "grouped": 1, "head": 1}),
    (4, True, {"stem": 1, "conv": 4, "pw": 4, "dw": 1, "grouped": 4, "head": 4}),
    (1, True, {"stem": 1, "conv": 1, "pw": 1, "dw": 1, "grouped": 1, "head": 1}),
])
def test_convert_group_policy(g: int, group_1x1: bool, expected: dict[str, int]) -> None:
    """g applies to k x k convs; 1x1 convs and Linear layers stay at 1 unless ``group_1x1``; a g that does not
    divide a layer's inputs per conv group falls back to their gcd (so depthwise convs are always at 1)."""
    model = nws.convert(_policy_net(), pool_size=4, group_size=g, group_1x1=group_1x1)
    layers = dict(nws.nws_layers(model))
    assert {n: layer.group_size for n, layer in layers.items()} == expected
    for name, layer in layers.items():
        w = layer.weight.detach()
        kernel = w[0, 0].numel() if w.ndim > 2 else 1
        assert layer.pool.dim == expected[name] * kernel
        assert torch.equal(layer.kernels(), _grouped(w, expected[name]))
    with pytest.raises(ValueError, match="group_size"):
        nws.convert(_policy_net(), group_size=0)


def test_resnet18_at_group_size_2() -> None:
    """The reference's ResNet-18 layer policy at g = 2: the 16 3x3 block convs grouped, the 7x7 stem (3 input
    channels) at gcd(2, 3) = 1, the three 1x1 shortcuts and the classifier at 1."""
    model = nws.convert(create_model("resnet18", num_classes=10, maxpool=False), pool_size=4, group_size=2)
    sizes = {n: layer.group_size for n, layer in nws.nws_layers(model)}
    assert sorted(n for n, g in sizes.items() if g == 2) == sorted(
        f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2))
    assert {n for n, g in sizes.items() if g == 1} == {"conv1", "fc", *(f"layer{s}.0.downsample.0" for s in (2, 3, 4))}
    # 3 * 64 stem kernels, (1,392,832 - 192 - 172,032) / 2 grouped 3x3 kernels, 172,032 shortcut kernels
    assert sum(layer.num_kernels for n, layer in nws.nws_layers(model) if n != "fc") == 192 + 610_304 + 172_032
    assert {layer.pool.dim for n, layer in nws.nws_layers(model)} == {49, 18, 1}


CONVS = [
    # in, out, kernel, stride, padding, dilation, groups, bias, group_size
    (4, 6, 3, 1, 0, 1, 1, False, 1),
    (4, 6, 3, 2, 1, 1, 1, True, 2),
    (6, 4, (3, 5), (2, 1), (1, 2), (2, 1), 1, True, 3),
    (8, 4, 1, 1, 0, 1, 1, False, 4),
    (4, 6, 3, 1, 1, 1, 2, True, 1),
    (8, 6, 3, 2, 2, 2, 2, False, 2),
    (6, 6, 3, 1, 1, 1, 6, True, 1),
    (6, 12, 3, 2, 1, 1, 6, False, 4),
]


@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, groups, bias, g", CONVS)
def test_conv_forward_uses_nearest_entries(cin, cout, kernel, stride, padding, dilation, groups, bias, g) -> None:
    torch.manual_seed(1)
    layer = NWSConv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=bias, group_size=g, pool_size=16)
    layer.pool.init_from(layer.kernels() + 0.05 * torch.randn(layer.num_kernels, layer.pool.dim), seed=1)
    x = torch.randn(2, cin, 9, 11)
    expected_w = _expected_weight(layer)
    expected = F.conv2d(x, expected_w, layer.bias, stride, padding, dilation, groups)
    assert torch.equal(layer.searched_weight(), expected_w)
    assert not torch.equal(expected_w, layer.weight.detach())
    assert torch.equal(layer(x), expected)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_linear_forward_uses_nearest_entries(g: int, bias: bool) -> None:
    torch.manual_seed(2)
    layer = NWSLinear(12, 5, bias=bias, group_size=g, pool_size=8)
    layer.pool.init_from(layer.kernels() + 0.05 * torch.randn(layer.num_kernels, layer.pool.dim), seed=2)
    x = torch.randn(2, 3, 12)
    expected_w = _expected_weight(layer)
    assert torch.equal(layer(x), F.linear(x, expected_w, layer.bias))


def _tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    nws.convert(net, pool_size=8, group_size=4, init="kernels", seed=seed)
    for _, layer in nws.nws_layers(net):
        layer.pool.codebook.add_(0.05 * torch.randn_like(layer.pool.codebook))
    return net


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_gradient_is_straight_through_plus_commitment(beta: float) -> None:
    net = _tiny_net()
    conv, lin = net[0], net[3]
    x, y = torch.randn(6, 3, 5, 5), torch.tensor([0, 2, 1, 1, 0, 2])
    loss = F.cross_entropy(net(x), y) + beta * nws.commitment_loss(net)
    loss.backward()

    q_conv = conv.searched_weight().clone().requires_grad_()
    q_lin = lin.searched_weight().clone().requires_grad_()
    plain = F.linear(F.relu(F.conv2d(x, q_conv, conv.bias, padding=1)).flatten(1), q_lin, lin.bias)
    g_conv, g_lin = torch.autograd.grad(F.cross_entropy(plain, y), [q_conv, q_lin])
    for layer, grad, q in [(conv, g_conv, q_conv), (lin, g_lin, q_lin)]:
        w = layer.weight.detach()
        assert not torch.equal(w, q)
        expected = grad + beta * 2 * (w - q.detach()) / w.numel()
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-8)


def test_commitment_loss_value() -> None:
    net = _tiny_net(3)
    expected = sum(((layer.weight - layer.searched_weight()) ** 2).mean() for _, layer in nws.nws_layers(net))
    torch.testing.assert_close(nws.commitment_loss(net), expected, rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError):
        nws.commitment_loss(nn.Sequential(nn.Linear(2, 2)))


def _plain_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        bn=nn.BatchNorm2d(8),
        block=nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="circular")),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(8, 5),
    ))


CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def test_convert_replaces_every_conv_and_linear() -> None:
    plain = _plain_model()
    before = dict(plain.named_modules())
    model = nws.convert(plain, pool_size=16)
    assert model is plain
    assert [n for n, _ in nws.nws_layers(model)] == ["stem", "block.0", "block.2", "head"]
    for name, layer in nws.nws_layers(model):
        old = before[name]
        assert type(layer) is (NWSConv2d if isinstance(old, nn.Conv2d) else NWSLinear)
        assert layer.weight is old.weight and layer.bias is old.bias
        assert layer.pool.num_entries == 16 and layer.group_size == 1
        if isinstance(old, nn.Conv2d):
            assert all(getattr(layer, a) == getattr(old, a) for a in CONV_ATTRS)
    assert model.bn is before["bn"]


@pytest.mark.parametrize("exclude, converted", [
    (["head", "block.*"], ["stem"]),
    (["block.2"], ["stem", "block.0", "head"]),
    (lambda name, m: isinstance(m, nn.Conv2d) and m.groups > 1, ["stem", "head"]),
    (lambda name, m: True, []),
])
def test_convert_exclude(exclude, converted: list[str]) -> None:
    model = nws.convert(_plain_model(), pool_size=4, exclude=exclude)
    assert [n for n, _ in nws.nws_layers(model)] == converted
    for name, module in model.named_modules():
        if name in ("stem", "block.0", "block.2", "head") and name not in converted:
            assert type(module) in (nn.Conv2d, nn.Linear)


def test_convert_pools_per_layer_and_deterministic() -> None:
    a = dict(nws.nws_layers(nws.convert(_plain_model(), pool_size=16, seed=5)))
    b = dict(nws.nws_layers(nws.convert(_plain_model(), pool_size=16, seed=5)))
    c = dict(nws.nws_layers(nws.convert(_plain_model(), pool_size=16, seed=6)))
    for i, name in enumerate(a):
        assert torch.equal(a[name].pool.codebook, b[name].pool.codebook)
        assert not torch.equal(a[name].pool.codebook, c[name].pool.codebook)
        assert torch.equal(a[name].pool.codebook, nws.KernelPool(16, a[name].pool.dim, seed=5 + i).codebook)
    assert not torch.equal(a["stem"].pool.codebook, a["block.0"].pool.codebook)
    assert not torch.equal(a["block.0"].pool.codebook, a["block.2"].pool.codebook)


def test_convert_init_kernels() -> None:
    model = nws.convert(_plain_model(), pool_size=16, init="kernels", seed=1)
    again = nws.convert(_plain_model(), pool_size=16, init="kernels", seed=1)
    for (name, layer), (_, other) in zip(nws.nws_layers(model), nws.nws_layers(again)):
        kernels, book = layer.kernels().detach(), layer.pool.codebook
        assert torch.equal(book, other.pool.codebook)
        assert torch.equal(layer.pool.embed_sum, book)
        if len(kernels) >= len(book):
            assert all((kernels == entry).all(1).any() for entry in book), name
            assert len(book.unique(dim=0)) == len(book)
        else:
            n = len(kernels)
            assert torch.equal(book[:n].sort(0).values, kernels.sort(0).values), name
    with pytest.raises(ValueError):
        nws.convert(_plain_model(), init="uniform")


def _ema(count, total, n, s, decay=0.9, eps=1e-5):
    count = decay * count + (1 - decay) * n
    total = decay * total + (1 - decay) * s
    k = len(count)
    smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
    return count, total, total / smoothed[:, None]


def test_ema_hand_example() -> None:
    layer = NWSLinear(2, 4, bias=False, pool_size=3, group_size=2, decay=0.9, eps=1e-5)
    book = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    vectors = torch.tensor([[0.5, 0.25], [3.5, 0.5], [4.25, -0.5], [-0.25, 0.5]])
    with torch.no_grad():
        layer.weight.copy_(vectors)
        layer.pool.codebook.copy_(book)
        layer.pool.embed_sum.copy_(book)
    count, total = torch.zeros(3, dtype=torch.float64), book.double()
    v = vectors.double()
    for assigned in ([0, 1, 1, 0], [0, 0, 0, 0]):
        assert layer.search().tolist() == assigned
        layer.train()
        layer(torch.ones(1, 2))
        onehot = F.one_hot(torch.tensor(assigned), 3).double()
        n, s = onehot.sum(0), onehot.T @ v
        assert torch.equal(layer.pool.step_count, n.float()) and torch.equal(layer.pool.step_sum, s.float())
        nws.update_pools(layer)
        count, total, expected = _ema(count, total, n, s)
        for got, want in [(layer.pool.cluster_size, count), (layer.pool.embed_sum, total),
                          (layer.pool.codebook, expected)]:
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert not layer.pool.step_count.any() and not layer.pool.step_sum.any()
        assert torch.equal(layer.searched_weight(), _expected_weight(layer))


def _sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, beta: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + beta * nws.commitment_loss(model)).backward()
        opt.step()
        nws.update_pools(model)


def test_frozen_pools_do_not_change() -> None:
    torch.manual_seed(0)
    model = nws.convert(create_model("convnet", num_classes=3), pool_size=32, init="kernels")
    assert nws.freeze_pools(model) is model
    pools = _pools(model)
    weights = {n: layer.weight.detach().clone() for n, layer in nws.nws_layers(model)}
    _sgd_steps(model, torch.randn(8, 1, 8, 8), torch.randint(3, (8,)), steps=3)
    after = _pools(model)
    assert after.keys() == pools.keys() and all(torch.equal(v, after[k]) for k, v in pools.items())
    assert all(not torch.equal(w, layer.weight) for (_, layer), w in zip(nws.nws_layers(model), weights.values()))
    with pytest.raises(RuntimeError):
        model.fc.pool.ema_update()


def test_trainable_pools_change() -> None:
    torch.manual_seed(0)
    model = nws.convert(create_model("convnet", num_classes=3), pool_size=32, init="kernels")
    pools = _pools(model)
    _sgd_steps(model, torch.randn(8, 1, 8, 8), torch.randint(3, (8,)), steps=1)
    after = _pools(model)
    for name, _ in nws.nws_layers(model):
        assert not torch.equal(pools[f"{name}.codebook"], after[f"{name}.codebook"])


def _fresh_copy(model: nn.Module, build, seed: int) -> nn.Module:
    """A freshly converted model with ``model``'s pools and non-searched state, but its own temporary weights."""
    fresh = nws.convert(build(), pool_size=16, seed=seed)
    searched = {f"{name}.weight" for name, _ in nws.nws_layers(model)}
    state = {k: v for k, v in model.state_dict().items() if k not in searched}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert set(missing) == searched and not unexpected
    return fresh


MODELS = {
    "convnet": (lambda: create_model("convnet", num_classes=3), (4, 1, 8, 8)),
    "resnet18": (lambda: create_model("resnet18", num_classes=3, stem="cifar"), (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", MODELS)
def test_decode_encode_roundtrip(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = nws.convert(build(), pool_size=16, init="kernels", seed=1)
    x, y = torch.randn(*shape), torch.randint(3, (shape[0],))
    before = {n: layer.weight.detach().clone() for n, layer in nws.nws_layers(model)}
    _sgd_steps(model, x, y, steps=1)
    assert all(not torch.equal(before[n], layer.weight) for n, layer in nws.nws_layers(model))
    codes = nws.encode(model)
    assert list(codes) == [n for n, _ in nws.nws_layers(model)]
    for n, layer in nws.nws_layers(model):
        assert codes[n].dtype == torch.long and codes[n].shape == (layer.num_kernels,)
        assert torch.equal(codes[n], brute_force_nearest(layer.kernels().detach(), layer.pool.codebook))

    torch.manual_seed(1)
    decoded = _fresh_copy(model, build, seed=50)
    assert nws.decode(decoded, codes) is decoded
    model.eval()
    decoded.eval()
    with torch.no_grad():
        assert torch.equal(decoded(x), model(x))
    assert all(torch.equal(v, nws.encode(decoded)[k]) for k, v in codes.items())

    plain = nws.materialize(model)
    assert not any(isinstance(m, NWSLayer) for m in plain.modules())
    assert any(isinstance(m, NWSLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_materialize_keeps_padding_mode() -> None:
    model = nws.convert(_plain_model(), pool_size=8).eval()
    plain = nws.materialize(model)
    assert plain.block[2].padding_mode == "circular"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain(x), model(x))


def _convnet_codes() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nws.convert(create_model("convnet", num_classes=3), pool_size=16)
    return model, nws.encode(model)


def _drop_first(codes):
    return dict(list(codes.items())[1:])


def _add_layer(codes):
    return {**codes, "nope": torch.zeros(3, dtype=torch.long)}


def _shorten(codes):
    return {k: (v[:-1] if k == "fc" else v) for k, v in codes.items()}


def _lengthen(codes):
    return {k: (torch.cat([v, v[:1]]) if k == "fc" else v) for k, v in codes.items()}


def _too_big(codes):
    return {k: (v.clone().fill_(16) if k == "features.4" else v) for k, v in codes.items()}


def _negative(codes):
    return {k: (torch.cat([v[:-1], torch.tensor([-1])]) if k == "fc" else v) for k, v in codes.items()}


@pytest.mark.parametrize("corrupt", [_drop_first, _add_layer, _shorten, _lengthen, _too_big, _negative])
def test_decode_rejects_bad_codes(corrupt) -> None:
    model, codes = _convnet_codes()
    with pytest.raises(ValueError):
        nws.decode(model, corrupt(codes))


def _cache_layer() -> NWSConv2d:
    torch.manual_seed(0)
    layer = NWSConv2d(4, 6, 3, padding=1, pool_size=32)
    layer.pool.init_from(layer.kernels(), seed=0)
    return layer


def _step(layer: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    (layer(x) * torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(2))).sum().backward()
    opt.step()


def _check_refreshed(layer: NWSConv2d, before: torch.Tensor) -> None:
    expected = _expected_weight(layer)
    assert not torch.equal(before, expected)
    assert torch.equal(layer.searched_weight(), expected)
    assert torch.equal(layer.search(), brute_force_nearest(layer.kernels().detach(), layer.pool.codebook))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(layer(x), F.conv2d(x, expected, layer.bias, padding=1))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5),
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.5, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
], ids=["sgd", "sgd-foreach", "adam", "sgd-fused", "adam-fused"])
def test_cache_follows_optimizer_step(make_opt) -> None:
    layer = _cache_layer()
    before = layer.searched_weight().clone()
    _step(layer, make_opt(layer.parameters()))
    _check_refreshed(layer, before)


def test_cache_follows_in_place_edit() -> None:
    layer = _cache_layer()
    before = layer.searched_weight().clone()
    with torch.no_grad():
        layer.weight.mul_(-1)
    _check_refreshed(layer, before)


def test_cache_follows_edit_through_data() -> None:
    layer = _cache_layer()
    before = layer.searched_weight().clone()
    layer.weight.data.mul_(-1)
    _check_refreshed(layer, before)


def test_cache_follows_pool_changes() -> None:
    layer = _cache_layer()
    before = layer.searched_weight().clone()
    layer.train()
    layer(torch.randn(2, 4, 5, 5))
    nws.update_pools(layer)
    _check_refreshed(layer, before)

    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.pool.codebook.mul_(-1)
    before = layer.searched_weight().clone()
    layer.pool.load_state_dict(other.pool.state_dict())
    _check_refreshed(layer, before)


# ------------------------------------------------------------------------------------------- rate-aware search

def _rate_oracle(layer: NWSLayer) -> torch.Tensor:
    """The rate-aware search from scratch: exact float64 distances plus ``mu * bits[r, k]`` per kernel."""
    rate = layer.rate
    ref = rate.reference.long()
    bits = rate.bits.double()[ref]
    dist = nws.exhaustive.exact_sqdist(layer.kernels().detach(), layer.pool.codebook)
    return (dist + bits * rate.mu).argmin(dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_rate_encode_is_the_rate_oracle(name: str) -> None:
    """With a rate set (references of the source network, a shorter one for the classifier), every layer's
    searched weight and ``nws.encode`` (what a task file stores) equal the oracle, through training steps, a
    refreshed bit model and a price change; lam 0 and clear_rate give the nearest-entry search back."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = nws.freeze_pools(nws.convert(build(), pool_size=16, init="kernels", seed=1))
    x, y = torch.randn(*shape), torch.randint(3, (shape[0],))
    reference = {n: c[: len(c) - 2] if n.endswith("fc") else c for n, c in nws.encode(model).items()}
    _sgd_steps(model, x, y, steps=2)
    plain = nws.encode(model)
    models = nws.set_rate(model, reference, lam=0.5)
    assert set(models) == set(reference)
    for step in range(4):
        if step == 2:
            nws.refresh_rate(model)
        if step == 3:
            nws.set_rate(model, reference, lam=5.0)
        codes = nws.encode(model)
        for n, layer in nws.nws_layers(model):
            assert torch.equal(codes[n], _rate_oracle(layer)), (step, n)
            assert torch.equal(layer.searched_weight(), layer.weight_from_kernels(layer.pool.codebook[codes[n]]))
        _sgd_steps(model, x, y, steps=1)
    left = sum(int((codes[n][: len(r)] != r).sum()) for n, r in reference.items())
    assert left <= sum(int((plain[n][: len(r)] != r).sum()) for n, r in reference.items())
    nws.set_rate(model, reference, lam=0.0)
    assert all(layer.rate is None for _, layer in nws.nws_layers(model))
    nws.set_rate(model, reference, lam=1.0)
    nws.clear_rate(model)
    assert all(layer.rate is None for _, layer in nws.nws_layers(model))
    for n, layer in nws.nws_layers(model):
        assert torch.equal(nws.encode(model)[n], brute_force_nearest(layer.kernels().detach(), layer.pool.codebook))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rate_search_stays_float32_under_autocast(dtype: torch.dtype) -> None:
    """Mixed precision: forward and backward under autocast, the search (plain and rate-aware) still the
    float32 oracle's."""
    torch.manual_seed(0)
    model = nws.freeze_pools(nws.convert(create_model("convnet", num_classes=3), pool_size=16, init="kernels"))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(3, (4,))
    reference = nws.encode(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for lam in (0.0, 0.3):
        nws.set_rate(model, reference, lam)
        for _ in range(3):
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y) + 0.5 * nws.commitment_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for _, layer in nws.nws_layers(model):
                want = brute_force_nearest(layer.kernels().detach(), layer.pool.codebook, layer.rate)
                assert torch.equal(layer.search(), want)
                if lam:
                    assert torch.equal(want, _rate_oracle(layer))


def test_rate_follows_the_layer_to_another_dtype_and_copy() -> None:
    """The rate is state of the search, not of the model's parameters: a deep copy keeps it, a float64 model
    searches with it in float64, and a rate for another layer's shape is refused."""
    torch.manual_seed(0)
    model = nws.freeze_pools(nws.convert(create_model("convnet", num_classes=3), pool_size=16, init="kernels"))
    reference = nws.encode(model)
    nws.set_rate(model, reference, 0.5)
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        for _, layer in nws.nws_layers(twin):
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    for _, layer in nws.nws_layers(twin):
        assert layer.rate is not None
        want = brute_force_nearest(layer.kernels().detach(), layer.pool.codebook, layer.rate)
        assert torch.equal(layer.search(), want)
    layers = [layer for _, layer in nws.nws_layers(model)]
    with pytest.raises(ValueError, match="rate is for"):
        layers[0].rate = layers[1].rate
