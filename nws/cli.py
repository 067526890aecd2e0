"""The ``nws`` command: ``demo``, ``run`` and ``eval``.

Problems with the user's input (a missing or malformed config, an unknown key, a wrong type, a missing or
corrupt run) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Optional

from nws.config import BaselineConfig, DataConfig, ModelConfig, RunConfig, TrainConfig, TrainerConfig
from nws.errors import NWSError

USAGE_ERROR = 2


class UsageError(NWSError):
    """Bad command-line arguments or config."""


def _one_line(text: object) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", line)


def config_parser(prog: str, require_config: bool):
    """jsonargparse parser of a :class:`RunConfig`: ``--config FILE.yaml`` then ``--group.key value`` overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, default_meta=False,
                            description="Pretrain pools, learn every task, report accuracy and memory.")
    parser.add_argument("--config", action=ActionConfigFile, required=require_config,
                        help="YAML file of settings (see configs/)")
    defaults = RunConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=str, default=defaults.out, help="run directory (the task store)")
    parser.add_argument("--pretrained", type=Optional[str], default=defaults.pretrained,
                        help="pool-pretraining run directory whose pools and network this run starts from")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out: finished tasks are kept, the rest learned")
    parser.add_argument("--method", type=str, default=defaults.method,
                        help="nws, or a baseline: finetune, individual, packnet, piggyback")
    for key, cls in (("model", ModelConfig), ("data", DataConfig), ("pretrain", TrainConfig),
                     ("task", TrainConfig), ("trainer", TrainerConfig), ("baseline", BaselineConfig)):
        parser.add_class_arguments(cls, key, default=getattr(defaults, key))
    return parser


def parse_run_config(argv: Sequence[str], prog: str = "nws run", require_config: bool = True) -> RunConfig:
    """A :class:`RunConfig` from ``--config`` and overrides; :class:`UsageError` with one line otherwise."""
    return parse_run_args(argv, prog, require_config)[0]


def parse_run_args(argv: Sequence[str], prog: str = "nws run", require_config: bool = True) -> tuple[RunConfig, bool]:
    """:func:`parse_run_config`, and whether ``--resume`` was given."""
    from jsonargparse import ArgumentError

    parser = config_parser(prog, require_config)
    try:
        ns = parser.parse_args(list(argv))
    except ArgumentError as err:
        raise UsageError(_one_line(err)) from None
    except SystemExit as err:  # --help
        raise SystemExit(err.code) from None
    d = ns.as_dict()
    d.pop("config", None)
    resume = bool(d.pop("resume", False))
    try:
        config = RunConfig(seed=d["seed"], out=d["out"], pretrained=d["pretrained"], model=ModelConfig(**d["model"]),
                           data=DataConfig(**d["data"]),
                           pretrain=TrainConfig(**d["pretrain"]), task=TrainConfig(**d["task"]),
                           trainer=TrainerConfig(**d["trainer"]), method=d["method"],
                           baseline=BaselineConfig(**d["baseline"]))
    except TypeError as err:
        raise UsageError(_one_line(err)) from None
    return config, resume


def _run(config: RunConfig, resume: bool = False) -> None:
    from nws.baselines import make_learner
    from nws.engine import shutdown_distributed

    learner = make_learner(config)
    learner.run(resume=resume)
    shutdown_distributed()
    if not getattr(learner, "writer", True):  # a DDP rank other than 0: rank 0 reports
        return
    print()
    print((learner.out / "results.md").read_text(), end="")
    print(f"Results: {learner.out / 'results.json'}")


def cmd_eval(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nws eval", description="Evaluate stored tasks from storage alone.")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--task", type=int, default=None, help="only this task index")
    args = parser.parse_args(argv)
    from nws.data import load_benchmark
    from nws.engine import evaluate
    from nws.baselines import open_run

    store = open_run(args.run)
    data = store.manifest.get("config", {}).get("data", {})
    benchmark = load_benchmark(data.get("name", "digits"), data.get("root"),
                               seed=store.manifest.get("config", {}).get("seed", 0), source="none",
                               image_size=data.get("image_size"))
    entries = [t for t in store.tasks() if args.task is None or t["index"] == args.task]
    if not entries:
        raise UsageError(f"{args.run} has no task {args.task}")
    failed = 0
    for t in entries:
        try:
            if t["index"] >= len(benchmark.tasks):
                raise UsageError(f"the benchmark has no task {t['index']}")
            acc = evaluate(store.model(t["index"]), benchmark.tasks[t["index"]].test)
        except NWSError as err:
            failed += 1
            print(f"task {t['index']} ({t['name']}): FAILED: {_one_line(err)}")
            continue
        recorded = t.get("acc_after_training")
        note = f" (after training: {100 * recorded:.2f}%)" if recorded is not None else ""
        print(f"task {t['index']} ({t['name']}): accuracy {100 * acc:.2f}%{note}")
    return 1 if failed else 0


def cmd_report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nws report", description="Compare runs: a markdown table and plots. "
                                     "Runs of one method and settings with different seeds are averaged.")
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", default=None, help="report directory (default: report/ next to the first run, "
                        "or inside it if it is a directory of runs)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from nws.report import write_report

    first = Path(args.runs[0]).resolve()
    out = Path(args.out) if args.out else (first.parent if (first / "results.json").is_file() else first) / "report"
    write_report(args.runs, out)
    print((out / "report.md").read_text().split("\n\n![")[0])
    print(f"Report: {out / 'report.md'}")
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nws data", description="Get or check benchmark data.")
    sub = parser.add_subparsers(dest="action", required=True)
    get = sub.add_parser("cifar100", help="download (or use the archive already there), verify and extract CIFAR-100")
    get.add_argument("--root", required=True, help="directory for cifar-100-python/ (and the archive)")
    for name in ("fashion-mnist", "mnist"):
        idx = sub.add_parser(name, help=f"verify the official {name} IDX files in a folder, downloading missing ones")
        idx.add_argument("--root", required=True, help="folder holding (or to hold) the four .gz or gunzipped files")
    check = sub.add_parser("check", help="validate a benchmark's layout and class counts")
    check.add_argument("--root", required=True, help="the benchmark's data root (--data.root of a run)")
    check.add_argument("--benchmark", default="cub2sketches",
                       choices=["cub2sketches", "split_cifar100", "split_fashion_mnist", "imagenet"])
    args = parser.parse_args(argv)
    if args.action == "cifar100":
        from nws.data.cifar100 import prepare

        print(prepare(args.root)[1])
        return 0
    if args.action in ("fashion-mnist", "mnist"):
        from nws.data import mnist

        print(mnist.prepare(args.root, args.action)[1])
        return 0
    if args.benchmark == "split_fashion_mnist":
        from nws.data import mnist

        data = mnist.load_idx_data(args.root, mnist.FASHION_MNIST, "--root")
        rows = [{"name": "fashion-mnist", "classes": 10, "train": len(data.labels["train"]),
                 "test": len(data.labels["test"])}]
    elif args.benchmark == "split_cifar100":
        from nws.data.cifar100 import load_cifar100

        data = load_cifar100(args.root)
        rows = [{"name": "cifar100", "classes": 100, "train": len(data.fine["train"]), "test": len(data.fine["test"])}]
    else:
        from nws.data.folders import check_cub2sketches, check_imagenet

        rows = check_cub2sketches(args.root) if args.benchmark == "cub2sketches" else check_imagenet(args.root)
    test = "val" if args.benchmark == "imagenet" else "test"
    print(f"| data set | classes | train images | {test} images |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['classes']} | {r['train']} | {r[test]} |")
    print(f"{args.root}: layout and class counts OK for {args.benchmark}")
    return 0


def cmd_launch(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nws launch", description="One run per seed (submitit: SLURM or local processes), then nws report. "
        "Other --group.key value arguments override the config, as for nws run.", allow_abbrev=False)
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", default=None, help="directory of the runs, one seed_<S>/ each (default: the "
                        "config's out)")
    parser.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                        help="submit to SLURM: partition, gpus (per node), nodes, hours, cpus, mem (GB), account, "
                        "qos, constraint")
    parser.add_argument("--parallel", action="store_true", help="local jobs: run all seeds at once")
    parser.add_argument("--no-wait", action="store_true", help="SLURM: submit and return; report later")
    args, overrides = parser.parse_known_args(argv)
    from pathlib import Path

    from nws.launch import launch

    dirs = launch(args.config, args.seeds, overrides, out=Path(args.out) if args.out else None, slurm=args.slurm,
                  parallel=args.parallel, wait=not args.no_wait)
    if args.no_wait:
        print("when the jobs are done: nws report " + " ".join(str(d) for d in dirs))
        return 0
    return cmd_report([str(d) for d in dirs] + ["--out", str(dirs[0].parent / "report")])


def cmd_compare(argv: Sequence[str]) -> int:
    """``nws demo --compare``: NWS and every baseline on the demo data, then the report."""
    from pathlib import Path

    from nws.baselines.compare import compare

    config, resume = parse_run_args(argv, prog="nws demo --compare", require_config=False)
    if resume:
        raise UsageError("--compare runs every method afresh; --resume does not apply")
    explicit = any(a.split("=")[0] in ("--out", "--config") for a in argv)
    out = Path(config.out if explicit else "runs/compare")
    result = compare(config, out)
    print()
    print((out / "report" / "report.md").read_text().split("\n\n![")[0])
    print("Seconds: " + ", ".join(f"{m} {s:.0f}" for m, s in result["seconds"].items())
          + f"; total {sum(result['seconds'].values()):.0f}")
    print(f"Report: {out / 'report' / 'report.md'}")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UsageError` (one line, exit 2) instead of usage text."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def cmd_pools(argv: Sequence[str]) -> int:
    """``nws pools from-checkpoint`` / ``import-reference``: pools without pretraining, written as a directory
    that ``nws run --pretrained DIR`` starts its first task from."""
    parser = _OneLineParser(prog="nws pools", description="Pools without pretraining. The output directory "
                            "holds the pools and the starting network; start a run from it with "
                            "nws run ... --pretrained DIR.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{from-checkpoint,import-reference}")
    ck = sub.add_parser("from-checkpoint", help="k-means pools of an ordinary pretrained state dict")
    ck.add_argument("weights", help="state dict: .pt/.pth (torch.load weights_only) or .safetensors")
    ck.add_argument("--arch", required=True, help="nws.models builder (resnet18, resnet34, vgg16_bn, ...)")
    ck.add_argument("--kwargs", default="{}", help="builder arguments as YAML, e.g. '{maxpool: false}'")
    ck.add_argument("--pool-size", type=int, default=512, help="K, entries per pool")
    ck.add_argument("--group-size", type=int, default=1, help="g, input channels per grouped kernel")
    ck.add_argument("--exclude", nargs="*", default=[], help="module-name patterns left unsearched")
    ck.add_argument("--iters", type=int, default=25, help="at most this many Lloyd iterations")
    ck.add_argument("--seed", type=int, default=0, help="seeds the k-means++ draws (layer i: seed + i)")
    ck.add_argument("--zero-entry", action="store_true", help="entry 0 of every pool is all zero (sparsity)")
    ck.add_argument("--new-head", action="store_true", help="drop the checkpoint's classifier and start a fresh "
                    "one (e.g. torchvision vgg16_bn's three-layer head)")
    ck.add_argument("--out", required=True, help="directory to write (must not hold a run)")
    ref = sub.add_parser("import-reference", help="the reference implementation's pool-pretraining checkpoint")
    ref.add_argument("checkpoint", help="torch.save file of the reference (read with weights_only=True)")
    ref.add_argument("--out", required=True, help="directory to write (must not hold a run)")
    args = parser.parse_args(argv)
    import time
    from pathlib import Path

    import yaml

    from nws import pool_sources as ps
    from nws.store import MANIFEST

    if (Path(args.out) / MANIFEST).exists():
        raise UsageError(f"{args.out} already holds a run; choose another output directory")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"{args.out} exists and is not a directory")
    start = time.perf_counter()
    if args.action == "from-checkpoint":
        try:
            kwargs = yaml.safe_load(args.kwargs)
        except yaml.YAMLError as err:
            raise UsageError(f"--kwargs is not YAML ({_one_line(err)})") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--kwargs must be a mapping such as '{{maxpool: false}}', got {args.kwargs!r}")
        if args.pool_size < 1 + args.zero_entry or args.group_size < 1 or args.iters < 0:
            raise UsageError("--pool-size must be >= 1 (>= 2 with --zero-entry), --group-size >= 1, --iters >= 0")
        model, spec, report = ps.pools_from_checkpoint(args.weights, args.arch, args.pool_size, args.group_size,
                                                       kwargs, args.exclude, args.iters, args.seed, args.zero_entry,
                                                       args.new_head)
        source = {"name": f"k-means of {args.weights}", "pools": "kmeans", "iters": args.iters, "seed": args.seed}
    else:
        model, spec, report = ps.reference_pools(args.checkpoint)
        source = {"name": f"reference checkpoint {args.checkpoint}", "pools": "reference"}
    seconds = time.perf_counter() - start
    try:
        ps.save_pools_dir(args.out, model, spec, {**source, "quantisation": [r.to_json() for r in report]})
    except OSError as err:
        raise UsageError(f"cannot write {args.out} ({err.strerror or err})") from None
    print(ps.format_report(report))
    kwargs_yaml = yaml.safe_dump(spec.kwargs, default_flow_style=True).strip()
    print(f"\nPools of {spec.name} (K={spec.pool_size}, g={spec.group_size}) in {args.out} ({seconds:.1f} s). "
          f"Start a run from them with: --pretrained {args.out} --model.name {spec.name} "
          f"--model.kwargs '{kwargs_yaml}' --model.pool_size {spec.pool_size} --model.group_size {spec.group_size}"
          + (f" --model.exclude '{list(spec.exclude)}'" if spec.exclude else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "run the pipeline on the embedded digits data (--compare: and every baseline)",
                "run": "run the pipeline from a config",
                "eval": "evaluate a run's stored tasks",
                "report": "tables and plots comparing runs (methods, seeds)",
                "data": "get CIFAR-100 (nws data cifar100) or check a benchmark's files (nws data check)",
                "launch": "one run per seed (SLURM or local jobs), then nws report",
                "pools": "pools without pretraining: k-means of a checkpoint, or the reference's published pools"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = "\n".join(f"  {c:6s} {h}" for c, h in commands.items())
        print(f"usage: nws {{{','.join(commands)}}} ...\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"nws: error: unknown command {argv[0]!r}", file=sys.stderr)
            return USAGE_ERROR
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "eval":
            return cmd_eval(rest)
        if command == "pools":
            return cmd_pools(rest)
        if command == "report":
            return cmd_report(rest)
        if command == "data":
            return cmd_data(rest)
        if command == "launch":
            return cmd_launch(rest)
        if command == "demo" and "--compare" in rest:
            return cmd_compare([a for a in rest if a != "--compare"])
        if command == "demo":
            config, resume = parse_run_args(rest, prog="nws demo", require_config=False)
        else:
            config, resume = parse_run_args(rest)
        _run(config, resume)
        return 0
    except NWSError as err:
        print(f"nws: error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("nws: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
