"""Models that ship inside pip packages: found by import spec, never imported or downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional


def package_dir(module: str) -> Optional[Path]:
    """The folder of an installed package (without importing it), or None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
