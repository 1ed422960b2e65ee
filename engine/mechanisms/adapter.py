"""A low-rank adapter on the frozen model: the matched control for the trained mechanisms.

At each target layer the arm adds `B·A·x̂_t` to self-attention's output (x̂ the layer's normed
input, A [rank, hidden], B [hidden, rank]): a LoRA on a path from x̂ to the residual stream,
initialised as peft initialises LoRA (A random, B zero), so a fresh adapter adds exactly 0. Its
trained parameters are `layers × 2 × hidden × rank` numbers: at rank 4 on 3 layers of the embedded
model, 3 × 2 × 576 × 4 = 13,824, the same count as neural memory's 3 × 8 × 576 trained persistent
tokens, so the two can be trained on the same data by `python -m engine train` and compared. It
has no memory and no conversation state: whatever it gains is what any parameters of that size,
tuned on that data, gain.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import ConformanceCase, LayerCall, Mechanism, MechanismSettings, file_field


class AdapterSettings(MechanismSettings):
    gain: float = Field(1.0, ge=0.0, le=10.0, description="scale of the adapter's residual")
    rank: int = Field(4, ge=1, le=512, description="rank of A and B per layer")
    init: Literal["lora", "random"] = Field(
        "lora",
        json_schema_extra={"advanced": True},
        description="fresh weights: lora (B = 0: adds nothing until trained) or random (both random, for tests)",
    )
    init_seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        json_schema_extra={"advanced": True},
        description="seed of the fresh A (and B with init=random)",
    )
    weights: str | None = file_field("trained A and B written by `python -m engine train`; default: fresh")

    def caveat(self) -> str | None:
        if self.weights is None and self.linkage > 0:
            return (
                "untrained adapter: adds exactly 0 (B = 0)"
                if self.init == "lora"
                else "untrained adapter with random A and B: a perturbation, not a memory"
            )
        return None


class AdapterWeights(torch.nn.Module):
    """Per layer A [rank, hidden] and B [hidden, rank] (names `a.<layer>`, `b.<layer>`)."""

    def __init__(self, a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]):
        super().__init__()
        self.a = torch.nn.ParameterDict({str(l): torch.nn.Parameter(t) for l, t in a.items()})
        self.b = torch.nn.ParameterDict({str(l): torch.nn.Parameter(t) for l, t in b.items()})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{l}": p.detach().clone() for k in ("a", "b") for l, p in getattr(self, k).items()}


class Adapter(Mechanism):
    name = "adapter"
    Settings = AdapterSettings

    def __init__(self, settings: AdapterSettings, model: torch.nn.Module, weights=None):
        super().__init__(settings, model, weights)
        self.weights = weights if weights is not None else self.build_weights(settings, model, None)

    @classmethod
    def build_weights(cls, settings, model, tensors):
        """Fresh (peft's LoRA init: A uniform ±1/sqrt(hidden), B zero) or read from a weights file."""
        layers = settings.resolved_layers(model.config.num_hidden_layers)
        hidden, r = model.config.hidden_size, settings.rank
        if tensors is not None:
            want = {f"{k}.{l}": s for l in layers for k, s in (("a", (r, hidden)), ("b", (hidden, r)))}
            got = {k: tuple(t.shape) for k, t in tensors.items()}
            if got != want:
                raise ValueError(f"the file's tensors {sorted(got)[:4]}... do not fit rank={r}, layers={layers}")
            return AdapterWeights(
                {l: tensors[f"a.{l}"].float() for l in layers}, {l: tensors[f"b.{l}"].float() for l in layers}
            )
        g = torch.Generator().manual_seed(settings.init_seed)
        bound = hidden**-0.5
        a = {l: (torch.rand(r, hidden, generator=g) * 2 - 1) * bound for l in layers}
        b = {
            l: (torch.randn(hidden, r, generator=g) * bound if settings.init == "random" else torch.zeros(hidden, r))
            for l in layers
        }
        return AdapterWeights(a, b)

    def forward(self, call: LayerCall) -> torch.Tensor | None:
        a, b = self.weights.a[str(call.layer)], self.weights.b[str(call.layer)]
        return (call.x_hat.to(a.dtype) @ a.T @ b.T).to(call.attn_out.dtype)

    def memory_size(self) -> int:
        return 0

    def describe(self) -> str:
        return (
            f"adapter rank {self.settings.rank} on layers {self.layers} (gain {self.settings.gain}, "
            f"linkage {self.settings.linkage})"
        )

    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        return [
            ConformanceCase("adapter:linkage=1,init=random"),
            ConformanceCase("adapter:linkage=1", changes_output=False),
        ]
