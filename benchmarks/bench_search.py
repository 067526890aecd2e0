"""Cost of NWS training against plain training: ResNet-18 (CIFAR stem), batch 32, 32x32, K 512, g 1.

Times one SGD step (lr 0.01, momentum 0.9, nesterov, wd 4e-5; beta 0.5) for
  (a) the plain network (ordinary Conv2d/Linear),
  (b) NWS with the reference implementation's search (full distance matrix and one-hot matrix per layer per
      forward),
  (c) NWS as shipped (bounded incremental search of the frozen pools),
measured round-robin in one process so machine noise hits all three alike, after warm-up. The NWS models
start as a task does: from weights decoded from indices (the previous task), pools frozen. Then the peak
memory of one step of each, the search's own state and working memory, and how the cost grows with the
pool size and the layer size.

    python benchmarks/bench_search.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_search.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nws
from nws.models import create_model
from nws.search import BoundedSearch, nearest


class ReferenceSearch:
    """The reference implementation's search: ``|x|^2 - 2 x E + |E|^2`` for all kernels and entries, argmin,
    and a one-hot matrix times the pool, on every forward (same interface as :class:`BoundedSearch`)."""

    last_rows = None
    last_searched = 0

    def __call__(self, x: Tensor, codebook: Tensor, frozen: bool = True, current: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)[None]
            indices = dist.argmin(1)
            onehot = F.one_hot(indices, codebook.shape[0]).to(x.dtype)
            (onehot @ codebook).sum()  # the reference builds the searched kernels from the one-hot matrix
        self.last_searched = len(x)
        return indices


def make_models(pool_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    plain = create_model("resnet18", num_classes=10, stem="cifar")
    shipped = nws.convert(copy.deepcopy(plain), pool_size=pool_size, init="kernels", seed=seed)
    nws.freeze_pools(shipped)
    nws.decode(shipped, nws.encode(shipped))  # a task starts from weights rebuilt from indices
    with torch.no_grad():  # the plain network starts from the same weights
        for (_, p), (_, q) in zip(plain.named_parameters(), nws.materialize(shipped).named_parameters()):
            p.copy_(q)
    reference = copy.deepcopy(shipped)
    for _, layer in nws.nws_layers(reference):
        layer._search = ReferenceSearch()
    for _, layer in nws.nws_layers(shipped):
        layer._search = BoundedSearch()
    return plain, reference, shipped


class Stepper:
    """One SGD training step of a model on fixed random batches."""

    def __init__(self, model: nn.Module, beta: float, batches: list[tuple[Tensor, Tensor]]):
        self.model, self.beta, self.batches, self.i = model.train(), beta, batches, 0
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)

    def __call__(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(x), y)
        if self.beta:
            loss = loss + self.beta * nws.commitment_loss(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def batches(n: int = 8, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(10, (32,), generator=g)) for _ in range(n)]


def round_robin(steppers: dict[str, Stepper], rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steppers.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            times[name].append(step())
    return times


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _fresh(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", "import benchmarks.bench_search as b, torch; "
                          "torch.set_num_threads(2); " + code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.split()[-1])


def release() -> float:
    """Return freed heap memory to the OS and reset the peak, so the next peak counts new memory only."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def step_peak_mb(variant: str) -> float:
    """Peak resident memory of 3 training steps above the built model, in a fresh process (Linux)."""
    return _fresh(f"m = b.make_models(512)[{'abc'.index(variant)}]; s = b.Stepper(m, "
                  f"{0.0 if variant == 'a' else 0.5}, b.batches(2)); base = b.release(); "
                  "[s() for _ in range(3)]; print(b.rss_mb('VmHWM') - base)")


def search_peak_mb() -> float:
    """Peak working memory of searching every layer of the shipped model after its weights moved."""
    return _fresh("m = b.make_models(512)[2]; s = b.Stepper(m, 0.5, b.batches(2)); s(); "
                  "layers = [l for _, l in b.nws.nws_layers(m)]; "
                  "[l.weight.data.add_(1e-3 * torch.randn_like(l.weight)) for l in layers]; base = b.release(); "
                  "[l._searched() for l in layers]; print(b.rss_mb('VmHWM') - base)")


def search_state_mb(model: nn.Module) -> float:
    total = 0
    for _, layer in nws.nws_layers(model):
        s = layer._search
        for t in (s.indices, s.anchor, s.lower, s.codebook, getattr(s, "nbr", None), getattr(s, "radius", None),
                  getattr(s, "columns", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rounds, warmup = (6, 3) if args.quick else (20, 5)
    data = batches()
    plain, reference, shipped = make_models(512)
    steppers = {"a plain": Stepper(plain, 0.0, data), "b NWS, reference search": Stepper(reference, 0.5, data),
                "c NWS, shipped": Stepper(shipped, 0.5, data)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 (CIFAR stem), batch 32, 32x32, "
          f"K 512, g 1; {rounds} rounds after {warmup} warm-up rounds")
    times = round_robin(steppers, rounds, warmup)
    base = times["a plain"]
    print("\n| variant | time per step (median) | ratio to (a), median of per-round ratios |")
    print("|---|---|---|")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"| {name} | {1000 * statistics.median(ts):.0f} ms | {statistics.median(ratios):.3f}x |")
    searched = [l._search.last_searched for _, l in nws.nws_layers(shipped)]
    total = sum(l.num_kernels for _, l in nws.nws_layers(shipped))
    print(f"\n(c) kernels searched again in the last step: {sum(searched):,} of {total:,} "
          f"({100 * sum(searched) / total:.1f}%), the rest proved by the bounds")

    peaks = {v: step_peak_mb(v) for v in "abc"}
    state, work = search_state_mb(shipped), search_peak_mb()
    q = sum(layer.weight.numel() * 4 for _, layer in nws.nws_layers(shipped)) / 2**20
    print("\n| memory (MB) | (a) plain | (b) reference | (c) shipped |")
    print("|---|---|---|---|")
    print(f"| peak of 3 training steps above the built model | {peaks['a']:.0f} | {peaks['b']:.0f} | {peaks['c']:.0f} |")
    print(f"| NWS extra: minus (a) | - | {peaks['b'] - peaks['a']:.0f} | {peaks['c'] - peaks['a']:.0f} |")
    print(f"| searched weights the convolutions use (any NWS) | - | {q:.0f} | {q:.0f} |")
    print(f"| search state kept between steps | - | 0 | {state:.1f} |")
    print(f"| search working memory (peak while searching all layers) | - | - | {work:.1f} |")
    print(f"| **search extra memory: state + working** | - | - | **{state + work:.1f}** |")

    print("\nCost as the pool grows (ResNet-18, one step each, round-robin with plain):")
    print("| K | (a) plain | (c) shipped | ratio | full exact search of all layers |")
    print("|---|---|---|---|---|")
    for k in (128, 256, 512, 1024, 2048, 4096):
        p, _, s = make_models(k)
        t = round_robin({"a": Stepper(p, 0.0, data), "c": Stepper(s, 0.5, data)}, max(3, rounds // 4), 2)
        kernels = [layer.kernels().detach() for _, layer in nws.nws_layers(s)]
        books = [layer.pool.codebook for _, layer in nws.nws_layers(s)]
        start = time.perf_counter()
        for x, book in zip(kernels, books):
            nearest(x, book)
        full = time.perf_counter() - start
        ratio = statistics.median([c / a for c, a in zip(t["c"], t["a"])])
        print(f"| {k} | {1000 * statistics.median(t['a']):.0f} ms | {1000 * statistics.median(t['c']):.0f} ms | "
              f"{ratio:.3f}x | {1000 * full:.0f} ms |")

    print("\nCost as the layer grows (one 3x3 conv, K 512, 20 SGD steps of a random regression, search time per step):")
    print("| layer | kernels | reference search | shipped search | full exact search |")
    print("|---|---|---|---|---|")
    for ch in (64, 128, 256, 512):
        rows = []
        for search in (ReferenceSearch(), BoundedSearch(), "full"):
            torch.manual_seed(0)
            layer = nws.convert(nn.Conv2d(ch, ch, 3, padding=1, bias=False), pool_size=512, init="kernels")
            layer.pool.freeze()
            nws.decode(layer, nws.encode(layer))
            x = torch.randn(8, ch, 8, 8)
            opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
            spent = 0.0
            for i in range(20):
                opt.zero_grad()
                layer(x).pow(2).mean().backward()
                opt.step()
                kernels = layer.kernels().detach()
                start = time.perf_counter()
                if search == "full":
                    nearest(kernels, layer.pool.codebook)
                else:
                    search(kernels, layer.pool.codebook)
                spent += time.perf_counter() - start if i >= 5 else 0.0
            rows.append(spent / 15)
        print(f"| {ch}->{ch} | {ch * ch:,} | {1000 * rows[0]:.1f} ms | {1000 * rows[1]:.1f} ms | {1000 * rows[2]:.1f} ms |")


if __name__ == "__main__":
    main()
