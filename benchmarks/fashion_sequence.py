"""A ResNet-18 task sequence trained on real data (Fashion-MNIST), for measuring how tasks' indices code.

Protocol (NWS on a CPU budget): a plain ResNet-18 (CIFAR stem, one input channel) is trained on Fashion-MNIST
classes 0-4 (the "source"); its layers get pools of 512 entries sampled from its own trained kernels
(``init="kernels"``), frozen. Then tasks of two classes each are learned in turn with the NWS loss
(cross-entropy + 0.5 * commitment, straight-through search), each starting from the previous task rebuilt
from its indices (the first from the source network), its classifier resized with the rows kept. Each
task's indices are recorded.

The sequence is cached (``sequence.safetensors``: pools, source indices, every task's indices; written
after each task, so an interrupted run continues), because NWS training of ResNet-18 is slow on a few CPU
cores. The Fashion-MNIST IDX files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``) or any directory holding them.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import nws
from nws.models import create_model

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Settings:
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[tuple[int, int], ...] = ((5, 6), (7, 8), (9, 0), (1, 2))
    source_steps: int = 150
    task_steps: int = 40
    batch_size: int = 16
    source_lr: float = 0.05
    task_lr: float = 0.01
    beta: float = 0.5
    pool_size: int = 512
    seed: int = 0


# Settings that change the source network and pools; the others only change the tasks.
SOURCE_SETTINGS = ("source_classes", "source_steps", "batch_size", "source_lr", "pool_size", "seed")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped), as MNIST and Fashion-MNIST ship: big-endian dimensions, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not a uint8 IDX file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def fashion_train(root: Path) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's training images ``(60000, 1, 28, 28)``, standardised, and labels."""
    x = torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz").copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64))
    return (x - x.mean()) / x.std(), y


def resnet18(num_classes: int) -> nn.Module:
    return create_model("resnet18", num_classes=num_classes, in_channels=1, stem="cifar")


@torch.no_grad()
def resize_classifier(model: nn.Module, num_classes: int, seed: int) -> None:
    """``fc`` with ``num_classes`` rows: existing rows kept, new ones drawn as ``nn.Linear`` would (seeded)."""
    fc = model.fc
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(fc.in_features)
    keep = min(fc.out_features, num_classes)
    weight = (torch.rand(num_classes, fc.in_features, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
    weight[:keep], bias[:keep] = fc.weight[:keep], fc.bias[:keep]
    fc.weight, fc.bias = nn.Parameter(weight), nn.Parameter(bias)
    fc.out_features = num_classes


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, batch: int, beta: float | None,
          seed: int, log: str) -> None:
    """SGD (momentum 0.9, nesterov, weight decay 4e-5) on random batches; with ``beta`` the NWS loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        b = torch.randint(len(y), (batch,), generator=gen)
        ce = F.cross_entropy(model(x[b]), y[b])
        loss = ce if beta is None else ce + beta * nws.commitment_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == steps - 1:
            print(f"  [{log}] step {step + 1}/{steps}: ce {ce.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)


def subset(x: Tensor, y: Tensor, classes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The images of ``classes``, labelled 0.. in the order given."""
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def sequence(cache: Path, root: Path = FASHION_ROOT, settings: Settings = Settings()
             ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Tensor]]]:
    """Pools, source indices and every task's indices of the sequence, trained (or read from ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache / "sequence.safetensors", cache / "sequence.json"
    tensors: dict[str, Tensor] = {}
    if path.exists() and meta_path.exists():
        stored, wanted = json.loads(meta_path.read_text()), json.loads(json.dumps(asdict(settings)))
        if all(stored.get(key) == wanted[key] for key in SOURCE_SETTINGS):
            tensors = load_file(path)  # the source is reused; the tasks only if their settings match too
            if stored != wanted:
                tensors = {k: v for k, v in tensors.items() if k.startswith(("pools.", "source"))}
    pools = {k[6:]: v for k, v in tensors.items() if k.startswith("pools.")}
    source = {k[7:]: v for k, v in tensors.items() if k.startswith("source.")}
    tasks = [{k[len(f"task{i}."):]: v for k, v in tensors.items() if k.startswith(f"task{i}.")}
             for i in range(len(settings.tasks))]
    tasks = [t for t in tasks if t]
    if len(tasks) == len(settings.tasks):
        return pools, source, tasks

    torch.set_num_threads(2)
    torch.manual_seed(settings.seed)
    x, y = fashion_train(root)
    model = resnet18(len(settings.source_classes))
    if not source:
        print(f"Fashion-MNIST sequence: training the source network ({settings.source_steps} steps)", flush=True)
        train(model, *subset(x, y, settings.source_classes), settings.source_steps, settings.source_lr,
              settings.batch_size, None, settings.seed, "source")
        model = nws.freeze_pools(nws.convert(model, pool_size=settings.pool_size, init="kernels",
                                             seed=settings.seed))
        pools = {n: layer.pool.codebook.clone() for n, layer in nws.nws_layers(model)}
        source = nws.encode(model)
        tensors = {**{f"pools.{k}": v for k, v in pools.items()}, **{f"source.{k}": v for k, v in source.items()},
                   **{f"source_state.{k}": v for k, v in model.state_dict().items()}}
        save_file(tensors, path)
        meta_path.write_text(json.dumps(asdict(settings)))
    else:
        model = nws.freeze_pools(nws.convert(model, pool_size=settings.pool_size, seed=settings.seed))
        model.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("source_state.")})
    if tasks:  # continue from the last task recorded, rebuilt from its indices and state
        model = resnet18(2)
        model = nws.freeze_pools(nws.convert(model, pool_size=settings.pool_size, seed=settings.seed))
        model.load_state_dict({k[len("last_state."):]: v for k, v in tensors.items()
                               if k.startswith("last_state.")})
        nws.decode(model, tasks[-1])
    for i in range(len(tasks), len(settings.tasks)):
        classes = settings.tasks[i]
        print(f"Fashion-MNIST sequence: task {i}, classes {classes} ({settings.task_steps} steps)", flush=True)
        model = copy.deepcopy(model)
        resize_classifier(model, len(classes), settings.seed + 1 + i)
        for p in model.parameters():
            p.requires_grad_(True)
        train(model, *subset(x, y, classes), settings.task_steps, settings.task_lr, settings.batch_size,
              settings.beta, settings.seed + 1 + i, f"task {i}")
        codes = nws.encode(model)
        nws.decode(model, codes)  # the next task starts from this one rebuilt from its indices
        tasks.append(codes)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("last_state.")}
        tensors.update({f"task{i}.{k}": v for k, v in codes.items()})
        tensors.update({f"last_state.{k}": v for k, v in model.state_dict().items()})
        save_file(tensors, path)
        meta_path.write_text(json.dumps(asdict(settings)))
    return pools, source, tasks
