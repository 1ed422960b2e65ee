"""Toy mechanisms that live only in the tests, registered from outside the engine through
`$LAB_PLUGINS` (set in conftest.py), so they appear in `python -m engine mechanisms`, in the lab's
mechanism dropdown, and in the shared conformance suite — proof that protocol v2 is open.

`mask_toy` edits the attention mask and positions and adds nothing (Inspect must draw its edited
attention); `vector_toy` adds one learned vector per layer taken from a weights file.

`bidirectional`: in the first turn's prefill, the user message's tokens attend to each other both
ways (a PALM-style source mask). `shift`: RoPE positions of every token moved by a constant (RoPE
is relative, so this changes numerics only).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from engine.mechanisms import ConformanceCase, Mechanism, MechanismSettings, RowPlan, file_field, register
from engine.mechanisms.base import ROLE_CODE


class MaskToySettings(MechanismSettings):
    bidirectional: bool = Field(True, description="first-turn user tokens see each other both ways (prefill)")
    shift: int = Field(0, ge=0, le=1000, description="add this to every RoPE position")

    @model_validator(mode="after")
    def _all_or_nothing(self):
        if self.linkage not in (0.0, 1.0):
            raise ValueError("mask_toy edits the attention mask, which cannot be scaled: linkage must be 0 or 1")
        return self


class MaskToy(Mechanism):
    name = "mask_toy"
    Settings = MaskToySettings

    def plan(self, row):
        allow = None
        if self.settings.bidirectional and row.turn == 0 and row.positions.numel() > 1:
            user = row.roles == ROLE_CODE["user"]
            allow = user[:, None] & user[None, :]
        positions = row.positions + self.settings.shift if self.settings.shift else None
        if allow is None and positions is None:
            return None
        return RowPlan(position_ids=positions, allow=allow)

    def forward(self, call):
        self.call_counts[call.layer] += 1
        return None

    @classmethod
    def conformance_cases(cls):
        return [
            ConformanceCase("mask_toy:linkage=1", cached_exact=False, causal=False),
            ConformanceCase("mask_toy:linkage=1,bidirectional=false,shift=7", changes_output=False),
        ]


register(MaskToy)


class VectorToySettings(MechanismSettings):
    weights: str | None = file_field("a weights file with one learned vector per layer")
    init_scale: float = Field(1.0, ge=0.0, le=100.0, description="scale of fresh random vectors")


class VectorToy(Mechanism):
    """Adds one learned vector per layer (its trained parameters) and reports its norm as an auxiliary loss."""

    name = "vector_toy"
    Settings = VectorToySettings

    @classmethod
    def build_weights(cls, settings, model, tensors):
        hidden = model.config.hidden_size
        layers = settings.resolved_layers(model.config.num_hidden_layers)
        module = torch.nn.ParameterDict()
        for layer in layers:
            if tensors is None:
                g = torch.Generator().manual_seed(layer)
                value = torch.randn(hidden, generator=g) * settings.init_scale
            else:
                value = tensors[f"vector.{layer}"]
                if value.shape != (hidden,):
                    raise ValueError(f"vector.{layer} has shape {tuple(value.shape)}, expected ({hidden},)")
            module[str(layer)] = torch.nn.Parameter(value.clone())
        return module

    def forward(self, call):
        self.call_counts[call.layer] += 1
        vec = self.weights[str(call.layer)]
        call.aux[f"norm.{call.layer}"] = vec.pow(2).sum()
        return vec.to(call.attn_out.dtype).expand_as(call.attn_out)

    @classmethod
    def conformance_cases(cls):
        return [ConformanceCase("vector_toy:linkage=1,gain=0.5")]


register(VectorToy)
