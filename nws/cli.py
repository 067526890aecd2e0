"""The ``nws`` command: one jsonargparse parser with a subcommand per job (:data:`COMMANDS`).

Every run setting has one spelling in every command (``--group.key value``, as in the config files), no
long option may be abbreviated, and every ``--help`` says what each option allows and gives an example.
Problems with the user's input (a missing or malformed config, an unknown key, a wrong value, a missing or
corrupt run) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from nws.config import (ConfigError, ModelConfig, Parser, add_settings, config_from_namespace,
                        explain, given_on_command_line, packaged_configs, registered_name,
                        setting_types, stored_config)
from nws.errors import NWSError
from nws.interrupts import Interrupted, handle_signals

USAGE_ERROR = 2


class UsageError(NWSError):
    """Bad command-line arguments."""


@dataclass(frozen=True)
class Command:
    """A subcommand: what it does (one line), an example, its options and what it runs."""

    about: str
    example: str
    options: Callable[[Parser], None]
    handler: Callable[[Namespace], int]


# ------------------------------------------------------------------------------------------ run, demo, compare


# Read from nws.methods when a method is named or --help shown (importing the methods imports Lightning).
MethodName = registered_name("method", "nws.methods:METHODS", resolve="nws.methods:method_class",
                             more="a module:Class, or a method installed under the entry-point group nws.methods")


def _run_options(parser: Parser) -> None:
    add_settings(parser, MethodName)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out: finished tasks are kept, the rest learned")


def _demo_options(parser: Parser) -> None:
    _run_options(parser)
    parser.add_argument("--compare", action="store_true",
                        help="run NWS and every baseline on the same tasks instead, then the report "
                        "(nws demo --compare --help: its options)")


def _compare_options(parser: Parser) -> None:
    add_settings(parser, skip=["method"])
    parser.set_defaults(out="runs/compare")


def cmd_run(args: Namespace) -> int:
    from nws.devices import shutdown_distributed
    from nws.runner import Runner

    from nws.results import RESULTS, RESULTS_MD

    runner = Runner(config_from_namespace(args.as_dict()))
    runner.run(resume=args.resume)
    shutdown_distributed()
    if not runner.ctx.writer:  # a distributed rank other than 0: rank 0 reports
        return 0
    print()
    print((runner.out / RESULTS_MD).read_text(), end="")
    print(f"Results: {runner.out / RESULTS}")
    return 0


def cmd_compare(args: Namespace) -> int:
    from nws.compare import compare

    config = config_from_namespace(args.as_dict())
    out = Path(config.out)
    result = compare(config, out)
    print()
    print((out / "report" / "report.md").read_text().split("\n\n![")[0])
    print("Seconds: " + ", ".join(f"{m} {s:.0f}" for m, s in result["seconds"].items())
          + f"; total {sum(result['seconds'].values()):.0f}")
    print(f"Report: {out / 'report' / 'report.md'}")
    return 0


# ------------------------------------------------------------------------------------------ eval, report, configs


def _eval_options(parser: Parser) -> None:
    parser.add_argument("--run", type=str, required=True, help="run directory")
    parser.add_argument("--task", type=Optional[NonNegativeInt], default=None, help="only this task index")
    parser.add_argument("--data.root", type=Optional[str], default=None,
                        help="where the benchmark's files are now, if they moved (default: the run's data.root)")


def cmd_eval(args: Namespace) -> int:
    import dataclasses

    from nws.data import benchmark_from_config
    from nws.devices import eval_device, use_threads
    from nws.engine import evaluate
    from nws.methods import open_run

    store = open_run(args.run)
    if "config" not in store.manifest:
        raise UsageError(f"{args.run} does not record its config, so its benchmark is unknown")
    config = stored_config(store.manifest["config"], f"{args.run}'s config")
    use_threads(config.trainer)
    root = args.data.root if args.data.root is not None else config.data.root
    benchmark = benchmark_from_config(dataclasses.replace(config.data, source="none", root=root), config.seed)
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
            print(f"task {t['index']} ({t['name']}): FAILED: {' '.join(str(err).split())}")
            continue
        recorded = t.get("acc_after_training")
        note = f" (after training: {100 * recorded:.2f}%)" if recorded is not None else ""
        print(f"task {t['index']} ({t['name']}): accuracy {100 * acc:.2f}%{note}")
    return 1 if failed else 0


def _upgrade_options(parser: Parser) -> None:
    parser.add_argument("runs", type=str, nargs="+", help="run directories")


def cmd_upgrade(args: Namespace) -> int:
    from nws.upgrade import upgrade

    for run in _flat(args.runs):
        notes = upgrade(run)
        print(f"{run}: " + ("upgraded to today's format" if notes else "already of today's format"))
        for note in notes:
            print(f"  {note}")
    return 0


def _report_options(parser: Parser) -> None:
    parser.add_argument("runs", type=str, nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="report directory (default: report/ inside the first directory given: the run, or the "
                        "directory of runs)")


def cmd_report(args: Namespace) -> int:
    return _report([str(r) for r in _flat(args.runs)], args.out)


def _flat(items: Any) -> list:
    return [x for item in items for x in (item if isinstance(item, list) else [item])]


def _report(runs: list[str], out_dir: str | None) -> int:
    from nws.report import write_report

    out = Path(out_dir) if out_dir else Path(runs[0]) / "report"
    write_report(runs, out)
    print((out / "report.md").read_text().split("\n\n![")[0])
    print(f"Report: {out / 'report.md'}")
    return 0


def cmd_configs(args: Namespace) -> int:
    configs = packaged_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:{width}s}  {first}")
    print(f"\nnws run --config NAME [--group.key value ...]; the files are in {path.parent}")
    return 0


# ------------------------------------------------------------------------------------------ predict, export


def _task(value: str) -> int | str:
    """``--task``: an index, or a task's name."""
    return int(value) if value.strip().isdigit() else value


def _predict_options(parser: Parser) -> None:
    parser.add_argument("--run", type=str, required=True, help="run directory")
    parser.add_argument("--task", type=str, required=True, help="the task: its index, or its name (nws eval lists "
                        "them)")
    parser.add_argument("files", type=str, nargs="+", help="image files (any format Pillow reads)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of tab-separated "
                        "text")
    parser.add_argument("--batch_size", type=PositiveInt, default=64, help="images per forward pass")


def cmd_predict(args: Namespace) -> int:
    import json

    import torch

    from nws.config import TrainerConfig
    from nws.devices import use_threads
    from nws.serve import TaskServer, open_image

    files = [str(f) for f in _flat(args.files)]
    server = TaskServer(args.run, cache_size=1)
    index = server.index(_task(args.task))
    preparation = server.preparation(index)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:  # before the first line is printed
        raise UsageError(f"{missing[0]}: no such file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    use_threads(TrainerConfig())
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        batch = torch.stack([preparation(open_image(f)) for f in chunk])
        out = server.predict(index, batch)
        for f, name, label, p in zip(chunk, out.names, out.labels.tolist(), out.confidence.tolist()):
            if args.json:
                print(json.dumps({"file": f, "class": name, "probability": p, "label": label}))
            else:
                print(f"{f}\t{name}\t{p:.4f}")
    return 0


def _export_format() -> Any:
    from nws.export import FORMATS

    return Literal[FORMATS]


def _export_options(parser: Parser) -> None:
    parser.add_argument("--run", type=str, required=True, help="run directory")
    parser.add_argument("--task", type=str, required=True, help="the task: its index, or its name")
    parser.add_argument("--format", type=_export_format(), required=True,
                        help="safetensors (a state dict: load it into the network's class), torchscript "
                        "(torch.jit.load), onnx (onnxruntime; needs pip install 'neural-weight-search[onnx]')")
    parser.add_argument("--out", type=str, required=True, help="the file to write; its description (task, classes, "
                        "how inputs are prepared) goes beside it as the same name with .json")


def cmd_export(args: Namespace) -> int:
    from nws.export import export

    written, described = export(args.run, _task(args.task), args.format, args.out)
    print(f"{written}: task {_task(args.task)} of {args.run} as {args.format}; its classes and how its inputs are "
          f"prepared: {described}")
    return 0


# ------------------------------------------------------------------------------------------ data


def _data_options(parser: Parser) -> None:
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

    entry, roots = benchmark_entry(sub.benchmark), [Path(r) for r in _flat(sub.root)]
    if len(roots) > 1 and not entry.many_roots:
        raise UsageError(f"nws data check: --benchmark {entry.name} takes one --root")
    rows = entry.check(roots)
    test = entry.test_split
    print(f"| data set | classes | train images | {test} images |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['classes']} | {r['train']} | {r[test]} |")
    print(f"{', '.join(map(str, roots))}: layout and class counts OK for {entry.name}")
    return 0


# ------------------------------------------------------------------------------------------ launch


def _launch_options(parser: Parser) -> None:
    add_settings(parser, MethodName)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one run per seed")
    parser.add_argument("--slurm", type=Optional[str], default=None,
                        help="submit to SLURM, as KEY=VALUE,...: partition, gpus (per node; none: the runs train on "
                        "the CPU), nodes, hours, cpus, mem (GB), account, qos, constraint")
    parser.add_argument("--parallel", action="store_true", help="local jobs: run all seeds at once")
    parser.add_argument("--no_wait", action="store_true", help="SLURM: submit and return; report later")
    parser.add_argument("--resume", action="store_true", help="run again only the seeds that did not finish "
                        "(each continues where it stopped), then report all of them")


def cmd_launch(args: Namespace) -> int:
    from nws.launch import launch

    config = config_from_namespace(args.as_dict())
    dirs = launch(config, _flat(args.seeds), slurm=args.slurm, parallel=args.parallel, wait=not args.no_wait,
                  resume=args.resume)
    if args.no_wait:
        print("when the jobs are done: nws report " + " ".join(str(d) for d in dirs))
        return 0
    return _report([str(d) for d in dirs], str(dirs[0].parent / "report"))


# ------------------------------------------------------------------------------------------ pools


POOL_SETTINGS = ("name", "kwargs", "pool_size", "group_size", "exclude", "zero_entry")


def _pools_options(parser: Parser) -> None:
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


# ------------------------------------------------------------------------------------------ the parser


COMMANDS: dict[str, Command] = {
    "demo": Command("run the pipeline on the embedded digits data (--compare: NWS and every baseline)",
                    "nws demo --task.epochs 5", _demo_options, cmd_run),
    "run": Command("pretrain pools, learn every task, report accuracy and memory (no --config: the demo's "
                   "settings)", "nws run --config split_cifar100_resnet18 --data.root data/cifar100",
                   _run_options, cmd_run),
    "compare": Command("NWS and every baseline on the same tasks, then the report (also: nws demo --compare)",
                       "nws compare --config split_fashion_mnist_convnet --data.root data/fashion-mnist",
                       _compare_options, cmd_compare),
    "eval": Command("evaluate a run's stored tasks from its files alone, on the run's own benchmark",
                    "nws eval --run runs/demo --task 0", _eval_options, cmd_eval),
    "report": Command("tables and plots comparing runs (methods, seeds)", "nws report runs/compare",
                      _report_options, cmd_report),
    "predict": Command("classify image files with a task of a run, prepared as the run recorded (one line per "
                       "file: the file, the class, its probability)",
                       "nws predict --run runs/demo --task 0 digit.png", _predict_options, cmd_predict),
    "export": Command("write a task's network as a file that runs without nws (safetensors, TorchScript, ONNX), "
                      "with how its inputs are prepared beside it",
                      "nws export --run runs/demo --task 0 --format onnx --out digits01.onnx", _export_options,
                      cmd_export),
    "configs": Command("list the packaged configs (nws run --config NAME)", "nws configs", lambda p: None,
                       cmd_configs),
    "data": Command("get CIFAR-100, Fashion-MNIST or MNIST, or check a benchmark's files",
                    "nws data check --benchmark folders --root data/birds data/cars", _data_options, cmd_data),
    "launch": Command("one run per seed (SLURM or local jobs), then nws report",
                      "nws launch --config digits_convnet --seeds 1 2 3 --out runs/seeds", _launch_options,
                      cmd_launch),
    "upgrade": Command("rewrite runs of an earlier nws format into today's, atomically (written aside and "
                       "verified before anything is replaced)", "nws upgrade runs/old", _upgrade_options,
                       cmd_upgrade),
    "pools": Command("pools without pretraining: k-means of a checkpoint, or the reference's published pools",
                     "nws pools from-checkpoint resnet18.pth --model.name resnet18 --out runs/pools_r18",
                     _pools_options, cmd_pools),
}


NESTED = ("data", "pools")


def build_parser() -> Parser:
    """The ``nws`` parser: one subcommand per entry of :data:`COMMANDS`."""
    from nws import __version__

    parser = Parser(prog="nws", description="Neural Weight Search: task-incremental learning by searching frozen "
                    "kernel pools.", epilog="example:\n  nws demo\n  nws run --help")
    parser.add_argument("--version", action="version", version=f"nws {__version__}")
    sub = parser.add_subcommands(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = Parser(prog=f"nws {name}", description=command.about, epilog=f"example:\n  {command.example}")
        if name not in NESTED:
            command.options(p)
        sub.add_subcommand(name, p, help=command.about)
        if name in NESTED:  # jsonargparse: a level of subcommands is added before the next
            command.options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"] and "--compare" in argv:  # `nws demo --compare` is `nws compare`
        argv = ["compare", *(a for a in argv[1:] if a != "--compare")]
    handle_signals()
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        return COMMANDS[args.command].handler(args[args.command])
    except ConfigError as err:
        types = {**setting_types(), "method": MethodName, "seeds": list[int], "task": Optional[NonNegativeInt],
                 "iters": NonNegativeInt, "batch_size": PositiveInt, "format": _export_format()}
        print(f"nws: error: {explain(str(err), given_on_command_line(argv), types)}", file=sys.stderr)
        return USAGE_ERROR
    except NWSError as err:
        print(f"nws: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR
    except Interrupted as err:
        if sys.stdout.isatty():
            print(flush=True)  # end a progress bar's line
        print(f"nws: {interrupted_line(err, argv)}", file=sys.stderr, flush=True)
        return err.exit_code
    except SystemExit as err:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(err, SIGTERMException):  # Lightning's, on SIGTERM (scancel, a time limit): not success
            raise
        print(f"nws: {interrupted_line(Interrupted(signal.SIGTERM, None), argv)}", file=sys.stderr)
        return 128 + signal.SIGTERM


def interrupted_line(err: Interrupted, argv: Sequence[str]) -> str:
    """What stopped, and the exact command that continues it (the same command with ``--resume``)."""
    what = f"stopped by {signal.Signals(err.signum).name} during {err.stage or 'the run'}"
    if argv[:1] in (["run"], ["demo"], ["launch"]):
        again = ["nws", *argv, *([] if "--resume" in argv else ["--resume"])]
        return f"{what}; what was stored is kept. Resume with: {shlex.join(again)}"
    return what


if __name__ == "__main__":
    sys.exit(main())
