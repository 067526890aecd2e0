"""Bytes per task for a task's indices: coded alone, and coded against a reference the run already holds.

Coded alone (``nws.pack_codes(codes, sizes)``): per-layer rANS under the layer's Rice-coded histogram, table
and header included, beside the per-layer empirical entropy (the bound without any table), int16 + lzma
(the reference implementation's storage) and fixed-width packing; for a trained demo task and for a
ResNet-18 (ImageNet stem, 1000 classes, K 512) whose indices follow skewed distributions.

Coded against a reference (``nws.pack_codes(codes, sizes, reference, pools)``), for every task of two real
sequences: NWS runs' (``--run DIR ...``: any run directory, such as the demo's or a Split-Fashion-MNIST run;
by default a fresh ``nws demo`` run) and
a ResNet-18 sequence trained on Fashion-MNIST (``benchmarks/fashion_sequence.py``: CIFAR stem, K 512,
pools sampled from a trained source network and frozen, each task trained from the previous one rebuilt
from its indices; cached under ``--cache``). References: the source network's indices (the default: every
task decodes from the shared files and its own), or the previous task's (a chain). Bits per index of:

- (a) the marginal entropy: per layer, N * H(indices) (what coding alone approaches);
- (b) the estimate: per layer, m * h(fraction changed) + the entropy of the changed entries' new indices
  (``nws.conditional_entropy_bits``), against the source and against the previous task;
- (c) int16 + lzma (the reference implementation);
- the coder, against each reference, with the pools (neighbour ranks) and, against the source, without.

The coder is checked against 1.05 * (b) + 100 bytes per task, for each of the three codings, and its bytes
against the source are split into the estimate's two parts (which indices changed, their new indices), beside
what conditioning the changed/unchanged flags on the pools would give. Last, the time to decode a ResNet-18
task's indices and rebuild its weights, coded alone and against the source (with ranks: the pools' neighbour
tables computed in the call, "cold", as the first task a process decodes; or already there, "warm"); and the
time to load a ResNet-18 task from a run directory (task format 2) and rebuild its network, by stage.

    python -m benchmarks.bench_codes [--run runs/demo ...] [--cache ~/.cache/nws-bench] [--task-steps N]
    python -m benchmarks.bench_codes --task-file-only
"""

from __future__ import annotations

import argparse
import lzma
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nws
import nws.methods.base
from benchmarks.fashion_sequence import FASHION_ROOT, Settings, resnet18, sequence
from nws import packing
from nws.models import create_model
from nws.methods.nws import TaskStore

Codes = dict[str, torch.Tensor]


def fixed_width_bytes(codes: Codes, pool_sizes: dict[str, int]) -> int:
    bits = sum(len(idx) * max(1, int(np.ceil(np.log2(pool_sizes[n])))) for n, idx in codes.items())
    return (bits + 7) // 8


def int16_lzma_bytes(codes: Codes) -> int:
    flat = np.concatenate([idx.numpy().astype(np.int16) for idx in codes.values()])
    return len(lzma.compress(flat.tobytes()))


def layout(codes: Codes, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {name: (sizes[name], len(idx)) for name, idx in codes.items()}


def packed(codes: Codes, sizes: dict[str, int], reference: Codes | None = None,
           pools: dict[str, torch.Tensor] | None = None) -> bytes:
    """``nws.pack_codes``, checked to decode exactly."""
    data = nws.pack_codes(codes, sizes, reference, pools)
    out = nws.unpack_codes(data, layout(codes, sizes), reference, pools)
    assert all(torch.equal(out[n], codes[n]) for n in codes)
    return data


def compare(label: str, codes: Codes, pool_sizes: dict[str, int]) -> None:
    bound = sum(nws.entropy_bits(idx, pool_sizes[n]) for n, idx in codes.items()) / 8
    data = packed(codes, pool_sizes)
    n = sum(len(v) for v in codes.values())
    rows = [("int16 + lzma (reference)", int16_lzma_bytes(codes)),
            ("fixed-width packing", fixed_width_bytes(codes, pool_sizes)),
            ("codec, alone (nws.pack_codes)", len(data)),
            ("entropy bound (no table)", bound)]
    print(f"\n{label}: {n:,} indices in {len(codes)} layers, coded alone")
    print("| scheme | bytes | bits per index | vs entropy bound |")
    print("|---|---|---|---|")
    for name, size in rows:
        print(f"| {name} | {size:,.0f} | {8 * size / n:.3f} | {size / bound:.4f}x |")


GUARDED = ("against the source, with the pools (as the store codes a task)",
           "against the previous task, with the pools", "against the source, without the pools")


def conditional(label: str, source: Codes, tasks: list[Codes], pools: dict[str, torch.Tensor]) -> None:
    """The table of bits per index for every task, and the check against 1.05 * (b) + 100 bytes."""
    sizes = {n: book.shape[0] for n, book in pools.items()}
    print(f"\n{label}: bits per index (bytes per task in the last rows)")
    print("| task | indices | changed vs source | changed vs previous | (a) marginal entropy | (c) int16 + lzma "
          "| coded alone | (b) vs source | coder vs source | coder vs source, no pools | (b) vs previous "
          "| coder vs previous |")
    print("|---|" + "---|" * 11)
    totals = np.zeros(10)
    worst: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in GUARDED}
    for i, codes in enumerate(tasks):
        previous = source if i == 0 else tasks[i - 1]
        n = sum(len(v) for v in codes.values())
        changed = [sum(int((codes[k][: len(r[k])] != r[k][: len(codes[k])]).sum()) for k in codes)
                   for r in (source, previous)]
        est_source = nws.conditional_entropy_bits(codes, source, sizes) / 8
        est_previous = nws.conditional_entropy_bits(codes, previous, sizes) / 8
        row = np.array([sum(nws.entropy_bits(v, sizes[k]) for k, v in codes.items()) / 8, int16_lzma_bytes(codes),
                        len(packed(codes, sizes)), est_source, len(packed(codes, sizes, source, pools)),
                        len(packed(codes, sizes, source)), est_previous, len(packed(codes, sizes, previous, pools)),
                        n, 1])
        totals += row
        for kind, est, coded in zip(GUARDED, (est_source, est_previous, est_source), (row[4], row[7], row[5])):
            worst[kind].append((coded - (1.05 * est + 100), coded, est))
        bits = " | ".join(f"{8 * b / n:.3f}" for b in row[:8])
        print(f"| {i} | {n:,} | {changed[0] / n:.1%} | {changed[1] / n:.1%} | {bits} |")
    count = totals[-1]
    print(f"| mean bytes | {totals[8] / count:,.0f} | | | "
          + " | ".join(f"{b / count:,.0f}" for b in totals[:8]) + " |")
    print("coder <= 1.05 * (b) + 100 bytes on every task:")
    for kind, rows in worst.items():
        over, coded, est = max(rows)
        print(f"- {kind}: {'yes' if over <= 0 else 'NO'} (closest: {coded:,.0f} B against a limit of "
              f"{1.05 * est + 100:,.0f} B; coder / (b) from {min(c / e for _, c, e in rows):.3f} to "
              f"{max(c / e for _, c, e in rows):.3f})")


def breakdown(source: Codes, tasks: list[Codes], pools: dict[str, torch.Tensor]) -> None:
    """Where a task's bytes go when coded against the source (mean per task), beside the estimate's two
    terms; and what conditioning the changed/unchanged flags on the pools would have saved."""
    parts = np.zeros(6)
    for codes in tasks:
        for name, indices in codes.items():
            x, r = packing._as_array(indices), packing._as_array(source[name])
            k, book = pools[name].shape[0], pools[name].numpy()
            m = min(len(x), len(r))
            changed = np.flatnonzero(x[:m] != r[:m])
            flags = m * packing._binary_entropy(len(changed) / m) if m else 0.0
            gaps = packing._bucket_plan(np.diff(changed, prepend=-1))[3] if 0 < len(changed) < m else 0.0
            total = []
            for pool in (book, None):
                plan, _ = packing._layer_plan(x, k, r, pool)
                total.append(sum(len(b) for b in plan.bits) + sum(
                    packing._ideal_bits(np.bincount(sym, minlength=len(p)), p.astype(float))
                    for sym, p in plan.segments if len(p) > 1))
            # Flags given the old entry's distance to its nearest other pool entry (8 equal classes).
            dist = ((book[:, None, :].astype(np.float64) - book[None, :, :]) ** 2).sum(-1)
            np.fill_diagonal(dist, np.inf)
            near = dist.min(1)[r[:m]]
            cls = np.searchsorted(np.quantile(near, np.linspace(0, 1, 9)[1:-1]), near)
            flag = np.zeros(m, bool)
            flag[changed] = True
            context = sum((cls == c).sum() * packing._binary_entropy(flag[cls == c].mean()) for c in np.unique(cls))
            new = np.concatenate([x[changed], x[m:]])
            parts += [flags, gaps, nws.entropy_bits(new, k), total[0] - gaps, total[1] - gaps, context]
    parts /= 8 * len(tasks)
    print("\nWhere the bytes go, against the source (mean per task, bytes; tables included, headers not):")
    print("| part | estimate (b) | coder |")
    print("|---|---|---|")
    print(f"| which indices changed | {parts[0]:,.0f} (m h(p)) | {parts[1]:,.0f} (gaps) |")
    print(f"| their new indices | {parts[2]:,.0f} (entropy) | {parts[3]:,.0f} (with ranks), "
          f"{parts[4]:,.0f} (without pools) |")
    print(f"Flags conditioned on the old entry's distance to its nearest pool neighbour (8 classes): "
          f"{parts[5]:,.0f} B, against m h(p) {parts[0]:,.0f} B.")


def demo_sequence(run: Path | None) -> tuple[Codes, list[Codes], dict[str, torch.Tensor]]:
    """Source indices, every task's indices and the pools of a demo run (run first if not given)."""
    if run is None:
        run = Path(tempfile.mkdtemp()) / "demo"
        subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(run), "--trainer.logger", "none"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = TaskStore(run)
    source = nws.encode(store.load_source())
    tasks = [store.codes(t["index"]) for t in store.tasks()]
    return source, tasks, store.pools()[0]


def skewed(n: int, k: int, kind: str, rng: np.random.Generator) -> torch.Tensor:
    if kind.startswith("zipf"):
        p = 1.0 / np.arange(1, k + 1) ** float(kind[4:])
        p = rng.permutation(p)
    else:
        p = rng.dirichlet(np.full(k, 0.5))
    return torch.from_numpy(rng.choice(k, size=n, p=p / p.sum()))


def decode_times(source: Codes, task: Codes, pools: dict[str, torch.Tensor], rounds: int = 7) -> None:
    """Decode a ResNet-18 task's indices (layout, reference and pools checked first) and rebuild its
    weights, interleaved: coded alone; against the source with ranks, neighbour tables cached (warm) or
    computed in the call (cold); against the source without pools. One thread (decoding is NumPy's, single
    threaded), so that on a busy machine a second thread's waits do not dominate the figures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = nws.convert(resnet18(2), pool_size=512)
    for name, layer in nws.nws_layers(model):
        layer.pool.codebook.copy_(pools[name])
    nws.freeze_pools(model).eval()
    sizes = {n: book.shape[0] for n, book in pools.items()}
    with_ranks = packed(task, sizes, source, pools)
    variants = {"coded alone": (packed(task, sizes), None, None, False),
                "against the source, ranks, warm": (with_ranks, source, pools, False),
                "against the source, ranks, cold": (with_ranks, source, pools, True),
                "against the source, no pools": (packed(task, sizes, source), source, None, False)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(rounds):
        for label, (data, reference, books, cold) in variants.items():
            if cold:
                packing._neighbour_order.cache_clear()
            start, cpu = time.perf_counter(), time.process_time()
            codes = nws.unpack_codes(data, nws.code_layout(model), reference, books)
            unpacked = time.perf_counter()
            nws.decode(model, codes)
            times[label].append((unpacked - start, time.perf_counter() - start, time.process_time() - cpu))
    print(f"\nDecode a ResNet-18 task's indices and rebuild its weights (ms, one thread; median and min over "
          f"{rounds} interleaved runs; CPU time of the process beside the wall time):")
    print("| coding | bytes | unpack, median | unpack + rebuild, median | unpack + rebuild, min "
          "| unpack + rebuild, CPU median |")
    print("|---|---|---|---|---|---|")
    for label, values in times.items():
        unpack, total, cpu = zip(*values)
        print(f"| {label} | {len(variants[label][0]):,} | {1000 * statistics.median(unpack):.0f} "
              f"| {1000 * statistics.median(total):.0f} | {1000 * min(total):.0f} "
              f"| {1000 * statistics.median(cpu):.0f} |")
    torch.set_num_threads(threads)


@torch.no_grad()
def task_file_times(rounds: int = 7, changed: float = 0.12) -> None:
    """Load a ResNet-18 task from its run directory and rebuild its network, as ``nws eval`` and the next task
    do: a run (CIFAR stem, K 512 pools sampled from the network's kernels, the source network's indices as the
    reference) whose task moved ``changed`` of its kernels by a small step (about the fraction a Fashion-MNIST
    task changes), written by :class:`TaskStore` in task format 2. Timed per stage, one thread, interleaved
    rounds: a fresh reader (manifest, pools, reference, the task's file verified, parsed and decoded, the
    model built, its state loaded), and each stage of a reader that has read the shared files once."""
    from nws.methods.nws import TaskStore
    from nws.spec import ModelSpec
    from nws.taskfile import build_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = ModelSpec("resnet18", 10, {"in_channels": 1, "stem": "cifar"}, pool_size=512, group_size=1)
    torch.manual_seed(0)
    source = nws.convert(create_model("resnet18", num_classes=10, in_channels=1, stem="cifar"), pool_size=512,
                         init="kernels")
    nws.freeze_pools(source).eval()
    root = Path(tempfile.mkdtemp()) / "run"
    store = TaskStore(root, create=True)
    store.save_pools(source, spec)
    store.save_source(source, spec)
    store.save_reference()
    task = store.load_source()
    nws.methods.base.resize_classifier(task, "fc", 2, seed=0)
    for _, layer in nws.nws_layers(task):
        w = layer.weight.view(layer.num_kernels, -1)
        moved = torch.rand(layer.num_kernels) < changed
        w[moved] += 0.5 * w[moved].std() * torch.randn_like(w[moved])
    sizes = store.save_task(0, task, "task 0", ["0", "1"])
    print(f"\nLoad a ResNet-18 task file and rebuild its network (task format 2; {sizes['indices']:,} B of indices, "
          f"{(root / 'task_000.safetensors').stat().st_size:,} B file; ms, one thread, median and min over {rounds} "
          f"interleaved rounds, and the process's CPU time):")
    labels = ("fresh reader: open, shared files, task, model", "read + verify + parse the task file",
              "decode its indices (against the reference)", "build the model, load pools, indices and state",
              "the three together")
    stages: dict[str, list[tuple[float, float]]] = {k: [] for k in labels}
    warm = TaskStore(root)
    warm.model(0)
    for _ in range(rounds):
        start, cpu = time.perf_counter(), time.process_time()
        TaskStore(root).model(0)
        stages[labels[0]].append((time.perf_counter() - start, time.process_time() - cpu))
        warm._codes.clear()
        marks = [(time.perf_counter(), time.process_time())]
        tf = warm._task_file(0)
        marks.append((time.perf_counter(), time.process_time()))
        codes = warm.codes(0)
        marks.append((time.perf_counter(), time.process_time()))
        books, _, run_spec = warm._read_pools()
        build_task(tf, books, run_spec, codes=codes)
        marks.append((time.perf_counter(), time.process_time()))
        for label, (a, b) in zip(labels[1:], ((0, 1), (1, 2), (2, 3), (0, 3))):
            stages[label].append((marks[b][0] - marks[a][0], marks[b][1] - marks[a][1]))
    print("| stage | median | min | CPU median |\n|---|---|---|---|")
    for label, values in stages.items():
        wall, cpu = zip(*values)
        print(f"| {label} | {1000 * statistics.median(wall):.0f} | {1000 * min(wall):.0f} "
              f"| {1000 * statistics.median(cpu):.0f} |")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-file-only", action="store_true",
                        help="only time loading a ResNet-18 task file and rebuilding its network (no sequence)")
    parser.add_argument("--run", type=Path, nargs="*", default=[],
                        help="NWS run directories (default: run the demo)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nws-bench",
                        help="where the trained ResNet-18 Fashion-MNIST sequence is kept")
    parser.add_argument("--fashion-root", type=Path, default=FASHION_ROOT,
                        help="directory of the Fashion-MNIST IDX files (Debian: dataset-fashion-mnist)")
    parser.add_argument("--task-steps", type=int, default=Settings.task_steps,
                        help="training steps per task of the ResNet-18 sequence")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.task_file_only:
        task_file_times()
        return

    # Trained (slowly: an hour or more on 2 cores) only when not in the cache.
    fashion = sequence(args.cache, args.fashion_root, Settings(task_steps=args.task_steps))
    demos = [(run, *demo_sequence(run)) for run in args.run or [None]]
    _, source, tasks, pools = demos[0]
    sizes = {n: book.shape[0] for n, book in pools.items()}
    compare("Demo task 0 (trained, digits convnet)", tasks[0], sizes)
    model = nws.convert(create_model("resnet18", num_classes=1000), pool_size=512)
    layers = dict(nws.nws_layers(model))
    rng = np.random.default_rng(0)
    for kind in ("zipf0.7", "zipf1.0", "dirichlet"):
        codes = {n: skewed(layer.num_kernels, 512, kind, rng) for n, layer in layers.items()}
        compare(f"ResNet-18, indices ~ {kind}", codes, {n: 512 for n in layers})

    for run, source, tasks, pools in demos:
        k = max(book.shape[0] for book in pools.values())
        conditional(f"Run {run or '(the demo)'} ({len(tasks)} tasks, K {k})", source, tasks, pools)
        breakdown(source, tasks, pools)
    fashion_pools, fashion_source, fashion_tasks = fashion
    conditional(f"ResNet-18 on Fashion-MNIST ({len(fashion_tasks)} tasks, CIFAR stem, K 512)", fashion_source,
                fashion_tasks, fashion_pools)
    breakdown(fashion_source, fashion_tasks, fashion_pools)
    decode_times(fashion_source, fashion_tasks[-1], fashion_pools)
    task_file_times()


if __name__ == "__main__":
    main()
