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
from collections.abc import Sequence
from typing import Optional

from jsonargparse.typing import NonNegativeInt, PositiveInt

from nws.config import ConfigError, setting_types
from nws.config_parser import Parser, explain, given_on_command_line
from nws.errors import NWSError
from nws.interrupts import Interrupted, handle_signals
from nws.run_commands import (MethodName, cmd_compare, cmd_eval, cmd_launch, cmd_report, cmd_run, cmd_upgrade,
                              compare_options, demo_options, eval_options, launch_options, report_options,
                              run_options, upgrade_options)
from nws.serve_commands import cmd_export, cmd_predict, export_format, export_options, predict_options
from nws.setup_commands import cmd_configs, cmd_data, cmd_pools, data_options, pools_options
from nws.subcommand import Command

USAGE_ERROR = 2


# ------------------------------------------------------------------------------------------ the parser


COMMANDS: dict[str, Command] = {
    "demo": Command("run the pipeline on the embedded digits data (--compare: NWS and every baseline)",
                    "nws demo --task.epochs 5", demo_options, cmd_run),
    "run": Command("pretrain pools, learn every task, report accuracy and memory (no --config: the demo's "
                   "settings)", "nws run --config split_cifar100_resnet18 --data.root data/cifar100",
                   run_options, cmd_run),
    "compare": Command("NWS and every baseline on the same tasks, then the report (also: nws demo --compare)",
                       "nws compare --config split_fashion_mnist_convnet --data.root data/fashion-mnist",
                       compare_options, cmd_compare),
    "eval": Command("evaluate a run's stored tasks from its files alone, on the run's own benchmark",
                    "nws eval --run runs/demo --task 0", eval_options, cmd_eval),
    "report": Command("tables and plots comparing runs (methods, seeds)", "nws report runs/compare",
                      report_options, cmd_report),
    "predict": Command("classify image files with a task of a run, prepared as the run recorded (one line per "
                       "file: the file, the class, its probability)",
                       "nws predict --run runs/demo --task 0 digit.png", predict_options, cmd_predict),
    "export": Command("write a task's network as a file that runs without nws (safetensors, TorchScript, ONNX), "
                      "with how its inputs are prepared beside it",
                      "nws export --run runs/demo --task 0 --format onnx --out digits01.onnx", export_options,
                      cmd_export),
    "configs": Command("list the packaged configs (nws run --config NAME)", "nws configs", lambda p: None,
                       cmd_configs),
    "data": Command("get CIFAR-100, Fashion-MNIST or MNIST, or check a benchmark's files",
                    "nws data check --benchmark folders --root data/birds data/cars", data_options, cmd_data),
    "launch": Command("one run per seed (SLURM or local jobs), then nws report",
                      "nws launch --config digits_convnet --seeds 1 2 3 --out runs/seeds", launch_options,
                      cmd_launch),
    "upgrade": Command("rewrite runs of an earlier nws format into today's, atomically (written aside and "
                       "verified before anything is replaced)", "nws upgrade runs/old", upgrade_options,
                       cmd_upgrade),
    "pools": Command("pools without pretraining: k-means of a checkpoint, or the reference's published pools",
                     "nws pools from-checkpoint resnet18.pth --model.name resnet18 --out runs/pools_r18",
                     pools_options, cmd_pools),
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
                 "iters": NonNegativeInt, "batch_size": PositiveInt, "format": export_format()}
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
