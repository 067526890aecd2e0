"""Interrupts (Ctrl-C, ``kill``, SLURM's pre-emption and time limits) as one exception that names the stage.

:func:`handle_signals` turns SIGINT and SIGTERM into :class:`Interrupted`, a ``BaseException`` that Lightning
does not swallow (it turns ``KeyboardInterrupt`` into ``exit(1)``), so it reaches the command line, which
prints what stopped and how to resume, and exits ``128 + signal`` (130, 143). Training marks the stage it is
in with :func:`stage`. Nothing is written on the way out: what a run stored stays as it was (task files are
written atomically, epoch checkpoints are complete files), and ``--resume`` continues from there.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_stages: list[str] = []
_held: list[int] = []  # signals received while held, raised on release
_holding = False


class Interrupted(BaseException):
    """The process received ``signum`` while in ``stage`` (None: between stages)."""

    def __init__(self, signum: int, stage: str | None):
        super().__init__(f"{signal.Signals(signum).name} during {stage or 'the run'}")
        self.signum, self.stage = signum, stage

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def current_stage() -> str | None:
    """The innermost stage being trained, if any."""
    return _stages[-1] if _stages else None


@contextmanager
def stage(name: str) -> Iterator[Callable[[], None]]:
    """Mark ``name`` (``pretrain``, ``task_003``, ...) as the stage an interrupt stops.

    The block may call the ``complete`` it is given just before the write that finishes the stage (listing a
    task): a signal from then on waits until the block has ended and is raised naming the stage around it, so
    the line printed always agrees with what was stored (a stage named is not stored; resume redoes it)."""
    _stages.append(name)
    completing = False

    def complete() -> None:
        nonlocal completing
        completing = True
        hold()

    try:
        yield complete
    except BaseException:
        if completing:
            release(raise_held=False)
        raise
    finally:
        _stages.pop()
    if completing:
        release()


def hold() -> None:
    """Hold signals until :func:`release`: for steps whose parts must all be written or none (an epoch's
    checkpoint and its log row)."""
    global _holding
    _holding = True


def release(raise_held: bool = True) -> None:
    """End :func:`hold`; a signal received meanwhile is raised now (unless ``raise_held`` is false)."""
    global _holding
    _holding = False
    held = _held[:1]
    _held.clear()
    if held and raise_held:
        raise Interrupted(held[0], current_stage())


def _raise(signum: int, frame) -> None:  # noqa: ARG001
    if _holding:
        _held.append(signum)
        return
    raise Interrupted(signum, current_stage())


def handle_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Raise :class:`Interrupted` on these signals from now on (call once, in the main thread)."""
    for signum in signums:
        signal.signal(signum, _raise)
