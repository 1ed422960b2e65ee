"""The mechanism protocol (v2): what every memory system implements to slot into the engine.

A mechanism instance belongs to one arm of one conversation and owns that conversation's state
(memory entries, neural-memory weights, source K/V). What it may do, in the order of a forward pass:

1. `plan(row)` before the forward: per-row edits of the step's RoPE position ids and extra
   *allowed* attention pairs among the step's tokens (`RowPlan`). The dialogue builds a per-row
   4-D mask only when some row asks for one; the capture reads the same mask and positions.
2. `forward(call)` at each of its `hook_layers`, after self-attention, with only this arm's real
   (non-padding) tokens (`LayerCall`); it returns a residual `delta` that the host adds as
   `gain * linkage * delta`, and may put auxiliary losses (for training) into `call.aux`.
3. `snapshot()` / `restore()` copy the conversation state, for regenerate and replay.

Trained parameters (a memory bank, adapters) live in an `nn.Module` built by `build_weights`
from a safetensors file (engine/weights.py) once per process per content hash and shared by every
arm and dialogue that names it; conversation state stays per arm. A mechanism that needs autograd
at test time sets `needs_grad`: its rows run under `no_grad` (not `inference_mode`), so it can open
a local `enable_grad()`.

A row whose linkage is 0 is never planned for nor passed to the mechanism, so linkage 0 is
bit-identical to the base model by construction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

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

    def caveat(self) -> str | None:
        """A warning a person must see beside this arm (e.g. untrained random parameters that make it
        a perturbation, not a memory); None when there is none. The lab and the CLIs show it."""
        return None

    def resolved_layers(self, n_layers: int) -> list[int]:
        layers = self.layers if self.layers is not None else default_layers(n_layers)
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {layers}")
        return sorted(layers)


def file_field(description: str, suffix: str = ".safetensors"):
    """A settings key naming a file (a weights file, a document): the lab shows an upload for it,
    and spec strings write it in double quotes. A mechanism's trained parameters come from the key
    named `weights` (see engine/weights.py)."""
    return Field(None, description=description, json_schema_extra={"file": True, "suffix": suffix})


@dataclass
class StepRow:
    """What one arm's row holds in the current forward pass (padding already removed)."""

    positions: torch.Tensor  # [T] absolute positions in the arm's own token sequence
    roles: torch.Tensor  # [T] role codes (ROLE_CODE)
    token_ids: torch.Tensor  # [T]
    turn: int
    record: bool  # record read traces for these tokens


@dataclass
class RowPlan:
    """A row's edits of the coming forward pass (None = no edit). Applies to the row's real tokens.

    `position_ids` [T]: RoPE positions for this step's tokens (e.g. positions that restart after a
    source). `allow` [T, T] bool: extra query->key pairs among this step's tokens, OR'd into the
    causal mask (e.g. a bidirectional source in the prefill). Earlier tokens stay fully visible.
    """

    position_ids: torch.Tensor | None = None
    allow: torch.Tensor | None = None


@dataclass
class LayerCall:
    """One arm's tokens at one hooked layer, after self-attention.

    `rope` is the (cos, sin) [T, head_dim] the layer used for these tokens; `aux` is the arm's
    dict of auxiliary losses for this forward pass (a mechanism adds e.g. `router_balance.12`).
    """

    layer: int
    attn: torch.nn.Module
    x_hat: torch.Tensor  # [T, hidden] the normed input of self-attention
    rope: tuple[torch.Tensor, torch.Tensor] | None
    attn_out: torch.Tensor  # [T, hidden] self-attention's output, before the residual add
    row: StepRow
    aux: dict[str, torch.Tensor]


@dataclass
class ConformanceCase:
    """One configuration the shared conformance suite (tests/engine/test_conformance.py) checks.

    `spec` is an arm spec at linkage 1 (the suite derives the linkage-0 arm from it). The flags say
    which invariants the configuration claims; every case must be bit-identical at linkage 0.
    """

    spec: str
    cached_exact: bool = True  # a cached (stepwise) forward equals an uncached one within 1e-4
    causal: bool = True  # no token's output depends on a later token
    changes_output: bool = True  # at linkage 1 the logits differ from the base model


def copy_state(value: Any) -> Any:
    """A deep copy of nested dicts / lists / tuples of tensors (tensors cloned, detached)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(v) for v in value)
    return value


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
            "layer": self.layer,
            "position": self.position,
            "slot_keys": list(self.slot_keys),
            "weights": self.weights.astype(float).round(6).tolist(),
            "per_head": None if self.per_head is None else self.per_head.astype(float).round(6).tolist(),
            "scalars": {k: float(v) for k, v in self.scalars.items()},
        }


class Mechanism:
    """Base class. Subclasses set `name` and `Settings` and implement `forward` (and, as needed,
    `plan`, `build_weights`, `snapshot` / `restore`, `conformance_cases`)."""

    name: ClassVar[str]
    Settings: ClassVar[type[MechanismSettings]]
    needs_grad: ClassVar[bool] = False  # rows run under no_grad (not inference_mode): enable_grad works
    # the host feeds this arm's whole transcript again at each turn's prefill (continuity's seed variant)
    reprefill_each_turn: bool = False

    def __init__(self, settings: MechanismSettings, model: torch.nn.Module, weights: torch.nn.Module | None = None):
        self.settings = settings
        self.config = model.config
        self.layers = settings.resolved_layers(self.config.num_hidden_layers)
        self.weights = weights
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.call_counts: Counter[int] = Counter()
        self.traces: list[ReadTrace] = []
        self._projections: dict[int, Any] = {}

    # -- the host layer's projections, built once per instance -------------------------------------
    def projections(self, layer: int, attn: torch.nn.Module):
        """`make_projections(layer, attn)`, cached per layer: 4-bit weights are dequantised once."""
        if layer not in self._projections:
            self._projections[layer] = self.make_projections(layer, attn)
        return self._projections[layer]

    def make_projections(self, layer: int, attn: torch.nn.Module):
        """The layer's own W_q / W_k / W_v / W_o with GQA grouping and RoPE (`LayerProjections`)."""
        from .projections import LayerProjections

        return LayerProjections(attn, self.config, self.dtype)

    # -- trained parameters (shared across arms and dialogues) ----------------------------------
    @classmethod
    def build_weights(
        cls, settings: MechanismSettings, model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None
    ) -> torch.nn.Module | None:
        """The mechanism's parameters: from a weights file's tensors, or freshly made (tensors None).

        Called once per process per (file content, model); the module is shared read-only by every
        arm that names the same file. Raise ValueError with a one-line message on a shape mismatch.
        """
        return None

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

    def plan(self, row: StepRow) -> RowPlan | None:
        """Edits of this row's positions / attention mask for the coming forward pass (None: none)."""
        return None

    def forward(self, call: LayerCall) -> torch.Tensor | None:
        """Return delta [T, hidden] for this arm's tokens at `call.layer` (None: nothing to add)."""
        raise NotImplementedError

    # -- conversation lifecycle ---------------------------------------------------------------
    def begin_turn(self, turn: int) -> None:
        """Called before each user turn is prefilled."""

    def reset(self) -> None:
        """Forget the conversation's memory."""

    def snapshot(self) -> dict:
        """A copy of the conversation state (never live references): regenerate and replay restore it."""
        return {}

    def restore(self, state: dict) -> None:
        """Return to a `snapshot()` (which stays usable: restore copies again)."""

    def memory_size(self) -> int:
        return 0

    def describe(self) -> str:
        return f"{self.name} on layers {self.layers} (gain {self.settings.gain}, linkage {self.settings.linkage})"

    # -- what the shared conformance suite checks -----------------------------------------------
    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        """Configurations (at linkage 1) whose invariants tests/engine/test_conformance.py checks."""
        return [ConformanceCase(f"{cls.name}:linkage=1")]
