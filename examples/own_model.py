"""Make your own model searchable, learn two tasks, store them as indices and serve them from storage.

    python examples/own_model.py [--out DIR]

Walks through docs/integrate.md on scikit-learn's bundled 8x8 digits (no download), in plain PyTorch:

1. a model of your own, registered so a task store can rebuild it;
2. pools without pretraining: train the plain model on a source task, then k-means of its kernels
   (``nws.pools_from_model``);
3. each task trained against the frozen pools with ``CE + beta * commitment``;
4. pools and tasks written to a ``TaskStore`` and every task served from storage alone.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import nws
from nws.data.digits import digits_benchmark
from nws.models import register_model
from nws.methods.nws import TaskStore
from nws.spec import ModelSpec


class TinyNet(nn.Module):
    """Any nn.Module works; NWS searches its Conv2d and Linear layers. ``classifier_name`` names the head."""

    classifier_name = "head"

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register_model
def tiny_net(num_classes: int = 10, in_channels: int = 1) -> TinyNet:
    """Registered by name, so ``ModelSpec("tiny_net", ...)`` can rebuild it when a task is served."""
    return TinyNet(num_classes, in_channels)


def train(model: nn.Module, data, epochs: int, lr: float, beta: float | None) -> nn.Module:
    """SGD on the cross-entropy, plus ``beta * commitment`` when the model is searchable."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=32, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(x), y)
            if beta is not None:
                loss = loss + beta * nws.commitment_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def main(out: str) -> None:
    torch.manual_seed(0)
    bench = digits_benchmark(seed=0)
    pool_size, beta = 64, 0.5

    # 1-2. The plain model trained on the source task; then each layer's pool = k-means of its kernels.
    model = train(tiny_net(num_classes=len(bench.source.classes)), bench.source.train, epochs=10, lr=0.05,
                  beta=None)
    print(f"plain model on the source task: {100 * accuracy(model, bench.source.test):.1f}%")
    model, report = nws.pools_from_model(model, pool_size=pool_size, seed=0)  # converted in place, pools frozen
    print(f"searched model on the source task: {100 * accuracy(model, bench.source.test):.1f}%")

    # 4. The store holds the pools once, the starting network, and its indices as the reference.
    spec = ModelSpec("tiny_net", len(bench.source.classes), {"in_channels": 1}, pool_size, group_size=1)
    store = TaskStore(out, create=True)
    store.save_pools(model, spec)
    store.save_source(model, spec)
    store.save_reference()  # the source network's indices: each task's indices are stored as changes to them

    # 3. Each task starts from the previous one (rebuilt from storage), with its own classifier rows.
    for index, task in enumerate(bench.tasks[:2]):
        start = store.load_source() if index == 0 else TaskStore(out).model(index - 1)  # a new copy to train
        start.head.weight = nn.Parameter(start.head.weight[: len(task.classes)].clone())
        start.head.bias = nn.Parameter(start.head.bias[: len(task.classes)].clone())
        start.head.out_features = len(task.classes)
        start.requires_grad_(True)
        model = train(start, task.train, epochs=8, lr=0.01, beta=beta)
        acc = accuracy(model, task.test)
        sizes = store.save_task(index, model, task.name, task.classes, acc_after_training=acc)
        print(f"task {index} ({task.name}): {100 * acc:.1f}% after training, stored in {sum(sizes.values())} "
              f"bytes ({sizes['indices']} of them indices)")

    # Serving: a fresh store rebuilds every task from the shared files (pools, reference) and its own file.
    served = TaskStore(out)
    for entry in served.tasks():
        net = served.model(entry["index"])
        acc = accuracy(net, bench.tasks[entry["index"]].test)
        assert acc == entry["acc_after_training"], "the served network is the trained one"
        print(f"served task {entry['index']}: {100 * acc:.1f}%; as a plain torch model: "
              f"{type(nws.materialize(net).head).__name__} head")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="store directory (default: a temporary one)")
    args = parser.parse_args()
    if args.out:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/store")
