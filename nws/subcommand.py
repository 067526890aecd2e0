"""A subcommand of the ``nws`` command line (:data:`nws.cli.COMMANDS`): what it is (:class:`Command`), the error
for bad arguments, and what the subcommands share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace

from nws.config_parser import Parser
from nws.errors import NWSError


class UsageError(NWSError):
    """Bad command-line arguments."""


@dataclass(frozen=True)
class Command:
    """A subcommand: what it does (one line), an example, its options and what it runs."""

    about: str
    example: str
    options: Callable[[Parser], None]
    handler: Callable[[Namespace], int]


def flat(items: Any) -> list:
    """The values of an option that takes several (``nargs``), as one list."""
    return [x for item in items for x in (item if isinstance(item, list) else [item])]
