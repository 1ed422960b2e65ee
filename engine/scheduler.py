"""The step scheduler: one per loaded model, one thread running the model for every open session.

Sessions (a lab tab's `Dialogue`, an experiment run's dialogue) submit turns; the scheduler runs
them step by step, and each step is one forward pass over the rows of *all* active turns (a
session's rows are its arms). This is continuous batching in the engine's own terms: a turn joins
at the next step boundary (its prefill batched with the other joining turns, or with the decode
rows when padding them to the prefill's length costs less than a second pass), a turn that ends
leaves at once, and the others go on. Each session keeps its own KV cache, mask, window and
mechanism state; for a step the caches of the sessions in the pass are laid side by side (left-
padded to one width, padding masked) and split back afterwards, and while the same sessions step
together the joined cache is reused instead of rebuilt.

Exactness: a row's computation in a joined pass is the same as alone except for masked padding and
the batch shape, so greedy and seeded-sampling tokens are identical to the session run alone, and
logits agree within float tolerance (bitwise equality across different batch mixes would need
batch-invariant kernels; see the README). A session alone in its pass runs exactly the plain
`Dialogue` step on its own cache.

Back-pressure: at most `max_rows` rows are active; a turn that does not fit waits in order, and its
stream says so ("queued, 3 ahead"). Work that needs the whole model between steps (an Inspect
capture) takes `exclusive()`: the scheduler finishes its step and waits until it is given back.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache

from .dialogue import ArmReply, Dialogue, DialogueError, StepRequest, StreamEvent, TurnRun, attention_mask_4d, grad_mode
from .hooks import BatchContext, RowBinding
from .model import LoadedModel

MERGE_OVERHEAD_TOKENS = 16  # a second forward pass costs about as much as this many padded tokens (CPU)
MAX_ROWS_CEILING = 64
TYPICAL_ROW_TOKENS = 2048  # the dialogue length a row's cache is sized for when estimating the cap


class SchedulerClosed(DialogueError):
    """The scheduler was shut down (the lab is stopping)."""


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token of one row takes over all layers."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return 2 * c.num_hidden_layers * heads * head_dim * max(size, 2)


def free_memory_bytes(device) -> int:
    """Free accelerator memory on a GPU; available RAM on the CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_max_rows(lm: LoadedModel) -> int:
    """A row cap from free memory: half of it over the KV cache of a `TYPICAL_ROW_TOKENS` dialogue
    (bounded to 2..64). An estimate: activations and mechanism state are not counted."""
    per_row = kv_bytes_per_token(lm.model) * min(
        TYPICAL_ROW_TOKENS, getattr(lm.model.config, "max_position_embeddings", 4096)
    )
    return max(2, min(MAX_ROWS_CEILING, int(0.5 * free_memory_bytes(lm.device) // max(1, per_row))))


class ModelLease:
    """`with lease:` holds the model between two steps of the scheduler (see `StepScheduler.exclusive`)."""

    def __init__(self, scheduler: "StepScheduler"):
        self.scheduler = scheduler

    def __enter__(self):
        self.scheduler._acquire()
        return self

    def __exit__(self, *exc):
        self.scheduler._release()
        return False

    def locked(self) -> bool:
        return self.scheduler._owner is not None


_END = object()  # a turn that ended without replies (cancelled before it produced anything)


@dataclass(eq=False)
class ScheduledTurn:
    """A submitted turn: its events go to `events`; `done` is set once it left the scheduler."""

    dialogue: Dialogue
    user: str
    max_new_tokens: int | None = None
    forced: list[list[int]] | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    run: TurnRun | None = None
    cancelled: bool = False
    replies: list[ArmReply] | None = None
    error: BaseException | None = None
    position: int | None = None  # turns ahead of it in the queue (None: running)

    @property
    def rows(self) -> int:
        return self.dialogue.n_arms

    def _emit(self, item) -> None:
        self.events.put(item)

    def _end(self, event: StreamEvent | None = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
            self._emit(error)
        elif event is not None and event.replies is not None:
            self.replies = event.replies
            self._emit(event)
        else:
            self._emit(_END)
        self.done.set()


class StepScheduler:
    """Batches the turns of every session on one model; see the module docstring.

    `thread=False` leaves the stepping to the caller (`step()`), for tests that place joins and
    leaves at chosen steps.
    """

    def __init__(
        self,
        lm: LoadedModel,
        max_rows: int | None = None,
        *,
        thread: bool = True,
        merge_overhead_tokens: int = MERGE_OVERHEAD_TOKENS,
    ):
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise DialogueError(f"the row cap must be a whole number >= 1 (got {max_rows!r})")
        self.lm = lm
        self.max_rows = max_rows or default_max_rows(lm)
        self.merge_overhead_tokens = merge_overhead_tokens
        self._cv = threading.Condition()
        self._waiting: deque[ScheduledTurn] = deque()
        self._active: list[ScheduledTurn] = []
        self._exclusive_wanted = 0
        self._owner: threading.Thread | None = None  # who holds the model between steps
        self._depth = 0
        self.lease = ModelLease(self)
        self._stepping = False
        self._closed = False
        self._joined: tuple | None = None  # (sessions, cache, handed-out layer tensors) of the last joined pass
        self.steps = 0  # forward passes run
        self.step_rows: list[int] = []  # rows per pass, for the benchmark (last 10_000)
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="step-scheduler", daemon=True)
            self._thread.start()

    # -- what sessions call -------------------------------------------------------------------
    def submit(
        self, dialogue: Dialogue, user: str, *, max_new_tokens: int | None = None, forced: list[list[int]] | None = None
    ) -> ScheduledTurn:
        """Queue a turn of `dialogue`; its events arrive on the returned turn's `events` queue."""
        if dialogue.model is not self.lm.model:
            raise DialogueError("this dialogue belongs to another model than the scheduler's")
        job = ScheduledTurn(dialogue, user, max_new_tokens, forced)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the lab is shutting down; the turn was not run")
            if any(j.dialogue is dialogue for j in (*self._active, *self._waiting)):
                raise DialogueError("a turn is already running for this session; wait for it or press Stop")
            self._waiting.append(job)  # told its place only if the next step cannot take it
            self._cv.notify_all()
        return job

    def stream(
        self, dialogue: Dialogue, user: str, *, max_new_tokens: int | None = None, forced: list[list[int]] | None = None
    ) -> Iterator[StreamEvent]:
        """`Dialogue.stream` through the scheduler: the same events (status events while queued).

        Closing the iterator early (a closed tab) cancels the turn: queued, it never runs; running,
        its rows stop at the next step and the turn keeps what was generated. Either way the turn
        has left the scheduler when `close()` returns.
        """
        job = self.submit(dialogue, user, max_new_tokens=max_new_tokens, forced=forced)
        try:
            while True:
                items = [job.events.get()]
                while True:  # a slow reader gets the newest state, never a backlog
                    try:
                        items.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is _END:
                        return
                    if item.replies is not None:
                        yield item
                        return
                yield items[-1]
        finally:
            if not job.done.is_set():
                self.cancel(job)
                if self._thread is not None and threading.current_thread() is not self._thread:
                    job.done.wait(timeout=120)

    def send(self, dialogue: Dialogue, user: str, **kwargs) -> list[ArmReply]:
        last = None
        for last in self.stream(dialogue, user, **kwargs):
            pass
        if last is None or last.replies is None:
            raise DialogueError("the turn was cancelled before it produced a reply")
        return last.replies

    def cancel(self, job: ScheduledTurn) -> None:
        """Stop a turn: removed from the queue, or its rows stopped at the next step."""
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._post_positions()
                job._end()
            self._cv.notify_all()

    def cancel_queued(self, dialogue: Dialogue) -> bool:
        """Withdraw `dialogue`'s turn if it is still waiting (Stop pressed while queued)."""
        with self._cv:
            job = next((j for j in self._waiting if j.dialogue is dialogue), None)
        if job is None:
            return False
        self.cancel(job)
        return True

    def exclusive(self) -> "ModelLease":
        """The model to the caller alone, between two steps (an Inspect capture, a probe): a
        reusable, re-entrant context manager (`with scheduler.exclusive(): ...`)."""
        return self.lease

    def _acquire(self) -> None:
        me = threading.current_thread()
        if me is self._thread or self._owner is me:
            self._depth += 1  # on the model's thread already, or nested
            return
        with self._cv:
            self._exclusive_wanted += 1
            while self._stepping or self._owner is not None:
                self._cv.wait()
            self._owner, self._depth = me, 1

    def _release(self) -> None:
        me = threading.current_thread()
        if me is self._thread:
            self._depth -= 1
            return
        with self._cv:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._exclusive_wanted -= 1
                self._cv.notify_all()

    def status(self) -> dict:
        """What the scheduler holds now: active turns and rows, queued turns, the cap."""
        with self._cv:
            return {
                "active_turns": len(self._active),
                "active_rows": sum(j.rows for j in self._active),
                "queued_turns": len(self._waiting),
                "max_rows": self.max_rows,
                "steps": self.steps,
            }

    def close(self) -> None:
        """Stop the thread; queued and running turns end with SchedulerClosed."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for job in waiting:
            job._end(error=SchedulerClosed("the lab is shutting down; the turn was not run"))
        if self._thread is not None:
            self._thread.join(timeout=60)
        for job in list(self._active):
            self._fail(job, SchedulerClosed("the lab shut down during this turn; it was undone"))

    # -- the model's thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._exclusive_wanted or not (self._waiting or self._active)):
                    self._cv.wait()
                if self._closed:
                    return
                self._stepping = True
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - never die; nobody may wait for a turn that cannot end
                self._joined = None
                for job in list(self._active):
                    self._fail(job, e)
            finally:
                with self._cv:
                    self._stepping = False
                    self._cv.notify_all()

    def step(self) -> bool:
        """Admit queued turns that fit, end cancelled ones, run one step of every active turn.
        Returns whether there was anything to do."""
        admitted = self._admit()
        for job in admitted:
            try:
                job.run = TurnRun(job.dialogue, job.user, job.max_new_tokens, job.forced)
            except Exception as e:  # noqa: BLE001 - a refused message: the caller gets the one-line reason
                job._end(error=e)
                continue
            self._active.append(job)
        for job in [j for j in self._active if j.cancelled]:
            try:
                self._leave(job, job.run.close())
            except Exception as e:  # noqa: BLE001
                self._fail(job, e)
        if not self._active:
            return bool(admitted)
        for group in self._plan([(j, j.run.request()) for j in self._active]):
            try:
                all_logits = self._forward(group)
            except Exception as e:  # noqa: BLE001 - the pass failed: each turn in it is undone and told why
                self._joined = None
                for job, _ in group:
                    self._fail(job, e)
                continue
            for (job, _), logits in zip(group, all_logits):
                try:
                    event = job.run.advance(logits)
                except Exception as e:  # noqa: BLE001
                    self._fail(job, e)
                    continue
                if event.replies is not None:
                    self._leave(job, event)
                else:
                    job._emit(event)
        return True

    def _admit(self) -> list[ScheduledTurn]:
        """Move queued turns into the batch in order while their rows fit under the cap (a turn
        larger than the cap runs alone)."""
        with self._cv:
            rows = sum(j.rows for j in self._active)
            admitted = []
            while self._waiting:
                job = self._waiting[0]
                if (self._active or admitted) and rows + job.rows > self.max_rows:
                    break
                self._waiting.popleft()
                job.position = None
                admitted.append(job)
                rows += job.rows
            self._post_positions()
            return admitted

    def _post_positions(self) -> None:
        """Tell each queued turn how many are ahead of it, when that changed (caller holds _cv)."""
        for k, job in enumerate(self._waiting):
            if job.position != k:
                job.position = k
                status = f"queued, {k} ahead" if k else "queued, next in line"
                n = job.rows
                job._emit(StreamEvent(0, [""] * n, [False] * n, status=status))

    def _fail(self, job: ScheduledTurn, error: BaseException) -> None:
        """End a turn whose step failed: undone (as far as its dialogue allows) and told why."""
        try:
            job.run.fail()
        except Exception:  # noqa: BLE001 - a dialogue too broken to undo still must not hang its caller
            pass
        if job in self._active:
            self._active.remove(job)
        job._end(error=error)

    def _leave(self, job: ScheduledTurn, event: StreamEvent | None = None, error: BaseException | None = None):
        if job in self._active:
            self._active.remove(job)
        _own_cache(job.dialogue)
        job._end(event, error)

    # -- one step's passes ----------------------------------------------------------------------
    def _plan(self, reqs: list[tuple[ScheduledTurn, StepRequest]]) -> list[list[tuple[ScheduledTurn, StepRequest]]]:
        """One pass for everyone, or two (prefills, decodes) when padding the decode rows to the
        prefills' length would cost more than a second pass. Sessions that cannot share a pass
        (a dialogue that observes its own passes, e.g. a capture) run alone."""
        alone = [[r] for r in reqs if not _joinable(r[0].dialogue)]
        rest = [r for r in reqs if _joinable(r[0].dialogue)]
        pre = [r for r in rest if r[1].prefill]
        dec = [r for r in rest if not r[1].prefill]
        if not pre or not dec:
            return alone + ([rest] if rest else [])
        rows = lambda g: sum(j.rows for j, _ in g)  # noqa: E731
        width = lambda g: max(q.width for _, q in g)  # noqa: E731
        joined = rows(rest) * width(rest)
        split = rows(pre) * width(pre) + rows(dec) * width(dec) + self.merge_overhead_tokens
        return alone + ([rest] if joined <= split else [pre, dec])

    def _forward(self, group: list[tuple[ScheduledTurn, StepRequest]]) -> list[torch.Tensor]:
        """One forward pass for the group's rows; each turn's last-position logits."""
        self.steps += 1
        self.step_rows = (self.step_rows + [sum(j.rows for j, _ in group)])[-10_000:]
        if len(group) == 1:
            job, req = group[0]
            self._joined = None
            return [job.dialogue._forward(req.chunks, req.roles, job.run.turn, logits_to_keep=1, carried=req.carried)]
        model = self.lm.model
        T = max(req.width for _, req in group)
        dialogues = [job.dialogue for job, _ in group]
        steps = [job.dialogue._step_inputs(req.chunks, req.roles, job.run.turn, width=T) for job, req in group]
        cache, offsets = self._joined_cache(dialogues)
        S = cache.get_seq_length() if cache is not None else 0
        rows, bindings, allow, columns = [], [], {}, []
        r0 = 0
        for d, st, off in zip(dialogues, steps, offsets):
            rows.append((r0, r0 + d.n_arms))
            bindings += [RowBinding(b.row + r0, b.mechanism, b.valid, b.info) for b in st.bindings]
            allow.update({r + r0: a for r, a in st.allow.items()})
            columns.append(
                torch.cat([torch.zeros(d.n_arms, off, dtype=st.columns.dtype, device=st.columns.device), st.columns], 1)
            )
            r0 += d.n_arms
        mask2d = torch.cat(columns, 0)
        assert mask2d.shape[1] == S + T, (mask2d.shape, S, T)
        mask = mask2d
        if allow:
            mask = attention_mask_4d(mask2d.cpu(), T, allow, model.config._attn_implementation, model.dtype).to(
                self.lm.device
            )
        ids = torch.cat([st.ids for st in steps], 0).to(self.lm.device)
        positions = torch.cat([st.positions for st in steps], 0).to(self.lm.device)
        if cache is None:
            cache = DynamicCache(config=model.config)
        host = dialogues[0].host
        with grad_mode(bindings)(), host.use(BatchContext(bindings)):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        handed = []
        for d, (a, b), off in zip(dialogues, rows, offsets):
            mine = []
            for layer, joined in zip(d.cache.layers, cache.layers):
                _set_layer(layer, joined.keys[a:b, :, off:, :], joined.values[a:b, :, off:, :])
                mine.append((layer.keys, layer.values))
            handed.append(mine)
        for (job, req), st in zip(group, steps):
            job.dialogue._absorb_step(st, req.chunks, req.roles, job.run.turn, req.carried)
        self._joined = (tuple(dialogues), cache, offsets, handed)
        return [out.logits[a:b] for a, b in rows]

    def _joined_cache(self, dialogues: list[Dialogue]) -> tuple[DynamicCache | None, list[int]]:
        """The sessions' caches side by side, each left-padded to the widest (padding is masked).
        Reused from the last pass when the same sessions step together and none touched its cache
        since (no window eviction, no rollback)."""
        if self._joined is not None:
            prev, cache, offsets, handed = self._joined
            if prev == tuple(dialogues) and all(
                layer.keys is k and layer.values is v
                for d, mine in zip(dialogues, handed)
                for layer, (k, v) in zip(d.cache.layers, mine)
            ):
                return cache, offsets
        self._joined = None
        widths = [d.mask.shape[1] for d in dialogues]
        S = max(widths)
        offsets = [S - w for w in widths]
        if S == 0:
            return None, offsets
        cache = DynamicCache(config=self.lm.model.config)
        for i, layer in enumerate(cache.layers):
            like = next(d.cache.layers[i] for d, w in zip(dialogues, widths) if w)
            keys, values = [], []
            for d, w in zip(dialogues, widths):
                if w:
                    keys.append(_pad_left(d.cache.layers[i].keys, S))
                    values.append(_pad_left(d.cache.layers[i].values, S))
                else:  # a first turn: nothing cached yet, all padding
                    keys.append(like.keys.new_zeros((d.n_arms, like.keys.shape[1], S, like.keys.shape[3])))
                    values.append(like.values.new_zeros((d.n_arms, like.values.shape[1], S, like.values.shape[3])))
            _set_layer(layer, torch.cat(keys, 0), torch.cat(values, 0))
        return cache, offsets


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, width, D] with zeros on the left of the sequence axis."""
    n = width - t.shape[2]
    if n == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], 2)


def _set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if not getattr(layer, "is_initialized", False):
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = keys.shape[-2]


def _joinable(d: Dialogue) -> bool:
    """A dialogue can share a pass when it does not observe its own passes (captures do) and its
    cache holds every column its mask describes (no layer that trims itself, e.g. sliding layers)."""
    if type(d).before_step is not Dialogue.before_step or type(d).after_step is not Dialogue.after_step:
        return False
    width = d.mask.shape[1]
    for layer in d.cache.layers:
        if (
            getattr(layer, "is_sliding", False)
            and getattr(layer, "sliding_window", None) is not None
            and width >= layer.sliding_window - 1
        ):
            return False
        if (
            width
            and getattr(layer, "is_initialized", False)
            and layer.keys is not None
            and layer.keys.numel()
            and layer.keys.shape[-2] != width
        ):
            return False
    return True


def _own_cache(d: Dialogue) -> None:
    """A session leaving the batch copies its cache out of the joined tensors, so they can be freed."""
    for layer in d.cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys._base is not None:
            layer.keys = layer.keys.clone(memory_format=torch.contiguous_format)
            layer.values = layer.values.clone(memory_format=torch.contiguous_format)


def scheduler_from_env(lm: LoadedModel, max_rows: int | None = None) -> StepScheduler:
    """The lab's scheduler: `max_rows`, else $LAB_MAX_ROWS, else the memory estimate."""
    if max_rows is None and os.environ.get("LAB_MAX_ROWS", "").strip():
        try:
            max_rows = int(os.environ["LAB_MAX_ROWS"])
        except ValueError:
            raise DialogueError(f"LAB_MAX_ROWS must be a whole number, not {os.environ['LAB_MAX_ROWS']!r}") from None
    return StepScheduler(lm, max_rows)
