"""The continuity stream (seed 000), done right.

Each target layer keeps a growing memory of key/value entries written from chosen tokens of the
dialogue (by default the model's own earlier answers). A token at position t reads, through the
layer's own W_q / W_o, a softmax over the entries written strictly before t:

    delta_t = W_o · concat_h softmax(q_t^h K_mem^hᵀ · scale) V_mem^h

The read is causal (entries of the same forward pass are visible only to later tokens), so a
cached decode and an uncached forward give the same logits. With `rope: relative` keys are stored
rotated at their positions and queries rotated at theirs, as in the layer's own attention.

`variant: seed` reproduces what the published code actually did, for comparison: the memory is the
previous forward call's normed input, read without mask or RoPE (so in prefill every prompt token
sees the whole prompt, future included), after a multi-token call only its last row is read (so
cached decoding is a previous-token skip W_o W_v x̂_{t-1}), it is reset before every turn, and
every turn re-prefills the WHOLE transcript from position 0 (the published code kept no cache
across turns): the arm's earlier cache columns are masked off and its transcript is fed again,
so turn k costs a prefill of everything so far. That is the seed's regime; the causal variant
prefills only the new turn.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from .base import ROLE_CODE, ConformanceCase, LayerCall, Mechanism, MechanismSettings, ReadTrace, StepRow, copy_state
from .projections import rotate


class ContinuitySettings(MechanismSettings):
    source: Literal["assistant", "all", "user"] = Field(
        "assistant", description="which tokens are written: the model's own answers, all, or the user's"
    )
    scope: Literal["dialogue", "turn"] = Field("dialogue", description="memory persists across turns or resets")
    rope: Literal["relative", "none"] = Field("relative", description="rotate keys/queries at their positions")
    window: int | None = Field(None, ge=1, description="read only the last N entries before each token")
    share_from: int | None = Field(None, ge=0, description="write at this layer only, read at every target layer")
    variant: Literal["causal", "seed"] = Field("causal", description="'seed' reproduces the published code")

    @model_validator(mode="after")
    def _seed_is_plain(self):
        if self.variant == "seed" and (self.window or self.share_from is not None):
            raise ValueError("variant=seed reproduces the published code and takes no window or share_from")
        return self


_SOURCE_ROLES = {
    "assistant": (ROLE_CODE["assistant"],),
    "user": (ROLE_CODE["user"],),
    "all": tuple(ROLE_CODE.values()),
}


class _LayerMemory:
    """Entries written at one layer: keys/values per KV head and where each came from."""

    def __init__(self):
        self.k: torch.Tensor | None = None  # [n_kv, N, head_dim]
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # [N] token positions in the arm's sequence

    def __len__(self):
        return 0 if self.pos is None else int(self.pos.shape[0])

    def with_new(self, k, v, pos):
        """Entries including new ones, without storing them yet (the read happens first)."""
        if self.pos is None:
            return k, v, pos
        return torch.cat([self.k, k], 1), torch.cat([self.v, v], 1), torch.cat([self.pos, pos])

    def store(self, k, v, pos, window: int | None):
        if window is not None and pos.shape[0] > window:
            k, v, pos = k[:, -window:], v[:, -window:], pos[-window:]
        self.k, self.v, self.pos = k, v, pos


class Continuity(Mechanism):
    name = "continuity"
    Settings = ContinuitySettings

    def __init__(self, settings: ContinuitySettings, model: torch.nn.Module, weights=None):
        super().__init__(settings, model, weights)
        if settings.share_from is not None:
            if settings.share_from >= self.config.num_hidden_layers:
                raise ValueError(f"share_from layer {settings.share_from} does not exist")
            if settings.share_from > self.layers[0]:
                raise ValueError(
                    "share_from must be at or below the first target layer (memory is written before it is read)"
                )
        self.memory: dict[int, _LayerMemory] = {}
        self.seed_memory: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # variant=seed: previous call's (x̂, positions)

    @property
    def hook_layers(self) -> list[int]:
        extra = [] if self.settings.share_from is None else [self.settings.share_from]
        return sorted(set(self.layers) | set(extra))

    def _write_layer(self, layer: int) -> int:
        return layer if self.settings.share_from is None else self.settings.share_from

    # -- lifecycle ------------------------------------------------------------------------------
    def begin_turn(self, turn: int) -> None:
        if self.settings.scope == "turn" or self.settings.variant == "seed":
            self.reset()

    def reset(self) -> None:
        self.memory.clear()
        self.seed_memory.clear()

    def snapshot(self) -> dict:
        state = {}
        for layer, mem in self.memory.items():
            if len(mem):
                state[f"mem.{layer}.k"], state[f"mem.{layer}.v"], state[f"mem.{layer}.pos"] = mem.k, mem.v, mem.pos
        for layer, (x, pos) in self.seed_memory.items():
            state[f"seed.{layer}.x"], state[f"seed.{layer}.pos"] = x, pos
        return copy_state(state)

    def restore(self, state: dict) -> None:
        self.reset()
        for key, value in copy_state(state).items():
            kind, layer, what = key.split(".")
            layer = int(layer)
            if kind == "seed":
                x, pos = self.seed_memory.get(layer, (None, None))
                self.seed_memory[layer] = (value, pos) if what == "x" else (x, value)
            else:
                mem = self.memory.setdefault(layer, _LayerMemory())
                setattr(mem, what, value)

    def memory_size(self) -> int:
        if self.settings.variant == "seed":
            return max((int(x.shape[0]) for x, _ in self.seed_memory.values()), default=0)
        return max((len(m) for m in self.memory.values()), default=0)

    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        return [
            ConformanceCase("continuity:linkage=1,gain=1,source=all"),
            ConformanceCase("continuity:linkage=1,gain=1"),
            ConformanceCase("continuity:linkage=1,gain=1,source=all,rope=none,window=7"),
            ConformanceCase("continuity:linkage=1,gain=1,source=user,layers=1/3,share_from=1"),
            ConformanceCase("continuity:linkage=1,gain=1,scope=turn,source=all"),
            # the published behaviour: bidirectional prefill, so neither causal nor cache-exact
            ConformanceCase("continuity:linkage=1,gain=1,variant=seed", cached_exact=False, causal=False),
        ]

    def memory_positions(self, layer: int | None = None) -> list[int]:
        layer = self._write_layer(layer if layer is not None else self.layers[0])
        mem = self.memory.get(layer)
        return [] if mem is None or mem.pos is None else mem.pos.tolist()

    # -- the read -------------------------------------------------------------------------------
    def forward(self, call: LayerCall):
        layer, x_hat, position_embeddings, attn_out, row = call.layer, call.x_hat, call.rope, call.attn_out, call.row
        proj = self.projections(layer, call.attn)
        if self.settings.variant == "seed":
            return self._seed_forward(layer, proj, x_hat, attn_out, row)
        rope = self.settings.rope == "relative" and position_embeddings is not None
        cos, sin = position_embeddings if rope else (None, None)

        write_layer = self._write_layer(layer)
        mem = self.memory.setdefault(write_layer, _LayerMemory())
        if layer == write_layer:
            keep = torch.isin(row.roles, torch.tensor(_SOURCE_ROLES[self.settings.source], device=row.roles.device))
            if keep.any():
                xs = x_hat[keep]
                k = proj.keys(xs)
                if rope:
                    k = rotate(k, cos[keep], sin[keep])
                k_all, v_all, pos_all = mem.with_new(k, proj.values(xs), row.positions[keep])
            else:
                k_all, v_all, pos_all = mem.k, mem.v, mem.pos
        else:  # a read-only layer under share_from: the write layer already stored this pass
            k_all, v_all, pos_all = mem.k, mem.v, mem.pos

        delta = None
        if layer in self.layers and pos_all is not None and pos_all.numel():
            self.call_counts[layer] += 1
            q = proj.queries(x_hat)
            if rope:
                q = rotate(q, cos, sin)
            delta = self._read(layer, proj, q, k_all, v_all, pos_all, attn_out, row)

        if layer == write_layer and pos_all is not None:
            mem.store(k_all, v_all, pos_all, self.settings.window)
        return delta

    def _read(self, layer, proj, q, k, v, pos, attn_out, row: StepRow):
        # q [n_kv, g, T, d]; k, v [n_kv, N, d]; visible[t, j]: entry j was written before token t
        scores = torch.einsum("hgtd,hnd->hgtn", q, k) * proj.scaling
        visible = pos[None, :] < row.positions[:, None]
        if self.settings.window is not None:
            # keep the last `window` visible entries per token (count of visible entries at or after j)
            after = visible.flip(-1).cumsum(-1).flip(-1)
            visible = visible & (after <= self.settings.window)
        any_visible = visible.any(-1)  # [T]
        scores = scores.masked_fill(~visible, float("-inf"))
        scores = torch.where(any_visible[:, None], scores, torch.zeros_like(scores))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype) * any_visible[:, None]
        heads = torch.einsum("hgtn,hnd->hgtd", weights, v)
        delta = proj.output(heads)
        if row.record:
            self._record(layer, weights, pos, delta, attn_out, row, any_visible)
        return delta

    def _record(self, layer, weights, pos, delta, attn_out, row: StepRow, readers=None):
        per_head = weights.reshape(-1, weights.shape[2], weights.shape[3]).float()  # [H, T, N]
        slots = pos.tolist()
        positions = row.positions.tolist()
        for t in range(per_head.shape[1]):
            if readers is not None and not readers[t]:
                continue  # nothing was written before this token: no read happened
            ph = per_head[:, t].cpu().numpy()
            self.traces.append(
                ReadTrace(
                    layer=layer,
                    position=positions[t],
                    slot_keys=slots,
                    weights=ph.mean(0),
                    per_head=ph,
                    scalars={"delta_norm": float(self.scale * delta[t].norm()), "attn_norm": float(attn_out[t].norm())},
                )
            )

    @property
    def reprefill_each_turn(self) -> bool:
        """variant=seed: every turn feeds the whole transcript again from position 0 (the Dialogue
        masks the arm's earlier cache), as the published code did; see `_seed_forward`."""
        return self.settings.variant == "seed"

    def _seed_forward(self, layer, proj, x_hat, attn_out, row: StepRow):
        """Published behaviour: no mask, no RoPE, reset per turn, and

        - the first call of a turn (the whole transcript, re-prefilled from position 0) attends
          to itself, bidirectionally;
        - every later call reads only the LAST row of the previous call's x̂ (the published
          `memory[:, -1, :]`): after the prefill that is the prompt's last token, then each
          decoded token, so a decode step is the previous-token skip W_o W_v x̂_{t-1}.
        """
        memory, memory_pos = self.seed_memory.get(layer, (None, None))
        if memory is None:  # first call of a turn: the prompt attends to itself, bidirectionally
            memory, memory_pos = x_hat, row.positions
        else:
            memory, memory_pos = memory[-1:], memory_pos[-1:]
        self.call_counts[layer] += 1
        q = proj.queries(x_hat)
        k, v = proj.keys(memory), proj.values(memory)
        weights = torch.softmax(torch.einsum("hgtd,hnd->hgtn", q, k).float() * proj.scaling, -1).to(q.dtype)
        delta = proj.output(torch.einsum("hgtn,hnd->hgtd", weights, v))
        if row.record:
            self._record(layer, weights, memory_pos, delta, attn_out, row)
        self.seed_memory[layer] = (x_hat.detach(), row.positions)
        return delta
