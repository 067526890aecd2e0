"""The ``nws`` subcommands about runs: ``run``, ``demo`` and ``compare`` train them, ``launch`` one per seed,
``eval`` evaluates a run's stored tasks, ``report`` compares runs, ``upgrade`` converts earlier formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt

from nws.config_parser import Parser, add_settings, config_from_namespace, stored_config
from nws.config_types import registered_name
from nws.errors import NWSError
from nws.subcommand import UsageError, flat


# ------------------------------------------------------------------------------------------ run, demo, compare


# Read from nws.methods when a method is named or --help shown (importing the methods imports Lightning).
MethodName = registered_name("method", "nws.methods:METHODS", resolve="nws.methods:method_class",
                             more="a module:Class, or a method installed under the entry-point group nws.methods")


def run_options(parser: Parser) -> None:
    add_settings(parser, MethodName)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out: finished tasks are kept, the rest learned")


def demo_options(parser: Parser) -> None:
    run_options(parser)
    parser.add_argument("--compare", action="store_true",
                        help="run NWS and every baseline on the same tasks instead, then the report "
                        "(nws demo --compare --help: its options)")


def compare_options(parser: Parser) -> None:
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


# ------------------------------------------------------------------------------------------ eval, report, upgrade


def eval_options(parser: Parser) -> None:
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


def upgrade_options(parser: Parser) -> None:
    parser.add_argument("runs", type=str, nargs="+", help="run directories")


def cmd_upgrade(args: Namespace) -> int:
    from nws.upgrade import upgrade

    for run in flat(args.runs):
        notes = upgrade(run)
        print(f"{run}: " + ("upgraded to today's format" if notes else "already of today's format"))
        for note in notes:
            print(f"  {note}")
    return 0


def report_options(parser: Parser) -> None:
    parser.add_argument("runs", type=str, nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="report directory (default: report/ inside the first directory given: the run, or the "
                        "directory of runs)")


def cmd_report(args: Namespace) -> int:
    return _report([str(r) for r in flat(args.runs)], args.out)


def _report(runs: list[str], out_dir: str | None) -> int:
    from nws.report import write_report

    out = Path(out_dir) if out_dir else Path(runs[0]) / "report"
    write_report(runs, out)
    print((out / "report.md").read_text().split("\n\n![")[0])
    print(f"Report: {out / 'report.md'}")
    return 0


# ------------------------------------------------------------------------------------------ launch


def launch_options(parser: Parser) -> None:
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
    dirs = launch(config, flat(args.seeds), slurm=args.slurm, parallel=args.parallel, wait=not args.no_wait,
                  resume=args.resume)
    if args.no_wait:
        print("when the jobs are done: nws report " + " ".join(str(d) for d in dirs))
        return 0
    return _report([str(d) for d in dirs], str(dirs[0].parent / "report"))
