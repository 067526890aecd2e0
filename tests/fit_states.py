"""``python tests/fit_states.py DIR ARGS...``: ``nws ARGS...``, saving the trained module's state after every
Lightning ``fit`` as ``DIR/rank<R>_fit<N>.pt``, so a test can compare what every DDP rank holds (only rank 0
writes the run). Also registers ``convnet_without_bn`` for such runs."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from nws.cli import main
from nws.models import ConvNet, register_model


@register_model
def convnet_without_bn(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> ConvNet:
    """The demo's convnet without its BatchNorm layers: a DDP step then equals a single process's step on the
    global batch up to float rounding (BatchNorm normalises each rank's share of the batch, and SyncBatchNorm
    needs GPUs)."""
    model = ConvNet(num_classes, in_channels, tuple(widths))
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.BatchNorm2d):
            model.features[i] = nn.Identity()
    return model


def saving_fit(out: Path):
    """``Trainer.fit`` that then saves the module's state under ``out``."""
    fit, count = pl.Trainer.fit, [0]

    def wrapped(trainer: pl.Trainer, *args, **kwargs):
        result = fit(trainer, *args, **kwargs)
        state = {k: v.detach().cpu().clone() for k, v in trainer.lightning_module.state_dict().items()}
        torch.save(state, out / f"rank{trainer.global_rank}_fit{count[0]}.pt")
        count[0] += 1
        return result

    return wrapped


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    pl.Trainer.fit = saving_fit(out)
    sys.exit(main(sys.argv[2:]))
