"""Types of settings that say what they allow: constrained numbers, device lists, names looked up in a registry
(:func:`registered_name`), and :func:`allowed`, what a type allows in words (for ``--help`` and errors).

The jsonargparse parser refuses a value its type does not allow, so a setting's type is its first check.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal, Union

from jsonargparse.typing import (NonNegativeInt, NotEmptyStr, OpenUnitInterval, PositiveInt, extend_base_type,
                                 restricted_number_type, restricted_string_type)

from nws.errors import NWSError

PositiveNumber = restricted_number_type("PositiveNumber", float, [(">", 0.0), ("<", math.inf)])
NonNegativeNumber = restricted_number_type("NonNegativeNumber", float, [(">=", 0.0), ("<", math.inf)])
Number = restricted_number_type("Number", float, [(">", -math.inf), ("<", math.inf)])
Fraction = restricted_number_type("Fraction", float, [(">", 0.0), ("<=", 1.0)])
HalfOpenUnit = restricted_number_type("HalfOpenUnit", float, [(">=", 0.0), ("<", 1.0)])
ImageSide = restricted_number_type("ImageSide", int, (">=", 8))
DeviceCount = restricted_number_type("DeviceCount", int, [(">=", 1), ("==", -1)], join="or")
DeviceList = restricted_string_type("DeviceList", r"^(auto|\d+(,\d+)*,|\d+(,\d+)+)$")


def registered_name(kind: str, names: str, resolve: str | None = None, more: str = ""):
    """A ``str`` type that accepts the names registered in ``names`` (``module:attribute``, a collection or a
    function returning one), looked up when a value is parsed or ``--help`` shown; with ``resolve``
    (``module:function``), also any other value that function accepts (``more`` says which, in words)."""
    extend = {"_names": names, "_kind": kind, "_resolve": resolve, "_more": more}
    return extend_base_type(f"{kind.title()}Name", str, lambda cls, value: _check_name(cls, value, kind),
                            extra_attrs=extend, register_key=(kind, names))


def _imported(path: str) -> Any:
    import importlib

    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def registered_names(typehint: Any) -> list[str]:
    names = _imported(typehint._names)
    return list(names() if callable(names) else names)


def registered_choices(typehint: Any) -> str:
    return ", ".join(registered_names(typehint)) + (f", {typehint._more}" if typehint._more else "")


def _check_name(cls, value: Any, kind: str) -> None:
    if value in registered_names(cls):
        return
    if cls._resolve is not None:
        try:
            _imported(cls._resolve)(value)
            return
        except NWSError:
            pass
    raise ValueError(f"{value!r} is not a registered {kind}")


_ALLOWED = {int: "an integer", float: "a number", str: "a string", bool: "true or false", NotEmptyStr: "a non-empty string",
            NonNegativeInt: "an integer >= 0", PositiveInt: "an integer >= 1", ImageSide: "an integer >= 8",
            DeviceCount: "an integer >= 1, or -1 (all)",
            DeviceList: "auto, or device indices such as 0,1 or 1, (one device: its index and a comma)", PositiveNumber: "a number > 0",
            NonNegativeNumber: "a number >= 0", Number: "a finite number", Fraction: "a number in (0, 1]",
            HalfOpenUnit: "a number in [0, 1)", OpenUnitInterval: "a number in (0, 1)"}


def allowed(typehint: Any) -> str:
    """What ``typehint`` allows, in words (for ``--help`` and error messages)."""
    origin, args = typing.get_origin(typehint), typing.get_args(typehint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Union:
        return " or ".join("null" if a is type(None) else allowed(a) for a in args)
    if origin is list:
        return f"a list, each {allowed(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if hasattr(typehint, "_names"):
        return "one of " + registered_choices(typehint)
    return _ALLOWED.get(typehint, getattr(typehint, "__name__", str(typehint)))
