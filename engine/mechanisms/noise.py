"""The noise control: a random residual with the norm of another mechanism's, token by token and layer by layer.

`noise:match="continuity:linkage=1,gain=0.3"` runs the named arm's mechanism exactly as that arm
would (its memory written and read, its mask and position edits planned), but instead of adding its
residual `g·λ·δ_t` it adds, at every hooked layer and token, a random direction with the same norm:

    a'_t = a_t + gain·λ · ||g_m·λ_m·δ_m,t|| · ε_t / ||ε_t||,   ε_t ~ N(0, I_hidden)

(`g_m`, `λ_m`, `δ_m` the matched arm's gain, linkage and residual; this arm's own `gain` defaults to
1, so at `linkage=1` the perturbation has the matched arm's size exactly). So a behavioural effect
of a mechanism can be told from a generic perturbation of the same size: the control keeps the
size and where it lands and throws away what it carries.

ε_t is a fixed function of (noise_seed, layer, position): the same in every process, in cached
and uncached forwards and after a rollback, so the arm is as cache-exact and causal as the arm it
matches. Linkage 0 is never dispatched (the host's rule), so it is the base model bit for bit.
The matched spec cannot itself hold double quotes: name a weights file as `weights=@name`.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..weights import shared_weights
from .base import ConformanceCase, LayerCall, Mechanism, MechanismSettings, ReadTrace
from .registry import MECHANISMS, parse_arm_text

BLOCK = 256  # positions drawn together: one generator call per (seed, layer, block of positions)


def parse_matched(text: str):
    """The matched arm's spec (an `ArmSpec`), refused in one line if it cannot be matched."""
    try:
        arm = parse_arm_text(text)  # engine.spec's parse_arm, through the registry (spec imports the mechanisms)
    except ValueError as e:  # its SpecError, as the settings model's one-line error
        raise ValueError(str(e)) from None
    if arm.mechanism is None:
        raise ValueError("match names the observer, which adds no residual to match")
    if arm.mechanism == Noise.name:
        raise ValueError("match names another noise arm; name the mechanism whose residual to match")
    if arm.linkage == 0:
        raise ValueError("match has linkage 0, which adds no residual to match")
    if arm.label is not None or arm.sampling.model_dump(exclude_defaults=True):
        raise ValueError("match takes the mechanism's settings only (sampling keys and label belong to this arm)")
    return arm


class NoiseSettings(MechanismSettings):
    gain: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        description="scale of the noise relative to the matched arm's residual (1 = the same norm)",
    )
    match: str = Field(
        "continuity:linkage=1",
        min_length=1,
        max_length=2000,
        description="the arm spec whose residual norm the noise copies, per token and layer "
        "(write it in double quotes in a spec; name a weights file as weights=@name)",
    )
    noise_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the random directions")

    @field_validator("match")
    @classmethod
    def _canonical_match(cls, value: str) -> str:
        return parse_matched(value).to_string(include_sampling=False)

    @field_validator("layers")
    @classmethod
    def _no_layers(cls, value):
        if value is not None:
            raise ValueError("the noise arm hooks the matched arm's layers; set layers inside match")
        return value

    def caveat(self) -> str | None:
        if self.linkage > 0 and self.gain > 0:
            return f"control: random residual with the norm of [{self.match}], carrying nothing; not a memory"
        return None

    def matched(self):
        return parse_matched(self.match)

    def resolved_layers(self, n_layers: int) -> list[int]:
        return self.matched().settings.resolved_layers(n_layers)

    @property
    def referenced_weights(self) -> str | None:
        """The matched arm's weights file (recorded with the arm, so replay checks it too)."""
        return getattr(self.matched().settings, "weights", None)


_TABLES: dict[tuple, torch.Tensor] = {}


def unit_noise(seed: int, layer: int, positions: torch.Tensor, hidden: int) -> torch.Tensor:
    """ε_t / ||ε_t|| [T, hidden] (float32, CPU) for the given absolute positions: a fixed function of
    (seed, layer, position), drawn a block of positions at a time and kept."""
    out = torch.empty(len(positions), hidden)
    pos = positions.cpu().long()
    for block in torch.unique(pos // BLOCK).tolist():
        key = (seed, layer, block, hidden)
        table = _TABLES.get(key)
        if table is None:
            g = torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_033 + block)
            table = torch.randn(BLOCK, hidden, generator=g)
            table = table / table.norm(dim=-1, keepdim=True)
            if len(_TABLES) > 4096:  # a long-running lab: forget the oldest blocks
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = table
        sel = (pos // BLOCK) == block
        out[sel] = table[pos[sel] % BLOCK]
    return out


class Noise(Mechanism):
    name = "noise"
    Settings = NoiseSettings

    def __init__(self, settings: NoiseSettings, model: torch.nn.Module, weights=None):
        super().__init__(settings, model, None)
        spec = settings.matched()
        cls = MECHANISMS[spec.mechanism]
        inner_weights, _ = shared_weights(cls, spec.settings, model)
        self.inner = cls(spec.settings, model, inner_weights)
        self.layers = self.inner.layers
        self.needs_grad = self.inner.needs_grad
        self.device = next(model.parameters()).device

    @property
    def hook_layers(self) -> list[int]:
        return self.inner.hook_layers

    @property
    def reprefill_each_turn(self) -> bool:
        return bool(getattr(self.inner, "reprefill_each_turn", False))

    def plan(self, row):
        return self.inner.plan(row)

    def forward(self, call: LayerCall):
        delta = self.inner.forward(call)
        if delta is None:
            return None
        self.call_counts[call.layer] += 1
        norm = (self.inner.scale * delta.float()).norm(dim=-1, keepdim=True)  # [T, 1]
        eps = unit_noise(self.settings.noise_seed, call.layer, call.row.positions, delta.shape[-1]).to(delta.device)
        out = (eps * norm).to(delta.dtype)
        if call.row.record:
            n = norm.squeeze(-1).detach().cpu().tolist()
            for t, p in enumerate(call.row.positions.tolist()):
                self.traces.append(
                    ReadTrace(
                        layer=call.layer,
                        position=p,
                        slot_keys=[],
                        weights=torch.zeros(0).numpy(),
                        scalars={"noise_norm": n[t]},
                    )
                )
        return out

    # -- the matched mechanism's conversation state is this arm's -------------------------------
    def begin_turn(self, turn: int) -> None:
        self.inner.begin_turn(turn)
        self.inner.traces = []  # the matched read is not what this arm adds: its traces are not kept

    def reset(self) -> None:
        self.inner.reset()

    def snapshot(self) -> dict:
        return self.inner.snapshot()

    def restore(self, state: dict) -> None:
        self.inner.restore(state)

    def memory_size(self) -> int:
        return self.inner.memory_size()

    def describe(self) -> str:
        return (
            f"noise with the norm of [{self.settings.match}] on layers {self.layers} "
            f"(gain {self.settings.gain}, linkage {self.settings.linkage})"
        )

    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        return [
            ConformanceCase('noise:linkage=1,match="continuity:linkage=1,gain=1,source=all"'),
            ConformanceCase('noise:linkage=1,match="neural_memory:linkage=1,gain=1"'),
            ConformanceCase('noise:linkage=1,match="memory_bank:linkage=1,slots=16"'),
            ConformanceCase('noise:linkage=1,match="partial_attention:linkage=1,gain=1"'),
            ConformanceCase('noise:linkage=1,gain=2,noise_seed=3,match="continuity:linkage=1,gain=1,scope=turn"'),
        ]
