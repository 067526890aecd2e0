"""The ``nws`` subcommands that get a run's inputs ready: ``configs`` lists the packaged configs, ``data`` gets
and checks benchmarks' files, ``pools`` makes pools without pretraining (k-means of a checkpoint, the
reference's published pools)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt

from nws.config import ModelConfig
from nws.config_parser import Parser, packaged_configs
from nws.subcommand import UsageError, flat


# ------------------------------------------------------------------------------------------ configs


def cmd_configs(args: Namespace) -> int:
    configs = packaged_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:{width}s}  {first}")
    print(f"\nnws run --config NAME [--group.key value ...]; the files are in {path.parent}")
    return 0


# ------------------------------------------------------------------------------------------ data


def data_options(parser: Parser) -> None:
    from nws.data import benchmark_entry, list_benchmarks

    sub = parser.add_subcommands(dest="action", required=True)
    for name, about in (("cifar100", "download (or use the archive already there), verify and extract CIFAR-100"),
                        ("fashion-mnist", "verify the official Fashion-MNIST IDX files in a folder, downloading "
                         "missing ones"),
                        ("mnist", "verify the official MNIST IDX files in a folder, downloading missing ones")):
        get = Parser(prog=f"nws data {name}", description=about, epilog=f"example:\n  nws data {name} --root data/{name}")
        get.add_argument("--root", type=str, required=True, help="the folder for the files (created if missing)")
        sub.add_subcommand(name, get, help=about)
    checked = [b for b in list_benchmarks() if benchmark_entry(b).check is not None]
    about = "validate a benchmark's files: layout, class counts, images per split"
    check = Parser(prog="nws data check", description=about + ". Benchmarks: " + "; ".join(
        f"{b}: {benchmark_entry(b).about}" for b in checked),
        epilog="example:\n  nws data check --benchmark cub2sketches --root data/cub2sketches")
    check.add_argument("--benchmark", type=Literal[tuple(checked)], required=True, help="the benchmark to check")
    check.add_argument("--root", type=str, nargs="+", required=True,
                       help="the benchmark's data root (--data.root of a run); for folders, each task folder")
    sub.add_subcommand("check", check, help=about)


def cmd_data(args: Namespace) -> int:
    action = args.action
    sub = args[action]
    if action == "cifar100":
        from nws.data.cifar100 import prepare

        print(prepare(sub.root)[1])
        return 0
    if action in ("fashion-mnist", "mnist"):
        from nws.data import mnist

        print(mnist.prepare(sub.root, action)[1])
        return 0
    from nws.data import benchmark_entry

    entry, roots = benchmark_entry(sub.benchmark), [Path(r) for r in flat(sub.root)]
    if len(roots) > 1 and not entry.many_roots:
        raise UsageError(f"nws data check: --benchmark {entry.name} takes one --root")
    rows = entry.check(roots)
    test = entry.test_split
    print(f"| data set | classes | train images | {test} images |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['classes']} | {r['train']} | {r[test]} |")
    print(f"{', '.join(map(str, roots))}: layout and class counts OK for {entry.name}")
    return 0


# ------------------------------------------------------------------------------------------ pools


POOL_SETTINGS = ("name", "kwargs", "pool_size", "group_size", "exclude", "zero_entry")


def pools_options(parser: Parser) -> None:
    sub = parser.add_subcommands(dest="action", required=True)
    about = "k-means pools of an ordinary pretrained state dict"
    ck = Parser(prog="nws pools from-checkpoint", description=about + "; start a run from them with nws run "
                "--pretrained DIR", epilog="example:\n  nws pools from-checkpoint resnet18.pth --model.name resnet18 "
                "--out runs/pools_r18")
    ck.add_argument("weights", type=str, help="state dict: .pt/.pth (torch.load weights_only) or .safetensors")
    ck.add_class_arguments(ModelConfig, "model",
                           skip={f.name for f in ModelConfig.__dataclass_fields__.values()} - set(POOL_SETTINGS))
    ck.groups["model"].title = "model: the checkpoint's network and the pools (as for nws run)"
    name = next(a for a in ck._actions if a.dest == "model.name")
    name.required, name.default = True, None  # the checkpoint's architecture: no default
    ck.add_argument("--iters", type=NonNegativeInt, default=25, help="at most this many Lloyd iterations")
    ck.add_argument("--seed", type=int, default=0, help="seeds the k-means++ draws (layer i: seed + i)")
    ck.add_argument("--new_head", action="store_true", help="drop the checkpoint's classifier and start a fresh "
                    "one (e.g. torchvision vgg16_bn's three-layer head)")
    ck.add_argument("--out", type=str, required=True, help="directory to write (must not hold a run)")
    sub.add_subcommand("from-checkpoint", ck, help=about)
    about = "the reference implementation's pool-pretraining checkpoint"
    ref = Parser(prog="nws pools import-reference", description=about,
                 epilog="example:\n  nws pools import-reference kernel_pool.pth --out runs/pools_ref")
    ref.add_argument("checkpoint", type=str, help="torch.save file of the reference (read with weights_only=True)")
    ref.add_argument("--out", type=str, required=True, help="directory to write (must not hold a run)")
    sub.add_subcommand("import-reference", ref, help=about)


def cmd_pools(args: Namespace) -> int:
    import time

    import yaml

    from nws import pool_sources as ps
    from nws.methods.nws import save_pools_run
    from nws.store import MANIFEST

    sub = args[args.action]
    if (Path(sub.out) / MANIFEST).exists():
        raise UsageError(f"{sub.out} already holds a run; choose another output directory")
    if Path(sub.out).exists() and not Path(sub.out).is_dir():
        raise UsageError(f"{sub.out} exists and is not a directory")
    start = time.perf_counter()
    if args.action == "from-checkpoint":
        m = sub.model
        if m.pool_size < 1 + m.zero_entry:
            raise UsageError(f"model.pool_size: {m.pool_size} is not allowed (an integer >= 2 with "
                             "model.zero_entry)")
        model, spec, report = ps.pools_from_checkpoint(sub.weights, m.name, m.pool_size, m.group_size,
                                                       dict(m.kwargs), list(m.exclude), sub.iters, sub.seed,
                                                       m.zero_entry, sub.new_head)
        source = {"name": f"k-means of {sub.weights}", "pools": "kmeans", "iters": sub.iters, "seed": sub.seed}
    else:
        model, spec, report = ps.reference_pools(sub.checkpoint)
        source = {"name": f"reference checkpoint {sub.checkpoint}", "pools": "reference"}
    seconds = time.perf_counter() - start
    try:
        save_pools_run(sub.out, model, spec, {**source, "quantisation": [r.to_json() for r in report]})
    except OSError as err:
        raise UsageError(f"cannot write {sub.out} ({err.strerror or err})") from None
    print(ps.format_report(report))
    kwargs_yaml = yaml.safe_dump(spec.kwargs, default_flow_style=True).strip()
    print(f"\nPools of {spec.name} (K={spec.pool_size}, g={spec.group_size}) in {sub.out} ({seconds:.1f} s). "
          f"Start a run from them with: --pretrained {sub.out} --model.name {spec.name} "
          f"--model.kwargs '{kwargs_yaml}' --model.pool_size {spec.pool_size} --model.group_size {spec.group_size}"
          + (f" --model.exclude '{list(spec.exclude)}'" if spec.exclude else ""))
    return 0
