"""Neural long-term memory learned at test time (seed 002, Titans), on the frozen model.

Per target layer and KV head a memory network M maps keys to values. It is *trained while the
dialogue is read*: every token t writes its own association (k_t -> v_t), with keys and values
from the layer's own W_k / W_v (keys ℓ2-normalised, no RoPE: the memory is content-addressed):

    loss       ℓ_t = ||M_{t-1}(k_t) − v_t||²          (the token's surprise)
    momentum   S_t = η S_{t-1} − θ_t ∇ℓ_t
    forgetting M_t = (1 − α) M_{t-1} + S_t

with θ_t = θ (step=constant) or θ·min(1, ℓ_t / ||v_t||²) (step=surprise: a token the memory
already predicts writes weakly). Read before write: token t reads y_t = M_{t-1}(q_t) with its
queries from W_q (ℓ2-normalised, one read per query head, GQA-grouped), so it only ever sees what
earlier tokens wrote. The read goes out through W_o:

* wiring=gate (default, memory as a gated branch): per query head the read is scaled by how strong
  it is relative to the values the memory holds, tanh(||y|| / mean ||v||), so an empty or
  unfamiliar memory adds (almost) nothing;
* wiring=layer (memory as an extra layer): W_o·y added as it is.

The linear memory (M a d×d matrix) has a closed-form gradient ∇ℓ = −2 e kᵀ, e = v − M k. Its
prefill runs in chunks in parallel: within a chunk the errors solve a unit lower-triangular system
(step=constant; a forward substitution for step=surprise, whose θ depends on the error), which is
exactly the token-by-token recurrence. Unrolled from an empty memory, its read is an attention
over earlier tokens (seed-systems.md, section 002):

    y_t = Σ_{i<t} w_{t,i} e_i,  w_{t,i} = 2·c_{t−1−i}·θ_i·(k_iᵀ q_t),  c_n = Σ_{r=0..n} a^{n−r} η^r, a = 1 − α

which the read traces report (slot_keys = the earlier tokens' positions), so the memory-read view
shows which past tokens the memory recalls. The MLP memory (W2·silu(W1·k) per KV head) takes real
autograd steps (`needs_grad`); its recurrence is inherently sequential, so its prefill batches the
projections and reads and steps token by token.

Persistent memory (Titans' learned, data-independent tokens, `persistent=P`): P vectors per layer
in the layer's input space (where x̂ lives). They go through the layer's own W_k / W_v like any
token and are written into the memory before the arm's first token (and again after every reset,
e.g. each turn with scope=turn), so every token reads them as if they were prepended; the implicit
attention lists them as slots "persistent 0".."persistent P-1". They come from a weights file
trained by `python -m engine train` (the write is differentiable: the linear memory's chunked
closed form directly, the MLP's steps through second-order autograd), or, training-free, from
`persistent_text` (the x̂ of that text's last P tokens at each layer), else seeded random vectors
shaped like the layer's normed inputs.

State belongs to the arm's conversation (scope=dialogue) or to one turn (scope=turn);
snapshot/restore copy it.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .base import ConformanceCase, LayerCall, Mechanism, MechanismSettings, ReadTrace, copy_state, file_field
from .projections import LayerProjections


class NeuralMemorySettings(MechanismSettings):
    # the lab warns below this gain: on the embedded model, two greedy turns of 24 tokens at the defaults (gain
    # 0.3) matched the observer 48/48 tokens; gain 1: 46/48; gain 3: 10/48
    weak_below_gain: ClassVar[float] = 1.0
    memory: Literal["linear", "mlp"] = Field(
        "linear", description="memory network per KV head: a linear d×d map (closed form) or a 2-layer MLP (autograd)"
    )
    hidden: int = Field(
        64,
        ge=4,
        le=1024,
        json_schema_extra={"only_when": ["memory", "mlp"]},
        description="MLP memory: hidden width per KV head",
    )
    lr: float = Field(0.1, gt=0.0, le=10.0, description="θ: step size of each test-time write")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="η: momentum of the surprise (past surprise carried on)")
    forget: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        json_schema_extra={"useful": [0.0, 0.05]},
        description="α: forgetting per token, M ← (1−α)·M + S",
    )
    step: Literal["constant", "surprise"] = Field(
        "constant", description="θ constant, or scaled by the token's own surprise min(1, loss/||v||²)"
    )
    wiring: Literal["gate", "layer"] = Field(
        "gate", description="memory as gate: read scaled by its strength per head; as layer: read added as is"
    )
    scope: Literal["dialogue", "turn"] = Field(
        "dialogue", description="memory persists across turns or resets each turn"
    )
    chunk: int = Field(
        64,
        ge=1,
        le=4096,
        json_schema_extra={"advanced": True},
        description="prefill chunk length of the parallel form (linear memory)",
    )
    init_seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        json_schema_extra={"advanced": True},
        description="seed of the MLP memory's first layer and of random persistent tokens",
    )
    persistent: int = Field(
        0,
        ge=0,
        le=256,
        description="persistent-memory tokens per layer (Titans): P data-independent vectors "
        "written into the memory before the arm's first token; 0 = off",
    )
    persistent_text: str | None = Field(
        None,
        max_length=4000,
        description="training-free persistent tokens: each layer's x̂ of this text's last P tokens (write it in "
        "double quotes in a spec); a weights file's trained tokens take precedence",
    )
    outer: bool = Field(
        False,
        description="Titans' outer loop: learned key/value/query projections and data-dependent θ_t, η_t, α_t "
        "(linear memory; trained by `python -m engine train`; a fresh one equals outer=false)",
    )
    weights: str | None = file_field(
        "trained parameters written by `python -m engine train` (persistent tokens, "
        "the outer loop); default: persistent_text, else seeded random vectors"
    )

    @model_validator(mode="after")
    def _persistent_source(self):
        if self.persistent_text is not None and not self.persistent_text.strip():
            raise ValueError("persistent_text is empty")
        if self.persistent_text is not None and self.persistent == 0:
            raise ValueError("persistent_text gives persistent tokens, but persistent=0: set persistent=P (P >= 1)")
        if self.outer and self.memory != "linear":
            raise ValueError("outer=true is built for the linear memory only: set memory=linear")
        return self

    def caveat(self) -> str | None:
        if self.persistent and self.weights is None and self.persistent_text is None and self.linkage > 0:
            return (
                f"untrained: the {self.persistent} persistent tokens per layer are seeded random vectors "
                "(no weights file, no persistent_text), not learned memory"
            )
        if self.outer and self.weights is None and self.linkage > 0:
            return "untrained outer loop: fresh projections and gates, the same memory as outer=false"
        return None


def _coefficients(a: float, eta: float, n: int) -> torch.Tensor:
    """c_0..c_n with c_k = Σ_{r=0..k} a^{k−r} η^r (float64, stable also for a ≈ η)."""
    c = torch.empty(n + 1, dtype=torch.float64)
    acc = 0.0
    for k in range(n + 1):
        acc = a * acc + eta**k
        c[k] = acc
    return c


_C_CACHE: dict[tuple[float, float], torch.Tensor] = {}


def coefficients(a: float, eta: float, n: int) -> torch.Tensor:
    """c_0..c_n (cached per (a, η), grown on demand)."""
    key = (a, eta)
    have = _C_CACHE.get(key)
    if have is None or have.shape[0] <= n:
        have = _coefficients(a, eta, max(n, 2 * (0 if have is None else have.shape[0]), 255))
        _C_CACHE[key] = have
    return have[: n + 1]


def _theta(settings: NeuralMemorySettings, loss: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if settings.step == "constant":
        return torch.full_like(loss, settings.lr)
    ratio = loss / v.pow(2).sum(-1).clamp_min(1e-12)
    return settings.lr * ratio.clamp(max=1.0)


# -- the linear memory: token by token, and the equal chunked form ---------------------------------
def linear_sequential(settings, M, S, k, v, q):
    """Reference recurrence. M, S [h, d, d]; k, v [h, T, d]; q [h, g, T, d].

    Returns (M, S, y [h, g, T, d], e [h, T, d], theta [h, T], mem_norm [h, T]).
    """
    a, eta = 1.0 - settings.forget, settings.momentum
    ys, es, ths, norms = [], [], [], []
    for t in range(k.shape[1]):
        ys.append(torch.einsum("hde,hge->hgd", M, q[:, :, t]))
        e = v[:, t] - torch.einsum("hde,he->hd", M, k[:, t])
        th = _theta(settings, e.pow(2).sum(-1), v[:, t])
        S = eta * S + 2 * th[:, None, None] * torch.einsum("hd,he->hde", e, k[:, t])
        M = a * M + S
        es.append(e), ths.append(th), norms.append(M.flatten(1).norm(dim=1))
    return M, S, torch.stack(ys, 2), torch.stack(es, 1), torch.stack(ths, 1), torch.stack(norms, 1)


def linear_chunk(settings, M0, S0, k, v, q, want_norms: bool = False):
    """The same recurrence for one chunk, in parallel. Shapes as `linear_sequential`."""
    a, eta = 1.0 - settings.forget, settings.momentum
    h, C, d = k.shape
    dt, dev = k.dtype, k.device
    c = coefficients(a, eta, C)  # float64, on the CPU
    t_idx = torch.arange(C)
    pa = torch.tensor([a], dtype=torch.float64) ** torch.arange(C + 1)
    b = c - pa  # b_j = c_j − a^j: how S0 reaches M after j steps
    diff = t_idx[:, None] - 1 - t_idx[None, :]  # t − 1 − m
    lower = diff >= 0
    cmat = torch.where(lower, c[diff.clamp_min(0)], torch.zeros((), dtype=torch.float64)).to(dev, dt)  # [C, C]
    pa, b = pa.to(dev), b.to(dev)
    # what the carried state predicts for each token's key (before this chunk's writes)
    M0k, S0k = torch.einsum("hde,hte->htd", M0, k), torch.einsum("hde,hte->htd", S0, k)
    R = v - pa[:C].to(dt)[None, :, None] * M0k - b[:C].to(dt)[None, :, None] * S0k
    G = 2 * cmat[None] * torch.einsum("htd,hmd->htm", k, k)  # [h, C, C], strictly lower
    if settings.step == "constant":
        theta = torch.full((h, C), settings.lr, dtype=dt, device=dev)
        system = torch.eye(C, dtype=dt, device=dev)[None] + G * settings.lr
        E = torch.linalg.solve_triangular(system, R, upper=False, unitriangular=True)
    else:  # θ depends on each error: forward substitution, vectorised over heads (no in-place
        # writes, so that it stays differentiable for training persistent tokens)
        es, ths = [], []
        for t in range(C):
            e = R[:, t]
            if t:
                e = e - torch.einsum("hm,hmd->hd", G[:, t, :t] * torch.stack(ths, 1), torch.stack(es, 1))
            es.append(e)
            ths.append(_theta(settings, e.pow(2).sum(-1), v[:, t]))
        E, theta = torch.stack(es, 1), torch.stack(ths, 1)
    # reads: the carried state, plus the implicit attention over this chunk's earlier tokens
    W = 2 * cmat[None, None] * theta[:, None, None, :] * torch.einsum("hmd,hgtd->hgtm", k, q)  # [h, g, C, C]
    y = (
        pa[:C].to(dt)[None, None, :, None] * torch.einsum("hde,hgte->hgtd", M0, q)
        + b[:C].to(dt)[None, None, :, None] * torch.einsum("hde,hgte->hgtd", S0, q)
        + torch.einsum("hgtm,hmd->hgtd", W, E)
    )
    U = (2 * theta)[..., None] * E  # u_m = U_m k_mᵀ
    cend = c[(C - 1 - t_idx)].to(dev, dt)  # c_{C−1−m}
    eend = (torch.tensor([eta], dtype=torch.float64) ** (C - 1 - t_idx)).to(dev, dt)
    M = float(pa[C]) * M0 + float(b[C]) * S0 + torch.einsum("m,hmd,hme->hde", cend, U, k)
    S = eta**C * S0 + torch.einsum("m,hmd,hme->hde", eend, U, k)
    norms = None
    if want_norms:  # ||M|| after each token's write: M^{(t+1)}
        diff1 = t_idx[:, None] - t_idx[None, :]
        c1 = torch.where(diff1 >= 0, c[diff1.clamp_min(0)], torch.zeros((), dtype=torch.float64)).to(dev, dt)
        Ms = (
            pa[1 : C + 1].to(dt)[:, None, None, None] * M0[None]
            + b[1 : C + 1].to(dt)[:, None, None, None] * S0[None]
            + torch.einsum("tm,hmd,hme->thde", c1, U, k)
        )
        norms = Ms.flatten(2).norm(dim=2).T  # [h, C]
    return M, S, y, E, theta, norms


def implicit_attention(settings, q, hist_k, hist_theta, hist_step, step_now):
    """w [h, g, T, N]: the linear memory's read of queries q [h, g, T, d] (at write steps step_now [T],
    i.e. each reads the state after `step_now` writes) as weights over the history's errors."""
    a, eta = 1.0 - settings.forget, settings.momentum
    dist = (step_now[:, None] - 1 - hist_step[None, :]).cpu()  # [T, N]
    c = coefficients(a, eta, int(max(0, dist.max().item() if dist.numel() else 0)))
    cm = torch.where(dist >= 0, c[dist.clamp_min(0)], torch.zeros((), dtype=torch.float64)).to(q.device, q.dtype)
    return 2 * cm[None, None] * hist_theta[:, None, None, :] * torch.einsum("hnd,hgtd->hgtn", hist_k, q)


# -- the MLP memory: real autograd steps ---------------------------------------------------------
def _mlp(params, x):
    """x [h, ..., d] through per-head W2·silu(W1·x): W1 [h, H, d], W2 [h, d, H]."""
    W1, W2 = params
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.einsum("hdk,hnk->hnd", W2, F.silu(torch.einsum("hkd,hnd->hnk", W1, flat)))
    return out.reshape(x.shape)


def mlp_steps(settings, params, moms, k, v, q, differentiable: bool = False):
    """Token-by-token test-time training. params/moms: [W1, W2]; k, v [h, T, d]; q [h, g, T, d].

    `differentiable`: keep the whole recurrence on the autograd graph (second-order: each step's
    gradient is itself differentiated), for training what feeds it (persistent tokens).
    Returns (params, moms, y, loss [h, T], theta [h, T], grad_norm [h, T], mem_norm [h, T]).
    """
    a, eta = 1.0 - settings.forget, settings.momentum
    ys, losses, ths, gns, norms = [], [], [], [], []
    for t in range(k.shape[1]):
        ys.append(_mlp(params, q[:, :, t]))
        with torch.enable_grad():
            if differentiable:
                live = [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
            else:
                live = [p.detach().requires_grad_(True) for p in params]
            per_head = (_mlp(live, k[:, t]) - v[:, t]).pow(2).sum(-1)  # [h]
            grads = torch.autograd.grad(per_head.sum(), live, create_graph=differentiable)
        params = live if differentiable else params
        loss = per_head if differentiable else per_head.detach()
        th = _theta(settings, loss, v[:, t])
        moms = [eta * m - th.view(-1, *([1] * (g.dim() - 1))) * g for m, g in zip(moms, grads)]
        params = [a * p + m for p, m in zip(params, moms)]
        gn = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))
        losses.append(loss), ths.append(th), gns.append(gn)
        norms.append(torch.sqrt(sum(p.flatten(1).pow(2).sum(1) for p in params)))
    st = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return params, moms, torch.stack(ys, 2), st(losses), st(ths), st(gns), st(norms)


class _LayerState:
    """One layer's memory: the network (M or the MLP's weights), its momentum, and what the read
    traces need (the linear memory's history of keys, errors and step sizes)."""

    def __init__(self):
        self.params: list[torch.Tensor] | None = None  # linear: [M]; mlp: [W1, W2]
        self.moms: list[torch.Tensor] | None = None
        self.steps = 0  # tokens written
        self.v_norm_sum: torch.Tensor | None = None  # [h] Σ ||v|| (the gate's scale)
        self.hist_k: torch.Tensor | None = None  # [h, N, d]
        self.hist_e: torch.Tensor | None = None
        self.hist_theta: torch.Tensor | None = None  # [h, N]
        self.hist_pos: torch.Tensor | None = None  # [N]
        self.hist_step: torch.Tensor | None = None  # [N]
        self.n_persistent = 0  # persistent tokens written first (write steps 0..P-1)
        self.pers_k: torch.Tensor | None = None  # [h, P, d] their keys, errors and step sizes
        self.pers_e: torch.Tensor | None = None
        self.pers_theta: torch.Tensor | None = None  # [h, P]

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "_LayerState":
        s = cls()
        for k, v in d.items():
            setattr(s, k, v)
        return s


OUTER_PARAMS = ("dk", "dv", "dq", "theta_w", "theta_b", "eta_w", "eta_b", "alpha_w", "alpha_b")


def outer_shapes(h: int, d: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Per layer: residual d×d maps on the layer's own keys / values / queries (per KV head), and
    per KV head a linear gate on x̂ for each of θ_t, η_t, α_t."""
    return {
        "dk": (h, d, d),
        "dv": (h, d, d),
        "dq": (h, d, d),
        "theta_w": (h, hidden),
        "theta_b": (h,),
        "eta_w": (h, hidden),
        "eta_b": (h,),
        "alpha_w": (h, hidden),
        "alpha_b": (h,),
    }


class PersistentTokens(torch.nn.Module):
    """The neural memory's trained parameters: per layer the persistent-memory tokens ([P, hidden], in
    the layer's input space) and / or the outer loop's projections and gates (`outer.<layer>.<name>`)."""

    def __init__(
        self, vectors: dict[int, torch.Tensor] | None = None, outer: dict[int, dict[str, torch.Tensor]] | None = None
    ):
        super().__init__()
        self.tokens = torch.nn.ParameterDict({str(l): torch.nn.Parameter(v) for l, v in (vectors or {}).items()})
        self.outer = torch.nn.ModuleDict(
            {
                str(l): torch.nn.ParameterDict({n: torch.nn.Parameter(t) for n, t in ps.items()})
                for l, ps in (outer or {}).items()
            }
        )

    def layer(self, layer: int) -> torch.Tensor:
        return self.tokens[str(layer)]

    def outer_of(self, layer: int):
        return self.outer[str(layer)]


def outer_gates(ps, x: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ_t, η_t, α_t [h, T] from x̂ [T, hidden]: each the setting times 2σ(w·x̂ + b), so zero weights
    give the setting itself exactly (η capped below 1, α at 1)."""
    x = x.float()

    def gate(w, b):
        return 2 * torch.sigmoid(x @ w.T + b).T  # [h, T]

    theta = settings.lr * gate(ps["theta_w"], ps["theta_b"])
    eta = (settings.momentum * gate(ps["eta_w"], ps["eta_b"])).clamp(max=0.999)
    alpha = (settings.forget * gate(ps["alpha_w"], ps["alpha_b"])).clamp(max=1.0)
    return theta, eta, alpha


def linear_scan(settings, M, S, k, v, q, theta, eta, alpha):
    """The linear memory's recurrence with per-token θ_t, η_t, α_t [h, T] (the outer loop's gates),
    token by token and differentiable. Shapes as `linear_sequential`; step=surprise scales θ_t by
    min(1, ℓ_t / ||v_t||²) as there. Returns (M, S, y, E, theta_used, mem_norm)."""
    ys, es, ths, norms = [], [], [], []
    for t in range(k.shape[1]):
        ys.append(torch.einsum("hde,hge->hgd", M, q[:, :, t]))
        e = v[:, t] - torch.einsum("hde,he->hd", M, k[:, t])
        th = theta[:, t]
        if settings.step == "surprise":
            th = th * (e.pow(2).sum(-1) / v[:, t].pow(2).sum(-1).clamp_min(1e-12)).clamp(max=1.0)
        S = eta[:, t, None, None] * S + 2 * th[:, None, None] * torch.einsum("hd,he->hde", e, k[:, t])
        M = (1 - alpha[:, t, None, None]) * M + S
        es.append(e), ths.append(th), norms.append(M.flatten(1).norm(dim=1))
    return M, S, torch.stack(ys, 2), torch.stack(es, 1), torch.stack(ths, 1), torch.stack(norms, 1)


def _text_inputs(model: torch.nn.Module, text: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """x̂ (self-attention's normed input, fp32) of `text` at each layer, from one plain base-model pass."""
    from ..hooks import layer_inputs
    from ..weights import WeightsError

    tok = getattr(model, "_lab_tokenizer", None)
    if tok is None:
        raise WeightsError("persistent_text needs the model's tokenizer (load the model with engine.load_model)")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return {l: x.float() for l, x in layer_inputs(model, ids, layers).items()}


class NeuralMemory(Mechanism):
    name = "neural_memory"
    Settings = NeuralMemorySettings

    def __init__(self, settings: NeuralMemorySettings, model: torch.nn.Module, weights=None):
        super().__init__(settings, model, weights)
        self.device = next(model.parameters()).device
        if (settings.persistent or settings.outer) and weights is None:  # built outside a Dialogue: its own
            weights = self.build_weights(settings, model, None)
        self.weights = weights
        self.needs_grad = settings.memory == "mlp"  # autograd steps at test time (protocol v2)
        self.state: dict[int, _LayerState] = {}

    # -- trained parameters: the persistent tokens ----------------------------------------------
    @classmethod
    def build_weights(cls, settings, model, tensors):
        from ..hooks import decoder_layers
        from ..weights import WeightsError

        P, hidden = settings.persistent, model.config.hidden_size
        layers = settings.resolved_layers(model.config.num_hidden_layers)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        shapes = outer_shapes(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim, hidden)
        if tensors is not None:
            want = {f"tokens.{l}" for l in layers} if P else set()
            if settings.outer:
                want |= {f"outer.{l}.{n}" for l in layers for n in OUTER_PARAMS}
            if set(tensors) != want:
                extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
                raise ValueError(
                    f"the file's tensors {sorted(tensors)[:4]}... do not fit persistent={P}, "
                    f"outer={settings.outer} on layers {layers}"
                    + (f" (no place for '{extra[0]}')" if extra else f" (missing '{missing[0]}')")
                )
            for name, t in tensors.items():
                expect = (P, hidden) if name.startswith("tokens.") else shapes[name.split(".")[-1]]
                if tuple(t.shape) != expect:
                    raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {expect}")
        if not P and not settings.outer:
            return None
        device = next(model.parameters()).device
        outer = None
        if settings.outer:  # zeros: the fresh outer loop is today's memory (θ, η, α constant; own projections)
            outer = {
                l: {
                    n: (
                        tensors[f"outer.{l}.{n}"].float().to(device).clone()
                        if tensors is not None
                        else torch.zeros(shape, device=device)
                    )
                    for n, shape in shapes.items()
                }
                for l in layers
            }
        if not P:
            return PersistentTokens(None, outer)
        if tensors is not None:
            vectors = {l: tensors[f"tokens.{l}"].float().to(device).clone() for l in layers}
        elif settings.persistent_text is not None:
            seen = _text_inputs(model, settings.persistent_text, layers)
            n = seen[layers[0]].shape[0]
            if n < P:
                raise WeightsError(
                    f"persistent_text has {n} tokens, fewer than persistent={P}: give a longer text or a smaller P"
                )
            vectors = {l: seen[l][-P:].to(device) for l in layers}
        else:  # seeded random vectors shaped like the layer's normed inputs (RMSNorm weight x unit noise)
            dec = decoder_layers(model)
            vectors = {}
            for l in layers:
                g = torch.Generator().manual_seed(settings.init_seed * 1009 + l)
                norm = getattr(dec[l], "input_layernorm", None)
                w = norm.weight.detach().float().cpu() if norm is not None and hasattr(norm, "weight") else 1.0
                vectors[l] = (torch.randn(P, hidden, generator=g) * w).to(device)
        return PersistentTokens(vectors, outer)

    # -- lifecycle ------------------------------------------------------------------------------
    def begin_turn(self, turn: int) -> None:
        if self.settings.scope == "turn":
            self.reset()

    def reset(self) -> None:
        self.state.clear()

    def snapshot(self) -> dict:
        return copy_state({str(layer): st.to_dict() for layer, st in self.state.items()})

    def restore(self, state: dict) -> None:
        self.state = {int(layer): _LayerState.from_dict(d) for layer, d in copy_state(state).items()}

    def memory_size(self) -> int:
        """Tokens written into the memory (per layer; the same at every layer)."""
        return max((st.steps for st in self.state.values()), default=0)

    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        return [
            ConformanceCase("neural_memory:linkage=1,gain=1"),
            ConformanceCase("neural_memory:linkage=1,gain=1,wiring=layer,step=surprise,chunk=4"),
            ConformanceCase("neural_memory:linkage=1,gain=1,scope=turn,momentum=0,forget=0.1"),
            ConformanceCase("neural_memory:linkage=1,gain=1,memory=mlp,hidden=16,wiring=layer"),
            ConformanceCase("neural_memory:linkage=1,gain=1,persistent=4,scope=turn,chunk=3,step=surprise"),
            ConformanceCase("neural_memory:linkage=1,gain=1,outer=true,wiring=layer"),
            ConformanceCase("neural_memory:linkage=1,gain=1,outer=true,persistent=2,step=surprise,scope=turn"),
        ]

    # -- the layer call -----------------------------------------------------------------------
    def _fresh(self, layer: int, proj: LayerProjections, h: int, g: int, d: int, train: bool) -> _LayerState:
        st = _LayerState()
        if self.settings.memory == "linear":
            st.params = [torch.zeros(h, d, d, dtype=torch.float32, device=self.device)]
        else:
            gen = torch.Generator().manual_seed(self.settings.init_seed)
            W1 = torch.randn(h, self.settings.hidden, d, generator=gen) / math.sqrt(d)
            st.params = [W1.to(self.device), torch.zeros(h, d, self.settings.hidden, device=self.device)]
        st.moms = [torch.zeros_like(p) for p in st.params]
        st.v_norm_sum = torch.zeros(h, device=self.device)
        P = self.settings.persistent
        if P:  # the persistent tokens are written first, as if prepended to the arm's tokens
            x = self.weights.layer(layer)
            k, v, _ = self._kvq(layer, proj, x)
            q = torch.zeros(h, g, P, d, dtype=k.dtype, device=k.device)  # they read nothing
            if self.settings.outer:
                self._outer(st, layer, x, k, v, q)
            elif self.settings.memory == "linear":
                _, _, theta, _, _, E = self._linear(st, k, v, q, False)
                st.pers_k, st.pers_e, st.pers_theta = k, E, theta
            else:
                st.params, st.moms, *_ = mlp_steps(self.settings, st.params, st.moms, k, v, q, differentiable=train)
            st.v_norm_sum = v.norm(dim=-1).sum(1)
            st.steps = st.n_persistent = P
        return st

    def forward(self, call: LayerCall):
        layer, row = call.layer, call.row
        proj = self.projections(layer, call.attn)
        train = torch.is_grad_enabled()  # the trainer: keep the graph (a dialogue's rows run without grad)
        x = call.x_hat if train else call.x_hat.detach()
        k, v, q = self._kvq(layer, proj, x)  # [h, T, d], [h, T, d], [h, g, T, d]
        h, T, d = k.shape
        st = self.state.get(layer)
        if st is None:
            st = self.state[layer] = self._fresh(layer, proj, h, q.shape[1], d, train)
        self.call_counts[layer] += 1
        steps0 = st.steps
        vsum0 = st.v_norm_sum.clone()
        if self.settings.outer:
            y, loss, theta, gnorm, mnorm, E = self._outer(st, layer, x, k, v, q)
        elif self.settings.memory == "linear":
            y, loss, theta, gnorm, mnorm, E = self._linear(st, k, v, q, row.record)
        else:
            st.params, st.moms, y, loss, theta, gnorm, mnorm = mlp_steps(
                self.settings, st.params, st.moms, k, v, q, differentiable=train
            )
            E = None
        # gate scale: mean ||v|| of the tokens written before each reader
        vn = v.norm(dim=-1)  # [h, T]
        before = vsum0[:, None] + torch.cumsum(vn, 1) - vn
        count = (steps0 + torch.arange(T, device=vn.device)).clamp_min(1)
        scale = before / count
        st.v_norm_sum = vsum0 + vn.sum(1)
        st.steps = steps0 + T
        if self.settings.wiring == "gate":
            gate = torch.tanh(y.norm(dim=-1) / scale[:, None].clamp_min(1e-6))  # [h, g, T]
            heads = gate[..., None] * y
        else:
            gate = None
            heads = y
        delta = proj.output(heads.to(self.dtype))
        if row.record:
            self._record(layer, st, row, q, k, E, theta, loss, gnorm, mnorm, gate, steps0)
        elif self.settings.memory == "linear" and not self.settings.outer and st.hist_k is not None:
            self._append_history(st, k, E, theta, row, steps0)
        return delta

    def _kvq(self, layer: int, proj: LayerProjections, x: torch.Tensor):
        """Keys (ℓ2-normalised), values and queries (ℓ2-normalised) of x̂ [T, hidden]: the layer's own
        projections, plus with the outer loop its learned residual maps (zero: exactly the same)."""
        k, v, q = proj.keys(x).float(), proj.values(x).float(), proj.queries(x).float()
        if self.settings.outer:
            ps = self.weights.outer_of(layer)
            k = k + torch.einsum("htd,hde->hte", k, ps["dk"])
            v = v + torch.einsum("htd,hde->hte", v, ps["dv"])
            q = q + torch.einsum("hgtd,hde->hgte", q, ps["dq"])
        return F.normalize(k, dim=-1), v, F.normalize(q, dim=-1)

    def _outer(self, st: _LayerState, layer: int, x, k, v, q):
        """The outer loop's write and read: per-token θ_t, η_t, α_t from x̂, the recurrence token by token
        (exact in cached and uncached forwards alike; no chunked form for time-varying gates)."""
        theta, eta, alpha = outer_gates(self.weights.outer_of(layer), x, self.settings)
        M, S, y, E, th, mnorm = linear_scan(self.settings, st.params[0], st.moms[0], k, v, q, theta, eta, alpha)
        st.params, st.moms = [M], [S]
        return y, E.pow(2).sum(-1), th, 2 * E.norm(dim=-1), mnorm, E

    def _linear(self, st: _LayerState, k, v, q, record: bool):
        M, S = st.params[0], st.moms[0]
        ys, Es, ths, norms = [], [], [], []
        C = self.settings.chunk
        for s in range(0, k.shape[1], C):
            sl = slice(s, s + C)
            M, S, y, E, th, nm = linear_chunk(self.settings, M, S, k[:, sl], v[:, sl], q[:, :, sl], want_norms=record)
            ys.append(y), Es.append(E), ths.append(th), norms.append(nm)
        st.params, st.moms = [M], [S]
        E, theta = torch.cat(Es, 1), torch.cat(ths, 1)
        loss = E.pow(2).sum(-1)
        gnorm = 2 * E.norm(dim=-1)  # ||∇ℓ|| = 2·||e||·||k||, ||k|| = 1
        mnorm = torch.cat(norms, 1) if record else None
        return torch.cat(ys, 2), loss, theta, gnorm, mnorm, E

    def _append_history(self, st: _LayerState, k, E, theta, row, steps0):
        T = k.shape[1]
        new_step = torch.arange(steps0, steps0 + T, device=k.device)
        if st.hist_k is None:
            st.hist_k, st.hist_e, st.hist_theta = k, E, theta
            st.hist_pos, st.hist_step = row.positions.clone(), new_step
        else:
            st.hist_k, st.hist_e = torch.cat([st.hist_k, k], 1), torch.cat([st.hist_e, E], 1)
            st.hist_theta = torch.cat([st.hist_theta, theta], 1)
            st.hist_pos, st.hist_step = torch.cat([st.hist_pos, row.positions]), torch.cat([st.hist_step, new_step])

    def _record(self, layer, st, row, q, k, E, theta, loss, gnorm, mnorm, gate, steps0):
        T = k.shape[1]
        per_head_w = None
        slots: list[int] = []
        if self.settings.memory == "linear" and not self.settings.outer:  # (time-varying gates: no closed form)
            # the exact implicit attention needs the history since the memory was empty
            exact = st.hist_k is not None or steps0 == st.n_persistent
            if exact:
                self._append_history(st, k, E, theta, row, steps0)
                now = torch.arange(steps0, steps0 + T, device=k.device)
                hk, hth, hstep = st.hist_k, st.hist_theta, st.hist_step
                slots = st.hist_pos.tolist()
                P = st.n_persistent
                if P:  # the persistent tokens are the first slots (write steps 0..P-1)
                    hk, hth = torch.cat([st.pers_k, hk], 1), torch.cat([st.pers_theta, hth], 1)
                    hstep = torch.cat([torch.arange(P, device=hstep.device), hstep])
                    slots = [f"persistent {j}" for j in range(P)] + slots
                w = implicit_attention(self.settings, q, hk, hth, hstep, now)  # [h,g,T,N]
                per_head_w = w.reshape(-1, T, w.shape[-1]).detach().cpu().numpy()  # [H, T, N]
        positions = row.positions.tolist()
        write = (theta * gnorm).mean(0)
        scalars = {"surprise": loss.mean(0), "write_strength": write, "memory_norm": mnorm.mean(0)}
        if gate is not None:
            scalars["gate"] = gate.mean((0, 1))
        scalars = {k_: v_.detach().float().cpu().numpy() for k_, v_ in scalars.items()}
        for t in range(T):
            if per_head_w is not None:
                n = int(steps0 + t)  # slots written before this token
                ph = per_head_w[:, t, :n]
                keys, weights = slots[:n], ph.mean(0)
            else:
                ph, keys, weights = None, [], np.zeros(0, np.float32)
            self.traces.append(
                ReadTrace(
                    layer=layer,
                    position=positions[t],
                    slot_keys=keys,
                    weights=weights,
                    per_head=None,
                    scalars={k_: float(v_[t]) for k_, v_ in scalars.items()},
                )
            )
