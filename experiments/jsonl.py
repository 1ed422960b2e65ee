"""JSON Lines reading shared by the protocol items files and the labelled stance files."""

from __future__ import annotations

import json
from typing import Any, Iterator


def jsonl_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed object or the JSONDecodeError) for every non-blank line, so each
    caller words its own one-line error."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, exc
