"""The rate-aware search's bit models against what the task file's coder really spends, and what lambda does.

(1) ``--run DIR`` (an NWS run, e.g. ``nws demo --out DIR``): for every task, per layer, the bits
``nws.packing.pack_codes`` spends on its indices coded against the run's reference (the layer packed alone), next
to the sum over its kernels of what each bit model says: estimated from the task's own codes (in-sample),
estimated from the previous task's codes (what ``nws.rate.refresh_rate`` does during training, out of sample),
and the prior (``nws.rate.prior_model``).
(2) ``--train``: the run's source network learns one two-class task of sklearn's digits (0 vs 8, SGD lr 0.05,
momentum 0.9, beta 0.5, batch 32, 6 epochs, seeded) at several lambdas, against the source network's indices:
the fraction of kernels that leave their reference, the bits the coder spends, the models' estimates of them
(the prior the search used, and the model estimated from the result), and the test accuracy of the network
rebuilt from its indices.

    python benchmarks/bench_rate.py --run /tmp/rate_demo --train
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

import nws
from nws.rate import coded_bits, estimate_model, prior_model
from nws.store import TaskStore


def agreement(run: str) -> None:
    store = TaskStore(run)
    pools, _ = store.pools()
    reference = store.reference_codes()
    print(f"\n(1) bit models against the coder, run {run} (bits; ratio model / coder)")
    print("| task | layer | kernels | changed | coder | estimated in-sample | estimated from task t-1 | prior |")
    print("|---|---|---|---|---|---|---|---|")
    previous = None
    totals = np.zeros(4)
    for t in range(len(store.tasks())):
        codes = store.codes(t)
        sums = np.zeros(4)
        for name, x in codes.items():
            book, r = pools[name], reference[name]
            m = min(len(x), len(r))
            real = coded_bits(x, r, book)
            est = estimate_model(x, r, book).total_bits(x, r, book)
            prev = estimate_model(previous[name], r, book).total_bits(x, r, book) if previous else float("nan")
            prior = prior_model(len(book)).total_bits(x, r, book)
            changed = int((x[:m] != r[:m]).sum())
            print(f"| {t} | {name} | {m:,} | {100 * changed / max(m, 1):.1f}% | {real:,} | {est:,.0f} ({est / real:.3f}) | "
                  f"{prev:,.0f} ({prev / real:.3f}) | {prior:,.0f} ({prior / real:.3f}) |")
            sums += [real, est, prev, prior]
        print(f"| {t} | **all** | | | **{sums[0]:,.0f}** | {sums[1]:,.0f} ({sums[1] / sums[0]:.3f}) | "
              f"{sums[2]:,.0f} ({sums[2] / sums[0]:.3f}) | {sums[3]:,.0f} ({sums[3] / sums[0]:.3f}) |")
        if previous:
            totals += sums
        previous = codes
    if totals[0]:
        print(f"\nTasks 1-{len(store.tasks()) - 1}, all layers: coder {totals[0]:,.0f} bits; in-sample "
              f"{totals[1] / totals[0]:.3f}, from the previous task {totals[2] / totals[0]:.3f}, prior "
              f"{totals[3] / totals[0]:.3f} of it.")


def digits(classes: tuple[int, int] = (0, 8)) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.isin(data.target, classes)
    x = torch.from_numpy(data.images[keep]).float()[:, None] / 8 - 1
    y = torch.from_numpy((data.target[keep] == classes[1]).astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.7 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def head(model: torch.nn.Module, classes: int) -> torch.nn.Module:
    """The classifier resized to ``classes`` rows (kept where they exist), as a new task does."""
    fc = model.fc
    with torch.no_grad():
        fc.weight.data = fc.weight.data[:classes].clone()
        if fc.bias is not None:
            fc.bias.data = fc.bias.data[:classes].clone()
    fc.out_features = classes
    return model


def train(run: str, lams: list[float], epochs: int = 6) -> None:
    store = TaskStore(run)
    source = head(store.load_source(), 2)
    reference = nws.encode(source)
    pools = {name: layer.pool.codebook for name, layer in nws.nws_layers(source)}
    xtr, ytr, xte, yte = digits()
    print(f"\n(2) digits 0 vs 8 ({len(ytr)} train, {len(yte)} test images) from the source network of {run}, "
          f"{epochs} epochs, against the source's indices")
    print("| lam | kernels off their reference | coder bits | prior model (used) | estimated from the result | "
          "test accuracy from the indices |\n|---|---|---|---|---|---|")
    for lam in lams:
        torch.manual_seed(0)
        model = copy.deepcopy(source).train()
        nws.set_rate(model, reference, lam)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=4e-5)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(ytr), generator=gen)
            for i in range(0, len(ytr), 32):
                idx = order[i : i + 32]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + 0.5 * nws.commitment_loss(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
        codes = nws.encode(model)
        real = sum(coded_bits(codes[n], reference[n], pools[n]) for n in codes)
        used = sum(prior_model(len(pools[n])).total_bits(codes[n], reference[n], pools[n]) for n in codes)
        est = sum(estimate_model(codes[n], reference[n], pools[n]).total_bits(codes[n], reference[n], pools[n])
                  for n in codes)
        off = sum(int((codes[n] != reference[n]).sum()) for n in codes) / sum(len(c) for c in codes.values())
        nws.clear_rate(model)
        rebuilt = nws.decode(model, codes).eval()
        with torch.no_grad():
            acc = float((rebuilt(xte).argmax(1) == yte).float().mean())
        print(f"| {lam:g} | {100 * off:.2f}% | {real:,} | {used:,.0f} ({used / real:.3f}) | {est:,.0f} ({est / real:.3f}) | "
              f"{100 * acc:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="an NWS run directory (e.g. from nws demo)")
    parser.add_argument("--train", action="store_true", help="also train a digits task at several lambdas")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    agreement(args.run)
    if args.train:
        train(args.run, args.lams)


if __name__ == "__main__":
    main()
