"""Captures for the Inspect views: attention weights, memory reads and source attention, after the fact.

Generation runs with SDPA, which returns no attention weights. A capture rebuilds the arms of a
logged dialogue and teacher-forces the logged turns through them (the same two forward passes
per turn as `Dialogue.teacher_force`, so every arm's mechanism hooks are active and its memory
grows exactly as in `engine.probes`). The pass itself stays on SDPA: a forward hook on every
layer's `self_attn` recomputes the queries of only the rows a view needs, takes the rotated keys
the layer has just written to the KV cache, and reduces softmax(q kᵀ) on the spot. That is the
layer's own attention (tested against eager `output_attentions`) at a fraction of eager's cost,
and nothing of size [L, H, T, T] is ever held for long transcripts. Every arm of the turn is
recorded in the same pass (each batch row has its own accumulators), so one capture serves the
views of every arm:

* each recorded arm's token x token attention, bucketed to at most `max_size` x `max_size`: one
  representative query row per bucket (its last token; all rows when T <= max_size), columns
  summed over the bucket, so every displayed row is an exact distribution that sums to 1;
  position 0, the attention sink, always keeps its own column so a view can leave it out of the
  colour range;
* per recorded arm and layer x head, over the rows that generated the arm's reply in the focus
  turn: entropy, and the mass on the source (system prompt + first user message), on the first
  token, on the arm's own earlier answers;
* for every arm, per layer, the share of attention mass the rows generating the focus turn put
  on the source: the "context rot" curve.

Conventions: the row of token p is computed while processing p, and it shapes the prediction of
token p+1; so the row (or memory read) "behind" generated token q is the one at position q-1.
Every fed token carries the index of the message it belongs to (`msg_turns`, the dialogue's own
`turns`: a reply's last token is fed at the start of the next turn, yet filed under its reply's turn).

Outputs are numpy arrays and plain dicts; this module knows nothing about the database or the UI.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .dialogue import ASSISTANT, Dialogue
from .hooks import decoder_layers
from .mechanisms.base import ROLE_CODE, ROLES, ReadTrace
from .mechanisms.projections import rotate
from .model import LoadedModel
from .spec import ArmSpec

CAPTURE_VERSION = 1
DEFAULT_MAX_SIZE = 256
SOURCE_ROLES = (ROLE_CODE["system"], ROLE_CODE["user"])
GRID_METRICS = {
    "entropy": "attention entropy (nats), mean over the reply's rows",
    "source": "mass on the system prompt + first user message",
    "sink": "mass on the first token (attention sink)",
    "own_answers": "mass on the arm's own earlier answers",
}

_CAPTURE_LOCK = threading.RLock()


class CaptureError(ValueError):
    """A capture cannot be made; the message is meant for a person."""


# --------------------------------------------------------------------------------------------------
# Bucketing for display
# --------------------------------------------------------------------------------------------------
def bucket_index(T: int, max_size: int | None) -> np.ndarray:
    """Bucket of each position 0..T-1: identity if T <= max_size; else position 0 alone, the rest even."""
    if max_size is None or T <= max_size:
        return np.arange(T)
    if max_size < 2:
        raise ValueError("max_size must be at least 2")
    p = np.arange(T)
    b = 1 + ((p - 1) * (max_size - 1)) // max(1, T - 1)
    b[0] = 0
    return b


def bucket_starts(index: np.ndarray) -> list[int]:
    """First position of each bucket."""
    starts = [0]
    for p in range(1, len(index)):
        if index[p] != index[p - 1]:
            starts.append(p)
    return starts


def representatives(idx: np.ndarray) -> np.ndarray:
    """The query row shown for each display bucket: the bucket's last position."""
    return np.r_[idx[1:] != idx[:-1], True] if len(idx) else np.zeros(0, bool)


def downsample(attn: np.ndarray, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket a full [..., T, T] attention for display: one representative query row per bucket
    (its last token), columns summed over the bucket, so every displayed row is an exact attention
    distribution of a real token and sums to 1. Captures compute only those rows."""
    T = attn.shape[-1]
    idx = bucket_index(T, max_size)
    S = int(idx.max()) + 1 if T else 0
    rows = attn[..., representatives(idx), :].astype(np.float64)
    cols = np.zeros(rows.shape[:-1] + (S,), dtype=np.float64)
    np.add.at(np.moveaxis(cols, -1, 0), idx, np.moveaxis(rows, -1, 0))
    return cols.astype(np.float32), idx


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclass
class ArmTranscript:
    """One arm's fed tokens with their role codes and message turns, and where each reply sits."""

    label: str
    spec: str
    token_ids: list[int]
    roles: list[int]
    msg_turns: list[int]  # the message (turn index) each token belongs to
    reply_spans: list[tuple[int, int]]  # per turn: [start, end) positions of the reply's tokens
    memory_sizes: list[int]  # mechanism memory size after each turn (0 for the observer)

    def source_mask(self) -> np.ndarray:
        roles, turns = np.asarray(self.roles), np.asarray(self.msg_turns)
        return np.isin(roles, SOURCE_ROLES) & (turns == 0)

    def own_answers_mask(self, before_turn: int) -> np.ndarray:
        roles, turns = np.asarray(self.roles), np.asarray(self.msg_turns)
        return (roles == ASSISTANT) & (turns < before_turn)


@dataclass
class TurnCapture:
    """Everything one capture pass yields: per recorded arm its bucketed attention and layer x head
    grid, per arm its transcript, source-attention curve and read traces. `focus_arm` picks the arm
    the single-arm views (`attention`, `bucket_of`, `grid`, `focus`) read; `for_arm(r)` is the same
    capture seen from another recorded arm (no new pass)."""

    focus_arm: int
    focus_turn: int
    arms: list[ArmTranscript]
    n_layers: int
    n_heads: int
    attentions: list[np.ndarray | None]  # per arm: [L, H, S, S] bucketed; None if not recorded/captured
    buckets: list[np.ndarray | None]  # per arm: [T] bucket of each position
    grids: list[dict[str, np.ndarray] | None]  # per arm: metric -> [L, H] over the rows generating its reply
    source_curves: list[np.ndarray | None]  # per arm: [L, n_reply] source share per generating row
    traces: list[list[list[ReadTrace]]]  # [arm][turn] -> the arm's read traces of that turn
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def focus(self) -> ArmTranscript:
        return self.arms[self.focus_arm]

    @property
    def attention(self) -> np.ndarray | None:
        return self.attentions[self.focus_arm]

    @property
    def bucket_of(self) -> np.ndarray | None:
        return self.buckets[self.focus_arm]

    @property
    def grid(self) -> dict[str, np.ndarray] | None:
        return self.grids[self.focus_arm]

    @property
    def recorded(self) -> list[int]:
        """The arms whose heatmap and grid this capture holds."""
        return [r for r, g in enumerate(self.grids) if g is not None]

    def for_arm(self, arm: int) -> "TurnCapture":
        """This capture with `arm` as its focus (it must be one of the recorded arms)."""
        if arm not in self.recorded:
            raise CaptureError(f"arm {arm} was not recorded by this capture (recorded: {self.recorded})")
        return replace(self, focus_arm=arm)


# --------------------------------------------------------------------------------------------------
# The capturing dialogue
# --------------------------------------------------------------------------------------------------
class _ArmAcc:
    """One recorded arm's accumulators: its display buckets, its bucketed heatmap and its layer x head grid."""

    def __init__(
        self, n_layers: int, n_heads: int, T_final: int, max_size: int | None, want_attention: bool, dtype: torch.dtype
    ):
        self.idx = bucket_index(T_final, max_size)
        self.S = int(self.idx.max()) + 1 if T_final else 0
        self.idx_t = torch.from_numpy(self.idx)
        # one representative query per display bucket: the last position of each bucket
        self.rep_t = torch.from_numpy(representatives(self.idx))
        # each display row is written once (by its representative query), so a float16 store loses
        # nothing beyond the final rounding a float16 payload makes anyway
        self.acc = torch.zeros(n_layers, n_heads, self.S, self.S, dtype=dtype) if want_attention else None
        self.overflow = False
        self.grid_sums = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in GRID_METRICS}
        self.grid_rows = 0


class _Probe:
    """Per-layer reduction of the attention weights of the current forward pass (only the rows the views need).

    `record`: the arms (batch rows) whose heatmap and layer x head grid are kept, each in its own
    accumulator (`_ArmAcc`); the source curves are kept for every arm that generates.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        n_arms: int,
        record: dict[int, int],
        max_size: int | None,
        want_attention: bool,
        dtype: torch.dtype = torch.float32,
    ):
        self.L, self.H = n_layers, n_heads
        self.active = False  # set while the passes that matter run
        self.host = None  # the MechanismHost (set by capture_turn)
        self.want_attention = want_attention
        # record: arm -> its transcript length at the end of the capture (fixes its buckets)
        self.arms = {r: _ArmAcc(n_layers, n_heads, T, max_size, want_attention, dtype) for r, T in record.items()}
        self.step: dict | None = None
        self.thread: int | None = None
        # per arm: which query rows generate reply tokens (set by the feeder), masks over columns
        self.gen_rows: list[str | None] = [None] * n_arms  # 'last' | 'all' | None
        self.col_masks: list[dict[str, torch.Tensor] | None] = [None] * n_arms
        self.curves: list[list[torch.Tensor]] = [[] for _ in range(n_arms)]  # chunks of [L, n]
        self._curve_chunk: list[torch.Tensor | None] = [None] * n_arms

    def begin_step(
        self, n: list[int], start: list[int], mask_after: torch.Tensor, T: int, allow: dict[int, torch.Tensor]
    ):
        """One forward pass begins: how many real tokens each row feeds, where they start, which cache
        columns are real after it, and any row's extra allowed pairs among its step tokens (its plan)."""
        mask = mask_after.bool().cpu()
        self.step = {"n": n, "start": start, "mask": mask, "all_valid": mask.all(1).tolist(), "T": T, "allow": allow}
        self.thread = threading.get_ident()  # the model is shared: other threads' forwards are not ours
        self._curve_chunk = [None] * len(n)

    def end_step(self):
        for r, chunk in enumerate(self._curve_chunk):
            if chunk is not None:
                self.curves[r].append(chunk)
        self.step = None

    def hook(self, layer: int):
        """Forward hook (with kwargs) on a layer's self_attn: reduce that layer's attention weights."""

        def fn(module, args, kwargs, output):
            if (
                self.active
                and self.step is not None
                and threading.get_ident() == self.thread
                and not (self.host is not None and self.host.in_base_pass)
            ):
                self._reduce(layer, module, kwargs)
            return None

        return fn

    def _needed_rows(self, r: int, n: int, start: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Query rows (indices into the step's n new tokens) that row r's views need.

        Returns (union, heatmap rows, generating rows): the heatmap takes one representative
        query per display bucket (its last token), the grid and curves every generating row.
        """
        heat = gen = None
        acc = self.arms.get(r)
        if acc is not None and self.want_attention and start + n <= len(acc.idx):
            heat = torch.nonzero(acc.rep_t[start : start + n]).squeeze(-1)
        mode = self.gen_rows[r]
        if mode is not None:
            gen = torch.tensor([n - 1]) if mode == "last" else torch.arange(n)
        parts = [t for t in (heat, gen) if t is not None]
        union = torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.long)
        return union, heat, gen

    def _weights(self, layer: int, module, kwargs, r: int, q_rows: torch.Tensor, n: int) -> torch.Tensor:
        """Softmax attention of the chosen query rows over the arm's own tokens: [H, m, start + n].

        Queries are recomputed from the layer's input for these rows only; keys are the rotated
        keys the layer has just written to the cache, so the result is the layer's own attention.
        """
        st = self.step
        x = kwargs["hidden_states"][r]
        Tq = x.shape[0]
        cos, sin = kwargs["position_embeddings"]
        cache = kwargs["past_key_values"]
        hd = module.head_dim
        pos_in_step = Tq - n + q_rows
        q = module.q_proj(x[pos_in_step]).view(len(q_rows), -1, hd)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(0, 1)  # [H, m, hd]
        q = rotate(q, cos[r, pos_in_step], sin[r, pos_in_step])
        keys = cache.layers[layer].keys[r]  # [n_kv, Ltot, hd], padding columns included
        if not st["all_valid"][r]:
            keys = keys[:, st["mask"][r].to(keys.device)]
        n_kv, Tk = keys.shape[0], keys.shape[1]
        H = q.shape[0]
        scores = torch.einsum("kgmd,ktd->kgmt", q.reshape(n_kv, H // n_kv, -1, hd), keys).reshape(H, -1, Tk)
        scores = scores.float() * module.scaling
        query_pos = st["start"][r] + q_rows  # sequence index of the query rows
        if int(query_pos.min()) < Tk - 1:  # some row would see later tokens: mask them
            future = torch.arange(Tk)[None, :] > query_pos[:, None]
            extra = st["allow"].get(r)
            if extra is not None:  # the row's plan allowed some pairs among this step's tokens
                start = st["start"][r]
                future[:, start:] &= ~extra[q_rows]
            scores = scores.masked_fill(future[None].to(scores.device), float("-inf"))
        return torch.softmax(scores, -1).cpu()

    def _reduce(self, layer: int, module, kwargs):
        st = self.step
        for r, n in enumerate(st["n"]):
            if n == 0:
                continue
            start = st["start"][r]
            union, heat, gen = self._needed_rows(r, n, start)
            if not len(union):
                continue
            w = self._weights(layer, module, kwargs, r, union, n)  # [H, m, start + n]
            where = {int(i): j for j, i in enumerate(union.tolist())}
            acc = self.arms.get(r)
            if heat is not None and len(heat):
                self._accumulate(acc, layer, w[:, [where[int(i)] for i in heat]], start + heat)
            elif acc is not None and self.want_attention and start + n > len(acc.idx):
                acc.overflow = True
            if gen is None:
                continue
            g = w[:, [where[int(i)] for i in gen]]  # [H, n_gen, Tk]
            rows_len = g.shape[-1]
            masks = self.col_masks[r]
            src = masks["source"][:rows_len]
            share = g[:, :, src].sum(-1)  # [H, n_gen]
            curve = share.mean(0)  # [n_gen]
            if self._curve_chunk[r] is None:
                self._curve_chunk[r] = torch.zeros(self.L, curve.shape[0])
            self._curve_chunk[r][layer] = curve
            if acc is not None:
                sums = acc.grid_sums
                p = g.clamp_min(1e-12)
                sums["entropy"][layer] += (-(g * p.log()).sum(-1)).sum(-1).double()
                sums["source"][layer] += share.sum(-1).double()
                sums["sink"][layer] += g[:, :, 0].sum(-1).double()
                own = masks["own_answers"][:rows_len]
                sums["own_answers"][layer] += g[:, :, own].sum(-1).sum(-1).double()
                if layer == 0:
                    acc.grid_rows += g.shape[1]

    @staticmethod
    def _accumulate(acc: _ArmAcc, layer: int, rows: torch.Tensor, positions: torch.Tensor):
        """Place representative query rows [H, m, Tk] (at absolute `positions`) into the arm's display grid."""
        Tk = rows.shape[-1]
        qb = acc.idx_t[positions]
        kb = acc.idx_t[:Tk]
        if acc.S == len(acc.idx):  # no bucketing: place the rows as they are
            acc.acc[layer][:, qb, :Tk] = rows.to(acc.acc.dtype)
        else:
            acc.acc[layer][:, qb] = (
                torch.zeros(rows.shape[0], rows.shape[1], acc.S).index_add_(2, kb, rows).to(acc.acc.dtype)
            )


class CaptureDialogue(Dialogue):
    """A `Dialogue` that teacher-forces logged turns and lets a `_Probe` see every forward pass."""

    probe: _Probe | None = None

    def before_step(self, step):
        probe = self.probe
        if probe is not None and probe.active:
            n = step.valid.sum(1).tolist()
            probe.begin_step(n, step.starts, step.columns, step.ids.shape[1], step.allow)

    def after_step(self, step):
        if self.probe is not None and self.probe.active and self.probe.step is not None:
            self.probe.end_step()

    def feed(self, user: str, replies: list[list[int]], before_body=None) -> list[tuple[int, int]]:
        """Teacher-force one turn (`Dialogue.teacher_force`, without logits); return each arm's reply span."""
        spans_seen: list[tuple[int, int]] = []

        def phase(name, spans):
            if name == "body":
                spans_seen.extend(spans)
                if before_body is not None:
                    before_body(spans)
            if self.probe is not None:  # which rows generate: the prompt's last one, then every body row
                body = name == "body"
                self.probe.gen_rows = [
                    ("all" if body else "last") if r in self.gen_arms and len(replies[r]) > body else None
                    for r in range(self.n_arms)
                ]

        self.teacher_force(user, replies, keep_logits=False, on_phase=phase)
        if self.probe is not None:
            self.probe.gen_rows = [None] * self.n_arms
        return spans_seen

    # the arms whose query rows generate (the probe reduces their attention rows for the grid, curves)
    gen_arms: frozenset[int] = frozenset()


def _checked_request(specs, turns, focus_arm: int, focus_turn, record, window) -> tuple[int, list[int]]:
    """(focus turn, arms to record) for a capture request, or one CaptureError naming what is wrong."""
    if window is not None:
        raise CaptureError(
            f"this dialogue ran with an attention window of {window} tokens; captures need the "
            "full cache (the attention views would not show what the arms saw)"
        )
    if not turns:
        raise CaptureError("the dialogue has no turns")
    focus_turn = len(turns) - 1 if focus_turn is None else focus_turn
    if not 0 <= focus_turn < len(turns):
        raise CaptureError(f"turn {focus_turn} does not exist: the dialogue has turns 0..{len(turns) - 1}")
    if not 0 <= focus_arm < len(specs):
        raise CaptureError(f"arm {focus_arm} does not exist: the dialogue has arms 0..{len(specs) - 1}")
    record = list(range(len(specs))) if record is None else sorted({int(r) for r in record} | {focus_arm})
    if any(not 0 <= r < len(specs) for r in record):
        raise CaptureError(f"record names an arm that does not exist: the dialogue has arms 0..{len(specs) - 1}")
    for k, (_, replies) in enumerate(turns[: focus_turn + 1]):
        if len(replies) != len(specs):
            raise CaptureError(f"turn {k} has replies for {len(replies)} arms, the dialogue has {len(specs)}")
    return focus_turn, record


def capture_turn(
    lm: LoadedModel,
    specs: list[ArmSpec],
    turns: list[tuple[str, list[list[int]]]],
    system: str | None = None,
    *,
    focus_arm: int = 0,
    focus_turn: int | None = None,
    attention: bool = True,
    max_size: int | None = DEFAULT_MAX_SIZE,
    curves: bool = True,
    expected_length: int | None = None,
    window: int | None = None,
    record: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TurnCapture:
    """Teacher-force `turns` [(user, [reply ids per arm]), ...] up to `focus_turn` and capture it.

    One pass, every arm's mechanism active and recording read traces. For every arm in `record`
    (default: every arm; each batch row has its own accumulators) it keeps the arm's bucketed
    attention over its transcript up to the end of the focus turn (`max_size=None`: full
    [L, H, T, T]) and the layer x head grid over the rows that generated the arm's reply; for every
    arm its source-attention curve for that turn and its read traces. `focus_arm` is the arm the
    result's single-arm views show (`TurnCapture.for_arm` shows another recorded one). `dtype`: the
    heatmaps' storage (float16 halves the memory of a long capture; each display row is written once).
    `expected_length`: the focus arm's transcript length if known (else it is found by a dry run of
    the tokenisation, as for every other recorded arm), used to fix the buckets before the pass.
    """
    focus_turn, record = _checked_request(specs, turns, focus_arm, focus_turn, record, window)
    t_start = time.perf_counter()
    model = lm.model
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    d = CaptureDialogue(lm, [s for s in specs], system=system, record_traces=True)
    predicted = d.predicted_lengths(turns[: focus_turn + 1]) if attention else []  # fixes the buckets
    lengths = {
        r: (0 if not attention else expected_length if r == focus_arm and expected_length is not None else predicted[r])
        for r in record
    }
    probe = _Probe(L, H, len(specs), lengths, max_size, attention, dtype)
    probe.host = d.host  # its hook skips the base-model passes a mechanism runs inside a forward
    d.probe = probe
    gen_arms = set(range(len(specs))) if curves else set(record)
    layers = decoder_layers(model)
    spans_by_arm: list[list[tuple[int, int]]] = [[] for _ in specs]
    traces: list[list[list[ReadTrace]]] = [[] for _ in specs]
    mem_sizes: list[list[int]] = [[] for _ in specs]
    handles = []
    try:
        with _CAPTURE_LOCK:
            handles = [layers[l].self_attn.register_forward_hook(probe.hook(l), with_kwargs=True) for l in range(L)]
            for k in range(focus_turn + 1):
                user, replies = turns[k]
                is_focus = k == focus_turn

                def set_masks(spans, k=k):  # before the body: the reply's own tokens are neither
                    for r, arm in enumerate(d.arms):
                        probe.col_masks[r] = _column_masks(arm.turns, arm.roles, k, pad=spans[r][1] - spans[r][0] + 1)

                # attention is only reduced in the focus turn, and everywhere for the heatmaps
                probe.active = attention or is_focus
                d.gen_arms = frozenset(gen_arms if is_focus else ())
                if is_focus:
                    # the prompt's last row already generates: masks must exist before the prompt pass
                    _prepare_masks_before_prompt(d, probe, k, user, replies)
                spans = d.feed(user, replies, before_body=set_masks if is_focus else None)
                for r, arm in enumerate(d.arms):
                    spans_by_arm[r].append(spans[r])
                    traces[r].append(list(arm.replies[-1].traces))
                    mem_sizes[r].append(0 if arm.mechanism is None else arm.mechanism.memory_size())
            if attention:
                probe.active = True
                d.gen_arms = frozenset()
                d.feed_pending(record)
    finally:
        for h in handles:
            h.remove()
        d.probe = None
    return _turn_capture(d, probe, spans_by_arm, mem_sizes, traces, focus_arm, focus_turn, attention, t_start)


def _turn_capture(
    d: CaptureDialogue,
    probe: _Probe,
    spans_by_arm,
    mem_sizes,
    traces,
    focus_arm: int,
    focus_turn: int,
    attention: bool,
    t_start: float,
) -> TurnCapture:
    """The finished pass as a `TurnCapture`: transcripts, heatmaps, grids, curves (accumulators freed)."""
    specs = [arm.spec for arm in d.arms]
    L, H = probe.L, probe.H
    notes: list[str] = []
    arms = []
    for r, arm in enumerate(d.arms):
        arms.append(
            ArmTranscript(
                label=arm.spec.display_label,
                spec=arm.spec.to_string(),
                token_ids=list(arm.token_ids),
                roles=list(arm.roles),
                msg_turns=list(arm.turns),
                reply_spans=spans_by_arm[r],
                memory_sizes=mem_sizes[r],
            )
        )
    attentions: list[np.ndarray | None] = [None] * len(specs)
    buckets: list[np.ndarray | None] = [None] * len(specs)
    grids: list[dict[str, np.ndarray] | None] = [None] * len(specs)
    for r, acc in probe.arms.items():
        if attention:
            T = len(arms[r].token_ids)
            if acc.overflow or T != len(acc.idx):
                notes.append(
                    f"arm {r}: transcript length {T} differs from the expected {len(acc.idx)}; attention not captured"
                )
            else:
                attentions[r] = acc.acc.numpy()  # rows never written are zero; every written row sums to 1
                buckets[r] = acc.idx
        rows = max(acc.grid_rows, 1)
        grids[r] = {k: (v / rows).numpy().astype(np.float32) for k, v in acc.grid_sums.items()}
        if acc.grid_rows == 0:
            grids[r] = {k: np.full((L, H), np.nan, np.float32) for k in GRID_METRICS}
        acc.acc = None
    src_curves: list[np.ndarray | None] = []
    for r in range(len(specs)):
        chunks = probe.curves[r]
        src_curves.append(torch.cat(chunks, 1).numpy() if chunks else None)
    return TurnCapture(
        focus_arm=focus_arm,
        focus_turn=focus_turn,
        arms=arms,
        n_layers=L,
        n_heads=H,
        attentions=attentions,
        buckets=buckets,
        grids=grids,
        source_curves=src_curves,
        traces=traces,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )


def _column_masks(turns: list[int], roles: list[int], k: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """Key columns that count as the source (system prompt + first user message) and as the arm's own
    earlier answers (before turn k), padded with False for `pad` positions still to come."""
    t, r = np.asarray(turns + [k] * pad), np.asarray(roles + [ASSISTANT] * pad)
    real = np.arange(len(t)) < len(turns)
    return {
        "source": torch.from_numpy(real & np.isin(r, SOURCE_ROLES) & (t == 0)),
        "own_answers": torch.from_numpy(real & (r == ASSISTANT) & (t < k)),
    }


def _prepare_masks_before_prompt(d: CaptureDialogue, probe: _Probe, k: int, user: str, replies):
    """Column masks for the focus turn's prompt pass: the arm's tokens so far, the pending token
    (last of the previous reply) and the new piece."""
    pieces = d.prompt_pieces(user, replies)
    for r, (arm, piece) in enumerate(zip(d.arms, pieces)):
        turns = arm.turns + [k - 1] * len(arm.pending) + [k] * len(piece.token_ids)
        roles = arm.roles + [ASSISTANT] * len(arm.pending) + list(piece.roles)
        probe.col_masks[r] = _column_masks(turns, roles, k)


def capture_attention(
    lm: LoadedModel,
    arm: ArmSpec,
    turns: list[tuple[str, list[int]]],
    system: str | None = None,
    *,
    upto_turn: int | None = None,
    max_size: int | None = None,
) -> tuple[np.ndarray, ArmTranscript]:
    """Attention [L, H, T, T] of one arm over its transcript up to the end of `upto_turn`.

    `max_size=None` gives the exact weights (rows sum to 1); otherwise bucketed for display.
    """
    cap = capture_turn(
        lm,
        [arm],
        [(u, [r]) for u, r in turns],
        system,
        focus_arm=0,
        focus_turn=upto_turn,
        attention=True,
        max_size=max_size,
        curves=False,
    )
    if cap.attention is None:
        raise CaptureError("; ".join(cap.notes) or "attention was not captured")
    return cap.attention, cap.focus


def band_edges(n_layers: int, bands: int = 3) -> list[tuple[int, int]]:
    cuts = [round(i * n_layers / bands) for i in range(bands + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(bands) if cuts[i + 1] > cuts[i]]


# --------------------------------------------------------------------------------------------------
# Labels and the memory-read table
# --------------------------------------------------------------------------------------------------
def token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if not text.strip():
        text = text.replace("\n", "\\n").replace(" ", "·") or tokenizer.convert_ids_to_tokens(int(token_id))
    return text.replace("\n", "\\n")


def token_labels(tokenizer, token_ids: list[int]) -> list[str]:
    return [token_label(tokenizer, t) for t in token_ids]


def slot_label(key, labels: list[str], roles: list[int], msg_turns: list[int]) -> dict:
    """Describe one memory slot: a token position of the arm (int) or a named slot (str)."""
    if isinstance(key, (int, np.integer)) and 0 <= int(key) < len(labels):
        p = int(key)
        return {
            "key": p,
            "text": labels[p],
            "role": ROLES[roles[p]],
            "turn": int(msg_turns[p]),
            "label": f"{labels[p]} @{p} (t{msg_turns[p]} {ROLES[roles[p]]})",
        }
    if isinstance(key, (int, np.integer)):
        return {"key": int(key), "text": str(key), "role": None, "turn": None, "label": f"slot {int(key)}"}
    return {"key": str(key), "text": str(key), "role": None, "turn": None, "label": str(key)}


def memory_read_table(traces: list[ReadTrace], transcript: ArmTranscript, turn: int, tokenizer) -> dict:
    """What the mechanism read for each generated token of `turn`, per layer (generic over ReadTrace).

    The read behind generated token q is the trace at position q-1. Returns, per layer, the slot
    list (union over the reply, in first-seen order; positions sorted) with labels, and weights
    [n_tokens, n_slots] (NaN where no read was made) plus per-head weights [n_tokens, H, n_slots].
    """
    labels = token_labels(tokenizer, transcript.token_ids)
    a, b = transcript.reply_spans[turn]
    gen_positions = list(range(a, b))
    by = {(tr.layer, tr.position): tr for tr in traces}
    layers = sorted({tr.layer for tr in traces})
    out_layers = []
    for layer in layers:
        keys: list = []
        seen = set()
        for q in gen_positions:
            tr = by.get((layer, q - 1))
            if tr is None:
                continue
            for key in tr.slot_keys:
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
        if keys and all(isinstance(k, (int, np.integer)) for k in keys):
            keys = sorted(keys)
        col = {k: i for i, k in enumerate(keys)}
        W = np.full((len(gen_positions), len(keys)), np.nan, np.float32)
        per_head = None
        scalars: list[dict] = []
        for i, q in enumerate(gen_positions):
            tr = by.get((layer, q - 1))
            scalars.append({} if tr is None else dict(tr.scalars))
            if tr is None:
                continue
            W[i] = 0.0
            cols = [col[k] for k in tr.slot_keys]
            W[i, cols] = tr.weights
            if tr.per_head is not None:
                if per_head is None:
                    per_head = np.full((len(gen_positions), tr.per_head.shape[0], len(keys)), np.nan, np.float32)
                per_head[i] = 0.0
                per_head[i][:, cols] = tr.per_head
        out_layers.append(
            {
                "layer": layer,
                "slots": [slot_label(k, labels, transcript.roles, transcript.msg_turns) for k in keys],
                "weights": W,
                "per_head": per_head,
                "scalars": scalars,
            }
        )
    return {
        "turn": turn,
        "positions": gen_positions,
        "tokens": [labels[p] if p < len(labels) else "?" for p in gen_positions],
        "token_ids": [transcript.token_ids[p] for p in gen_positions if p < len(transcript.token_ids)],
        "layers": out_layers,
    }


def scalar_curves(traces: list[ReadTrace]) -> dict:
    """Every named scalar of the traces (surprise, write strength, norms...) as a curve over positions,
    per layer: {"positions": [...], "layers": [{"layer": l, "series": {name: [value | None per position]}}]}.
    Generic over mechanisms and scalar names."""
    positions = sorted({int(tr.position) for tr in traces if tr.scalars})
    index = {p: i for i, p in enumerate(positions)}
    layers: dict[int, dict[str, list]] = {}
    for tr in traces:
        for name, value in tr.scalars.items():
            series = layers.setdefault(int(tr.layer), {}).setdefault(name, [None] * len(positions))
            series[index[int(tr.position)]] = float(value)
    return {"positions": positions, "layers": [{"layer": l, "series": layers[l]} for l in sorted(layers)]}


def own_answer_read_share(traces: list[ReadTrace], transcript: ArmTranscript, turn: int) -> float | None:
    """Mean (over reads and layers) weight a turn's reads put on slots from the arm's earlier answers."""
    roles, mt = transcript.roles, transcript.msg_turns
    vals = []
    for tr in traces:
        w = np.asarray(tr.weights, dtype=np.float64)
        if w.sum() <= 0:
            continue
        keep = [
            isinstance(k, (int, np.integer))
            and 0 <= int(k) < len(roles)
            and roles[int(k)] == ASSISTANT
            and mt[int(k)] < turn
            for k in tr.slot_keys
        ]
        vals.append(float(w[np.asarray(keep, bool)].sum()) if any(keep) else 0.0)
    return float(np.mean(vals)) if vals else None


def turn_summary(cap: TurnCapture) -> list[dict]:
    """Per arm and turn: memory size after the turn, number of reads, mean read weight on own earlier answers."""
    rows = []
    for r, arm in enumerate(cap.arms):
        for k in range(len(arm.reply_spans)):
            tr = cap.traces[r][k] if k < len(cap.traces[r]) else []
            share = own_answer_read_share(tr, arm, k)
            rows.append(
                {
                    "arm": r,
                    "label": arm.label,
                    "turn": k,
                    "memory_size": arm.memory_sizes[k],
                    "n_reads": len(tr),
                    "own_answer_read": share,
                }
            )
    return rows
