"""Cost of NWS training against plain training, over whole tasks and during pool pretraining, on real images.

ResNet-18 (CIFAR stem, one input channel), K 512, g 1, batch 32, SGD (lr 0.01, momentum 0.9, nesterov, weight
decay 4e-5), beta 0.5, learning Fashion-MNIST T-shirt vs trouser (padded to 32x32), a fresh batch every step.
Every ratio is the median, over steps, of NWS step time / plain step time: the networks take the same batch
one after the other in one process (the order rotating), so machine noise hits all alike. By default the
threads are torch's default (what a user gets) and steps are timed by the wall clock. One life cycle, in order:
  (1) pool pretraining: the pools move (EMA update after every step), from pools sampled from the kernels,
      shown from its first step (steps 0-5, 5-25) and after a warm-up;
  (2) task 0: pools frozen, starting from the pretrained weights, which are not on their entries;
  (3) task 1: starting from task 0's weights rebuilt from its indices (every kernel on its entry), a long run
      shown in windows, to see that the cost stays where it settles.
(2) and (3) run the nearest-entry search (lam 0) and the rate-aware one (``--lam``, against the source
network's indices, :mod:`nws.rate`) side by side with plain training. (4) a whole task from the source network
at ``--lam``, from the first step and warmed up (``model.rate_warmup 0.5``), against plain training.
Then the search variants side by side on a decoded start: plain, NWS with an exact chunked search of every
kernel every step (``nearest``), NWS as shipped, NWS with the reference implementation's search (full
distance matrix, argmin and one-hot product per layer per forward); the memory of each; and how the cost
grows with the pool size and the layer size.

Needs the Fashion-MNIST IDX files (Debian: ``apt-get install dataset-fashion-mnist``; or ``--data DIR``).

    python benchmarks/bench_search.py            # full run
    python benchmarks/bench_search.py --quick    # a smoke run: a few steps of each part
    python benchmarks/bench_search.py --threads 1 --clock cpu   # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gzip
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# nws first, as a run imports it: its OpenMP setting (GOMP_SPINCOUNT, nws/__init__.py) holds only if set
# before torch loads libgomp, and the threads' wait policy is part of what a step costs.
import nws  # noqa: I001

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nws.bounded_search import BoundedSearch
from nws.models import create_model
from nws.search import nearest

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (0, 1)  # T-shirt/top, trouser


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped), as in the MNIST distribution: magic, dimensions, then unsigned bytes."""
    data = gzip.decompress(path.read_bytes())
    if data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: Path = DATA) -> tuple[Tensor, Tensor]:
    """Training images of the two classes, scaled to [-1, 1] and padded to 32x32, and their labels 0/1."""
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    keep = np.isin(labels, CLASSES)
    x = torch.from_numpy(images[keep].astype(np.float32) / 127.5 - 1.0)
    y = torch.from_numpy((labels[keep] == CLASSES[1]).astype(np.int64))
    return F.pad(x, (2, 2, 2, 2), value=-1.0)[:, None], y


class Batches:
    """A fresh random batch of 32 every call (seeded)."""

    def __init__(self, data: tuple[Tensor, Tensor], seed: int = 0):
        self.x, self.y = data
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[Tensor, Tensor]:
        i = torch.randint(len(self.y), (32,), generator=self.gen)
        return self.x[i], self.y[i]


class ExactSearch:
    """A fair baseline: the exact chunked search (:func:`nws.nearest`) of every kernel on every forward."""

    last_searched = last_full = 0

    def __call__(self, x: Tensor, codebook: Tensor, rate: object = None) -> Tensor:
        indices = nearest(x, codebook)
        self.searched = codebook[indices]
        self.last_searched = self.last_full = len(x)
        return indices

    def prime(self, indices: Tensor, codebook: Tensor) -> None:
        pass


class ReferenceSearch(ExactSearch):
    """The reference implementation's search: ``|x|^2 - 2 x E + |E|^2`` for all kernels and entries, argmin,
    and the searched kernels as a one-hot matrix times the pool, on every forward."""

    def __call__(self, x: Tensor, codebook: Tensor, rate: object = None) -> Tensor:
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)[None]
        indices = dist.argmin(1)
        self.searched = F.one_hot(indices, codebook.shape[0]).to(x.dtype) @ codebook
        self.last_searched = self.last_full = len(x)
        return indices


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=2, in_channels=1, stem="cifar")


def nws_model(plain: nn.Module, pool_size: int = 512, seed: int = 0) -> nn.Module:
    """``plain`` converted, its pools sampled from its own kernels (trainable)."""
    return nws.convert(copy.deepcopy(plain), pool_size=pool_size, init="kernels", seed=seed)


def decoded(model: nn.Module) -> nn.Module:
    """Freeze the pools and rebuild the weights from the indices: how a task after the first starts."""
    nws.freeze_pools(model)
    nws.decode(model, nws.encode(model))
    return model


def copy_weights(plain: nn.Module, model: nn.Module) -> None:
    """Give the plain network the searched weights of ``model`` (same start, so the same work per step)."""
    with torch.no_grad():
        for p, q in zip(plain.parameters(), nws.materialize(model).parameters()):
            p.copy_(q)


CLOCK = time.perf_counter  # --clock cpu: process time, for one thread on a busy machine


class Stepper:
    """One SGD training step; for NWS, the commitment loss and (pools trainable) the EMA pool update."""

    def __init__(self, model: nn.Module, nws_loss: bool):
        self.model, self.nws_loss = model.train(), nws_loss
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)

    def __call__(self, x: Tensor, y: Tensor) -> float:
        start = CLOCK()
        loss = F.cross_entropy(self.model(x), y)
        if self.nws_loss:
            loss = loss + 0.5 * nws.commitment_loss(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.nws_loss:
            nws.update_pools(self.model)
        return CLOCK() - start


def search_counts(model: nn.Module) -> tuple[int, int, int]:
    """Over the layers whose kernels are longer than 1 (length-1 kernels are searched in full every step, by
    binary search): kernels searched again in the last call, searched in full, and all their kernels."""
    layers = [layer for _, layer in nws.nws_layers(model) if layer.pool.dim > 1]
    return (sum(layer._search.last_searched for layer in layers), sum(layer._search.last_full for layer in layers),
            sum(layer.num_kernels for layer in layers))


Row = tuple[float, list[float], list[int], list[int]]  # plain time; per NWS model: time, searched again, in full


def steps(plain: nn.Module, models: list[nn.Module], batches: Batches, count: int,
          before: Callable[[int], None] | None = None) -> list[Row]:
    """``count`` training steps of the plain network and every NWS network on the same fresh batches, one
    after the other, the order rotating every step (so machine noise hits all alike); ``before(i)`` is called
    before step ``i``, untimed."""
    steppers = [Stepper(plain, False)] + [Stepper(m, True) for m in models]
    out = []
    for i in range(count):
        if before is not None:
            before(i)
        x, y = batches()
        times = [0.0] * len(steppers)
        for j in range(len(steppers)):
            k = (i + j) % len(steppers)
            times[k] = steppers[k](x, y)
        counts = [search_counts(m)[:2] for m in models]
        out.append((times[0], times[1:], [c[0] for c in counts], [c[1] for c in counts]))
    return out


def ratio(rows: list[Row], j: int = 0) -> float:
    """Median over steps of NWS model ``j``'s step time / the plain step time."""
    return statistics.median(r[1][j] / r[0] for r in rows)


def shares(rows: list[Row], total: int, j: int = 0) -> str:
    return " | ".join(f"{100 * statistics.mean(r[i][j] for r in rows) / total:.2f}%" for i in (2, 3))


HEADER = ("| steps | NWS / plain (median of step ratios) | plain (median) | NWS (median) | kernels searched again "
          "per step | of them in full |\n|---|---|---|---|---|---|")


def table(rows: list[Row], windows: list[tuple[int, int]], total: int, names: list[str]) -> None:
    print(HEADER.replace("| steps |", "| NWS | steps |").replace("|---|", "|---|---|", 1))
    for j, name in enumerate(names):
        for lo, hi in windows:
            part = rows[lo:hi]
            print(f"| {name} | {lo}-{hi} | **{ratio(part, j):.3f}x** | {1000 * statistics.median(r[0] for r in part):.0f} ms | "
                  f"{1000 * statistics.median(r[1][j] for r in part):.0f} ms | {shares(part, total, j)} |")


def rate_aware(model: nn.Module, lam: float) -> nn.Module:
    """A copy of ``model`` searching rate-aware at ``lam`` against the source network's indices (what a task
    file is coded against by default), with the prior bit model."""
    model = copy.deepcopy(model)
    nws.set_rate(model, REFERENCE, lam)
    return model


REFERENCE: dict[str, Tensor] = {}


def life_cycle(data: tuple[Tensor, Tensor], warmup: int, measured: int, long: int, lam: float) -> None:
    plain = plain_model()
    model = nws_model(plain)
    total = search_counts(model)[2]
    print(f"\nKernels counted: the {total:,} kernels of length 9 (3x3 convs); the length-1 kernels of the 1x1 "
          "convs and the classifier are proved by their entry's cell, searched when they leave it.")
    batches = Batches(data)

    copy_weights(plain, model)
    start = time.perf_counter()
    rows = steps(plain, [model], batches, max(25, warmup + measured))
    print(f"\n(1) pool pretraining, pools moving, from its first step ({time.perf_counter() - start:.0f} s)")
    table(rows, [(0, 5), (5, 25), (warmup, warmup + measured)], total, ["shipped"])

    nws.freeze_pools(model)
    REFERENCE.update(nws.encode(model))  # the source network's indices
    names = ["lam 0", f"lam {lam:g}"]
    for title, warm, count in (("(2) task 0, off-entry start (the pretrained weights), pools frozen", warmup, measured),
                               ("(3) task 1, decoded start (task 0's weights rebuilt from its indices)", warmup, long)):
        if title.startswith("(3)"):
            decoded(model)
        copy_weights(plain, model)
        models = [model, rate_aware(model, lam)]
        start = time.perf_counter()
        rows = steps(plain, models, batches, warm + count)
        left = [sum(int((c[n][: len(REFERENCE[n])] != REFERENCE[n]).sum()) for n in c) / sum(map(len, c.values()))
                for c in (nws.encode(m) for m in models)]
        print(f"\n{title}: {warm} warm-up steps, then {count} steps ({time.perf_counter() - start:.0f} s); kernels "
              f"off the source's entries at the end: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in zip(names, left)))
        edges = [warm] + [e for e in (100, 200, 300, 500, 1000) if warm < e < warm + count] + [warm + count]
        table(rows, [(warm, warm + count)] + (list(zip(edges, edges[1:])) if len(edges) > 2 else []), total, names)
        model = models[0]


def warmup_cost(data: tuple[Tensor, Tensor], count: int, lam: float) -> None:
    """A whole task of ``count`` steps from the source network (off its entries, as ``model.task_start:
    source`` starts), the rate at ``lam`` from the first step or warmed up over the first half
    (:class:`nws.methods.nws.RateWarmup`, as a run drives it: 16 levels, the first a new penalty, the rest
    repriced), side by side with plain training: the total time of the task, level changes included."""
    from types import SimpleNamespace

    from nws.methods.nws import RateWarmup

    plain = plain_model()
    model = nws.freeze_pools(nws_model(plain))
    REFERENCE.update(nws.encode(model))
    copy_weights(plain, model)
    warm = copy.deepcopy(model)
    warmup = RateWarmup(REFERENCE, lam, 0.5)
    def level(i: int) -> None:  # as the trainer calls it before step i
        warmup.on_train_batch_start(SimpleNamespace(global_step=i, estimated_stepping_batches=count),
                                    SimpleNamespace(model=warm), None, i)

    rows = steps(plain, [rate_aware(model, lam), warm], Batches(data), count, level)
    totals = [sum(r[0] for r in rows)] + [sum(r[1][j] for r in rows) for j in range(2)]
    print(f"\n(4) a whole task of {count} steps from the source network (off its entries), lam {lam:g}: total time "
          "against plain training\n| NWS | total | / plain |\n|---|---|---|")
    print(f"| plain | {totals[0]:.1f} s | 1 |")
    for name, total in zip((f"lam {lam:g} from the first step", "warmed up over the first half"), totals[1:]):
        print(f"| {name} | {total:.1f} s | **{total / totals[0]:.3f}x** |")


def variant_models(pool_size: int = 512) -> dict[str, nn.Module]:
    plain = plain_model()
    shipped = decoded(nws_model(plain, pool_size))
    copy_weights(plain, shipped)
    models = {"a plain": plain}
    for name, search in (("b NWS, exact chunked search of every kernel every step", ExactSearch),
                         ("c NWS, shipped", BoundedSearch),
                         ("d NWS, reference implementation's search", ReferenceSearch)):
        model = copy.deepcopy(shipped)
        for _, layer in nws.nws_layers(model):
            layer._search = search()
        nws.decode(model, nws.encode(shipped))
        models[name] = model
    return models


def variants(data: tuple[Tensor, Tensor], rounds: int, warmup: int) -> None:
    models = variant_models()
    steppers = {name: Stepper(m, not name.startswith("a")) for name, m in models.items()}
    batches = Batches(data, seed=1)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i in range(warmup + rounds):
        x, y = batches()
        for name, step in steppers.items():
            t = step(x, y)
            if i >= warmup:
                times[name].append(t)
    print(f"\nSearch variants, decoded start, {rounds} rounds after {warmup} warm-up rounds (round-robin):")
    print("| variant | time per step (median) | ratio to (a), median of per-round ratios |\n|---|---|---|")
    base = times["a plain"]
    for name, ts in times.items():
        per_round = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| {name} | {1000 * statistics.median(ts):.0f} ms | {per_round:.3f}x |")


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _fresh(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", "import benchmarks.bench_search as b, torch; "
                          f"torch.set_num_threads({torch.get_num_threads()}); " + code], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.split()[-1])


def release() -> float:
    """Return freed heap memory to the OS and reset the peak, so the next peak counts new memory only."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def step_peak_mb(variant: str) -> float:
    """Peak resident memory of 3 training steps above the built model, in a fresh process (Linux)."""
    return _fresh(f"m = list(b.variant_models().values())[{'abcd'.index(variant)}]; s = b.Stepper(m, "
                  f"{variant != 'a'}); x = torch.randn(32, 1, 32, 32); y = torch.randint(2, (32,)); "
                  "base = b.release(); [s(x, y) for _ in range(3)]; print(b.rss_mb('VmHWM') - base)")


def search_peak_mb() -> float:
    """Peak working memory of searching every layer of the shipped model after its weights moved."""
    return _fresh("m = b.variant_models()['c NWS, shipped']; x = torch.randn(32, 1, 32, 32); "
                  "b.Stepper(m, True)(x, torch.randint(2, (32,))); layers = [l for _, l in b.nws.nws_layers(m)]; "
                  "[l.weight.data.add_(1e-3 * torch.randn_like(l.weight)) for l in layers]; base = b.release(); "
                  "[l._searched() for l in layers]; print(b.rss_mb('VmHWM') - base)")


def search_state_mb(model: nn.Module) -> float:
    total = 0
    for _, layer in nws.nws_layers(model):
        s = layer._search
        for t in (s.indices, s.anchor, s.lower, s.cand, s.rest, s.codebook, s._limit and s._limit[0]):
            if t is not None:  # (length-1 kernels keep no bounds)
                total += t.numel() * t.element_size()
    return total / 2**20


def memory() -> None:
    peaks = {v: step_peak_mb(v) for v in "abcd"}
    models = variant_models()
    shipped = models["c NWS, shipped"]
    Stepper(shipped, True)(torch.randn(32, 1, 32, 32), torch.randint(2, (32,)))
    state, work = search_state_mb(shipped), search_peak_mb()
    q = sum(layer.weight.numel() * 4 for _, layer in nws.nws_layers(shipped)) / 2**20
    print("\n| memory (MB) | (a) plain | (b) exact every step | (c) shipped | (d) reference |")
    print("|---|---|---|---|---|")
    print(f"| peak of 3 training steps above the built model | {peaks['a']:.0f} | {peaks['b']:.0f} | "
          f"{peaks['c']:.0f} | {peaks['d']:.0f} |")
    print(f"| NWS extra: minus (a) | - | {peaks['b'] - peaks['a']:.0f} | {peaks['c'] - peaks['a']:.0f} | "
          f"{peaks['d'] - peaks['a']:.0f} |")
    print(f"| searched weights the convolutions use (any NWS) | - | {q:.0f} | {q:.0f} | {q:.0f} |")
    print(f"| search state kept between steps | - | 0 | {state:.1f} | 0 |")
    print(f"| search working memory (peak while searching all layers) | - | - | {work:.1f} | - |")
    print(f"| **search extra memory: state + working** | - | - | **{state + work:.1f}** | - |")


def scaling(data: tuple[Tensor, Tensor], rounds: int, warmup: int) -> None:
    print(f"\nCost as the pool grows (decoded start, step pairs with plain, {rounds} after {warmup} warm-up pairs):")
    print("| K | (a) plain | (c) shipped | ratio | full exact search of all layers |\n|---|---|---|---|---|")
    for k in (128, 256, 512, 1024, 2048, 4096):
        plain = plain_model()
        model = decoded(nws_model(plain, k))
        copy_weights(plain, model)
        rows = steps(plain, [model], Batches(data, seed=2), warmup + rounds)[warmup:]
        kernels = [layer.kernels().detach() for _, layer in nws.nws_layers(model)]
        books = [layer.pool.codebook for _, layer in nws.nws_layers(model)]
        start = time.perf_counter()
        for x, book in zip(kernels, books):
            nearest(x, book)
        full = time.perf_counter() - start
        print(f"| {k} | {1000 * statistics.median(r[0] for r in rows):.0f} ms | "
              f"{1000 * statistics.median(r[1][0] for r in rows):.0f} ms | {ratio(rows):.3f}x | {1000 * full:.0f} ms |")

    print("\nCost as the layer grows (one 3x3 conv, K 512, 20 SGD steps of a random regression, search time "
          "per step after 5):")
    print("| layer | kernels | reference search | exact chunked search | shipped search |\n|---|---|---|---|---|")
    for ch in (64, 128, 256, 512):
        spent = []
        for search in (ReferenceSearch(), ExactSearch(), BoundedSearch()):
            torch.manual_seed(0)
            layer = nws.convert(nn.Conv2d(ch, ch, 3, padding=1, bias=False), pool_size=512, init="kernels")
            decoded(layer)
            x = torch.randn(8, ch, 8, 8)
            opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
            total = 0.0
            for i in range(20):
                opt.zero_grad()
                layer(x).pow(2).mean().backward()
                opt.step()
                kernels = layer.kernels().detach()
                start = time.perf_counter()
                search(kernels, layer.pool.codebook)
                total += time.perf_counter() - start if i >= 5 else 0.0
            spent.append(total / 15)
        print(f"| {ch}->{ch} | {ch * ch:,} | {1000 * spent[0]:.1f} ms | {1000 * spent[1]:.1f} ms | "
              f"{1000 * spent[2]:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps of each part")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's default, what a user gets: one per core)")
    parser.add_argument("--lam", type=float, default=0.5, help="the rate-aware search's lambda for the task starts")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by the wall clock or by this process's CPU time (one thread on a busy machine)")
    parser.add_argument("--only", choices=("cycle", "warmup", "variants", "memory", "scaling"), action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"no Fashion-MNIST in {args.data}: apt-get install dataset-fashion-mnist, or pass --data")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    parts = args.only or ["cycle", "warmup", "variants", "memory", "scaling"]
    warmup, measured, long, rounds = (10, 10, 20, 3) if args.quick else (60, 40, 300, 10)
    data = fashion_mnist(args.data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; ResNet-18 (CIFAR stem), batch 32, "
          f"K 512, g 1; Fashion-MNIST {len(data[1]):,} images (T-shirt vs trouser), a fresh batch every step")
    if "cycle" in parts:
        life_cycle(data, warmup, measured, long, args.lam)
    if "warmup" in parts:
        warmup_cost(data, 32 if args.quick else 320, args.lam)
    if "variants" in parts:
        variants(data, rounds, 3)
    if "memory" in parts:
        memory()
    if "scaling" in parts:
        scaling(data, rounds, 10 if rounds > 3 else 1)


if __name__ == "__main__":
    main()
