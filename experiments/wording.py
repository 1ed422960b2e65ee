"""How a bad value is named in an error line ("the string 'vibes'", "a number (3)").

Shared by protocol validation and the scorers' option models, so that every message a researcher
reads describes what they wrote the same way.
"""

from __future__ import annotations

from typing import Any


def describe(value: Any) -> str:
    """A short, readable name for a value a file or form supplied."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"the string {value[:60]!r}" + ("..." if len(value) > 60 else "")
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"
