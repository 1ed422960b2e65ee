"""Batched multi-arm dialogue: several arms of one model share one KV cache and one forward pass.

Each arm is a batch row with its own token history, mechanism memory, sampling settings and RNG.
Rows grow by different amounts each step (replies differ in length), so every step's new tokens
are left-padded within the step; padding therefore sits in the middle of the cache and is masked by
a 2-D attention mask, and each row carries its own position ids. A turn prefills only its new
tokens: the cache and the mechanisms' memories persist across turns.

The last token sampled in a turn is fed at the start of the next turn (or never, if the dialogue
ends), exactly as `generate` leaves it, so no forward pass is spent on a token nobody reads.

With `window=N` the attention of every arm is limited: after each forward pass every row keeps in
the KV cache only its first `sink` tokens (the attention sink) and its last N tokens; older tokens
are evicted from the cache (the cache and the 2-D mask are re-laid out per row, each row's kept
columns right-aligned, so rows of different lengths stay consistent). Position ids stay the real
positions. A token therefore sees the sink, the N tokens before its forward pass, and the tokens of
its own pass up to itself (in decoding: the sink plus the last N). Mechanisms keep their own memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from .chat import Piece, first_turn, next_turn
from .hooks import BatchContext, MechanismHost, RowBinding
from .mechanisms import MECHANISMS, Mechanism, ReadTrace, RowPlan, StepRow
from .mechanisms.base import ROLE_CODE
from .model import LoadedModel
from .spec import ArmSpec, SamplingSettings
from .weights import WeightsError, shared_weights

ASSISTANT = ROLE_CODE["assistant"]
MAX_MESSAGE_CHARS = 20_000
ATTENTION_SINK = 4  # tokens at the start of every row that a window never evicts


class DialogueError(ValueError):
    """A message or request cannot be run; the message is meant for a person. `arm`: the index of the
    arm it is about, when it is one arm's (e.g. its weights file does not fit its settings)."""

    def __init__(self, message: str, arm: int | None = None):
        super().__init__(message)
        self.arm = arm


def check_message(
    text, what: str = "the message", limit: int | None = MAX_MESSAGE_CHARS, allow_empty: bool = False
) -> None:
    """A message the tokenizer can take: non-empty text, within the limit, valid Unicode."""
    if not isinstance(text, str) or (not allow_empty and not text.strip()):
        raise DialogueError(f"{what} is empty")
    if limit is not None and len(text) > limit:
        raise DialogueError(f"{what} is {len(text):,} characters; the limit is {limit:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DialogueError(
            f"{what} is not valid text: character {e.start + 1} is a lone surrogate (invalid UTF-8 in the input?)"
        ) from None


@dataclass
class ArmReply:
    """One arm's result for one turn: enough, with the arm's spec, to replay it."""

    arm: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # 'eos' | 'length' | 'stopped'
    started_at: float
    ttft_s: float
    duration_s: float
    gen_settings: dict
    traces: list[ReadTrace] = field(default_factory=list)


@dataclass
class StreamEvent:
    """Sent after every decoding step: each arm's reply so far."""

    step: int
    texts: list[str]
    done: list[bool]
    replies: list[ArmReply] | None = None  # set on the last event of a turn
    status: str | None = None  # e.g. "queued, 3 ahead" while a scheduler holds the turn back


@dataclass
class ArmState:
    spec: ArmSpec
    mechanism: Mechanism | None
    token_ids: list[int] = field(default_factory=list)  # fed to the model, in order
    roles: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # sampled but not yet fed
    messages: list[dict] = field(default_factory=list)
    replies: list[ArmReply] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def all_token_ids(self) -> list[int]:
        return self.token_ids + self.pending


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a reply (the generation config may list several)."""
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def decode_reply(tokenizer, ids: list[int], eos: set[int]) -> str:
    """A reply's text: without end-of-turn tokens, and without a half-decoded trailing character."""
    return tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True).rstrip("\ufffd")


def seed_for_turn(seed: int, turn: int) -> int:
    """Each turn draws from its own stream, so a turn replays without replaying earlier sampling."""
    return (seed * 1_000_003 + turn) % (2**63 - 1)


def sample_token(logits: torch.Tensor, s: SamplingSettings, gen: torch.Generator) -> int:
    """Greedy, or temperature + top-p with the exponential race (one draw per vocabulary entry)."""
    if s.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) > s.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return int(torch.argmax(probs / race))


def build_mechanism(spec: ArmSpec, lm: LoadedModel) -> Mechanism | None:
    """The arm's mechanism, with its trained parameters shared per process (engine/weights.py)."""
    if spec.mechanism is None:
        return None
    cls = MECHANISMS[spec.mechanism]
    try:
        weights, _ = shared_weights(cls, spec.settings, lm.model, lm.identity)
        return cls(spec.settings, lm.model, weights)
    except WeightsError as e:
        raise DialogueError(str(e)) from None


@dataclass
class StepInputs:
    """One forward pass of the batch, as the model sees it (the capture reads the same tensors)."""

    ids: torch.Tensor  # [B, T] left-padded within the step
    valid: torch.Tensor  # [B, T] bool: real tokens
    positions: torch.Tensor  # [B, T] RoPE position ids (a row's plan may have edited them)
    starts: list[int]  # per row: the arm's length before this step (sequence index of its first token)
    bindings: list[RowBinding]
    allow: dict[int, torch.Tensor]  # row -> [n, n] extra allowed pairs among its n real tokens
    columns: torch.Tensor  # [B, S] which cache columns are real tokens, after the step
    mask: torch.Tensor  # what the model gets: `columns`, or the 4-D mask when some row edits it


def attention_mask_4d(
    mask2d: torch.Tensor, T: int, allow: dict[int, torch.Tensor], impl: str, dtype: torch.dtype
) -> torch.Tensor:
    """The per-row [B, 1, T, S] mask: causal over the step, padding columns off, plus `allow` pairs.

    Built only when some row edits its mask; rows without edits get exactly the causal mask. A
    padding query row may see itself, so no row is fully masked (its values stay finite).
    """
    B, S = mask2d.shape
    past = S - T
    cols = mask2d.bool()[:, None, :].expand(B, T, S).clone()
    step = torch.ones(T, T, dtype=torch.bool).tril()
    cols[:, :, past:] &= step
    step_valid = mask2d[:, past:].bool()
    for r, extra in allow.items():
        idx = step_valid[r].nonzero().squeeze(-1)
        block = cols[r, :, past:]
        block[idx[:, None], idx[None, :]] |= extra.to(torch.bool).cpu()
    eye = torch.arange(T)
    cols[:, eye, past + eye] |= ~step_valid
    cols = cols[:, None]
    if impl == "eager":  # additive float mask
        return torch.zeros(cols.shape, dtype=dtype).masked_fill(~cols, torch.finfo(dtype).min)
    return cols


def apply_plan(r: int, plan: RowPlan, real: torch.Tensor, pos: torch.Tensor, allow: dict) -> None:
    """Write row r's plan into a step's tensors: its position ids into `pos[r]` at the row's real
    tokens (`real` [T] bool, n of them, wherever padding puts them), its extra pairs into `allow[r]`
    ([n, n], for `attention_mask_4d`). The dialogue and the trainer both plan through this."""
    n = int(real.sum())
    if plan.position_ids is not None:
        if plan.position_ids.shape != (n,):
            raise DialogueError(f"a mechanism planned {tuple(plan.position_ids.shape)} positions for {n} tokens")
        pos[r, real.to(pos.device)] = plan.position_ids.to(pos.device, pos.dtype)
    if plan.allow is not None:
        if plan.allow.shape != (n, n):
            raise DialogueError(f"a mechanism planned a {tuple(plan.allow.shape)} mask for {n} tokens")
        if bool(plan.allow.any()):
            allow[r] = plan.allow.bool().cpu()


def grad_mode(bindings: list[RowBinding]):
    """inference_mode everywhere, except where a mechanism takes gradient steps at test time."""
    return torch.no_grad if any(b.mechanism.needs_grad for b in bindings) else torch.inference_mode


class Dialogue:
    """A conversation with one or more arms of the same model, run batched."""

    def __init__(
        self,
        lm: LoadedModel,
        arms: list[ArmSpec],
        system: str | None = None,
        record_traces: bool = False,
        window: int | None = None,
        sink: int = ATTENTION_SINK,
    ):
        if not arms:
            raise DialogueError("a dialogue needs at least one arm")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise DialogueError(f"window must be a whole number of tokens >= 1 (got {window!r})")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise DialogueError(f"sink must be a whole number of tokens >= 0 (got {sink!r})")
        self.window, self.sink = window, sink
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        n_layers = self.model.config.num_hidden_layers
        for spec in arms:
            spec.validate_for(n_layers)
        self.system = system or None
        self.record_traces = record_traces
        self.host = MechanismHost.of(self.model)
        self.arms: list[ArmState] = []
        for k, spec in enumerate(arms):
            try:
                self.arms.append(ArmState(spec, build_mechanism(spec, lm)))
            except DialogueError as e:
                raise DialogueError(str(e), arm=k) from None
        if self.system:
            for arm in self.arms:
                arm.messages.append({"role": "system", "content": self.system})
        self.device = lm.device
        self.cache = DynamicCache(config=self.model.config)
        self.mask = torch.zeros(len(arms), 0, dtype=torch.long, device=self.device)
        # with a window: which token of its arm each cache column holds (-1: padding), on the CPU
        self.col_tokens = torch.zeros(len(arms), 0, dtype=torch.long)
        self.turn = 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 4096)
        self._stop = [False] * len(arms)
        self._snapshot = None
        self._refed: dict[int, int] = {}  # rows that re-fed their transcript this turn -> its length
        self._prefill_saved = None  # (mask, arms' histories) while a prefill is under way
        self.record_logits: list[list[torch.Tensor]] | None = None  # tests: per arm, each sampled step's logits
        self.last_user: str | None = None

    # -- public API ---------------------------------------------------------------------------
    @property
    def n_arms(self) -> int:
        return len(self.arms)

    def stop_arm(self, index: int) -> None:
        self._stop[index] = True

    def stop_all(self) -> None:
        self._stop = [True] * self.n_arms

    def send(self, user: str, **kwargs) -> list[ArmReply]:
        """Run one turn to the end and return each arm's reply."""
        last = None
        for last in self.stream(user, **kwargs):
            pass
        return last.replies

    def stream(
        self, user: str, *, max_new_tokens: int | None = None, forced: list[list[int]] | None = None
    ) -> Iterator[StreamEvent]:
        """Send `user` to every arm; yield after each step. `forced` replays given reply tokens."""
        run = TurnRun(self, user, max_new_tokens, forced)
        try:
            while True:
                req = run.request()
                event = run.advance(
                    self._forward(req.chunks, req.roles, run.turn, logits_to_keep=1, carried=req.carried)
                )
                if event.replies is not None:
                    break
                yield event
        except GeneratorExit:
            run.close()  # the consumer went away (closed tab, cancelled event): keep what was generated
            raise
        except BaseException:
            run.fail()
            raise
        yield event

    def rollback(self) -> None:
        """Undo the last turn (for 'regenerate'): cache, memories, transcript."""
        if self._snapshot is None:
            raise DialogueError("there is no turn to undo")
        self._restore_snapshot(self._snapshot)
        self._snapshot = None

    def teacher_force(
        self,
        user: str,
        replies: list[list[int]],
        *,
        keep_logits: bool = True,
        on_phase: Callable[[str, list[tuple[int, int]] | None], None] | None = None,
        chunk: int | None = None,
    ) -> list[torch.Tensor] | None:
        """Feed given replies after `user`; return per arm the logits [len(reply), vocab] that predict them.

        Two forward passes: the prompt (whose last position predicts each reply's first token), then
        the replies but their last token. Leaves the dialogue exactly as if the arms had generated
        those replies. `on_phase('prompt', None)` / `on_phase('body', spans)` run before each pass,
        with spans = each arm's reply positions (used by captures); `keep_logits=False` skips the
        vocabulary projection of the body.

        `chunk=C` feeds the body in passes of at most C tokens. It matters only with a window, which
        evicts after each pass: a body token then sees the sink, the last `window` tokens before its
        pass and at most C - 1 of its own pass, so a long forced reply really loses what decoding it
        token by token (C = 1) would lose, instead of seeing the whole prompt from one pass.
        """
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise DialogueError(f"chunk must be a whole number of tokens >= 1 (got {chunk!r})")
        pieces = self._prepare(user, max(1, max(len(r) for r in replies)), replies)
        turn, prompt_ids = self._open_turn(pieces)
        started, t0 = time.time(), time.perf_counter()
        if on_phase is not None:
            on_phase("prompt", None)
        first = self._prefill(pieces, prompt_ids, turn)
        if on_phase is not None:
            on_phase("body", [(a.length, a.length + len(r)) for a, r in zip(self.arms, replies)])
        body = [r[:-1] for r in replies]
        rests = self._forward_body(body, turn, keep_logits, chunk)
        out = None
        if keep_logits:
            out = [torch.cat([first[i, -1:], *(p[i] for p in rests)], 0).float() for i in range(self.n_arms)]
        now = time.perf_counter()
        reasons = ["eos" if r and r[-1] in self.eos_ids else "length" for r in replies]
        self._finish_turn(
            user,
            pieces,
            prompt_ids,
            [list(r) for r in replies],
            reasons,
            started,
            t0,
            0.0,
            [now] * self.n_arms,
            [len(r) for r in replies],
        )
        return out

    def _forward_body(self, body: list[list[int]], turn: int, keep_logits: bool, chunk: int | None) -> list[list]:
        """Feed the forced replies' bodies in passes of at most `chunk` tokens (one pass without);
        per pass, each row's logits for its own tokens of that pass."""
        width = max((len(b) for b in body), default=0)
        step = chunk or max(1, width)
        parts = []
        for s in range(0, max(1, width), step):
            pieces = [b[s : s + step] for b in body]
            logits = self._forward(
                pieces, [[ASSISTANT] * len(p) for p in pieces], turn, logits_to_keep=0 if keep_logits else 1
            )
            T = logits.shape[1]
            parts.append([logits[i, T - len(p) :] if len(p) else logits[i, :0] for i, p in enumerate(pieces)])
        return parts

    def transcript(self, arm: int) -> list[dict]:
        return list(self.arms[arm].messages)

    # -- the door for observers (captures): what they may ask and do, without the internals ------
    def prompt_pieces(self, user: str, replies: list[list[int]]) -> list[Piece]:
        """Each arm's prompt piece for the next turn `user` with these replies to come (validated as
        `teacher_force` validates them); nothing is fed. An arm's prompt also starts with its
        `pending` token (the previous reply's last one), which belongs to the previous turn."""
        return self._prepare(user, max(1, max(len(r) for r in replies)), replies)

    def predicted_lengths(self, turns: list[tuple[str, list[list[int]]]]) -> list[int]:
        """Each arm's transcript length after teacher-forcing `turns` [(user, [reply ids per arm])]
        from here and then `feed_pending`, computed from the tokenisation alone (no forward pass).

        A re-prefilling arm (`Mechanism.reprefill_each_turn`) feeds its transcript again each turn
        but its transcript (positions, token history) stays the same length, so it is counted alike.
        """
        out = []
        for i, arm in enumerate(self.arms):
            messages, total = list(arm.messages), arm.length + len(arm.pending)
            previous = arm.replies[-1].token_ids if arm.replies else None
            for k, (user, replies) in enumerate(turns):
                reply = list(replies[i])
                piece = (
                    first_turn(self.tokenizer, self.system, user)
                    if self.turn + k == 0
                    else next_turn(self.tokenizer, messages, user, previous)
                )
                total += len(piece.token_ids) + len(reply)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": self._decode(reply)}]
                previous = reply
            out.append(total)
        return out

    def feed_pending(self, rows: list[int]) -> None:
        """Feed the pending token (the last reply's last token, otherwise fed at the start of the next
        turn) of the given arms now, so that it is in their transcript and cache; the step runs with
        the mechanisms active, their read traces cleared first."""
        chunks = [list(self.arms[r].pending) if r in rows else [] for r in range(self.n_arms)]
        if not any(chunks):
            return
        for arm in self.arms:
            if arm.mechanism is not None:
                arm.mechanism.traces = []
        self._forward(chunks, [[ASSISTANT] * len(c) for c in chunks], self.turn - 1, 1)
        for r in rows:
            self.arms[r].pending = []

    def before_step(self, step: StepInputs) -> None:
        """Called with each forward step's inputs right before the model runs: `step.ids` [B, T],
        `step.valid` (which of the T positions are real tokens, per row), `step.starts` (each row's
        first position), `step.columns` (the key-column mask after the step), `step.allow` (pairs a
        mechanism's plan lets attend). A subclass that observes its passes overrides it (captures);
        such a dialogue runs alone, never batched with others by the step scheduler."""

    def after_step(self, step: StepInputs) -> None:
        """Called after each step's model call, also when it failed."""

    # -- internals ----------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return decode_reply(self.tokenizer, ids, self.eos_ids)

    def _prepare(self, user: str, max_new_tokens, forced) -> list[Piece]:
        check_message(user)
        if self.turn == 0 and self.system:
            check_message(self.system, "the system prompt", limit=None, allow_empty=True)
        if forced is not None and len(forced) != self.n_arms:
            raise DialogueError(f"forced replies for {len(forced)} arms, but the dialogue has {self.n_arms}")
        pieces = []
        for i, arm in enumerate(self.arms):
            if self.turn == 0:
                piece = first_turn(self.tokenizer, self.system, user)
            else:
                piece = next_turn(self.tokenizer, arm.messages, user, arm.replies[-1].token_ids)
            budget = max_new_tokens or arm.spec.sampling.max_new_tokens
            if forced is not None:
                budget = len(forced[i])
            total = arm.length + len(arm.pending) + len(piece.token_ids) + budget
            if total > self.max_positions:
                raise DialogueError(
                    f"too long for the model's context: this message is {len(piece.token_ids)} tokens, the dialogue "
                    f"so far {arm.length + len(arm.pending)}, plus {budget} new tokens makes {total} "
                    f"> {self.max_positions}; start a new session or shorten the message"
                )
            pieces.append(piece)
        return pieces

    def _open_turn(self, pieces: list[Piece]) -> tuple[int, list[list[int]]]:
        """Snapshot for rollback, tell the mechanisms a turn begins; return the turn and each arm's prompt ids
        (the previous reply's unfed last token, then the new piece)."""
        self._snapshot = self._take_snapshot()
        self._refed = {}
        for arm in self.arms:
            if arm.mechanism is not None:
                arm.mechanism.begin_turn(self.turn)
                arm.mechanism.traces = []
        return self.turn, [
            (a.token_ids if self._reprefills(a) else []) + a.pending + p.token_ids for a, p in zip(self.arms, pieces)
        ]

    def _reprefills(self, arm: ArmState) -> bool:
        """An arm whose mechanism asks to feed the whole transcript again each turn (continuity
        variant=seed, as the published code did), past its first turn."""
        return bool(arm.token_ids) and arm.mechanism is not None and bool(arm.mechanism.reprefill_each_turn)

    def _prefill(self, pieces: list[Piece], prompt_ids: list[list[int]], turn: int) -> torch.Tensor:
        """Feed the turn's prompt; the last position's logits predict each reply's first token."""
        chunks, roles, carried = self._begin_prefill(pieces, prompt_ids)
        try:
            logits = self._forward(chunks, roles, turn, logits_to_keep=1, carried=carried)
        except BaseException:
            self._abort_prefill()
            raise
        self._end_prefill()
        return logits

    def _begin_prefill(self, pieces: list[Piece], prompt_ids: list[list[int]]):
        """The prefill's (chunks, roles, carried), with re-prefilling arms set up to feed again.

        A re-prefilling arm (see `_reprefills`) feeds its whole transcript again from position 0:
        its earlier cache columns are masked off for this and every later step, and its token
        history is rebuilt from the re-fed tokens (the same tokens, with their turn labels kept).
        `_end_prefill` completes the step after the forward, `_abort_prefill` undoes it on failure.
        """
        again = [r for r, a in enumerate(self.arms) if self._reprefills(a)]
        roles = [
            ([] if r not in again else list(a.roles)) + [ASSISTANT] * len(a.pending) + p.roles
            for r, (a, p) in enumerate(zip(self.arms, pieces))
        ]
        carried = [len(a.pending) + (a.length if r in again else 0) for r, a in enumerate(self.arms)]
        saved = {r: (self.arms[r].token_ids, self.arms[r].roles, self.arms[r].turns) for r in again}
        self._refed = {r: len(saved[r][0]) for r in again}  # ArmReply.prompt_token_ids: the new tokens only
        self._prefill_saved = (self.mask, saved)
        if again:
            mask = self.mask.clone()
            mask[again] = 0
            self.mask = mask
            for r in again:
                self.arms[r].token_ids, self.arms[r].roles, self.arms[r].turns = [], [], []
        return prompt_ids, roles, carried

    def _abort_prefill(self) -> None:
        if self._prefill_saved is None:
            return
        self.mask, saved = self._prefill_saved
        for r, (ids, rl, tn) in saved.items():
            self.arms[r].token_ids, self.arms[r].roles, self.arms[r].turns = ids, rl, tn
        self._prefill_saved = None

    def _end_prefill(self) -> None:
        _, saved = self._prefill_saved
        for r, (_, _, old_turns) in saved.items():
            arm = self.arms[r]
            arm.turns = old_turns + arm.turns[len(old_turns) :]
        for arm in self.arms:
            arm.pending = []
        self._prefill_saved = None

    def _forward(
        self,
        chunks: list[list[int]],
        roles: list[list[int]],
        turn: int,
        logits_to_keep: int,
        carried: list[int] | None = None,
    ):
        """Append each row's chunk (left-padded within the step) and return the logits.

        `carried[r]` leading tokens of row r are the previous reply's last token, fed now: they
        belong to the previous turn.
        """
        step = self._step_inputs(chunks, roles, turn)
        logits = self._run_model(step, logits_to_keep)
        self._absorb_step(step, chunks, roles, turn, carried)
        return logits

    def _run_model(self, step: StepInputs, logits_to_keep: int) -> torch.Tensor:
        """The model call of one step on this dialogue's own cache."""
        self.before_step(step)
        try:
            with grad_mode(step.bindings)(), self.host.use(BatchContext(step.bindings)):
                out = self.model(
                    input_ids=step.ids.to(self.device),
                    attention_mask=step.mask,
                    position_ids=step.positions.to(self.device),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=logits_to_keep,
                )
        finally:
            self.after_step(step)
        return out.logits

    def _absorb_step(
        self, step: StepInputs, chunks: list[list[int]], roles: list[list[int]], turn: int, carried: list[int] | None
    ) -> None:
        """After a step's forward (alone or batched with other dialogues): the mask, the window, the
        arms' token histories."""
        self.mask = step.columns
        if self.window is not None:
            self._track_and_evict(step)
        for r, (chunk, role) in enumerate(zip(chunks, roles)):
            arm = self.arms[r]
            arm.token_ids += list(chunk)
            arm.roles += list(role)
            n_prev = carried[r] if carried else 0
            arm.turns += [turn - 1] * n_prev + [turn] * (len(chunk) - n_prev)

    def _step_inputs(
        self, chunks: list[list[int]], roles: list[list[int]], turn: int, width: int | None = None
    ) -> StepInputs:
        """The batch tensors of one step, with every active arm's plan (positions, mask edits) applied.
        `width`: the step's length T when it runs batched with other dialogues (default: the longest chunk)."""
        B = self.n_arms
        T = max(1, max(len(c) for c in chunks), width or 0)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        pos = torch.zeros(B, T, dtype=torch.long)
        role_t = torch.full((B, T), ROLE_CODE["template"], dtype=torch.long)
        for r, (chunk, role) in enumerate(zip(chunks, roles)):
            n, start = len(chunk), self.arms[r].length
            pos[r] = start  # padding gets the row's next position; it is masked anyway
            if n:
                ids[r, T - n :] = torch.tensor(chunk)
                valid[r, T - n :] = True
                pos[r, T - n :] = torch.arange(start, start + n)
                role_t[r, T - n :] = torch.tensor(role)
        bindings, allow = [], {}
        for r, arm in enumerate(self.arms):
            if arm.mechanism is not None and arm.mechanism.active and chunks[r]:
                keep = valid[r]
                info = StepRow(
                    positions=pos[r, keep].to(self.device),
                    roles=role_t[r, keep].to(self.device),
                    token_ids=ids[r, keep].to(self.device),
                    turn=turn,
                    record=self.record_traces,
                )
                plan = arm.mechanism.plan(info)
                if plan is not None:
                    apply_plan(r, plan, valid[r], pos, allow)
                bindings.append(RowBinding(r, arm.mechanism, valid[r].to(self.device), info))
        columns = torch.cat([self.mask, valid.long().to(self.device)], dim=1)
        mask = columns
        if allow:
            mask = attention_mask_4d(
                columns.cpu(), T, allow, self.model.config._attn_implementation, self.model.dtype
            ).to(self.device)
        return StepInputs(ids, valid, pos, [a.length for a in self.arms], bindings, allow, columns, mask)

    def _track_and_evict(self, step: StepInputs) -> None:
        """Window: file this step's columns under their token indices, then evict every row's tokens
        outside its sink + last `window`, re-laying out the cache and the mask (rows right-aligned)."""
        B, T = step.valid.shape
        new = torch.full((B, T), -1, dtype=torch.long)
        lengths = []
        for r in range(B):
            n = int(step.valid[r].sum())
            start = step.starts[r]
            new[r, T - n :] = torch.arange(start, start + n)
            lengths.append(start + n)
        cols = torch.cat([self.col_tokens, new], 1)
        keep = (cols >= 0) & ((cols < self.sink) | (cols >= torch.tensor(lengths)[:, None] - self.window))
        counts = keep.sum(1)
        width = int(counts.max()) if B else 0
        if not bool(((cols >= 0) & ~keep).any()) and not bool((cols < 0).all(0).any()):
            self.col_tokens = cols  # nothing to evict and no column that is padding in every row
            return
        index = torch.zeros(B, width, dtype=torch.long)
        out_tokens = torch.full((B, width), -1, dtype=torch.long)
        for r in range(B):
            idx = keep[r].nonzero().squeeze(-1)
            index[r, width - idx.numel() :] = idx
            out_tokens[r, width - idx.numel() :] = cols[r, idx]
        valid = out_tokens >= 0
        dev_index = index.to(self.device)
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False) or layer.keys.numel() == 0:
                continue
            g = dev_index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width
        self.mask = valid.long().to(self.device)
        self.col_tokens = out_tokens

    def cache_view(self, row: int) -> list[int]:
        """The token indices (= positions) of `row` that the KV cache holds, in column order."""
        if self.window is None:
            return list(range(self.arms[row].length))
        return [int(t) for t in self.col_tokens[row] if t >= 0]

    def _finish_turn(
        self, user, pieces, prompt_ids, replies_ids, reasons, started, t0, ttft, finished_at, limits
    ) -> list[ArmReply]:
        results = []
        for i, arm in enumerate(self.arms):
            ids = replies_ids[i]
            arm.pending = ids[-1:]  # the reply's last token is not fed yet; it opens the next turn
            text = self._decode(ids)
            arm.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
            traces = arm.mechanism.traces if arm.mechanism is not None else []
            reply = ArmReply(
                arm=i,
                text=text,
                token_ids=list(ids),
                prompt_token_ids=list(prompt_ids[i][self._refed.get(i, 0) :]),
                finish_reason=reasons[i] or "length",
                started_at=started,
                ttft_s=ttft,
                duration_s=(finished_at[i] or time.perf_counter()) - t0,
                gen_settings={
                    **arm.spec.sampling.model_dump(),
                    "max_new_tokens": limits[i],
                    "turn_seed": seed_for_turn(arm.spec.sampling.seed, self.turn),
                },
                traces=list(traces),
            )
            arm.replies.append(reply)
            results.append(reply)
        self.turn += 1
        return results

    def _take_snapshot(self):
        # With a window the cache is re-laid out, so cropping cannot undo a turn; the layers' tensors
        # are kept by reference instead (updates and evictions make new tensors, never write in place).
        kv = (
            None
            if self.window is None
            else [
                (layer.keys, layer.values) if getattr(layer, "is_initialized", False) else None
                for layer in self.cache.layers
            ]
        )
        return {
            "cache_len": self.mask.shape[1],
            "mask": self.mask,
            "turn": self.turn,
            "kv": kv,
            "col_tokens": self.col_tokens,
            "arms": [
                (
                    a.length,
                    list(a.pending),
                    len(a.messages),
                    len(a.replies),
                    None if a.mechanism is None else a.mechanism.snapshot(),
                )
                for a in self.arms
            ],
        }

    def _restore_snapshot(self, snap) -> None:
        # Crop every layer to the snapshot's length: a forward that failed midway left the layers
        # below the failure one step longer than those above it.
        n = snap["cache_len"]
        kv = snap.get("kv")
        for i, layer in enumerate(self.cache.layers):
            if kv is not None and i < len(kv) and kv[i] is not None:
                layer.keys, layer.values = kv[i]
                if hasattr(layer, "cumulative_length"):
                    layer.cumulative_length = n
            elif getattr(layer, "is_initialized", False) and layer.keys.shape[-2] > n:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        self.mask, self.turn, self.col_tokens = snap["mask"], snap["turn"], snap["col_tokens"]
        for arm, (length, pending, n_msg, n_rep, mech_state) in zip(self.arms, snap["arms"]):
            del arm.token_ids[length:], arm.roles[length:], arm.turns[length:]
            arm.pending = pending
            del arm.messages[n_msg:], arm.replies[n_rep:]
            if arm.mechanism is not None:
                arm.mechanism.restore(mech_state)


@dataclass
class StepRequest:
    """What a turn feeds in its next forward pass: per arm its new tokens, their roles, and how many
    leading tokens belong to the previous turn (`carried`, prefill only)."""

    chunks: list[list[int]]
    roles: list[list[int]]
    carried: list[int] | None = None
    prefill: bool = False

    @property
    def width(self) -> int:
        return max(1, max(len(c) for c in self.chunks))


class TurnRun:
    """One turn of a dialogue as a sequence of steps: `request()` the next forward's inputs, run
    them (alone, or in one pass with other dialogues' rows), `advance(logits)` to sample.

    `Dialogue.stream` drives one at a time; the step scheduler (engine/scheduler.py) drives the
    turns of many sessions together. Building one validates the message (DialogueError) and opens
    the turn (snapshot for rollback); `close()` ends it early keeping what was generated, `fail()`
    undoes it.
    """

    def __init__(
        self, dialogue: Dialogue, user: str, max_new_tokens: int | None = None, forced: list[list[int]] | None = None
    ):
        d = self.d = dialogue
        self.user, self.forced = user, forced
        self.pieces = d._prepare(user, max_new_tokens, forced)
        d._stop = [False] * d.n_arms
        self.turn, self.prompt_ids = d._open_turn(self.pieces)
        n = d.n_arms
        self.limits = [max_new_tokens or arm.spec.sampling.max_new_tokens for arm in d.arms]
        if forced is not None:
            self.limits = [len(f) for f in forced]
        self.gens = [torch.Generator().manual_seed(seed_for_turn(a.spec.sampling.seed, self.turn)) for a in d.arms]
        self.replies_ids: list[list[int]] = [[] for _ in range(n)]
        self.done, self.reasons, self.texts = [False] * n, [""] * n, [""] * n
        self.started, self.t0 = time.time(), time.perf_counter()
        self.ttft: float | None = None
        self.finished_at = [0.0] * n
        self.step = 0
        self.prefilled = False
        self.replies: list[ArmReply] | None = None
        self._request: StepRequest | None = None

    @property
    def finished(self) -> bool:
        return self.replies is not None

    def request(self) -> StepRequest:
        """The inputs of this turn's next forward pass (the same object until `advance`)."""
        if self._request is None:
            if not self.prefilled:
                chunks, roles, carried = self.d._begin_prefill(self.pieces, self.prompt_ids)
                self._request = StepRequest(chunks, roles, carried, prefill=True)
            else:
                chunks = [[] if self.done[i] else [self.replies_ids[i][-1]] for i in range(self.d.n_arms)]
                self._request = StepRequest(chunks, [[ASSISTANT] * len(c) for c in chunks])
        return self._request

    def advance(self, logits: torch.Tensor) -> StreamEvent:
        """Sample each running arm's next token from the step's last-position logits [B, 1+, V]."""
        d = self.d
        if not self.prefilled:
            d._end_prefill()
            self.prefilled = True
        self._request = None
        for i, arm in enumerate(d.arms):
            if self.done[i]:
                continue
            if d._stop[i]:
                self.done[i], self.reasons[i], self.finished_at[i] = True, "stopped", time.perf_counter()
                continue
            if self.forced is not None:
                tok = self.forced[i][len(self.replies_ids[i])]
            else:
                tok = sample_token(logits[i, -1], arm.spec.sampling, self.gens[i])
            if d.record_logits is not None:
                d.record_logits[i].append(logits[i, -1].detach().float().cpu().clone())
            self.replies_ids[i].append(tok)
            if tok in d.eos_ids:
                self.done[i], self.reasons[i] = True, "eos"
            elif len(self.replies_ids[i]) >= self.limits[i]:
                self.done[i], self.reasons[i] = True, "length"
            if self.done[i]:
                self.finished_at[i] = time.perf_counter()
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.texts = [d._decode(ids) for ids in self.replies_ids]
        self.step += 1
        if all(self.done):
            return self._finish()
        return StreamEvent(self.step, list(self.texts), list(self.done))

    def close(self) -> StreamEvent | None:
        """End the turn now, every running arm 'stopped', keeping what was generated (None: nothing
        was generated yet, so the turn is undone as if never sent)."""
        if self.finished:
            return None
        if not self.prefilled:
            self.fail()
            return None
        for i in range(self.d.n_arms):
            if not self.done[i]:
                self.done[i], self.reasons[i], self.finished_at[i] = True, "stopped", time.perf_counter()
        return self._finish()

    def fail(self) -> None:
        """Undo the turn: the dialogue is as it was before it (a failed forward, a cancelled prefill)."""
        d = self.d
        d._abort_prefill()
        if d._snapshot is not None:
            d._restore_snapshot(d._snapshot)
        d._snapshot = None  # the failed turn is already undone: nothing left to roll back
        self._request = None

    def _finish(self) -> StreamEvent:
        self.replies = self.d._finish_turn(
            self.user,
            self.pieces,
            self.prompt_ids,
            self.replies_ids,
            self.reasons,
            self.started,
            self.t0,
            self.ttft or 0.0,
            self.finished_at,
            self.limits,
        )
        return StreamEvent(self.step, list(self.texts), list(self.done), self.replies)
