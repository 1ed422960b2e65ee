"""The mechanism registry, a leaf: `MECHANISMS` (name -> class) and `register`, plus the arm parser
that `engine.spec` hands down.

A leaf so that a mechanism which builds another (the noise control runs the arm it matches) can
look mechanisms up, and parse the arm spec it is given, without importing the package `__init__`
or `engine.spec`, both of which import the mechanisms: no import circle, at module level or late.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Mechanism

MECHANISMS: dict[str, type[Mechanism]] = {}
_ARM_PARSER: list[Callable[[str], Any]] = []


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Add a mechanism to the registry (usable as a class decorator). Names are `[a-z0-9_]+`."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or name != name.lower() or name == "observer":
        raise ValueError(f"mechanism name {name!r} must be lower-case letters, digits and '_' (not 'observer')")
    if MECHANISMS.get(name, cls) is not cls:
        raise ValueError(f"a different mechanism is already registered as '{name}'")
    MECHANISMS[name] = cls
    return cls


def use_arm_parser(parse: Callable[[str], Any]) -> None:
    """`engine.spec` registers its `parse_arm` here when it loads (the engine package loads it)."""
    _ARM_PARSER[:] = [parse]


def parse_arm_text(text: str):
    """An arm spec string parsed into an `ArmSpec` by `engine.spec.parse_arm` (its SpecError, a
    ValueError, for a bad one)."""
    if not _ARM_PARSER:
        raise RuntimeError("engine.spec is not loaded: import engine first")
    return _ARM_PARSER[0](text)
