"""Memory mechanisms, one per module, all behind the protocol in `base.py`.

To add one: subclass `Mechanism` with a `Settings` model, implement `forward`, and register it in
`MECHANISMS` below. The host, the dialogue loop, the CLI and the lab pick it up from there.
"""
from .base import Mechanism, MechanismSettings, ReadTrace, StepRow, default_layers
from .continuity import Continuity, ContinuitySettings

MECHANISMS: dict[str, type[Mechanism]] = {Continuity.name: Continuity}

__all__ = ["MECHANISMS", "Mechanism", "MechanismSettings", "ReadTrace", "StepRow", "default_layers",
           "Continuity", "ContinuitySettings"]
