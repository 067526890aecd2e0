"""The ``nws`` command: ``demo``, ``run`` and ``eval``.

Problems with the user's input (a missing or malformed config, an unknown key, a wrong type, a missing or
corrupt run) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from nws.config import DataConfig, ModelConfig, RunConfig, TrainConfig, TrainerConfig
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
    for key, cls in (("model", ModelConfig), ("data", DataConfig), ("pretrain", TrainConfig),
                     ("task", TrainConfig), ("trainer", TrainerConfig)):
        parser.add_class_arguments(cls, key, default=getattr(defaults, key))
    return parser


def parse_run_config(argv: Sequence[str], prog: str = "nws run", require_config: bool = True) -> RunConfig:
    """A :class:`RunConfig` from ``--config`` and overrides; :class:`UsageError` with one line otherwise."""
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
    try:
        return RunConfig(seed=d["seed"], out=d["out"], model=ModelConfig(**d["model"]), data=DataConfig(**d["data"]),
                         pretrain=TrainConfig(**d["pretrain"]), task=TrainConfig(**d["task"]),
                         trainer=TrainerConfig(**d["trainer"]))
    except TypeError as err:
        raise UsageError(_one_line(err)) from None


def _run(config: RunConfig) -> None:
    from nws.learner import NWSLearner

    learner = NWSLearner(config)
    learner.run()
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
    from nws.store import TaskStore

    store = TaskStore(args.run)
    data = store.manifest.get("config", {}).get("data", {})
    benchmark = load_benchmark(data.get("name", "digits"), data.get("root"),
                               seed=store.manifest.get("config", {}).get("seed", 0))
    entries = [t for t in store.tasks() if args.task is None or t["index"] == args.task]
    if not entries:
        raise UsageError(f"{args.run} has no task {args.task}")
    failed = 0
    for t in entries:
        try:
            acc = evaluate(store.model(t["index"]), benchmark.tasks[t["index"]].test)
        except NWSError as err:
            failed += 1
            print(f"task {t['index']} ({t['name']}): FAILED: {err}")
            continue
        recorded = t.get("acc_after_training")
        note = f" (after training: {100 * recorded:.2f}%)" if recorded is not None else ""
        print(f"task {t['index']} ({t['name']}): accuracy {100 * acc:.2f}%{note}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "run the pipeline on the embedded digits data", "run": "run the pipeline from a config",
                "eval": "evaluate a run's stored tasks"}
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
        if command == "demo":
            config = parse_run_config(rest, prog="nws demo", require_config=False)
        else:
            config = parse_run_config(rest)
        _run(config)
        return 0
    except NWSError as err:
        print(f"nws: error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("nws: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
