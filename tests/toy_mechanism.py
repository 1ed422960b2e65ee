"""A toy mechanism that lives only in the tests: it edits the attention mask and positions and adds nothing.

It proves that protocol v2 is open: registered from outside the engine (through `$LAB_PLUGINS`,
set in conftest.py), it appears in `python -m engine mechanisms`, in the lab's mechanism
dropdown, passes the shared conformance suite, and Inspect draws its edited attention.

`bidirectional`: in the first turn's prefill, the user message's tokens attend to each other both
ways (a PALM-style source mask). `shift`: RoPE positions of every token moved by a constant (RoPE
is relative, so this changes numerics only).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from engine.mechanisms import ConformanceCase, Mechanism, MechanismSettings, RowPlan, register
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
        return [ConformanceCase("mask_toy:linkage=1", cached_exact=False, causal=False),
                ConformanceCase("mask_toy:linkage=1,bidirectional=false,shift=7", changes_output=False)]


register(MaskToy)
