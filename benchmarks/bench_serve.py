"""Serving 20 ResNet-18 tasks from one process (``nws.serve.TaskServer``) against 20 separate float networks.

The run: a real pretrained ResNet-18 NWS source (the first stage of ``benchmarks/fashion_sequence.py``: CIFAR
stem, one input channel, 150 SGD steps on Fashion-MNIST classes 0-4, pools of 512 entries sampled from its
trained kernels, frozen; cached under ``--cache``), stored as an NWS run directory (pools, source network,
reference), and 20 synthetic tasks written by the store's own ``save_task``: each task takes the
source's indices and, in every layer, moves a fraction ``--changed`` of its grouped kernels (default 0.3; the
trained tasks of docs/results.md move 0.57-0.78 at the accuracy-tuned lr, fewer with ``model.rate``) to a nearby
pool entry (the k-th nearest to the source's entry, k drawn from a geometric distribution, mean 2), multiplies
its BatchNorm weights and running variances by exp(N(0, 0.1)) and shifts its biases and running means by N(0,
0.1), and gets a new two-class classifier (seeded per task). The tasks are stored as any task is (indices coded
against the reference, BatchNorm float32), so their files, decoding and rebuilding are what serving real
tasks costs; their accuracy is not measured.

Measured, each configuration in a fresh process (RSS from /proc/self/status: after importing torch and nws and
one forward, then after setting up and warming; tensor bytes counted exactly), at ``--threads`` compute threads:

- ``float``: the 20 tasks' plain networks, all held (what serving without nws takes);
- ``server``: ``TaskServer(run, cache_size=C)`` for C in ``--cache-sizes`` (default 1, 4, 20);
- per configuration: a cache miss (a task's network rebuilt from the held files: decode, build, materialise;
  median over the 20 tasks), a hit (a cached network's forward of one image), and the throughput of switching
  round robin over the 20 tasks (a batch of 1 and of 32 per call), i.e. the worst case for a cache below 20;
- NWS layers that search in every forward (``store.model(i)``) against the materialised network, per image.

The machine's load average is recorded with every figure: run it as quietly as the machine allows.

    python -m benchmarks.bench_serve [--cache ~/.cache/nws-bench] [--threads 1] [--changed 0.3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TASKS = 20


def rss() -> dict[str, int]:
    """This process's resident set size now and at its peak (bytes)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"now": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------- the run


def make_run(out: Path, cache: Path, changed: float, seed: int = 0) -> Path:
    """The NWS run of the pool-pretrained source and 20 synthetic tasks (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    import nws
    from benchmarks.fashion_sequence import (FASHION_ROOT, SOURCE_SETTINGS, Settings, fashion_train, resnet18, subset,
                                             train)
    from nws.data.preparation import Preparation
    from nws.data.transforms import mnist_transforms
    from nws.methods.base import resize_classifier
    from nws.methods.nws import TaskStore
    from nws.spec import ModelSpec

    settings = Settings()
    meta = {"changed": changed, "seed": seed, "source": {k: getattr(settings, k) for k in SOURCE_SETTINGS}}
    done = (out / "manifest.json").is_file() and (out / "bench.json").is_file()  # bench.json: written last
    if done and json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(meta)):
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    source_file = cache / "serve_source.safetensors"  # the source network alone (fashion_sequence's first stage)
    if not source_file.is_file():
        torch.manual_seed(settings.seed)
        x, y = fashion_train(FASHION_ROOT)
        plain = resnet18(len(settings.source_classes))
        print(f"training the source network ({settings.source_steps} steps)", flush=True)
        train(plain, *subset(x, y, settings.source_classes), settings.source_steps, settings.source_lr,
              settings.batch_size, None, settings.seed, "source")
        model = nws.freeze_pools(nws.convert(plain, pool_size=settings.pool_size, init="kernels", seed=settings.seed))
        cache.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), source_file)
    model = nws.freeze_pools(nws.convert(resnet18(len(settings.source_classes)), pool_size=settings.pool_size,
                                         seed=settings.seed))
    model.load_state_dict(load_file(source_file))
    pools = {n: layer.pool.codebook.clone() for n, layer in nws.nws_layers(model)}
    source_codes = nws.encode(model)
    spec = ModelSpec("resnet18", len(settings.source_classes), {"in_channels": 1, "stem": "cifar"},
                     settings.pool_size, 1)
    store = TaskStore(out, create=True)
    store.save_pools(model, spec)
    store.save_source(model, spec)
    store.save_reference()
    near = {}
    for name, book in pools.items():
        order = torch.cdist(book, book).argsort(1)  # row e: the entries nearest to e first (e itself at 0)
        near[name] = order[:, 1:33]
    gen = torch.Generator().manual_seed(seed)
    preparation = Preparation.of("L", mnist_transforms([0.286], [0.353], 28), (28, 28),
                                 "synthetic tasks: Fashion-MNIST-like 28x28 grayscale")
    for t in range(TASKS):
        task = copy.deepcopy(model)
        codes = {}
        for name, idx in source_codes.items():
            idx = idx.clone()
            moved = torch.rand(len(idx), generator=gen) < changed
            k = torch.distributions.Geometric(probs=torch.tensor(0.5)).sample((int(moved.sum()),)).long()
            k = k.clamp(max=31)
            idx[moved] = near[name][idx[moved], k]
            codes[name] = idx
        nws.decode(task, codes)
        with torch.no_grad():
            for m in task.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    n = m.num_features
                    m.weight.mul_(torch.exp(0.1 * torch.randn(n, generator=gen)))
                    m.bias.add_(0.1 * torch.randn(n, generator=gen))
                    m.running_mean.add_(0.1 * torch.randn(n, generator=gen))
                    m.running_var.mul_(torch.exp(0.1 * torch.randn(n, generator=gen)))
        resize_classifier(task, "fc", 2, seed=seed + 1 + t)  # searched into its pool when stored
        sizes = store.save_task(t, task, f"synthetic {t}", ["a", "b"], preparation=preparation.to_json())
        print(f"  task {t}: {sum(sizes.values()) / 1024:.1f} KB ({sizes})", flush=True)
    (out / "bench.json").write_text(json.dumps(meta))
    return out


# ----------------------------------------------------------------------------------- one configuration


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def switching(call, batches: dict[int, torch.Tensor], rounds: int) -> dict[str, float]:
    """Images per second and ms per call when calling ``call(task, batch)`` round robin over the tasks."""
    out = {}
    for size, x in batches.items():
        seconds = timed(lambda: [call(t, x) for t in range(TASKS)], rounds)
        out[f"batch{size}_images_per_s"] = round(TASKS * size / seconds, 1)
        out[f"batch{size}_ms_per_call"] = round(1000 * seconds / TASKS, 2)
    return out


def child(run: Path, kind: str, cache_size: int, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    from nws.methods import open_run
    from nws.serve import TaskServer, tensor_bytes

    x1, x32 = torch.randn(1, 1, 32, 32), torch.randn(32, 1, 32, 32)
    warm = open_run(str(run)).plain_model(0)  # imports, allocator and kernels warmed by one forward
    with torch.no_grad():
        warm(x1)
    del warm
    import gc

    gc.collect()
    before = rss()
    result: dict = {"kind": kind, "cache_size": cache_size, "threads": threads, "load_start": load()}
    if kind == "float":
        store = open_run(str(run))
        store.cache_size = 0
        start = time.perf_counter()
        nets = [store.plain_model(t) for t in range(TASKS)]
        result["setup_s"] = round(time.perf_counter() - start, 2)
        result["tensor_bytes"] = sum(map(tensor_bytes, nets))

        def call(t, x):
            with torch.no_grad():
                return nets[t](x)

        hit = statistics.median(timed(lambda: call(t, x1)) for t in range(TASKS) for _ in range(3))
        result["hit_ms"] = round(1000 * hit, 2)
    else:
        server = TaskServer(run, cache_size=cache_size)
        misses = []
        for t in range(TASKS):
            server.drop(t)
            misses.append(timed(lambda: server.network(t)))
        result["miss_ms"] = round(1000 * statistics.median(misses), 1)
        result["miss_ms_range"] = [round(1000 * min(misses), 1), round(1000 * max(misses), 1)]
        server.drop()
        for t in range(TASKS):  # warm: the last cache_size tasks cached
            server.network(t)
        hot = server.cached()[-1]
        hit = statistics.median(timed(lambda: server.logits(hot, x1)) for _ in range(3 * TASKS))
        result["hit_ms"] = round(1000 * hit, 2)
        memory = server.memory()
        result["tensor_bytes"] = memory["files"] + memory["networks"] + sum(
            b.numel() * b.element_size() for b in server.store.pools()[0].values())
        result["held"] = memory

        def call(t, x):
            return server.logits(t, x)

    after = rss()
    result["rss_bytes"] = after["now"] - before["now"]
    result.update(switching(call, {1: x1, 32: x32}, rounds))
    result["rss_peak_bytes"] = rss()["peak"] - before["now"]
    result["load_end"] = load()
    return result


def searched_forward(run: Path, threads: int) -> dict:
    """ms per image of a task's network with NWS layers (a search in every forward) and materialised."""
    torch.set_num_threads(threads)
    from nws.methods import open_run

    store = open_run(str(run))
    out = {"load_start": load(), "threads": threads}
    for size in (1, 32):
        x = torch.randn(size, 1, 32, 32)
        for kind, net in (("searching", store.model(0)), ("materialised", store.plain_model(0))):
            with torch.no_grad():
                net(x)
                out[f"{kind}_batch{size}_ms_per_image"] = round(1000 * timed(lambda: net(x), 5) / size, 3)
    out["load_end"] = load()
    return out


# ----------------------------------------------------------------------------------- main


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nws-bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--changed", type=float, default=0.3)
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over the 20 tasks per figure")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("RUN", "KIND", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run, kind, size = args.child
        found = searched_forward(Path(run), args.threads) if kind == "search" else \
            child(Path(run), kind, int(size), args.threads, args.rounds)
        print(json.dumps(found))
        return
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    run = make_run(args.cache / f"serve_run_{args.changed}", args.cache, args.changed)
    results = json.loads((run / "manifest.json").read_text())
    files = {n: f["size"] for n, f in results["files"].items()}
    task_files = [files[t["file"]] for t in results["tasks"]]
    shared = files["pools.safetensors"] + files["reference.safetensors"]
    print(f"run {run}: pools + reference {files['pools.safetensors'] / 1024:.1f} + "
          f"{files['reference.safetensors'] / 1024:.1f} KB, tasks {statistics.mean(task_files) / 1024:.1f} KB each "
          f"(mean of {TASKS}); memory {(shared + sum(task_files)) / 2**20:.2f} MB", flush=True)

    def spawn(kind: str, size: int) -> dict:
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--threads", str(args.threads),
                               "--rounds", str(args.rounds), "--child", str(run), kind, str(size)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    figures = [spawn("float", 0)] + [spawn("server", c) for c in args.cache_sizes]
    search = spawn("search", 0)
    print("\n| serving 20 tasks | memory held (tensors) | RSS growth | miss | hit (1 image) | round robin, batch 1 "
          "| round robin, batch 32 | load (start-end) |\n|---|---|---|---|---|---|---|---|")
    for f in figures:
        what = "20 float networks" if f["kind"] == "float" else f"TaskServer, cache_size={f['cache_size']}"
        miss = f"{f['miss_ms']:.0f} ms" if "miss_ms" in f else "-"
        print(f"| {what} | {mb(f['tensor_bytes'])} | {mb(f['rss_bytes'])} | {miss} | {f['hit_ms']:.1f} ms | "
              f"{f['batch1_images_per_s']:.1f} img/s ({f['batch1_ms_per_call']:.0f} ms/call) | "
              f"{f['batch32_images_per_s']:.0f} img/s ({f['batch32_ms_per_call']:.0f} ms/call) | "
              f"{f['load_start']}-{f['load_end']} |")
    print(f"\nper image, batch 1 / 32: NWS layers searching in every forward "
          f"{search['searching_batch1_ms_per_image']} / {search['searching_batch32_ms_per_image']} ms, materialised "
          f"{search['materialised_batch1_ms_per_image']} / {search['materialised_batch32_ms_per_image']} ms "
          f"(load {search['load_start']}-{search['load_end']})")
    print(f"threads: {args.threads}; uptime: {os.popen('uptime').read().strip()}")
    if args.out:
        args.out.write_text(json.dumps({"figures": figures, "search": search, "task_bytes": task_files,
                                        "shared_bytes": shared}, indent=1))


if __name__ == "__main__":
    main()
