"""The dialogue-level attention window: the cache really holds only each row's sink + last N tokens
(at their real positions), the result equals full attention under the same visibility mask, linkage 0
is bit-identical to the same window without mechanisms, rollback restores the evicted cache."""

from __future__ import annotations

import pytest
import torch

from engine.dialogue import Dialogue, DialogueError
from engine.spec import parse_arm

REPLIES_1 = [[1012, 2011, 3013, 4015, 5017, 6019, 7021], [1100, 1200, 1300]]
REPLIES_2 = [[2000, 2100, 2200], [2300, 2400, 2500, 2600, 2700, 2800]]


def _steps(d: Dialogue) -> list:
    """Record every forward pass: per row (start, number of real tokens)."""
    seen = []
    before = d.before_step

    def spy(step):
        seen.append([(s, int(v.sum())) for s, v in zip(step.starts, step.valid)])
        before(step)

    d.before_step = spy
    return seen


def _two_turns(lm, arms, window, sink, record=None):
    d = Dialogue(lm, [parse_arm(a) for a in arms], window=window, sink=sink)
    steps = _steps(d)
    out1 = d.teacher_force("Hello there, how are you doing on this fine day?", REPLIES_1[: len(arms)])
    out2 = d.teacher_force("Tell me something about the sea and the mountains.", REPLIES_2[: len(arms)])
    return d, steps, out1, out2


def test_window_drops_exactly_the_tokens_it_says(tiny_llama):
    window, sink = 9, 3
    d, _, _, _ = _two_turns(tiny_llama, ["observer", "observer"], window, sink)
    full, _, _, _ = _two_turns(tiny_llama, ["observer", "observer"], None, sink)
    lengths = [a.length for a in d.arms]
    assert lengths[0] != lengths[1]  # rows of different lengths share the cache
    kept = [list(range(sink)) + list(range(L - window, L)) for L in lengths]
    width = max(len(k) for k in kept)
    for layer in d.cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == width == d.mask.shape[1]
    for r in range(2):
        assert d.cache_view(r) == kept[r]
        real = d.mask[r].bool()
        assert int(real.sum()) == len(kept[r]) and not bool(real[: width - len(kept[r])].any())  # padding in front
        # layer 0's keys depend only on the token and its position: the kept columns are exactly the
        # full run's columns of those tokens, rotated at their real positions
        got = d.cache.layers[0].keys[r][:, real]
        want = full.cache.layers[0].keys[r][:, full.mask[r].bool()][:, kept[r]]
        assert torch.allclose(got, want, atol=1e-6)
    # the full run really holds more
    assert full.cache.layers[0].keys.shape[-2] > width


def test_window_equals_full_attention_under_the_same_mask(tiny_llama):
    """Every logit equals one uncached forward over the arm's tokens whose mask lets token p (fed in a
    pass starting at s) see j <= p with j < sink or j >= s - window."""
    window, sink = 7, 2
    d, steps, _, out2 = _two_turns(tiny_llama, ["observer", "observer"], window, sink)
    for r, arm in enumerate(d.arms):
        start_of = []
        for step in steps:
            s, n = step[r]
            start_of += [s] * n
        L = arm.length
        assert len(start_of) == L
        p = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        s = torch.tensor(start_of)[:, None]
        allowed = (j <= p) & ((j < sink) | (j >= s - window))
        ref = tiny_llama.model(
            input_ids=torch.tensor([arm.token_ids]),
            attention_mask=allowed[None, None],
            position_ids=torch.arange(L)[None],
        ).logits[0]
        n = len(REPLIES_2[r])
        assert torch.allclose(out2[r], ref[-n:], atol=1e-4)
        unwindowed = tiny_llama.model(input_ids=torch.tensor([arm.token_ids])).logits[0]
        assert (unwindowed[-n:] - out2[r]).abs().max() > 1e-3  # the window changed what it sees


@pytest.mark.parametrize("window", [5, 40])
def test_linkage_zero_bit_identical_under_the_same_window(tiny_llama, window):
    plain = Dialogue(tiny_llama, [parse_arm("observer")] * 3, window=window)
    linked = Dialogue(
        tiny_llama,
        [
            parse_arm("neural_memory:linkage=0"),
            parse_arm("continuity:linkage=0"),
            parse_arm("neural_memory:linkage=0,memory=mlp"),
        ],
        window=window,
    )
    on = Dialogue(
        tiny_llama,
        [
            parse_arm("observer"),
            parse_arm("neural_memory:linkage=1,gain=1"),
            parse_arm("neural_memory:linkage=1,gain=1,memory=mlp,hidden=8"),
        ],
        window=window,
    )
    for user in ("Hello there, how are you doing on this fine day?", "And the sea?"):
        a = plain.teacher_force(user, REPLIES_1 + [REPLIES_1[0]])
        b = linked.teacher_force(user, REPLIES_1 + [REPLIES_1[0]])
        c = on.teacher_force(user, REPLIES_1 + [REPLIES_1[0]])
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    ra = plain.send("Go on.", max_new_tokens=5)
    rb = linked.send("Go on.", max_new_tokens=5)
    assert [r.token_ids for r in ra] == [r.token_ids for r in rb]


def test_rollback_with_a_window_restores_the_evicted_cache(tiny_llama):
    arms = [parse_arm("observer"), parse_arm("neural_memory:linkage=1,gain=1,layers=1/3")]
    d = Dialogue(tiny_llama, arms, window=6)
    d.send("Hello there, how are you doing on this fine day?", max_new_tokens=6)
    views = [d.cache_view(r) for r in range(2)]
    keys = d.cache.layers[2].keys.clone()
    d.send("Tell me something about the sea and the mountains.", max_new_tokens=6)
    d.rollback()
    assert [d.cache_view(r) for r in range(2)] == views and torch.equal(d.cache.layers[2].keys, keys)
    again = d.send("And the rivers?", max_new_tokens=6)
    fresh = Dialogue(tiny_llama, arms, window=6)
    fresh.send("Hello there, how are you doing on this fine day?", max_new_tokens=6)
    want = fresh.send("And the rivers?", max_new_tokens=6)
    assert [r.token_ids for r in again] == [r.token_ids for r in want]


def test_chunked_teacher_forcing_loses_what_decoding_loses(tiny_llama):
    """Under a window, a reply forced in passes of one token gives the logits decoding it gives (the
    greedy reply is its own argmax); forced in one pass it sees the evicted prompt, and differs."""
    arms = [parse_arm("observer"), parse_arm("neural_memory:linkage=1,gain=1,layers=1/3")]
    user = "Hello there, how are you doing on this fine day? Tell me about the sea."
    decoded = Dialogue(tiny_llama, arms, window=5).send(user, max_new_tokens=12)
    replies = [r.token_ids for r in decoded]
    one_by_one = Dialogue(tiny_llama, arms, window=5).teacher_force(user, replies, chunk=1)
    in_one_pass = Dialogue(tiny_llama, arms, window=5).teacher_force(user, replies)
    for r, ids in enumerate(replies):
        assert one_by_one[r].argmax(-1).tolist() == ids
        assert (one_by_one[r] - in_one_pass[r]).abs().max() > 1e-3
    # the steps: prompt, then 11 passes of one token (the reply but its last token)
    d = Dialogue(tiny_llama, arms, window=5)
    steps = _steps(d)
    d.teacher_force(user, replies, chunk=4)
    assert [max(n for _, n in s) for s in steps[1:]] == [4, 4, 3]


def test_chunking_without_a_window_changes_nothing(tiny_llama):
    arms = [parse_arm("observer"), parse_arm("continuity:linkage=1")]
    whole = Dialogue(tiny_llama, arms).teacher_force("Hello there.", REPLIES_1)
    parts = Dialogue(tiny_llama, arms).teacher_force("Hello there.", REPLIES_1, chunk=2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, parts))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_chunk_is_one_clear_error(tiny_llama, bad):
    with pytest.raises(DialogueError, match="chunk must be"):
        Dialogue(tiny_llama, [parse_arm("observer")], window=4).teacher_force("Hi", [[5, 6]], chunk=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_window_is_one_clear_error(tiny_llama, bad):
    with pytest.raises(DialogueError, match="window must be"):
        Dialogue(tiny_llama, [parse_arm("observer")], window=bad)


def test_runner_logs_the_window_replay_rebuilds_it_and_inspect_refuses(tiny_llama, tmp_path):
    from db import Store
    from experiments.inspect import InspectError, inspect_turn
    from experiments.protocol import get_protocol
    from experiments.record import replay_turn
    from experiments.runner import RunConfigError, run_protocol

    protocol = get_protocol("window_recall")
    assert protocol.window == 64 and "answer_match" in protocol.scoring
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    try:
        arms = ["observer", "neural_memory:linkage=1,gain=1,layers=1/3"]
        eid = run_protocol(store, tiny_llama, protocol, arms, items=1, max_new_tokens=3, window=12)
        (session,) = store.list_sessions(experiment_id=eid)
        assert session["meta"]["window"] == 12 and session["meta"]["complete"] is True
        assert store.get_experiment(eid)["args"]["window"] == 12
        replay = replay_turn(store, tiny_llama, session["id"], 4)
        assert replay.identical
        with pytest.raises(InspectError, match="attention window of 12 tokens"):
            inspect_turn(store, tiny_llama, session["id"], 1, 4)
        with pytest.raises(RunConfigError, match="window"):
            run_protocol(store, tiny_llama, protocol, arms, items=1, max_new_tokens=3, window=0)
    finally:
        store.close()


def test_cli_window_flags_refuse_bad_values():
    from engine.__main__ import main as engine_main
    from experiments.__main__ import main as experiments_main

    assert engine_main(["generate", "--prompt", "Hi", "--arm", "observer", "--window", "0"]) == 2
    assert experiments_main(["run", "window_recall", "--arm", "observer", "--window", "-1"]) == 2


def test_experiments_tab_takes_a_window(tiny_llama, tmp_path):
    from db import Store
    from lab import experiments_view as V
    from lab.context import LabContext

    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    try:
        ctx = LabContext(store=store, lm=tiny_llama, db_url=store.name)
        message, run = V.start_run(ctx, "window_recall", "", None, "observer", 1, 1, 2, window="nine")
        assert message.startswith("❌") and "window must be a whole number" in message and run is None
        message, run = V.start_run(ctx, "window_recall", "", None, "observer", 1, 1, 2, window="9")
        assert message.startswith("✅"), message
        (session,) = store.list_sessions(experiment_id=run)
        assert session["meta"]["window"] == 9
    finally:
        store.close()
