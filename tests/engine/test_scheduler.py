"""The step scheduler: sessions batched step by step keep the tokens they get alone.

Every registered mechanism's conformance configurations run as a session (greedy and seeded-
sampling arms) while other sessions — one windowed — join and leave at chosen steps; each
session's tokens must equal the same session run alone and its logits agree within float
tolerance. Then the threaded scheduler on the embedded model: concurrent streams, the row cap and
its queue status, Stop and closed streams, exclusive work between steps, refused and failed turns.
"""

from __future__ import annotations

import threading

import pytest
import torch

from engine import Dialogue, DialogueError, parse_arm
from engine.mechanisms import MECHANISMS
from engine.scheduler import StepScheduler

CASES = [pytest.param(case, id=case.spec) for cls in MECHANISMS.values() for case in cls.conformance_cases()]
TURNS = ["Tell me about the sea, please, in a few words.", "And the mountains?"]
OTHER = ["What is two plus two? Answer with one word only.", "Are you sure?"]


def sampled(spec: str) -> str:
    """The spec with seeded temperature / top-p sampling instead of greedy decoding."""
    return spec + ("," if ":" in spec else ":") + "greedy=false,temperature=0.9,top_p=0.95,seed=11"


class Session:
    """One session of a schedule: its dialogue, messages, new tokens per turn and first step."""

    def __init__(self, lm, specs, messages, n, join_at=0, window=None):
        self.lm, self.specs, self.messages, self.n, self.join_at, self.window = lm, specs, messages, n, join_at, window
        self.d = self.fresh()
        self.job, self.replies = None, []

    def fresh(self) -> Dialogue:
        d = Dialogue(self.lm, [parse_arm(s) for s in self.specs], window=self.window)
        d.record_logits = [[] for _ in self.specs]
        return d

    def alone(self):
        d = self.fresh()
        tokens = [[r.token_ids for r in d.send(m, max_new_tokens=self.n)] for m in self.messages]
        return tokens, d.record_logits


def run_schedule(lm, sessions: list[Session]) -> int:
    """Step a manual scheduler; each session joins at its step and submits its next turn as soon as
    the last one ended. Returns the number of forward passes."""
    s = StepScheduler(lm, thread=False)
    step = 0
    while any(len(x.replies) < len(x.messages) for x in sessions):
        for x in sessions:
            if x.job is not None and x.job.done.is_set():
                assert x.job.error is None, x.job.error
                x.replies.append([r.token_ids for r in x.job.replies])
                x.job = None
            if x.job is None and step >= x.join_at and len(x.replies) < len(x.messages):
                x.job = s.submit(x.d, x.messages[len(x.replies)], max_new_tokens=x.n)
        s.step()
        step += 1
        assert step < 500
    return s.steps


def assert_same_as_alone(x: Session, atol=1e-4):
    tokens, logits = x.alone()
    assert x.replies == tokens, x.specs
    for arm, (got, want) in enumerate(zip(x.d.record_logits, logits)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=atol, rtol=1e-4), (x.specs[arm], float((g - w).abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_interleaved_sessions_keep_their_tokens(tiny_llama, case):
    """A session of this configuration (greedy and sampled arms) beside a full-attention neighbour
    joining mid-decode and leaving early, and a windowed session of the same configuration."""
    subject = Session(tiny_llama, ["observer", case.spec, sampled(case.spec)], TURNS, 10)
    neighbour = Session(tiny_llama, ["continuity:linkage=1,gain=1", sampled("observer")], OTHER, 4, join_at=2)
    windowed = Session(tiny_llama, [case.spec, "observer"], OTHER, 7, join_at=4, window=8)
    passes = run_schedule(tiny_llama, [subject, neighbour, windowed])
    alone_passes = sum(len(x.messages) * (x.n + 1) for x in (subject, neighbour, windowed))
    assert passes < alone_passes  # rows really shared passes
    for x in (subject, neighbour, windowed):
        assert_same_as_alone(x)


def test_interleaving_on_every_architecture(tiny):
    sessions = [
        Session(tiny, ["observer", "memory_bank:linkage=1,slots=16"], TURNS, 8),
        Session(tiny, [sampled("neural_memory:linkage=1,gain=1"), "observer"], OTHER, 5, join_at=1),
        Session(tiny, ["partial_attention:linkage=1,gain=1", "observer"], TURNS, 6, join_at=3, window=6),
    ]
    run_schedule(tiny, sessions)
    for x in sessions:
        assert_same_as_alone(x)


def test_interleaving_on_the_embedded_model(embedded):
    sessions = [
        Session(embedded, ["observer", "continuity:linkage=1"], TURNS, 6),
        Session(embedded, ["observer", sampled("memory_bank:linkage=1")], OTHER, 4, join_at=2),
    ]
    run_schedule(embedded, sessions)
    for x in sessions:
        assert_same_as_alone(x, atol=5e-4)


def test_rollback_and_regenerate_through_the_scheduler(tiny_llama):
    s = StepScheduler(tiny_llama, thread=False)
    a, b = (
        Session(tiny_llama, ["observer", "continuity:linkage=1"], TURNS, 6),
        Session(tiny_llama, ["observer", sampled("observer")], OTHER, 6),
    )
    for k in range(2):
        ja, jb = s.submit(a.d, TURNS[k], max_new_tokens=6), s.submit(b.d, OTHER[k], max_new_tokens=6)
        while not (ja.done.is_set() and jb.done.is_set()):
            s.step()
    first = [r.token_ids for r in ja.replies]
    a.d.rollback()
    ja = s.submit(a.d, TURNS[1], max_new_tokens=6)
    while not ja.done.is_set():
        s.step()
    assert [r.token_ids for r in ja.replies] == first
    assert a.d.turn == 2 and len(a.d.arms[0].replies) == 2


# -- the threaded scheduler ---------------------------------------------------------------------
def stream_in_thread(sched, d, messages, n, out, key):
    def go():
        try:
            out[key] = [[r.token_ids for r in sched.send(d, m, max_new_tokens=n)] for m in messages]
        except Exception as e:  # noqa: BLE001
            out[key] = e

    t = threading.Thread(target=go)
    t.start()
    return t


def test_threaded_sessions_stream_together(embedded):
    sched = StepScheduler(embedded)
    try:
        specs = [
            ["observer", "continuity:linkage=1"],
            ["observer", "memory_bank:linkage=1"],
            [sampled("observer"), "neural_memory:linkage=1"],
        ]
        want = {
            k: [[r.token_ids for r in Dialogue(embedded, [parse_arm(x) for x in sp]).send(TURNS[0], max_new_tokens=5)]]
            for k, sp in enumerate(specs)
        }
        out: dict = {}
        threads = [
            stream_in_thread(sched, Dialogue(embedded, [parse_arm(x) for x in sp]), TURNS[:1], 5, out, k)
            for k, sp in enumerate(specs)
        ]
        for t in threads:
            t.join(timeout=300)
        assert out == want
        assert max(sched.step_rows) > 2  # at least one pass held more than one session
        assert sched.status()["active_rows"] == 0
    finally:
        sched.close()


def test_row_cap_queues_and_says_so(tiny_llama):
    sched = StepScheduler(tiny_llama, max_rows=2)
    try:
        ds = [Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("observer")]) for _ in range(3)]
        statuses: dict = {k: [] for k in range(3)}
        results: dict = {}
        barrier = threading.Barrier(3)

        def go(k):
            barrier.wait()
            for ev in sched.stream(ds[k], TURNS[0], max_new_tokens=12):
                if ev.status:
                    statuses[k].append(ev.status)
                if ev.replies:
                    results[k] = [r.token_ids for r in ev.replies]

        threads = [threading.Thread(target=go, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 3  # nothing dropped
        assert max(sched.step_rows) <= 2
        queued = [st for k in range(3) for st in statuses[k]]
        assert any(st.startswith("queued") for st in queued), statuses
        alone = [
            r.token_ids for r in Dialogue(tiny_llama, [parse_arm("observer")] * 2).send(TURNS[0], max_new_tokens=12)
        ]
        assert all(r == alone for r in results.values())
    finally:
        sched.close()


def test_stop_is_per_session_and_a_closed_stream_frees_its_rows(embedded):
    sched = StepScheduler(embedded)
    try:
        a = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
        b = Dialogue(embedded, [parse_arm("observer"), parse_arm("observer")])
        out: dict = {}
        tb = stream_in_thread(sched, b, TURNS[:1], 30, out, "b")
        it = sched.stream(a, TURNS[0], max_new_tokens=60)
        for ev in it:
            if ev.step >= 2:
                a.stop_arm(0)
            if ev.step >= 6:
                break
        it.close()  # the tab went away mid-turn: the turn keeps what it generated
        assert a.turn == 1
        assert [arm.replies[-1].finish_reason for arm in a.arms] == ["stopped", "stopped"]
        assert len(a.arms[0].replies[-1].token_ids) < len(a.arms[1].replies[-1].token_ids) < 60
        tb.join(timeout=120)
        assert all(arm.replies[-1].finish_reason != "stopped" for arm in b.arms)  # b's rows ran on
        assert sched.status()["active_rows"] == 0
        # the stopped session goes on from its partial turn like any other
        assert sched.send(a, TURNS[1], max_new_tokens=3)[0].token_ids
    finally:
        sched.close()


def test_a_cancelled_queued_turn_never_runs(tiny_llama):
    sched = StepScheduler(tiny_llama, thread=False)
    d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("observer")])
    job = sched.submit(d, TURNS[0], max_new_tokens=4)
    sched.cancel(job)
    assert job.done.is_set() and job.replies is None
    sched.step()
    assert d.turn == 0 and sched.steps == 0


def test_exclusive_work_runs_between_steps(tiny_llama):
    sched = StepScheduler(tiny_llama)
    try:
        d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("memory_bank:linkage=1,slots=16")])
        want = [
            r.token_ids
            for r in Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("memory_bank:linkage=1,slots=16")]).send(
                TURNS[0], max_new_tokens=20
            )
        ]
        out: dict = {}
        t = stream_in_thread(sched, d, TURNS[:1], 20, out, "d")
        seen = []
        for _ in range(5):
            with sched.exclusive():
                steps = sched.steps
                ids = tiny_llama.tokenizer("a plain pass", return_tensors="pt").input_ids
                with torch.no_grad():
                    tiny_llama.model(input_ids=ids)
                seen.append(sched.steps == steps)  # nothing stepped while we held the model
        t.join(timeout=120)
        assert all(seen) and out["d"] == [want]
    finally:
        sched.close()


def test_refused_and_failed_turns_leave_the_scheduler_up(tiny_llama):
    sched = StepScheduler(tiny_llama)
    try:
        d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("observer")])
        with pytest.raises(DialogueError, match="empty"):
            sched.send(d, "   ")
        with pytest.raises(DialogueError, match="too long"):
            sched.send(d, "word " * 3000)
        other = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("observer")])
        other.cache = None  # a broken session: its pass fails ...
        with pytest.raises(Exception):
            sched.send(other, TURNS[0], max_new_tokens=3)
        assert d.turn == 0
        assert sched.send(d, TURNS[0], max_new_tokens=3)  # ... and the scheduler serves the next turn
        assert sched.status() == {**sched.status(), "active_rows": 0, "queued_turns": 0}
    finally:
        sched.close()


def test_bad_row_cap_is_refused(tiny_llama):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DialogueError, match="row cap"):
            StepScheduler(tiny_llama, max_rows=bad, thread=False)
