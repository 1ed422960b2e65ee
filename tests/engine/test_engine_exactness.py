"""Exactness of the engine: linkage 0 is the base model bit for bit, cached == uncached, no future
leakage, batched arms == arms alone, memory scopes, the seed variant, 4-bit. The invariants every
mechanism shares are in tests/engine/test_conformance.py; this file keeps the continuity-specific ones."""

from __future__ import annotations

import torch
from helpers import PROMPTS, A, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from engine.dialogue import Dialogue
from engine.hooks import MechanismHost
from engine.spec import parse_arm


# -- linkage 0 is the base model -----------------------------------------------------------------
# Every mechanism's own configurations are checked by the conformance suite (tests/engine/test_conformance.py);
# here the observer itself, which no mechanism registers.
def test_observer_equals_plain_generate(tiny):
    ref_tokens, ref_logits = generate_logits(tiny, PROMPTS[0], 12)
    tokens, logits = dialogue_logits(tiny, ["observer"], PROMPTS[0], 12)
    assert tokens[0] == ref_tokens
    for got, want in zip(logits, ref_logits):
        assert torch.equal(got[0], want)


def test_multi_turn_generation_matches_uncached(embedded):
    """Greedy tokens of a 2-turn cached dialogue are the argmax of one uncached forward over it."""
    arm = "continuity:linkage=1,gain=0.5"
    d = Dialogue(embedded, [parse_arm(arm)])
    d.send(PROMPTS[1], max_new_tokens=12)
    d.send("Are you sure?", max_new_tokens=12)
    st = d.arms[0]
    ids, roles = st.all_token_ids(), st.roles + [A] * len(st.pending)
    full = full_forward(embedded, arm, ids, roles)
    end = len(ids)
    for reply in reversed(st.replies):
        start = end - len(reply.token_ids)
        assert full[start - 1 : end - 1].argmax(-1).tolist() == reply.token_ids
        end = start - (len(st.replies[1].prompt_token_ids) - 1)  # skip turn 2's prompt (its first id is reply 1's last)


# -- the read is the layer's own attention geometry ---------------------------------------------
def test_read_matches_expanded_head_reference(tiny_llama):
    """With source=all and RoPE, the read at layer l is softmax attention over strictly earlier tokens,
    computed here the slow way with transformers' repeat_kv (expanded heads)."""
    lm, layer = tiny_llama, 2
    spec = parse_arm(f"continuity:linkage=1,gain=1,source=all,layers={layer}")
    d = Dialogue(lm, [spec], record_traces=True)
    ids, roles = mixed_sequence(16)
    captured = {}
    attn = lm.model.model.layers[layer].self_attn

    def grab(module, args, kwargs, output):
        captured["x"] = kwargs["hidden_states"][0].clone()
        captured["pe"] = kwargs["position_embeddings"]
        captured["a"] = output[0][0].clone()

    h = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        d._forward([ids], [roles], 0, logits_to_keep=1)
    finally:
        h.remove()
    x, (cos, sin) = captured["x"], captured["pe"]
    T, hd = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    strictly_before = torch.ones(T, T).tril(-1).bool()
    scores = scores.masked_fill(~strictly_before, float("-inf"))
    w = torch.nan_to_num(torch.softmax(scores, -1))
    traces = [t for t in d.arms[0].mechanism.traces if t.layer == layer]
    assert len(traces) == T - 1  # the first token has nothing before it
    for t in traces:
        p = t.position
        assert t.slot_keys == list(range(T))
        assert torch.allclose(torch.tensor(t.weights), w[0, :, p].mean(0), atol=1e-5)
    assert d.arms[0].mechanism.call_counts[layer] == 1


def test_delta_added_is_reference_delta(tiny_llama):
    lm, layer = tiny_llama, 1
    ids, roles = mixed_sequence(12)
    outs = {}
    attn = lm.model.model.layers[layer].self_attn
    for name, arm in [("plain", "observer"), ("linked", f"continuity:linkage=0.5,gain=2,source=all,layers={layer}")]:
        d = Dialogue(lm, [parse_arm(arm)])
        # our hook runs after this one? register after the host's hook: the host hooks on first use
        MechanismHost.of(lm.model).ensure_hooks([layer])
        h = attn.register_forward_hook(
            lambda m, a, k, o: outs.__setitem__(name, (k["hidden_states"][0].clone(), o[0][0].clone())),
            with_kwargs=True,
        )
        try:
            d._forward([ids], [roles], 0, logits_to_keep=1)
        finally:
            h.remove()
    x, plain = outs["plain"]
    _, linked = outs["linked"]
    T, hd = x.shape[0], attn.head_dim
    cos, sin = lm.model.model.rotary_emb(x[None], torch.arange(T)[None])
    q = attn.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    scores = ((q @ k.transpose(-1, -2)) * attn.scaling).masked_fill(~torch.ones(T, T).tril(-1).bool(), float("-inf"))
    w = torch.nan_to_num(torch.softmax(scores, -1))
    ref_delta = torch.nn.functional.linear((w @ v).transpose(1, 2).reshape(T, -1), attn.o_proj.weight)
    assert torch.allclose(linked - plain, 2 * 0.5 * ref_delta, atol=1e-5)


# -- batched arms == arms alone ------------------------------------------------------------------
BATCH = [
    "observer",
    "continuity:linkage=1,gain=1,source=all",
    "continuity:linkage=0.5,rope=none,gain=1",
    "continuity:linkage=1,greedy=false,temperature=0.9,seed=7",
]


def run_turns(lm, arms, turns, n=10):
    d = Dialogue(lm, [parse_arm(a) for a in arms])
    return [[r.token_ids for r in d.send(t, max_new_tokens=n)] for t in turns], d


def test_batched_arms_match_alone(tiny):
    turns = [PROMPTS[1], "I disagree. Are you sure?"]
    batched, db = run_turns(tiny, BATCH, turns)
    for i, arm in enumerate(BATCH):
        alone, da = run_turns(tiny, [arm], turns)
        assert [t[i] for t in batched] == [t[0] for t in alone], arm
        # teacher-forced logits of a third turn agree within 1e-4
    probe = "Summarise your position."
    forced = [[5, 6, 7, 8] for _ in BATCH]
    lb = db.teacher_force(probe, forced)
    for i, arm in enumerate(BATCH):
        _, da = run_turns(tiny, [arm], turns)
        la = da.teacher_force(probe, [forced[i]])
        assert (lb[i] - la[0]).abs().max() <= 1e-4


def test_batched_arms_match_alone_embedded(embedded):
    arms = ["observer", "continuity:linkage=1", "continuity:linkage=1,greedy=false,seed=3"]
    batched, _ = run_turns(embedded, arms, [PROMPTS[0], "Are you sure?"], n=12)
    for i, arm in enumerate(arms):
        alone, _ = run_turns(embedded, [arm], [PROMPTS[0], "Are you sure?"], n=12)
        assert [t[i] for t in batched] == [t[0] for t in alone], arm


def test_sampling_depends_on_seed_only(tiny):
    a, _ = run_turns(tiny, ["observer:greedy=false,seed=1", "observer:greedy=false,seed=1"], [PROMPTS[0]], n=15)
    b, _ = run_turns(tiny, ["observer:greedy=false,seed=2"], [PROMPTS[0]], n=15)
    assert a[0][0] == a[0][1]
    assert a[0][0] != b[0][0]


# -- memory scope --------------------------------------------------------------------------------
def test_memory_persists_across_turns_in_dialogue_scope(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("continuity:linkage=1"), parse_arm("continuity:linkage=1,scope=turn")])
    d.send(PROMPTS[0], max_new_tokens=8)
    size_1 = [a.mechanism.memory_size() for a in d.arms]
    turn2_start = d.arms[1].length
    d.send("Are you sure?", max_new_tokens=8)
    dialogue_mem, turn_mem = (a.mechanism for a in d.arms)
    assert size_1[0] > 0
    assert dialogue_mem.memory_size() > size_1[0]
    assert min(dialogue_mem.memory_positions()) < turn2_start  # turn-1 answer still there
    assert min(turn_mem.memory_positions()) >= turn2_start - 1  # only this turn's tokens (+ the pending one)


def test_rollback_restores_everything(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("continuity:linkage=1"), parse_arm("observer")])
    d.send(PROMPTS[0], max_new_tokens=8)
    first = [r.token_ids for r in d.send("Are you sure?", max_new_tokens=8)]
    d.rollback()
    again = [r.token_ids for r in d.send("Are you sure?", max_new_tokens=8)]
    assert first == again


# -- the seed variant reproduces the published behaviour ----------------------------------------
def test_seed_variant_prefill_sees_the_future(tiny_llama):
    ids, roles = mixed_sequence(20)
    changed = ids[:15] + [7] * 5
    arm = "continuity:variant=seed,linkage=1,gain=1"
    a, b = full_forward(tiny_llama, arm, ids, roles), full_forward(tiny_llama, arm, changed, roles)
    assert (a[:15] - b[:15]).abs().max() > 1e-4  # bidirectional: later tokens change earlier logits
    cached, uncached = stepwise_forward(tiny_llama, arm, ids, roles), a
    assert (cached - uncached).abs().max() > 1e-4  # and cached != uncached, as published


def test_seed_variant_decode_is_previous_token_skip(tiny_llama):
    from engine.mechanisms.continuity import Continuity

    layer = 1
    mech = Continuity(Continuity.Settings(variant="seed", layers=[layer]), tiny_llama.model)
    attn = tiny_llama.model.model.layers[layer].self_attn
    from engine.mechanisms.base import StepRow

    def row(n, start):
        return StepRow(torch.arange(start, start + n), torch.full((n,), A), torch.zeros(n, dtype=torch.long), 0, False)

    x1, x2, x3 = torch.randn(5, 64), torch.randn(1, 64), torch.randn(1, 64)
    from engine.mechanisms.base import LayerCall

    def call(x, r):
        return mech.forward(LayerCall(layer, attn, x, None, torch.zeros(x.shape[0], 64), r, {}))

    def skip(x):  # W_o W_v x: a softmax over one memory row is 1
        v = attn.v_proj(x).view(1, 2, 16)  # 2 KV heads of 16
        expanded = v.repeat_interleave(2, dim=1).reshape(1, 64)  # each query head reads its KV head's value
        return torch.nn.functional.linear(expanded, attn.o_proj.weight)

    call(x1, row(5, 0))  # prefill
    # the first decode step reads only the prompt's LAST row (the published memory[:, -1, :])
    assert torch.allclose(call(x2, row(1, 5)), skip(x1[-1:]), atol=1e-6)
    delta = call(x3, row(1, 6))
    assert torch.allclose(delta, skip(x2), atol=1e-6)
    mech.begin_turn(1)
    assert mech.memory_size() == 0  # reset before every turn


# -- 4-bit ---------------------------------------------------------------------------------------
def test_4bit_load_and_continuity(tmp_path):
    """Position-matched: bitsandbytes' CPU kernel may give row-position-dependent results, so the claim
    is that row k of [observer, X] equals row k of [continuity λ=0, X] (same batch shape) bit for bit."""
    from engine.model import load_model

    lm = load_model(load_in_4bit=True, verbose=False)
    assert lm.identity.quantization == "bnb-nf4"
    linked = "continuity:linkage=1,gain=1,source=all"
    tok_a, log_a = dialogue_logits(lm, ["observer", linked], PROMPTS[0], 8)
    tok_b, log_b = dialogue_logits(lm, ["continuity:linkage=0", linked], PROMPTS[0], 8)
    assert tok_a == tok_b
    assert all(torch.equal(a[0], b[0]) for a, b in zip(log_a, log_b))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(log_a, log_b))
    assert any((l[1] - l[0]).abs().max() > 1e-3 for l in log_a)
