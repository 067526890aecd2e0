"""Bytes per task for a task's indices, by storage scheme, beside the entropy bound; and decode time.

Schemes: int16 + lzma (the reference: all layers' indices as int16, concatenated, lzma-compressed), plain
fixed-width packing (ceil(log2 K) bits per index), and the shipped codec (``nws.pack_codes``: per-layer
rANS under the layer's Rice-coded histogram, table overhead included). The bound is the per-layer empirical
entropy, sum over layers of N * H(indices), without any table.

Cases: the indices of a trained demo task (from a run directory, or a fresh `nws demo` run), and a
ResNet-18 (ImageNet stem, 1000 classes, K 512, g 1) whose indices follow skewed distributions like those of
trained pools (Zipf exponents 0.7 and 1.0, and Dirichlet(0.5) per layer).

    python benchmarks/bench_codes.py [--run runs/demo]
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
from nws.models import create_model
from nws.store import TaskStore


def fixed_width_bytes(codes: dict[str, torch.Tensor], pool_sizes: dict[str, int]) -> int:
    bits = sum(len(idx) * max(1, int(np.ceil(np.log2(pool_sizes[n])))) for n, idx in codes.items())
    return (bits + 7) // 8


def int16_lzma_bytes(codes: dict[str, torch.Tensor]) -> int:
    flat = np.concatenate([idx.numpy().astype(np.int16) for idx in codes.values()])
    return len(lzma.compress(flat.tobytes()))


def compare(label: str, codes: dict[str, torch.Tensor], pool_sizes: dict[str, int]) -> None:
    bound = sum(nws.entropy_bits(idx, pool_sizes[n]) for n, idx in codes.items()) / 8
    packed = nws.pack_codes(codes, pool_sizes)
    assert all(torch.equal(a, b) for a, b in zip(nws.unpack_codes(packed).values(), codes.values()))
    n = sum(len(v) for v in codes.values())
    rows = [("int16 + lzma (reference)", int16_lzma_bytes(codes)),
            ("fixed-width packing", fixed_width_bytes(codes, pool_sizes)),
            ("shipped codec (nws.pack_codes)", len(packed)),
            ("entropy bound (no table)", bound)]
    print(f"\n{label}: {n:,} indices in {len(codes)} layers")
    print("| scheme | bytes | bits per index | vs entropy bound |")
    print("|---|---|---|---|")
    for name, size in rows:
        print(f"| {name} | {size:,.0f} | {8 * size / n:.3f} | {size / bound:.4f}x |")


def per_layer(codes: dict[str, torch.Tensor], pool_sizes: dict[str, int], limit: int = 25) -> None:
    print("\n| layer | indices | used entries | bits per index (codec, alone) | entropy (bits) |")
    print("|---|---|---|---|---|")
    for name, idx in list(codes.items())[:limit]:
        alone = len(nws.pack_codes({name: idx}, pool_sizes))
        h = nws.entropy_bits(idx, pool_sizes[name]) / max(len(idx), 1)
        print(f"| {name} | {len(idx):,} | {len(idx.unique())} | {8 * alone / len(idx):.3f} | {h:.3f} |")


def demo_codes(run: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    if run is None:
        run = Path(tempfile.mkdtemp()) / "demo"
        subprocess.run([sys.executable, "-m", "nws.cli", "demo", "--out", str(run), "--trainer.logger", "none"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = TaskStore(run).model(0)
    return nws.encode(model), {n: layer.pool.num_entries for n, layer in nws.nws_layers(model)}


def skewed(n: int, k: int, kind: str, rng: np.random.Generator) -> torch.Tensor:
    if kind.startswith("zipf"):
        p = 1.0 / np.arange(1, k + 1) ** float(kind[4:])
        p = rng.permutation(p)
    else:
        p = rng.dirichlet(np.full(k, 0.5))
    return torch.from_numpy(rng.choice(k, size=n, p=p / p.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a demo run directory (default: run the demo)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    codes, sizes = demo_codes(args.run)
    compare("Demo task 0 (trained, digits convnet)", codes, sizes)
    per_layer(codes, sizes)

    model = nws.convert(create_model("resnet18", num_classes=1000), pool_size=512)
    layers = dict(nws.nws_layers(model))
    sizes = {n: layer.pool.num_entries for n, layer in layers.items()}
    rng = np.random.default_rng(0)
    for kind in ("zipf0.7", "zipf1.0", "dirichlet"):
        codes = {n: skewed(layer.num_kernels, 512, kind, rng) for n, layer in layers.items()}
        compare(f"ResNet-18, indices ~ {kind}", codes, sizes)

    packed = nws.pack_codes(codes, sizes)
    model.eval()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        nws.decode(model, nws.unpack_codes(packed, nws.code_layout(model)))
        times.append(time.perf_counter() - start)
    print(f"\nDecode a ResNet-18 task's indices and rebuild its weights: median {1000 * statistics.median(times):.0f} ms "
          f"(min {1000 * min(times):.0f} ms) over 7 runs")


if __name__ == "__main__":
    main()
