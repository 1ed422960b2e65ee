"""The memory bank with chapter routing (seed 001), as a gated adapter on the frozen model.

A bank of N memory slots (vectors in the model's hidden space, like a normed input `x̂`) is read
by cross-attention at chosen layers, through that layer's own projections:

    a' = a + gain·λ·W_o·concat_h(g_h · Σ_c w_c · softmax_c(q_h·K_memᵀ/√d) · V_mem)

- `q = W_q x̂` of the reading token (its own query, **no RoPE**: memory slots have no position, so
  neither side is rotated; the read is position-free by design), `K_mem = W_k M`, `V_mem = W_v M`
  (the layer's own key/value projections, grouped-query aware, K/V computed once per layer and
  kept while the bank is frozen), `g_h` a per-head output gate (part of the bank's parameters).
- Variants: `standard` (M ∈ R^{N×d}), `factorized` (M = A·Bᵀ, A ∈ R^{N×r}, B ∈ R^{d×r}),
  `reduced` (scores computed in r dimensions: q·P and K_mem·P with a per-KV-head P ∈ R^{d_h×r},
  scale 1/√r; values stay full).
- Placement: `custom` (the `layers` key; default the seed depths), `all`, `first_k`, `last_k`,
  `every_n` (with `placement_k`). Sharing: one bank for every layer (`shared`), one per layer
  (`per_layer`), or one per run of `share_k` consecutive layers (`every_k`).
- Chapters: the N slots form C equal chapters. A router `softmax(W_r·u_t + b)` over the routed
  chapters picks the top-k for each token, from `u_t = x̂_t` (`routing: token`) or from the mean
  of the arm's tokens up to and including t (`routing: prefix_mean`; the running sum is
  conversation state, so cached decoding equals a full forward). Never pooled over later tokens:
  the seed's sequence-mean routing looked at the future. The first `shared_chapters` chapters are
  always read. Each read chapter gets its own softmax over its slots; the chapter mixture weights
  are the top-k router probabilities renormalised to sum to k/(k+S), plus 1/(k+S) per shared
  chapter (S = shared chapters), so they sum to one. C = 1 is a plain attention over all slots.
- Auxiliary losses for training (`call.aux`, per layer): `router_balance.L` = C·Σ f_i·P_i
  (f_i = fraction of the token's top-k picks that went to chapter i, P_i = mean probability),
  `router_aux.L` = mean_i (f_i − 1/C)², `router_z.L` = mean_t logsumexp(logits_t)².
- Traces: per reading token and layer, weights over slots labelled `chapter c / slot s` (or by the
  document text a distilled slot came from; with one chapter, `slot s` or the text alone), plus scalars: each chapter's mixture weight
  (`chapter c`), the top chapter, router entropy, and the delta norm.

- Reader (`reader=FILE`): what reads a bank, trained once for every document (`ReaderWeights`):
  per layer, peft LoRA on the read's W_q / W_k and a per-head gate multiplied into the bank's.
  A bank distilled at test time (`engine distill`) is then read through it:
  `memory_bank:weights="doc.safetensors",reader=@bank_reader_match_long`. A fresh reader reads as the layer's
  own projections. Trained with `engine train` and `data.documents: true`, which binds each row's
  document as the bank (`bind_document`). Options that use the slot order (document order), which
  position-free slots otherwise lose (see `ReaderLayer`): window maps into a slot's key and value
  (`reader_key_window`, `reader_value_window`), and a similarity score (`reader_match`, with
  `reader_match_lag` and `reader_query_window`) by which a name the conversation mentions finds the
  slots just after that name in the document (`@bank_reader_match` and `@bank_reader_match_long` read that way).

Parameters come from `build_weights` (a weights file, see `python -m engine distill` and
`python -m engine train`, or a fresh bank: slots ~ N(0, init_std²) in the units of `x̂`, a
router ~ N(0, 0.02²), gates `gate_init`; drawn from a fixed seed, so a fresh bank is
the same in every process). Linkage 0 never reaches this code, so it is the base
model bit for bit whatever the bank holds.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .base import ConformanceCase, LayerCall, Mechanism, MechanismSettings, ReadTrace, copy_state, file_field
from .projections import LayerProjections, clone_linear


class MemoryBankSettings(MechanismSettings):
    untrained_note: ClassVar[str] = "fresh random bank: expect noise — load or distill weights"  # shown in the lab
    gain: float = Field(1.0, ge=0.0, le=10.0, description="scale of the bank's read added to attention")
    placement: Literal["custom", "all", "first_k", "last_k", "every_n"] = Field(
        "custom", description="which layers read the bank: the `layers` list, all, first/last k, every n-th"
    )
    placement_k: int = Field(4, ge=1, le=1024, description="k for first_k / last_k, n for every_n")
    slots: int = Field(256, ge=1, le=1_000_000, description="number of memory slots N in each bank")
    chapters: int = Field(1, ge=1, le=4096, description="chapters C the slots are split into (1 = no routing)")
    top_k: int = Field(1, ge=1, le=4096, description="routed chapters each token reads")
    shared_chapters: int = Field(0, ge=0, le=4096, description="always-read chapters (the first ones), not routed")
    routing: Literal["token", "prefix_mean"] = Field(
        "token", description="router input: the token's own x̂, or the mean of x̂ over the prefix so far"
    )
    variant: Literal["standard", "factorized", "reduced"] = Field(
        "standard", description="slots N×d; factorized A·Bᵀ of rank r; or attention scores in r dims"
    )
    rank: int = Field(64, ge=1, le=8192, description="r: rank of a factorized bank, score dims of a reduced one")
    sharing: Literal["shared", "per_layer", "every_k"] = Field(
        "shared", description="one bank for all layers, one per layer, or one per share_k layers"
    )
    share_k: int = Field(2, ge=1, le=1024, description="layers per bank when sharing=every_k")
    init_std: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        json_schema_extra={"training_only": True},
        description="std of a fresh bank's slots (units of x̂)",
    )
    gate_init: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        json_schema_extra={"training_only": True},
        description="per-head output gate of a fresh bank (0: starts as the base model)",
    )
    weights: str | None = file_field("bank weights (safetensors from distill or train); none = a fresh bank")
    reader: str | None = file_field(
        "a trained bank reader (engine train with data.documents: true): LoRA on the "
        "read's W_q / W_k and per-head gates, for any distilled bank"
    )
    reader_rank: int = Field(8, ge=1, le=1024, description="LoRA rank of a reader's query / key adapters")
    reader_alpha: float = Field(16.0, gt=0.0, le=4096.0, description="LoRA alpha of a reader's adapters")
    reader_key_window: int = Field(
        0,
        ge=0,
        le=64,
        description="a reader's slot keys also see the w slots before each slot (0: the slot alone)",
    )
    reader_value_window: int = Field(
        0,
        ge=0,
        le=64,
        description="a reader's slot values also carry the w slots after each slot (0: the slot alone)",
    )
    reader_window_rank: int = Field(16, ge=1, le=1024, description="rank of a reader's window maps")
    reader_match: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="a reader also scores slots by cosine similarity of x̂ (reading token, slot) times this "
        "(per head, learnt from here; 0 = off): a token finds the slots that are the same words",
    )
    reader_query_window: int = Field(
        1,
        ge=1,
        le=64,
        description="with reader_match, a token's similarity to a slot is the best over itself and the "
        "conversation's w-1 tokens before it (1: itself), so an answer finds the name its question gave",
    )
    reader_match_lag: int = Field(
        0,
        ge=0,
        le=64,
        description="with reader_match, a slot's similarity is that of the best of the `lag` slots before "
        "it (0: the slot itself), so the words after a name are found by the name",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.placement != "custom" and self.layers is not None:
            raise ValueError(f"layers are given, but placement={self.placement} chooses them; use placement=custom")
        if self.slots % self.chapters:
            raise ValueError(f"slots ({self.slots}) must split into {self.chapters} equal chapters")
        routed = self.chapters - self.shared_chapters
        if self.chapters > 1 and routed < 1:
            raise ValueError(
                f"shared_chapters ({self.shared_chapters}) leaves no chapter to route among {self.chapters}"
            )
        if self.chapters > 1 and self.top_k > routed:
            raise ValueError(f"top_k ({self.top_k}) is more than the {routed} routed chapters")
        if (self.reader_query_window > 1 or self.reader_match_lag) and not self.reader_match:
            raise ValueError(
                "reader_query_window and reader_match_lag shape reader_match's similarity; set reader_match > 0 too"
            )
        if self.reader is not None and self.variant != "standard":
            raise ValueError(f"a reader reads standard banks only, not variant={self.variant}")
        return self

    def caveat(self) -> str | None:
        if self.weights is None and self.gate_init > 0 and self.linkage > 0 and self.gain > 0:
            return (
                "untrained: a fresh memory bank is random slots, a perturbation and not a memory (at linkage 1 "
                "on the embedded model KL 7.4 from the observer, top-1 agreement 0.04, as large as its "
                "noise control's 6.5); distill or train a bank (weights=...) before calling it memory"
            )
        return None

    def resolved_layers(self, n_layers: int) -> list[int]:
        k = self.placement_k
        if self.placement == "custom":
            return super().resolved_layers(n_layers)
        if self.placement == "all":
            return list(range(n_layers))
        if k > n_layers and self.placement != "every_n":
            raise ValueError(f"placement_k {k} is more than the model's {n_layers} layers")
        if self.placement == "first_k":
            return list(range(k))
        if self.placement == "last_k":
            return list(range(n_layers - k, n_layers))
        return list(range(k - 1, n_layers, k)) or [n_layers - 1]

    @property
    def routed(self) -> int:
        return self.chapters - self.shared_chapters if self.chapters > 1 else 0

    def bank_of(self, layers: list[int]) -> dict[int, int]:
        """layer -> bank index."""
        if self.sharing == "shared":
            return {l: 0 for l in layers}
        if self.sharing == "per_layer":
            return {l: i for i, l in enumerate(layers)}
        return {l: i // self.share_k for i, l in enumerate(layers)}


def router_losses(logits: torch.Tensor, chosen: torch.Tensor, n_routed: int) -> dict[str, torch.Tensor]:
    """Switch-style router losses over T routing decisions.

    logits [T, C_r]; chosen [T, k] chapter indices. balance = C·Σ_i f_i·P_i with f_i = (picks of i)/T
    (a token's k picks each count), P_i = mean_t softmax(logits_t)_i; aux = mean_i (f_i − 1/C)²;
    z = mean_t logsumexp(logits_t)².
    """
    probs = torch.softmax(logits.float(), -1)
    f = F.one_hot(chosen, n_routed).float().sum(1).mean(0)
    P = probs.mean(0)
    return {
        "router_balance": n_routed * (f * P).sum(),
        "router_aux": ((f - 1.0 / n_routed) ** 2).mean(),
        "router_z": (torch.logsumexp(logits.float(), -1) ** 2).mean(),
    }


def _pack_labels(labels: list[str]) -> torch.Tensor:
    return torch.tensor(list("\x00".join(labels).encode("utf-8")), dtype=torch.uint8)


def _unpack_labels(t: torch.Tensor) -> list[str]:
    return bytes(t.tolist()).decode("utf-8", errors="replace").split("\x00")


class BankWeights(torch.nn.Module):
    """Every bank's parameters for one settings object. Tensor names (per bank b):

    `bank.b.slots` [N, d] (standard, reduced) or `bank.b.a` [N, r] + `bank.b.b` [d, r] (factorized);
    `bank.b.proj` [n_kv, d_h, r] (reduced); `bank.b.gate` [n_heads]; `bank.b.router.weight`
    [C_r, d] + `bank.b.router.bias` [C_r] (C > 1); optional `bank.b.mask` [N] bool (padding slots
    of a distilled bank) and `bank.b.labels` (uint8: NUL-separated UTF-8 slot labels).
    """

    def __init__(self, settings: MemoryBankSettings, config, n_banks: int):
        super().__init__()
        d = config.hidden_size
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or d // n_heads
        s = settings
        self.settings = s
        self.n_banks = n_banks
        self.labels: dict[int, list[str]] = {}
        self.kv_cache: dict = {}
        gen = torch.Generator().manual_seed(0)  # a fresh bank is the same in every process

        def randn(*shape):
            return torch.randn(*shape, generator=gen)

        for b in range(n_banks):
            if s.variant == "factorized":
                self.register_parameter(
                    f"bank_{b}_a", torch.nn.Parameter(randn(s.slots, s.rank) * s.init_std / math.sqrt(s.rank) ** 0.5)
                )
                self.register_parameter(f"bank_{b}_b", torch.nn.Parameter(randn(d, s.rank) / math.sqrt(s.rank) ** 0.5))
            else:
                self.register_parameter(f"bank_{b}_slots", torch.nn.Parameter(randn(s.slots, d) * s.init_std))
            if s.variant == "reduced":
                q, _ = torch.linalg.qr(randn(n_kv, head_dim, max(head_dim, s.rank)))
                self.register_parameter(f"bank_{b}_proj", torch.nn.Parameter(q[:, :, : s.rank].contiguous()))
            self.register_parameter(f"bank_{b}_gate", torch.nn.Parameter(torch.full((n_heads,), float(s.gate_init))))
            if s.routed:
                self.register_parameter(f"bank_{b}_router_weight", torch.nn.Parameter(randn(s.routed, d) * 0.02))
                self.register_parameter(f"bank_{b}_router_bias", torch.nn.Parameter(torch.zeros(s.routed)))
            self.register_buffer(f"bank_{b}_mask", torch.ones(s.slots, dtype=torch.bool))

    def p(self, b: int, name: str):
        return getattr(self, f"bank_{b}_{name}")

    def memory(self, b: int) -> torch.Tensor:
        """M [N, d] of bank b (the dense product for a factorized bank)."""
        if self.settings.variant == "factorized":
            return self.p(b, "a") @ self.p(b, "b").T
        return self.p(b, "slots")

    def slot_labels(self, b: int) -> list[str]:
        """Each slot's name in the read traces: its document text for a distilled bank, else its
        number; with more than one chapter, prefixed by the chapter (one chapter: no prefix, so the
        memory-read view's short column labels show the text)."""
        s = self.settings
        n_c = s.slots // s.chapters

        def chapter(i: int) -> str:
            return f"chapter {i // n_c} / " if s.chapters > 1 else ""

        if b in self.labels and len(self.labels[b]) == s.slots:
            return [chapter(i) + text for i, text in enumerate(self.labels[b])]
        return [chapter(i) + f"slot {i % n_c}" for i in range(s.slots)]

    # -- files ---------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            b, rest = name[len("bank_") :].split("_", 1)
            out[f"bank.{b}.{rest.replace('router_', 'router.')}"] = t.detach().cpu().contiguous()
        for b, labels in self.labels.items():
            out[f"bank.{b}.labels"] = _pack_labels(labels)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if any(k.startswith("readers.") for k in tensors):
            raise ValueError(
                "this file is a bank reader, not a bank: name it with reader=, beside a distilled bank's weights="
            )
        expected = {k for k in self.to_tensors() if not k.endswith(".labels")}
        given = {k for k in tensors if not k.endswith(".labels")}
        missing = sorted(expected - given - {f"bank.{b}.mask" for b in range(self.n_banks)})
        extra = sorted(given - expected)
        if missing or extra:
            raise ValueError(f"tensors do not fit the settings (missing {missing[:3]}, unexpected {extra[:3]})")
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for key, value in tensors.items():
            parts = key.split(".")
            b = int(parts[1])
            if parts[2] == "labels":
                self.labels[b] = _unpack_labels(value)
                continue
            name = f"bank_{b}_" + "_".join(parts[2:])
            target = own[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key} has shape {tuple(value.shape)}, these settings need {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))


class ReaderLayer(torch.nn.Module):
    """One host layer's reader: clones of its W_q / W_k (frozen, under LoRA), a per-head gate and,
    optionally, two window maps over the slot order (document order, as `distill --method tokens`
    keeps it): a low-rank map from the `key_window` slots before a slot to a term added to its key,
    and one from the `value_window` slots after it to a term added to its value. Both `*_up`
    matrices are zero at start, so a fresh windowed reader reads as the window-free one. And, with
    `match` > 0, a similarity score.

    Why: a distilled token bank is a bag of token states with no positions, so "Orla lives in
    Tarrowby" is, to a plain read, Orla's slots and Tarrowby's slots with nothing tying them. The key
    window lets a question find the slot whose preceding slots name the person (the previous-token
    trick of induction heads); the value window lets the person's own slots, which a question about
    them finds easily, carry what the document says after them. With `match`, each head also adds
    w_h · cos(x̂_t, slot) to its scores: a question's "Vennick" is, at every reader layer, more like
    the document's "Vennick" than like any other slot, so a name in a question finds its own slots
    without anything learnt about names (on from the start, w_h = `match`: unlike the windows, a
    matching reader is not the plain one when fresh). `match_lag` scores a slot by the best of the
    slots just before it, so the words after a name are what the name finds; `query_window` scores a
    token by the best of itself and the conversation's tokens just before it, so an answer's first
    token still finds the name its question gave (that state lives in `MemoryBank.recent`). Slots
    past either end of a window count as zero.
    The bank is a finished document, so a slot's value may use later slots of it: no conversation
    token sees anything after itself."""

    def __init__(
        self,
        attn: torch.nn.Module,
        n_heads: int,
        dtype: torch.dtype,
        key_window: int = 0,
        value_window: int = 0,
        rank: int = 16,
        match: float = 0.0,
        query_window: int = 1,
        match_lag: int = 0,
    ):
        super().__init__()
        self.q_read = clone_linear(attn.q_proj, dtype)
        self.k_read = clone_linear(attn.k_proj, dtype)
        device = self.q_read.weight.device
        self.gate = torch.nn.Parameter(torch.ones(n_heads, dtype=dtype, device=device))
        self.key_window, self.value_window = key_window, value_window
        self.match, self.query_window, self.match_lag = match, query_window, match_lag
        if match:  # each head's similarity weight is match * match_weight (1 at start)
            self.match_weight = torch.nn.Parameter(torch.ones(n_heads, dtype=dtype, device=device))
        d = self.k_read.in_features
        for name, window, out in (
            ("key", key_window, self.k_read.out_features),
            ("value", value_window, attn.v_proj.out_features),
        ):
            if window:
                down = torch.nn.Linear(window * d, rank, bias=False, dtype=dtype, device=device)
                up = torch.nn.Linear(rank, out, bias=False, dtype=dtype, device=device)
                torch.nn.init.zeros_(up.weight)
                setattr(self, f"ctx_{name}_down", down)
                setattr(self, f"ctx_{name}_up", up)

    @staticmethod
    def _neighbours(x: torch.Tensor, window: int, after: bool) -> torch.Tensor:
        """[N, window*d]: for each slot the `window` slots before it (nearest first) or after it."""
        n, d = x.shape
        zeros = x.new_zeros(window, d)
        if after:
            padded = torch.cat([x, zeros])
            near = [padded[j : j + n] for j in range(1, window + 1)]
        else:
            padded = torch.cat([zeros, x])
            near = [padded[window - j : window - j + n] for j in range(1, window + 1)]
        return torch.stack(near, 1).reshape(n, window * d)

    def match_scores(
        self, x_hat: torch.Tensor, slots: torch.Tensor, before: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """[n_heads, T, N]: each head's weight times the similarity of the T reading tokens to each
        slot, cos(x̂_t, slot), or with a query window the best cos over x̂_t and the w-1 tokens before
        it (`before` [P, d]: the conversation's tokens ahead of these, newest last); with a lag, a
        slot's similarity is the best of the `lag` slots before it (-1 before the first). None
        without `match`."""
        if not self.match:
            return None
        k = F.normalize(slots.float(), dim=-1)
        q = F.normalize(x_hat.float(), dim=-1)
        w, T = self.query_window, x_hat.shape[0]
        P = 0 if w == 1 or before is None else before.shape[0]
        c = (q if not P else torch.cat([F.normalize(before.float(), dim=-1), q])) @ k.T  # [P + T, N]
        if self.match_lag:
            lag, N = self.match_lag, c.shape[1]
            c = torch.cat([c.new_full((c.shape[0], lag), -1.0), c], 1)  # column n + lag is slot n
            c = torch.stack([c[:, lag - i : lag - i + N] for i in range(1, lag + 1)]).amax(0)
        if w == 1:
            cos = c
        else:
            c = torch.cat([c.new_full((w - 1, c.shape[1]), -torch.inf), c])  # row i + w - 1 is token i
            cos = torch.stack([c[P + w - 1 - j : P + w - 1 - j + T] for j in range(w)]).amax(0)
        return (self.match * self.match_weight.float())[:, None, None] * cos[None]

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Slot keys (before any k_norm) of slots x [N, d], in slot order."""
        k = self.k_read(x)
        if not self.key_window:
            return k
        return k + self.ctx_key_up(self.ctx_key_down(self._neighbours(x, self.key_window, after=False)))

    def value_context(self, x: torch.Tensor) -> torch.Tensor | None:
        """The term the value window adds to the slots' values (None without one)."""
        if not self.value_window:
            return None
        return self.ctx_value_up(self.ctx_value_down(self._neighbours(x, self.value_window, after=True)))


READER_TARGETS = ["q_read", "k_read"]


class ReaderWeights(torch.nn.Module):
    """A bank reader: what reads a bank, not what it holds, so one reader serves every distilled
    document. Per host layer, peft LoRA adapters on the read's query and slot-key projections (B = 0
    at start: a fresh reader reads as the layer's own W_q / W_k) and a per-head gate (1 at start),
    multiplied into the bank's own. Trained by `python -m engine train` with `data.documents: true`
    (each row's document distilled into the bank on the fly); an arm loads it with `reader=FILE`
    beside the distilled bank's `weights=FILE`. The file holds the adapters and gates only."""

    def __init__(self, settings: MemoryBankSettings, model: torch.nn.Module):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        from ..hooks import decoder_layers

        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        blocks = decoder_layers(model)
        self.layers = settings.resolved_layers(model.config.num_hidden_layers)
        self.readers = torch.nn.ModuleDict(
            {
                str(l): ReaderLayer(
                    blocks[l].self_attn,
                    model.config.num_attention_heads,
                    dtype,
                    settings.reader_key_window,
                    settings.reader_value_window,
                    settings.reader_window_rank,
                    settings.reader_match,
                    settings.reader_query_window,
                    settings.reader_match_lag,
                )
                for l in self.layers
            }
        )
        with torch.random.fork_rng(devices=[]):  # the same fresh adapters in every process
            torch.manual_seed(3000 + settings.reader_rank)
            inject_adapter_in_model(
                LoraConfig(
                    r=settings.reader_rank,
                    lora_alpha=settings.reader_alpha,
                    lora_dropout=0.0,
                    target_modules=READER_TARGETS,
                ),
                self,
            )
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name or name.endswith((".gate", ".match_weight")) or ".ctx_" in name)

    def layer(self, layer: int) -> ReaderLayer:
        return self.readers[str(layer)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        own = {n: t for n, t in self.state_dict().items() if n.endswith((".gate", ".match_weight")) or ".ctx_" in n}
        return own | get_peft_model_state_dict(self)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a reader file's tensors. A file without the window maps or match weights these
        settings add (a reader trained before them) loads with those at their start values."""
        own = self.to_tensors()
        optional = {k for k in own if ".ctx_" in k or k.endswith(".match_weight")}
        if set(tensors) - set(own) or set(own) - set(tensors) - optional:
            odd = sorted(set(tensors) ^ (set(own) - (optional - set(tensors))))
            raise ValueError(f"reader tensors do not fit layers {self.layers} (first mismatch: '{odd[0]}')")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"reader tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self, {k: v for k, v in tensors.items() if "lora_" in k})
        self.load_state_dict({k: v for k, v in tensors.items() if "lora_" not in k}, strict=False)

    def train(self, mode: bool = True):
        """A frozen reader (an arm's) merges its adapters into the clones once."""
        super().train(mode)
        if not mode and not any(p.requires_grad for p in self.parameters()):
            from peft.tuners.lora import LoraLayer

            for m in self.modules():
                if isinstance(m, LoraLayer) and not m.merged:
                    m.merge()
        return self


class _ReaderProjections(LayerProjections):
    """The layer's attention geometry with the reader's W_q / W_k (called as modules: LoRA takes part)."""

    def __init__(self, reader: ReaderLayer, attn: torch.nn.Module, config, dtype: torch.dtype):
        super().__init__(attn, config, dtype)
        self.reader = reader

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "q_proj":
            return self.reader.q_read(x.to(self.dtype))
        if name == "k_proj":
            return self.reader.keys(x.to(self.dtype))
        if name == "v_proj":
            v = super()._proj(name, x)
            extra = self.reader.value_context(x.to(self.dtype))
            return v if extra is None else v + extra.to(v.dtype)
        return super()._proj(name, x)


_READERS: dict[tuple, ReaderWeights] = {}


def load_reader(settings: MemoryBankSettings, model: torch.nn.Module, identity=None) -> ReaderWeights:
    """The frozen reader named by `settings.reader`, built once per (file content, model)."""
    from ..weights import WeightsError, check_fits, load_tensors, read_header

    wf = read_header(settings.reader)
    check_fits(wf, "memory_bank", model, identity)
    if not wf.extra.get("reader"):
        raise WeightsError(
            f"{wf.path} is a bank, not a reader (a reader is trained with data.documents: true); "
            f"name a bank with weights="
        )
    key = (wf.sha256, id(model))
    if key not in _READERS:
        own = settings.model_copy(
            update={
                "placement": "custom",
                "layers": wf.settings["layers"],
            }
            | {  # the reader's own settings; a key added since the file was made takes its default
                k: wf.settings.get(k, field.default)
                for k, field in MemoryBankSettings.model_fields.items()
                if k.startswith("reader_")
            }
        )
        reader = ReaderWeights(own, model)
        try:
            reader.load_tensors(load_tensors(wf))
        except ValueError as e:
            raise WeightsError(f"reader {wf.path}: {e}") from None
        reader.requires_grad_(False)
        _READERS[key] = reader.eval()
    reader = _READERS[key]
    missing = sorted(set(settings.resolved_layers(model.config.num_hidden_layers)) - set(reader.layers))
    if missing:
        raise WeightsError(
            f"reader {wf.path} was trained for layers {reader.layers}; the bank also reads layers {missing}"
        )
    return reader


class MemoryBank(Mechanism):
    name = "memory_bank"
    Settings = MemoryBankSettings

    def __init__(self, settings: MemoryBankSettings, model: torch.nn.Module, weights: BankWeights | None = None):
        reader = None
        if isinstance(weights, ReaderWeights):  # a reader under training: the bank comes with each document
            reader, weights = weights, None
        super().__init__(settings, model, weights)
        if reader is None and settings.reader:
            reader = load_reader(settings, model)
        self.reader = reader
        self.document: dict[int, torch.Tensor] | None = None  # layer -> slots x̂ [n, d] (bind_document)
        if weights is None:
            weights = self.build_weights(settings, model, None)
            weights.requires_grad_(False)
        self.weights = weights
        self.bank_of = settings.bank_of(self.layers)
        self.prefix: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (sum of x̂ so far [d] fp32, count)
        self.recent: dict[int, torch.Tensor] = {}  # layer -> x̂ of the last w-1 tokens (a reader's query window)

    @classmethod
    def build_reader(cls, settings: MemoryBankSettings, model, tensors) -> ReaderWeights:
        """A reader to train (fresh, or from a reader file's tensors)."""
        if settings.chapters != 1 or settings.variant != "standard":
            raise ValueError("a reader trains on plain distilled banks: chapters=1, variant=standard")
        reader = ReaderWeights(settings, model)
        if tensors is not None:
            reader.load_tensors(tensors)
        return reader

    def bind_document(self, slots: dict[int, torch.Tensor]) -> None:
        """Read these slots (layer -> x̂ [n, d], as `engine distill --method tokens` makes them)
        instead of the bank's, until `reset`: how a reader trains on many documents."""
        self.document = slots

    def make_projections(self, layer: int, attn: torch.nn.Module):
        if self.reader is not None:
            return _ReaderProjections(self.reader.layer(layer), attn, self.config, self.dtype)
        return super().make_projections(layer, attn)

    @classmethod
    def build_weights(cls, settings: MemoryBankSettings, model, tensors):
        layers = settings.resolved_layers(model.config.num_hidden_layers)
        n_banks = max(settings.bank_of(layers).values()) + 1
        module = BankWeights(settings, model.config, n_banks)
        if tensors is not None:
            module.load_tensors(tensors)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        device = next(model.parameters()).device
        return module.to(device=device, dtype=dtype)

    # -- lifecycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.prefix.clear()
        self.recent.clear()
        self.document = None

    def snapshot(self) -> dict:
        return copy_state({"prefix": dict(self.prefix), "recent": dict(self.recent)})

    def restore(self, state: dict) -> None:
        state = copy_state(state)
        self.prefix, self.recent = dict(state["prefix"]), dict(state["recent"])

    def memory_size(self) -> int:
        return self.settings.slots * self.weights.n_banks

    @classmethod
    def conformance_cases(cls) -> list[ConformanceCase]:
        return [
            ConformanceCase("memory_bank:linkage=1,slots=16"),
            ConformanceCase("memory_bank:linkage=1,slots=16,chapters=4,top_k=2,routing=token"),
            ConformanceCase(
                "memory_bank:linkage=1,slots=24,chapters=4,top_k=1,shared_chapters=1,"
                "routing=prefix_mean,sharing=per_layer"
            ),
            ConformanceCase(
                "memory_bank:linkage=1,slots=16,variant=factorized,rank=4,placement=all,sharing=every_k,share_k=2"
            ),
            ConformanceCase(
                "memory_bank:linkage=1,slots=16,variant=reduced,rank=8,chapters=2,placement=last_k,placement_k=2"
            ),
        ]

    # -- the read -------------------------------------------------------------------------------
    def slot_states(self, layer: int) -> torch.Tensor:
        """The slots the layer reads, [N, d] in slot order: the bound document's x̂, or the bank's memory."""
        if self.document is not None:
            return self.document[layer]
        return self.weights.memory(self.bank_of[layer])

    def bank_kv(self, layer: int, proj: LayerProjections):
        """K_mem, V_mem [n_kv, N, d_h] (K reduced to r dims for the reduced variant) of the layer's bank.

        Kept per (weights, layer) when the bank is frozen (as every loaded bank is); recomputed
        at every call while its parameters train."""
        if self.document is not None:
            m = self.slot_states(layer)
            return proj.keys(m), proj.values(m)
        w, b = self.weights, self.bank_of[layer]
        frozen = not any(p.requires_grad for p in w.parameters())
        frozen = frozen and (self.reader is None or not any(p.requires_grad for p in self.reader.parameters()))
        key = (layer, id(proj.attn), id(self.reader))
        if frozen and key in w.kv_cache:
            return w.kv_cache[key]
        m = self.slot_states(layer)
        k, v = proj.keys(m), proj.values(m)
        if self.settings.variant == "reduced":
            k = torch.einsum("hnd,hdr->hnr", k, w.p(b, "proj").to(k.dtype))
        if frozen:
            w.kv_cache[key] = (k, v)
        return k, v

    def route(self, layer: int, x_hat: torch.Tensor, aux: dict | None):
        """Chapter mixture weights [T, C] (rows sum to 1), router logits [T, C_r] (or None)."""
        s, w, b = self.settings, self.weights, self.bank_of[layer]
        T = x_hat.shape[0]
        if not s.routed:
            return torch.ones(T, 1, dtype=torch.float32, device=x_hat.device), None, None
        x = x_hat.float()
        if s.routing == "prefix_mean":
            total, count = self.prefix.get(layer, (torch.zeros(x.shape[1], device=x.device), 0))
            sums = total[None] + x.cumsum(0)
            u = sums / (count + torch.arange(1, T + 1, device=x.device, dtype=torch.float32))[:, None]
            self.prefix[layer] = (sums[-1].detach(), count + T)
        else:
            u = x
        logits = F.linear(u, w.p(b, "router_weight").float(), w.p(b, "router_bias").float())
        probs = torch.softmax(logits, -1)
        top, chosen = probs.topk(s.top_k, -1)
        S = s.shared_chapters
        mix = torch.zeros(T, s.chapters, dtype=torch.float32, device=x.device)
        mix[:, S:] = mix[:, S:].scatter(1, chosen, top / top.sum(-1, keepdim=True) * (s.top_k / (s.top_k + S)))
        if S:
            mix[:, :S] = 1.0 / (s.top_k + S)
        if aux is not None:
            for name, value in router_losses(logits, chosen, s.routed).items():
                aux[f"{name}.{layer}"] = value
        return mix, logits, chosen + S

    def forward(self, call: LayerCall):
        s, layer = self.settings, call.layer
        if layer not in self.bank_of:
            return None
        self.call_counts[layer] += 1
        proj = self.projections(layer, call.attn)
        b = self.bank_of[layer]
        k, v = self.bank_kv(layer, proj)
        q = proj.queries(call.x_hat)  # [n_kv, g, T, d_h]; no RoPE on either side (slots have no position)
        scale = proj.scaling
        if s.variant == "reduced":
            q = torch.einsum("hgtd,hdr->hgtr", q, self.weights.p(b, "proj").to(q.dtype))
            scale = s.rank**-0.5
        mix, logits, chosen = self.route(layer, call.x_hat, call.aux)
        n_kv, g, T, _ = q.shape
        N = k.shape[1]
        C, n_c = s.chapters, N // s.chapters
        scores = torch.einsum("hgtd,hnd->hgtn", q, k).float() * scale
        reader = self.reader.layer(layer) if self.reader is not None else None
        if reader is not None and reader.match:
            match = reader.match_scores(call.x_hat, self.slot_states(layer), self.recent.get(layer))
            scores = scores + match.view(n_kv, g, T, N)
            if reader.query_window > 1:
                seen = call.x_hat.detach()
                if layer in self.recent:
                    seen = torch.cat([self.recent[layer], seen])
                self.recent[layer] = seen[-(reader.query_window - 1) :]
        if self.document is None:
            mask = self.weights.p(b, "mask")
            if not bool(mask.all()):
                scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.view(n_kv, g, T, C, n_c), -1).nan_to_num(0.0)  # an all-padding chapter reads 0
        weights = (probs * mix[None, None, :, :, None]).reshape(n_kv, g, T, N)
        heads = torch.einsum("hgtn,hnd->hgtd", weights.to(v.dtype), v)
        gate = reader.gate if reader is not None else None
        if self.document is None:
            own = self.weights.p(b, "gate")
            gate = own if gate is None else gate * own
        gate = gate.to(heads.dtype).view(n_kv, g, 1, 1)
        delta = proj.output(heads * gate)
        if call.row.record:
            self._record(layer, b, weights, mix, logits, delta, call)
        return delta

    def _record(self, layer, b, weights, mix, logits, delta, call: LayerCall):
        per_head = weights.detach().reshape(-1, weights.shape[2], weights.shape[3]).float().cpu().numpy()
        labels = self.weights.slot_labels(b)
        positions = call.row.positions.tolist()
        mix = mix.detach().cpu()
        entropy = None
        if logits is not None:
            p = torch.softmax(logits.detach().float(), -1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).cpu()
        for t, pos in enumerate(positions):
            scalars = {
                "delta_norm": float(self.scale * delta[t].detach().float().norm()),
                "attn_norm": float(call.attn_out[t].detach().float().norm()),
                "top_chapter": float(mix[t].argmax()),
            }
            if entropy is not None:
                scalars["router_entropy"] = float(entropy[t])
                if self.settings.chapters <= 64:
                    scalars.update({f"chapter {c}": float(mix[t, c]) for c in range(self.settings.chapters)})
            ph = per_head[:, t]
            self.traces.append(
                ReadTrace(layer=layer, position=pos, slot_keys=labels, weights=ph.mean(0), per_head=ph, scalars=scalars)
            )
