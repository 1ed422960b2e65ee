"""Memory mechanisms, one per module, all behind the protocol in `base.py`.

To add one: subclass `Mechanism` with a `Settings` model, implement `forward` (and whatever else
of the protocol it needs), and `register` it. The host, the dialogue loop, the CLI, the lab and the
conformance suite (tests/engine/test_conformance.py) pick it up from the registry. Modules named in
`$LAB_PLUGINS` (comma-separated, importable) are imported when the engine loads, so a mechanism
kept outside this package registers itself the same way.
"""

from __future__ import annotations

import importlib
import os
import sys

from .adapter import Adapter
from .base import (
    ConformanceCase,
    LayerCall,
    Mechanism,
    MechanismSettings,
    ReadTrace,
    RowPlan,
    StepRow,
    copy_state,
    default_layers,
    file_field,
)
from .continuity import Continuity, ContinuitySettings
from .memory_bank import MemoryBank, MemoryBankSettings
from .neural_memory import NeuralMemory
from .noise import Noise
from .partial_attention import PartialAttention
from .registry import MECHANISMS, register


def load_plugins(names: str | None = None) -> list[str]:
    """Import the modules named in `names` (default `$LAB_PLUGINS`); each registers its mechanisms.

    A module that fails to import is reported in one line on stderr and skipped: the engine and
    every other mechanism stay usable, and the missing mechanism is then an unknown name.
    """
    names = os.environ.get("LAB_PLUGINS", "") if names is None else names
    loaded = []
    for module in filter(None, (n.strip() for n in names.split(","))):
        try:
            importlib.import_module(module)
        except Exception as e:
            print(f"warning: LAB_PLUGINS: cannot import '{module}': {type(e).__name__}: {e}", file=sys.stderr)
            continue
        loaded.append(module)
    return loaded


register(Continuity)
register(MemoryBank)
register(NeuralMemory)
register(PartialAttention)
register(Noise)  # the matched-norm noise control for any of the above
register(Adapter)  # a low-rank adapter with no memory: the matched control for trained mechanisms

__all__ = [
    "MECHANISMS",
    "ConformanceCase",
    "LayerCall",
    "Mechanism",
    "MechanismSettings",
    "ReadTrace",
    "RowPlan",
    "StepRow",
    "copy_state",
    "default_layers",
    "file_field",
    "load_plugins",
    "register",
    "Continuity",
    "ContinuitySettings",
    "MemoryBank",
    "MemoryBankSettings",
]
