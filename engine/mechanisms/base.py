"""The mechanism protocol: what every memory system implements to slot into the engine.

A mechanism instance belongs to one arm of one conversation and owns that conversation's memory.
The `MechanismHost` (engine/hooks.py) calls `forward` at each of the mechanism's `hook_layers`
with only this arm's real (non-padding) tokens of the current forward pass, and adds
`gain * linkage * delta` to the arm's self-attention output. A row whose linkage is 0 is never
passed to the mechanism at all, so linkage 0 is bit-identical to the base model by construction.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "user", "assistant", "template")
ROLE_CODE = {r: i for i, r in enumerate(ROLES)}

# The seed used layers 16/24/30 of Llama-3.1-8B's 32: the same relative depths on any model.
SEED_RELATIVE_DEPTHS = (16 / 32, 24 / 32, 30 / 32)


def default_layers(n_layers: int) -> list[int]:
    return sorted({min(n_layers - 1, int(f * n_layers)) for f in SEED_RELATIVE_DEPTHS})


class MechanismSettings(BaseModel):
    """Settings shared by every mechanism; subclasses add their own keys (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    linkage: float = Field(1.0, ge=0.0, le=1.0, description="the arm's gate: 0 = observer, 1 = full")
    gain: float = Field(0.3, ge=0.0, le=10.0, description="scale of the residual the mechanism adds")
    layers: list[int] | None = Field(None, description="decoder layers to attach to; default: seed depths")

    def resolved_layers(self, n_layers: int) -> list[int]:
        layers = self.layers if self.layers is not None else default_layers(n_layers)
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {layers}")
        return sorted(layers)


@dataclass
class StepRow:
    """What one arm's row holds in the current forward pass (padding already removed)."""

    positions: torch.Tensor  # [T] absolute positions in the arm's own token sequence
    roles: torch.Tensor  # [T] role codes (ROLE_CODE)
    token_ids: torch.Tensor  # [T]
    turn: int
    record: bool  # record read traces for these tokens


@dataclass
class ReadTrace:
    """One reading token at one layer: weights over labelled memory slots, plus named scalars.

    `slot_keys` are ints (token positions in the arm's dialogue, for memories made of tokens) or
    strings (e.g. 'chapter 2 / slot 5'), so the inspect views can draw any mechanism the same way.
    """

    layer: int
    position: int
    slot_keys: list
    weights: np.ndarray  # [n_slots], averaged over heads
    per_head: np.ndarray | None = None  # [n_heads, n_slots]
    scalars: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "position": self.position, "slot_keys": list(self.slot_keys),
            "weights": self.weights.astype(float).round(6).tolist(),
            "per_head": None if self.per_head is None else self.per_head.astype(float).round(6).tolist(),
            "scalars": {k: float(v) for k, v in self.scalars.items()},
        }


class Mechanism:
    """Base class. Subclasses set `name` and `Settings` and implement `forward`."""

    name: ClassVar[str]
    Settings: ClassVar[type[MechanismSettings]]

    def __init__(self, settings: MechanismSettings, model: torch.nn.Module):
        self.settings = settings
        self.config = model.config
        self.layers = settings.resolved_layers(self.config.num_hidden_layers)
        self.call_counts: Counter[int] = Counter()
        self.traces: list[ReadTrace] = []

    # -- what the host asks -------------------------------------------------------------------
    @property
    def hook_layers(self) -> list[int]:
        """Layers the host must call `forward` at (read layers plus any write-only layers)."""
        return self.layers

    @property
    def scale(self) -> float:
        return self.settings.gain * self.settings.linkage

    @property
    def active(self) -> bool:
        return self.settings.linkage > 0.0

    def forward(self, layer: int, attn: torch.nn.Module, x_hat: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attn_out: torch.Tensor, row: StepRow) -> torch.Tensor | None:
        """Return delta [T, hidden] for this arm's tokens at `layer` (None: nothing to add)."""
        raise NotImplementedError

    # -- conversation lifecycle ---------------------------------------------------------------
    def begin_turn(self, turn: int) -> None:
        """Called before each user turn is prefilled."""

    def reset(self) -> None:
        """Forget the conversation's memory."""

    def state_dict(self) -> dict:
        """Conversation state (tensors and plain values), cheap to take: used to roll back a turn."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def memory_size(self) -> int:
        return 0

    def describe(self) -> str:
        return f"{self.name} on layers {self.layers} (gain {self.settings.gain}, linkage {self.settings.linkage})"
