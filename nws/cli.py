"""The ``nws`` command: ``demo``, ``run``, ``eval``, ``report``, ``data``, ``launch``, ``pools`` and ``upgrade``.

Problems with the user's input (a missing or malformed config, an unknown key, a wrong type, a missing or
corrupt run) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nws.config import ConfigError, RunConfig, one_line, parse_run_args
from nws.errors import NWSError

USAGE_ERROR = 2


class UsageError(NWSError):
    """Bad command-line arguments."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UsageError` (one line, exit 2) instead of usage text."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _run(config: RunConfig, resume: bool = False) -> None:
    from nws.engine import shutdown_distributed
    from nws.results import RESULTS, RESULTS_MD
    from nws.runner import Runner

    runner = Runner(config)
    runner.run(resume=resume)
    shutdown_distributed()
    if not runner.ctx.writer:  # a distributed rank other than 0: rank 0 reports
        return
    print()
    print((runner.out / RESULTS_MD).read_text(), end="")
    print(f"Results: {runner.out / RESULTS}")


def cmd_eval(argv: Sequence[str]) -> int:
    parser = _OneLineParser(prog="nws eval", description="Evaluate stored tasks from storage alone, on the run's "
                            "own benchmark and device settings.")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--task", type=int, default=None, help="only this task index")
    parser.add_argument("--data-root", default=None, help="where the benchmark's data is now, if it moved "
                        "(default: the run's data.root)")
    args = parser.parse_args(argv)
    import dataclasses

    from nws.config import config_from_dict
    from nws.data import benchmark_from_config
    from nws.engine import eval_device, evaluate
    from nws.methods import open_run

    store = open_run(args.run)
    if "config" not in store.manifest:
        raise UsageError(f"{args.run} does not record its config, so its benchmark is unknown")
    config = config_from_dict(store.manifest["config"], f"{args.run}'s config")
    data = dataclasses.replace(config.data, source="none",
                               root=args.data_root if args.data_root is not None else config.data.root)
    benchmark = benchmark_from_config(data, config.seed)
    device = eval_device(config.trainer)
    entries = [t for t in store.tasks() if args.task is None or t["index"] == args.task]
    if not entries:
        raise UsageError(f"{args.run} has no task {args.task}")
    failed = 0
    for t in entries:
        try:
            if t["index"] >= len(benchmark.tasks):
                raise UsageError(f"the benchmark has no task {t['index']}")
            acc = evaluate(store.model(t["index"]), benchmark.tasks[t["index"]].test,
                           num_workers=config.data.num_workers, device=device)
        except NWSError as err:
            failed += 1
            print(f"task {t['index']} ({t['name']}): FAILED: {one_line(err)}")
            continue
        recorded = t.get("acc_after_training")
        note = f" (after training: {100 * recorded:.2f}%)" if recorded is not None else ""
        print(f"task {t['index']} ({t['name']}): accuracy {100 * acc:.2f}%{note}")
    return 1 if failed else 0


def cmd_upgrade(argv: Sequence[str]) -> int:
    parser = _OneLineParser(prog="nws upgrade", description="Rewrite runs of an earlier nws format into today's, "
                            "atomically (written aside and verified before anything is replaced).")
    parser.add_argument("runs", nargs="+", help="run directories")
    args = parser.parse_args(argv)
    from nws.upgrade import upgrade

    for run in args.runs:
        notes = upgrade(run)
        print(f"{run}: " + ("upgraded to today's format" if notes else "already of today's format"))
        for note in notes:
            print(f"  {note}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    parser = _OneLineParser(prog="nws report", description="Compare runs: a markdown table and plots. "
                                     "Runs of one method and settings with different seeds are averaged.")
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", default=None, help="report directory (default: report/ next to the first run, "
                        "or inside it if it is a directory of runs)")
    args = parser.parse_args(argv)

    from nws.report import write_report

    first = Path(args.runs[0]).resolve()
    out = Path(args.out) if args.out else (first.parent if (first / "results.json").is_file() else first) / "report"
    write_report(args.runs, out)
    print((out / "report.md").read_text().split("\n\n![")[0])
    print(f"Report: {out / 'report.md'}")
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    parser = _OneLineParser(prog="nws data", description="Get or check benchmark data.")
    sub = parser.add_subparsers(dest="action", required=True)
    get = sub.add_parser("cifar100", help="download (or use the archive already there), verify and extract CIFAR-100")
    get.add_argument("--root", required=True, help="directory for cifar-100-python/ (and the archive)")
    for name in ("fashion-mnist", "mnist"):
        idx = sub.add_parser(name, help=f"verify the official {name} IDX files in a folder, downloading missing ones")
        idx.add_argument("--root", required=True, help="folder holding (or to hold) the four .gz or gunzipped files")
    check = sub.add_parser("check", help="validate a benchmark's layout and class counts")
    check.add_argument("--root", required=True, nargs="+", help="the benchmark's data root (--data.root of a "
                       "run); for folders, each task folder (and the source folder)")
    check.add_argument("--benchmark", default="cub2sketches",
                       choices=["cub2sketches", "split_cifar100", "split_fashion_mnist", "imagenet", "folders"])
    args = parser.parse_args(argv)
    if args.action == "cifar100":
        from nws.data.cifar100 import prepare

        print(prepare(args.root)[1])
        return 0
    if args.action in ("fashion-mnist", "mnist"):
        from nws.data import mnist

        print(mnist.prepare(args.root, args.action)[1])
        return 0
    roots = args.root
    if args.benchmark != "folders" and len(roots) > 1:
        raise UsageError(f"nws data check: --benchmark {args.benchmark} takes one --root")
    if args.benchmark == "split_fashion_mnist":
        from nws.data import mnist

        data = mnist.load_idx_data(roots[0], mnist.FASHION_MNIST, "--root")
        rows = [{"name": "fashion-mnist", "classes": 10, "train": len(data.labels["train"]),
                 "test": len(data.labels["test"])}]
    elif args.benchmark == "split_cifar100":
        from nws.data.cifar100 import load_cifar100

        data = load_cifar100(roots[0])
        rows = [{"name": "cifar100", "classes": 100, "train": len(data.fine["train"]), "test": len(data.fine["test"])}]
    else:
        from nws.data.folders import check_cub2sketches, check_folders, check_imagenet

        check_one = {"cub2sketches": check_cub2sketches, "imagenet": check_imagenet}.get(args.benchmark)
        rows = check_folders(roots) if check_one is None else check_one(roots[0])
    test = "val" if args.benchmark == "imagenet" else "test"
    print(f"| data set | classes | train images | {test} images |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['classes']} | {r['train']} | {r[test]} |")
    print(f"{', '.join(roots)}: layout and class counts OK for {args.benchmark}")
    return 0


def cmd_launch(argv: Sequence[str]) -> int:
    parser = _OneLineParser(
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
    from nws.launch import launch

    dirs = launch(args.config, args.seeds, overrides, out=Path(args.out) if args.out else None, slurm=args.slurm,
                  parallel=args.parallel, wait=not args.no_wait)
    if args.no_wait:
        print("when the jobs are done: nws report " + " ".join(str(d) for d in dirs))
        return 0
    return cmd_report([str(d) for d in dirs] + ["--out", str(dirs[0].parent / "report")])


def cmd_compare(argv: Sequence[str]) -> int:
    """``nws demo --compare``: NWS and every baseline on the demo data, then the report."""
    from nws.compare import compare

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
    import yaml

    from nws import pool_sources as ps
    from nws.methods.nws import save_pools_run
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
            raise UsageError(f"--kwargs is not YAML ({one_line(err)})") from None
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
        save_pools_run(args.out, model, spec, {**source, "quantisation": [r.to_json() for r in report]})
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
                "pools": "pools without pretraining: k-means of a checkpoint, or the reference's published pools",
                "upgrade": "rewrite runs of an earlier nws format into today's"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = "\n".join(f"  {c:6s} {h}" for c, h in commands.items())
        print(f"usage: nws {{{','.join(commands)}}} ...\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"nws: error: unknown command {argv[0]!r}", file=sys.stderr)
            return USAGE_ERROR
        return 0
    command, rest = argv[0], argv[1:]
    handlers = {"eval": cmd_eval, "pools": cmd_pools, "report": cmd_report, "data": cmd_data, "launch": cmd_launch,
                "upgrade": cmd_upgrade}
    try:
        if command in handlers:
            return handlers[command](rest)
        if command == "demo" and "--compare" in rest:
            return cmd_compare([a for a in rest if a != "--compare"])
        config, resume = parse_run_args(rest, prog=f"nws {command}", require_config=command == "run")
        _run(config, resume)
        return 0
    except NWSError as err:
        print(f"nws: error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("nws: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(err, SIGTERMException):  # Lightning's, on SIGTERM (scancel, a time limit): not success
            raise
        print("nws: error: terminated (SIGTERM) before the run finished; rerun with --resume", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
