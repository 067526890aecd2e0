"""The ``nws`` subcommands that use a stored task outside training: ``predict`` classifies image files,
``export`` writes its network as a file that runs without nws."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt

from nws.config_parser import Parser
from nws.subcommand import UsageError, flat


def _task(value: str) -> int | str:
    """``--task``: an index, or a task's name."""
    return int(value) if value.strip().isdigit() else value


def predict_options(parser: Parser) -> None:
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

    files = [str(f) for f in flat(args.files)]
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


def export_format() -> Any:
    from nws.export import FORMATS

    return Literal[FORMATS]


def export_options(parser: Parser) -> None:
    parser.add_argument("--run", type=str, required=True, help="run directory")
    parser.add_argument("--task", type=str, required=True, help="the task: its index, or its name")
    parser.add_argument("--format", type=export_format(), required=True,
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
