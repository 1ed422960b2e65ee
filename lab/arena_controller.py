"""One browser tab's Arena conversation, without Gradio: start, stream, log, regenerate, reveal, resume.

`ArenaSession` holds the `Dialogue` of 2-4 arms, its `SessionRecorder` (experiments/record.py) and
the turns so far. Pane p shows arm `order[p]`: the identity, or in blind mode a permutation drawn
when the session starts (stored as the session's `pane_order`: pane position -> arm index). Until
Reveal a blind session names its panes only by letter, everywhere.

The database session is created when the first turn has been generated (a refused first message
leaves nothing behind). If creating it or logging a turn fails (a locked database), the turn stays
in memory and the next turn retries: the session is created then and every unlogged turn is written
in order, so nothing generated is lost.

`ArenaSession.resume` reopens a logged session: the arms are rebuilt from the logged tokens through
the same batched step schedule as the original run (`Dialogue.stream(forced=...)`, as replay does),
so the next turn continues the same conversation and is appended to the same session.

The Gradio code (lab/arena.py) keeps only layout and wiring.
"""

from __future__ import annotations

import html
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from db import STANCE_LABELS, Store, StoreError
from db.blind import draw_pane_order, is_revealed, pane_letter, reveal_mapping, revealed_meta
from db.rules import SessionRow
from engine import ArmReply, ArmSpec, Dialogue, DialogueError, LoadedModel, SpecError, StreamEvent
from engine.dialogue import MAX_MESSAGE_CHARS
from engine.dialogue import check_message as engine_check_message
from engine.scheduler import StepScheduler
from experiments.protocol import MAX_WINDOW
from experiments.record import SessionRecorder, dialogue_from_session, other_weights

MAX_ARMS = 4
BUSY = "A turn is already running in this tab; wait for it to end or press Stop."
"""The one refusal of a second turn (or a Continue) while a tab's turn runs."""


class ArenaError(ValueError):
    """A request the arena cannot do now; the message is one line for a person. `pane`: the pane whose
    settings it is about, when it is one pane's."""

    def __init__(self, message: str, pane: int | None = None):
        super().__init__(message)
        self.pane = pane


@dataclass
class LabTurn:
    user: str
    replies: list[ArmReply]  # by arm index
    turn_ids: list  # assistant turn id by arm index; None where it was not logged
    log_error: str | None = None

    @property
    def logged(self) -> bool:
        return any(i is not None for i in self.turn_ids)


@dataclass
class TurnOutcome:
    """The end of `ArenaSession.run_turn`: kind 'done' | 'refused' | 'failed', and a status line."""

    kind: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class Accepted:
    """`ArenaSession.send` took the message (the session is started): the turn's events follow."""

    status: str = "Generating… (Stop buttons work while it runs)"


@dataclass(frozen=True)
class SettingsRefused:
    """`ArenaSession.send` could not start a session: {pane: why}, or {"session": why}."""

    errors: dict


@dataclass(frozen=True)
class SessionSettings:
    """What a session is started with, as the Arena's top row and panes give it.

    `pane_spec(p)` is pane p's settings as an ArmSpec, or the one line saying why they are refused
    (asked only for the panes in use, as the browser shows them)."""

    n_arms: object
    pane_spec: Callable[[int], "ArmSpec | str"]
    blind: bool = False
    system: str | None = None
    title: str | None = None
    annotator: str | None = None
    window: object = None


def check_message(message) -> str | None:
    """Why `message` cannot be sent (one line), or None."""
    if not isinstance(message, str) or not message.strip():
        return "The message is empty — nothing was sent."
    if len(message) > MAX_MESSAGE_CHARS:
        return f"The message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. Nothing was sent."
    try:
        message.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"The message contains invalid text at character {e.start + 1} (a lone surrogate, "
            f"{message[e.start]!r}: not valid Unicode). Nothing was sent."
        )
    if "\x00" in message:
        return "The message contains a NUL character. Nothing was sent."
    return None


# how a reply ended, in the same words in every view (the stored value is the key)
STOP_REASONS = {"eos": "finished", "length": "hit the token limit", "stopped": "stopped"}


def stop_reason_text(reason) -> str:
    """A stored finish_reason as the lab words it everywhere (Arena, Sessions, Inspect)."""
    return STOP_REASONS.get(reason, str(reason or ""))


def turn_label(turn_index: int) -> str:
    """'turn 1' for the stored index 0: every view counts turns from 1 (the store stays 0-based)."""
    return f"turn {int(turn_index) + 1}"


def settings_refusal(errors: dict, pane_name=lambda p: str(p + 1)) -> str:
    """The one status line for settings that cannot run: 'Not sent: arm 2 · linkage: ... (got 7)'."""
    if "session" in errors:
        return f"Not sent: {errors['session']}"
    parts = [
        f"arm {pane_name(p)} · {why}" for p, why in sorted((k, v) for k, v in errors.items() if isinstance(k, int))
    ]
    return "Not sent: " + "; ".join(parts) + " — fix it in the arm's settings."


def parse_window(value) -> int | None:
    """The session's attention window from a settings box: None (blank: full attention) or a whole
    number of tokens; ArenaError with one line otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    why = (
        f"the attention window must be a whole number of tokens from 1 to {MAX_WINDOW:,} "
        f"(or blank for full attention), not {str(value).strip()[:40]!r}"
    )
    if isinstance(value, bool):
        raise ArenaError(why)
    if isinstance(value, float):
        if not value.is_integer():
            raise ArenaError(why)
        value = int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        if not text.isdigit():
            raise ArenaError(why)
        value = int(text)
    if not isinstance(value, int) or not 1 <= value <= MAX_WINDOW:
        raise ArenaError(why)
    return value


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_session_fields(system=None, title=None, annotator=None) -> str | None:
    """Why a session with this system prompt, title and annotator cannot be started (one line), or None:
    the engine's rule for the system prompt (valid text, as the CLI's --system), the store's rules for
    the title and the annotator (checked before anything is generated, so a turn never waits for a
    session that can never be written)."""
    try:
        if system is not None:
            engine_check_message(system, "the system prompt", limit=None, allow_empty=True)
        for what, value in (("title", title), ("annotator", annotator)):
            if value is not None:
                engine_check_message(value, f"the {what}", limit=None, allow_empty=True)
        SessionRow.check_fields(title=(title or "").strip(), user=(annotator or "").strip() or None)
    except (DialogueError, ValueError) as e:
        return _first_line(e).replace("user:", "annotator:", 1)
    return None


# -- labels and reveal of a logged session: shared by the Arena and the Sessions tab ---------------------
def label_progress(store: Store, session_id: str | None, annotator: str) -> tuple[int, int]:
    """(replies `annotator` has labelled, replies logged) in a logged session: "N of M labelled"."""
    if not session_id:
        return 0, 0
    counts = store.label_counts([session_id]).get(session_id) or {"replies": 0, "labelled": {}}
    return counts["labelled"].get((annotator or "").strip(), 0), counts["replies"]


def labelled_line(done: int, total: int, annotator: str) -> str:
    """The "N of M labelled" line as the lab shows it (Markdown)."""
    name = (annotator or "").strip()
    who = f"by **{html.escape(name)}**" if name else "(enter your name under Annotator)"
    return f"**{done} of {total}** replies labelled {who}"


def reveal_session(store: Store, session_id: str) -> str:
    """Reveal a blind session's arms (records `meta.revealed_at`, kept if already set); returns the
    mapping "Arm A = <label>, Arm B = ..." in pane order. Raises ArenaError if there is nothing to reveal."""
    try:
        s = store.get_session(session_id)
    except StoreError as e:
        raise ArenaError(_first_line(e)) from None
    if not s.get("blind"):
        raise ArenaError("This session is not blind: its arms are named already.")
    meta = revealed_meta(s.get("meta"))
    if meta is not None:
        try:
            store.update_session(session_id, meta=meta)
        except StoreError as e:
            raise ArenaError(f"Not revealed: {_first_line(e)}") from None
    labels = {a["index"]: a["label"] for a in s["arms"]}
    return reveal_mapping(labels, s.get("pane_order") or sorted(labels))


@dataclass
class ArenaSession:
    """One tab's arena conversation. Thread-safe enough for Gradio: one turn at a time per tab (`busy`);
    the turns of all tabs run through the lab's step scheduler, batched (without one, e.g. in a
    notebook, on the caller's thread); stop requests only set flags."""

    store: Store
    lm: LoadedModel
    scheduler: StepScheduler | None = None
    dialogue: Dialogue | None = None
    recorder: SessionRecorder | None = None
    order: list[int] = field(default_factory=list)  # pane -> arm index
    blind: bool = False
    revealed: bool = False
    turns: list[LabTurn] = field(default_factory=list)
    store_error: str | None = None  # why the session could not be created / a turn logged
    busy: bool = False
    can_rollback: bool = False
    failed_message: str | None = None  # the message of a turn whose generation failed
    title: str = ""
    annotator: str | None = None
    resumed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __deepcopy__(self, memo):
        """Gradio deep-copies a State's initial value per browser tab: a fresh conversation that shares
        the store, the model and the scheduler (a running one is never copied)."""
        if self.started:
            return self
        return ArenaSession(self.store, self.lm, self.scheduler)

    # -- what the views ask ---------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.dialogue is not None

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def hidden(self) -> bool:
        """Blind and not revealed: only pane letters may be shown."""
        return self.blind and not self.revealed

    @property
    def session_id(self) -> str | None:
        return self.recorder.session_id if self.recorder else None

    def arm_of(self, pane: int) -> int | None:
        return self.order[pane] if 0 <= pane < len(self.order) else None

    def pane_of(self, arm: int) -> int | None:
        return self.order.index(arm) if arm in self.order else None

    def pane_name(self, pane: int) -> str:
        return pane_letter(pane) if self.blind else str(pane + 1)

    @property
    def window(self) -> int | None:
        """The running session's attention window (None: full attention, or not started)."""
        return None if self.dialogue is None else self.dialogue.window

    def spec_of(self, pane: int) -> ArmSpec | None:
        arm = self.arm_of(pane)
        return None if arm is None or self.dialogue is None else self.dialogue.arms[arm].spec

    def reset(self, wait_s: float = 60.0) -> None:
        """Forget the conversation (a running turn is stopped first and allowed to end)."""
        if self.dialogue is not None:
            self.dialogue.stop_all()
        deadline = time.monotonic() + wait_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:  # a send claiming the tab meanwhile sees either the old or the fresh state
            self.__init__(self.store, self.lm, self.scheduler, _lock=self._lock)

    def _claim(self) -> bool:
        """Mark the tab busy unless it already is (check-then-set under the lock): two sends racing
        into one tab, or a send racing a Continue, cannot both run."""
        with self._lock:
            if self.busy:
                return False
            self.busy = True
            return True

    def _turn_events(self, user: str, **kwargs):
        """A turn's StreamEvents: through the scheduler when there is one."""
        if self.scheduler is not None:
            return self.scheduler.stream(self.dialogue, user, **kwargs)
        return self.dialogue.stream(user, **kwargs)

    # -- starting -------------------------------------------------------------------------------
    def start(
        self,
        specs: list[ArmSpec],
        *,
        blind: bool = False,
        system: str | None = None,
        title: str = "",
        annotator: str | None = None,
        rng: random.Random | None = None,
        window=None,
    ) -> None:
        """Build the arms (no database row yet: that comes with the first accepted turn).

        `window`: the dialogue's attention window in tokens (every arm sees the first few plus the
        last N; None or blank: full attention); the session's meta stores it, so replay and Continue
        rebuild it."""
        if self.started:
            raise ArenaError("a session is already running; press New session first")
        if not 2 <= len(specs) <= MAX_ARMS:
            raise ArenaError(f"the number of arms must be 2 to {MAX_ARMS}, not {len(specs)}")
        why = check_session_fields(system, title, annotator)
        if why:
            raise ArenaError(why)
        window = parse_window(window)
        try:
            self.dialogue = Dialogue(self.lm, list(specs), system=(system or "").strip() or None, window=window)
        except (SpecError, DialogueError) as e:  # specs come in pane order: arm k is pane k
            raise ArenaError(_first_line(e), pane=getattr(e, "arm", None)) from None
        self.order, self.blind, self.revealed = draw_pane_order(len(specs), bool(blind), rng), bool(blind), False
        self.title, self.annotator = (title or "").strip(), (annotator or "").strip() or None

    def open(self, settings: SessionSettings) -> dict:
        """Start a session from the Arena's settings: {} when started, else {pane: why} (or
        {"session": why}) checked in the order the browser shows them: the session's fields, the
        window, the number of arms, each pane's settings."""
        why = check_session_fields(settings.system, settings.title, settings.annotator)
        if why:
            return {"session": why}
        try:
            window = parse_window(settings.window)
        except ArenaError as e:
            return {"session": str(e)}
        try:
            n = int(settings.n_arms or 2)
        except (TypeError, ValueError):
            return {0: f"the number of arms must be 2 to {MAX_ARMS}, not {settings.n_arms!r}"}
        if not 2 <= n <= MAX_ARMS:
            return {0: f"the number of arms must be 2 to {MAX_ARMS}, not {n}"}
        specs = [settings.pane_spec(p) for p in range(n)]
        errors: dict = {p: s for p, s in enumerate(specs) if isinstance(s, str)}
        if errors:
            return errors
        try:
            self.start(
                [s for s in specs if not isinstance(s, str)],
                blind=bool(settings.blind),
                system=settings.system,
                title=settings.title or "",
                annotator=settings.annotator,
                window=window,
            )
        except ArenaError as e:
            return {0 if e.pane is None else e.pane: str(e)}
        return {}

    def _unstart(self) -> None:
        """A refused first message: forget the arms, the settings stay editable."""
        if not self.turns and self.recorder is None:
            self.dialogue, self.order, self.blind = None, [], False

    # -- the database ---------------------------------------------------------------------------
    def _ensure_recorder(self, first_message: str) -> SessionRecorder | None:
        if self.recorder is not None:
            return self.recorder
        try:
            self.recorder = SessionRecorder(
                self.store,
                self.lm,
                self.dialogue,
                kind="lab",
                title=self.title or first_message.strip().replace("\n", " ")[:80],
                user=self.annotator,
                blind=self.blind,
                pane_order=self.order,
                meta={"pane_order": "pane position -> arm index", "source": "lab arena"},
            )
            self.store_error = None
        except (StoreError, ValueError, OverflowError) as e:
            self.recorder, self.store_error = None, _first_line(e)
        return self.recorder

    def _log_pending(self) -> None:
        """Write every turn not yet logged, in order (retrying the session creation if needed)."""
        pending = [k for k, t in enumerate(self.turns) if not t.logged]
        if not pending:
            return
        if self._ensure_recorder(self.turns[0].user) is None:
            for k in pending:
                self.turns[k].log_error = self.store_error or "no database session"
            return
        for k in pending:
            t = self.turns[k]
            try:
                t.turn_ids, t.log_error = list(self.recorder.log(t.user, t.replies, turn_index=k)), None
            except (StoreError, ValueError, OverflowError) as e:
                self.store_error = _first_line(e)
                for j in pending[pending.index(k) :]:
                    self.turns[j].log_error = self.store_error
                return

    def _record(self, message: str, replies: list[ArmReply]) -> str:
        self.turns.append(LabTurn(message, list(replies), [None] * len(replies)))
        self.can_rollback, self.failed_message = True, None
        before = sum(t.logged for t in self.turns)
        self._log_pending()
        k = len(self.turns)
        turn = self.turns[-1]
        if not turn.logged:
            return (
                f"⚠ Turn {k} was **not logged**: {turn.log_error}. The chat continues; it is kept in memory "
                "and written with the next turn."
            )
        back = sum(t.logged for t in self.turns) - before - 1
        extra = f" ({back} earlier unlogged turn{'s' if back != 1 else ''} written too.)" if back > 0 else ""
        stopped = [self.pane_name(p) for p in range(self.n) if replies[self.arm_of(p)].finish_reason == "stopped"]
        if stopped:
            extra += f" Stopped: arm {', '.join(stopped)}."
        return f"✓ Turn {k} logged to session `{self.session_id}`.{extra}"

    # -- a turn ---------------------------------------------------------------------------------
    def run_turn(self, message: str) -> Iterator[StreamEvent | TurnOutcome]:
        """Stream one turn: yields StreamEvents (by arm index), then one TurnOutcome.

        Refused before anything changed -> 'refused' (a refused first message un-starts the session);
        failed mid-way -> 'failed' (the dialogue rolled itself back; Regenerate retries the message);
        if the consumer goes away mid-turn the partial turn is kept and logged.
        """
        if not self.started:
            yield TurnOutcome("refused", "Start a session first.", "not started")
            return
        why = check_message(message)
        if why:
            yield TurnOutcome("refused", f"⚠ {why}", why)
            return
        if not self._claim():
            yield TurnOutcome("refused", f"⚠ {BUSY}", "busy")
            return
        yield from self._run_claimed(message)

    def send(self, message: str, settings: SessionSettings) -> Iterator[object]:
        """The Arena's Send: check the message, claim the tab, start the session on the first message,
        then stream the turn. Yields a TurnOutcome('refused') for a bad message, TurnOutcome('busy')
        while a turn runs, SettingsRefused when the session cannot start; else Accepted, then what
        `run_turn` yields."""
        why = check_message(message)
        if why:
            yield TurnOutcome("refused", f"⚠ {why}", why)
            return
        if not self._claim():
            yield TurnOutcome("busy", f"⚠ {BUSY} Your message stays in the box.", "busy")
            return
        running = False
        try:
            errors = {} if self.started else self.open(settings)
            if errors:
                yield SettingsRefused(errors)
                return
            yield Accepted()
            running = True
            yield from self._run_claimed(message)
        finally:
            if not running:  # refused, or the consumer left before the turn began
                self.busy = False

    def _run_claimed(self, message: str) -> Iterator[StreamEvent | TurnOutcome]:
        """`run_turn`'s body, on a tab this call has claimed (`busy`); every way out releases it."""
        d = self.dialogue
        ev = None
        it = self._turn_events(message)
        try:
            for ev in it:
                if ev.replies is not None:
                    break
                yield ev
            it.close()
        except DialogueError as e:  # refused before anything changed
            self.busy = False
            self._unstart()
            yield TurnOutcome("refused", f"⚠ Not sent: {_first_line(e)}", _first_line(e))
            return
        except GeneratorExit:  # the browser went away mid-turn: keep the turn the dialogue kept
            it.close()  # the scheduler ends the turn at its next step and returns once it has
            self.busy = False
            if d.turn == len(self.turns) + 1:
                self._record(message, [a.replies[-1] for a in d.arms])
            raise
        except Exception as e:  # noqa: BLE001 - the dialogue rolled itself back to before the turn
            self.busy = False
            self.can_rollback = False
            self.failed_message = message
            first = _first_line(e)
            yield TurnOutcome(
                "failed",
                f"✗ Generation failed: {type(e).__name__}: {first}. Earlier turns are "
                "intact; press **Regenerate** to try this message again.",
                first,
            )
            return
        self.busy = False
        if ev is None or ev.replies is None:
            if d.turn == len(self.turns):  # withdrawn while queued: nothing ran
                self._unstart()
                yield TurnOutcome(
                    "refused", "■ Stopped while queued: the message was not sent.", "stopped while queued"
                )
                return
            yield TurnOutcome("failed", "✗ Generation ended without replies.", "no replies")
            return
        yield TurnOutcome("done", self._record(message, ev.replies))

    def rollback_last(self) -> str:
        """Undo the last turn (memory, cache and DB rows) for Regenerate; return the message to send again."""
        if not self.started or (not self.turns and not self.failed_message):
            raise ArenaError("Nothing to regenerate yet: send a message first.")
        if self.failed_message is not None and not self.can_rollback:
            return self.failed_message
        if not self.can_rollback:
            raise ArenaError("Only the last turn can be regenerated, once.")
        last = self.turns[-1]
        if self.recorder is not None and last.logged:
            try:
                self.recorder.undo_last()
            except StoreError as e:
                raise ArenaError(f"Could not remove the last turn from the database: {e}. Nothing changed.") from None
        try:
            self.dialogue.rollback()
        except DialogueError as e:
            raise ArenaError(str(e)) from None
        self.turns.pop()
        self.can_rollback = False
        return last.user

    def regenerate(self) -> Iterator[StreamEvent | TurnOutcome]:
        try:
            message = self.rollback_last()
        except ArenaError as e:
            yield TurnOutcome("refused", f"⚠ {e}", str(e))
            return
        yield from self.run_turn(message)

    def stop_pane(self, pane: int) -> bool:
        arm = self.arm_of(pane)
        if self.dialogue is not None and arm is not None and self.busy:
            self.dialogue.stop_arm(arm)
            return True
        return False

    def stop_all(self) -> bool:
        if self.dialogue is not None and self.busy:
            if self.scheduler is None or not self.scheduler.cancel_queued(self.dialogue):
                self.dialogue.stop_all()
            return True
        return False

    # -- blind mode -----------------------------------------------------------------------------
    def reveal(self) -> str:
        if not self.started or not self.blind:
            raise ArenaError("Nothing to reveal.")
        self.revealed = True
        if self.recorder is not None:
            try:
                reveal_session(self.store, self.session_id)
            except ArenaError:
                pass  # the panes are revealed here; the record keeps its letters until a write succeeds
        return reveal_mapping({self.arm_of(p): self.spec_of(p).display_label for p in range(self.n)}, self.order)

    # -- labels ---------------------------------------------------------------------------------
    def annotate(
        self, pane: int, turn_index, annotator: str, label: str, note: str = "", confidence: float | None = None
    ) -> tuple[int, int]:
        """Save a label for pane `pane`'s reply in turn `turn_index` (0-based); returns (turn index, turn id)."""
        arm = self.arm_of(pane)
        if arm is None or not self.turns:
            raise ArenaError("No reply to label yet.")
        if not (annotator or "").strip():
            raise ArenaError("Enter your name in **Annotator** (top of the page) first.")
        if label not in STANCE_LABELS:
            raise ArenaError("Pick a stance label first.")
        try:
            k = int(turn_index) if turn_index is not None else len(self.turns) - 1
            turn = self.turns[k]
        except (ValueError, TypeError, IndexError):
            raise ArenaError("Pick a turn first.") from None
        if k < 0:
            raise ArenaError("Pick a turn first.")
        tid = turn.turn_ids[arm]
        if tid is None:
            raise ArenaError(f"Turn {k + 1} was not logged ({turn.log_error}); it cannot be annotated yet.")
        if confidence is not None:
            try:
                confidence = float(confidence)
            except (TypeError, ValueError, OverflowError):
                shown = repr(confidence) if len(repr(confidence)) <= 40 else repr(confidence)[:37] + "..."
                raise ArenaError(f"Not saved: confidence must be a number from 0 to 1, got {shown}") from None
        try:
            self.store.annotate(tid, annotator.strip(), label, note or "", confidence=confidence)
        except (StoreError, ValueError) as e:
            raise ArenaError(f"Not saved: {_first_line(e)}") from None
        return k, tid

    def _labelled(self, annotator: str) -> set[int]:
        if self.recorder is None:
            return set()
        try:
            rows = self.store.get_annotations(self.session_id, latest=True)
        except StoreError:
            return set()
        name = (annotator or "").strip()
        return {a["turn_id"] for a in rows if a["annotator"] == name}

    def label_progress(self, annotator: str) -> tuple[int, int]:
        """(replies labelled by `annotator`, replies logged) in this session (`label_progress`)."""
        if self.recorder is None:
            return 0, 0
        try:
            return label_progress(self.store, self.session_id, annotator)
        except StoreError:
            return 0, 0

    def next_unlabelled(self, annotator: str, after: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """The next (turn index, pane) whose reply `annotator` has not labelled, in reading order."""
        done = self._labelled(annotator)
        cells = [
            (k, p)
            for k, t in enumerate(self.turns)
            for p in range(self.n)
            if t.turn_ids[self.arm_of(p)] is not None and t.turn_ids[self.arm_of(p)] not in done
        ]
        if not cells:
            return None
        if after is not None:
            later = [c for c in cells if c > tuple(after)]
            if later:
                return later[0]
        return cells[0]

    # -- reopening a logged session -------------------------------------------------------------
    @classmethod
    def resume(
        cls, store: Store, lm: LoadedModel, session_id: str, scheduler: StepScheduler | None = None
    ) -> "ArenaSession":
        """Rebuild a logged lab session's arms from its tokens so that the next turn continues it."""
        sid = (session_id or "").strip()
        session, d, turns = _loadable_session(store, lm, sid)
        self = cls(store, lm, scheduler, resumed=True)
        for k in sorted(turns):
            self.turns.append(_replay_turn(d, turns[k], k, sid, scheduler))
        self.dialogue, self.order = d, list(session.get("pane_order") or range(d.n_arms))
        self.blind = bool(session.get("blind"))
        self.revealed = is_revealed(session)
        self.title, self.annotator = session.get("title") or "", session.get("user")
        self.recorder = SessionRecorder(store, lm, d, session_id=sid)
        self.can_rollback = False  # the replay left no snapshot: the last logged turn stays
        return self

    def reopen(self, session_id: str) -> None:
        """Continue a logged session in this tab (the Arena's Continue): refused while a turn runs;
        this tab's conversation is replaced only once the logged one is rebuilt (a refusal changes
        nothing here)."""
        if not self._claim():
            raise ArenaError(BUSY)
        try:
            other = ArenaSession.resume(self.store, self.lm, session_id, self.scheduler)
            if self.dialogue is not None:
                self.dialogue.stop_all()
            self.dialogue, self.recorder, self.order, self.turns = (
                other.dialogue,
                other.recorder,
                other.order,
                other.turns,
            )
            self.blind, self.revealed, self.title, self.annotator = (
                other.blind,
                other.revealed,
                other.title,
                other.annotator,
            )
            self.store_error, self.can_rollback, self.failed_message, self.resumed = None, False, None, True
        finally:
            self.busy = False


def _loadable_session(store: Store, lm: LoadedModel, sid: str):
    """(session, Dialogue, turns) of a logged lab session the Arena can continue; ArenaError with
    one line for a person otherwise."""
    if not sid:
        raise ArenaError("Pick a session first.")
    try:
        session, d, turns = dialogue_from_session(store, lm, sid)
    except StoreError as e:
        raise ArenaError(_first_line(e)) from None
    except (SpecError, DialogueError, ValueError) as e:
        raise ArenaError(f"session {sid} cannot be rebuilt: {_first_line(e)}") from None
    if session["kind"] != "lab":
        raise ArenaError(f"session {sid} is a {session['kind']} session; only lab sessions can be continued")
    why = other_weights(session, lm, "continue")
    if why:
        raise ArenaError(why)
    if not 2 <= d.n_arms <= MAX_ARMS:
        raise ArenaError(f"session {sid} has {d.n_arms} arms; the Arena shows 2 to {MAX_ARMS}")
    if sorted(turns) != list(range(len(turns))):
        raise ArenaError(f"session {sid} has gaps in its turns ({sorted(turns)}); it cannot be continued")
    return session, d, turns


def _replay_turn(d: Dialogue, rows: dict, k: int, sid: str, scheduler: StepScheduler | None) -> LabTurn:
    """Feed logged turn k back through the dialogue (forced tokens, batched with the other tabs'
    turns when there is a scheduler) and return it as the Arena's LabTurn with the logged timings."""
    if sorted(rows) != list(range(d.n_arms)) or any("assistant" not in r or "user" not in r for r in rows.values()):
        raise ArenaError(f"turn {k + 1} of session {sid} is not logged for every arm; it cannot be continued")
    forced = [rows[i]["assistant"]["token_ids"] or [] for i in range(d.n_arms)]
    if any(not f for f in forced):
        raise ArenaError(f"turn {k + 1} of session {sid} has an empty reply; it cannot be continued")
    user = rows[0]["user"]["text"]
    if scheduler is not None:  # the replay shares passes with the other tabs' turns
        scheduler.send(d, user, forced=forced)
    else:
        d.send(user, forced=forced)
    replies = []
    for i, r in enumerate(d.arms[a].replies[-1] for a in range(d.n_arms)):
        row = rows[i]["assistant"]
        r.finish_reason = row.get("finish_reason") or r.finish_reason
        r.duration_s = float(row.get("duration_s") or 0.0)
        r.text = row.get("text") or r.text
        replies.append(r)
    return LabTurn(user, replies, [rows[i]["assistant"]["id"] for i in range(d.n_arms)])
