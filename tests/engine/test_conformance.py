"""The conformance suite: the invariants every registered mechanism must keep.

Parametrized over `MECHANISMS` and each mechanism's `conformance_cases()` (specs at linkage 1,
with flags saying which invariants a configuration claims). Nothing here names a mechanism: a new
one joins by registering. Checked for every case:

- linkage 0 is the base model bit for bit: `torch.equal` on every step's logits and identical
  greedy tokens against plain transformers `generate` (each mechanism's first configuration on tiny
  Llama, Qwen2 and Mistral and on the embedded model; its other configurations on tiny Llama);
- position-matched rows: row k of `[observer, X]` equals row k of `[mechanism at λ=0, X]`, bit for
  bit (same batch shape, so the claim holds for any kernel, dtype or quantization);
- cached == uncached within 1e-4 at linkage 1 (where claimed), no future leakage (where claimed);
- snapshot -> more turns -> restore -> the same tokens, and a snapshot is never mutated later;
- batched == alone; read traces in the common shape;
- Inspect's captured attention equals eager attention under the mechanism's own mask and positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PROMPTS, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward

from engine.dialogue import Dialogue
from engine.mechanisms import MECHANISMS, ReadTrace
from engine.spec import ArmSpec, parse_arm

CASES = [pytest.param(case, id=case.spec) for name, cls in MECHANISMS.items() for case in cls.conformance_cases()]
FIRST_CASES = [pytest.param(cls.conformance_cases()[0], id=name) for name, cls in MECHANISMS.items()]
# Each mechanism's first configuration on all three architectures, the others on Llama (CI time).
ARCH_CASES = [
    pytest.param(arch, case, id=f"{arch}-{case.spec}")
    for name, cls in MECHANISMS.items()
    for k, case in enumerate(cls.conformance_cases())
    for arch in (("llama", "qwen2", "mistral") if k == 0 else ("llama",))
]
_TINY: dict = {}


@pytest.fixture
def tiny_arch(tokenizer):
    """tiny_arch(name) -> the tiny random model of that architecture (built once per session)."""
    from conftest import make_tiny

    def get(arch):
        if arch not in _TINY:
            _TINY[arch] = make_tiny(arch, tokenizer)
        return _TINY[arch]

    return get


def _flag(params, flag):
    return [p for p in params if getattr(p.values[-1], flag)]


def at_linkage(spec: str, linkage: float) -> ArmSpec:
    arm = parse_arm(spec)
    settings = type(arm.settings)(**{**arm.settings.model_dump(), "linkage": linkage})
    return ArmSpec(arm.mechanism, settings, arm.sampling, arm.label)


def spec_at(spec: str, linkage: float) -> str:
    return at_linkage(spec, linkage).to_string()


def test_every_mechanism_has_cases():
    for name, cls in MECHANISMS.items():
        cases = cls.conformance_cases()
        assert cases, name
        for case in cases:
            assert parse_arm(case.spec).mechanism == name and parse_arm(case.spec).linkage == 1.0, case.spec


# -- linkage 0 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,case", ARCH_CASES)
def test_linkage_zero_equals_plain_generate(tiny_arch, arch, case):
    tiny = tiny_arch(arch)
    ref_tokens, ref_logits = generate_logits(tiny, PROMPTS[0], 10)
    tokens, logits = dialogue_logits(tiny, [spec_at(case.spec, 0)], PROMPTS[0], 10)
    assert tokens[0] == ref_tokens
    assert len(logits) == len(ref_logits)
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


@pytest.mark.parametrize("case", FIRST_CASES)
def test_linkage_zero_equals_plain_generate_embedded(embedded, case):
    ref_tokens, ref_logits = generate_logits(embedded, PROMPTS[1], 12)
    tokens, logits = dialogue_logits(embedded, [spec_at(case.spec, 0)], PROMPTS[1], 12)
    assert tokens[0] == ref_tokens
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


@pytest.mark.parametrize("arch,case", ARCH_CASES)
def test_position_matched_rows_are_bit_identical(tiny_arch, arch, case):
    """Row 0 of [observer, X] equals row 0 of [mechanism at λ=0, X], every step, bit for bit."""
    tiny = tiny_arch(arch)
    linked = spec_at(case.spec, 1)
    tok_a, log_a = dialogue_logits(tiny, ["observer", linked], PROMPTS[1], 8)
    tok_b, log_b = dialogue_logits(tiny, [spec_at(case.spec, 0), linked], PROMPTS[1], 8)
    assert tok_a == tok_b
    assert all(torch.equal(a[0], b[0]) for a, b in zip(log_a, log_b))
    if case.changes_output:  # the linked row did change: the mechanism is on the path
        assert not all(torch.equal(a[1], a[0]) for a in log_a)


# -- cached == uncached, causality ---------------------------------------------------------------
@pytest.mark.parametrize("arch,case", _flag(ARCH_CASES, "cached_exact"))
def test_cached_equals_uncached(tiny_arch, arch, case):
    tiny = tiny_arch(arch)
    ids, roles = mixed_sequence()
    full = full_forward(tiny, case.spec, ids, roles)
    steps = stepwise_forward(tiny, case.spec, ids, roles)
    assert (full - steps).abs().max() <= 1e-4
    if case.changes_output:
        plain = full_forward(tiny, "observer", ids, roles)
        assert (full - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch,case", _flag(ARCH_CASES, "causal"))
def test_no_future_leakage(tiny_arch, arch, case):
    tiny = tiny_arch(arch)
    ids, roles = mixed_sequence()
    j = 25
    changed = list(ids)
    changed[j:] = [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    a, b = full_forward(tiny, case.spec, ids, roles), full_forward(tiny, case.spec, changed, roles)
    assert (a[:j] - b[:j]).abs().max() <= 1e-6
    assert (a[j:] - b[j:]).abs().max() > 1e-3


# -- state -----------------------------------------------------------------------------------------
def _leaves(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _leaves(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _leaves(v)]
    return []


@pytest.mark.parametrize("case", CASES)
def test_snapshot_restore_replays_the_same_tokens(tiny_llama, case):
    d = Dialogue(tiny_llama, [parse_arm(case.spec)])
    d.send(PROMPTS[1], max_new_tokens=6)
    d.send("Are you sure?", max_new_tokens=6)
    mech = d.arms[0].mechanism
    snap = mech.snapshot()
    frozen = [t.clone() for t in _leaves(snap)]
    first = d.send("Say it again.", max_new_tokens=6)[0].token_ids
    assert all(torch.equal(a, b) for a, b in zip(_leaves(snap), frozen)), "the snapshot changed after it was taken"
    d.rollback()
    assert d.send("Say it again.", max_new_tokens=6)[0].token_ids == first
    mech.restore(snap)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(mech.snapshot()), frozen))


@pytest.mark.parametrize("arch,case", ARCH_CASES)
def test_batched_equals_alone(tiny_arch, arch, case):
    tiny = tiny_arch(arch)
    turns = [PROMPTS[1], "I disagree. Are you sure?"]
    batch = ["observer", case.spec, spec_at(case.spec, 0)]
    d = Dialogue(tiny, [parse_arm(a) for a in batch])
    batched = [[r.token_ids for r in d.send(t, max_new_tokens=6)] for t in turns]
    for i, arm in enumerate(batch):
        a = Dialogue(tiny, [parse_arm(arm)])
        alone = [a.send(t, max_new_tokens=6)[0].token_ids for t in turns]
        assert [t[i] for t in batched] == alone, arm


@pytest.mark.parametrize("case", CASES)
def test_traces_have_the_common_shape(tiny_llama, case):
    d = Dialogue(tiny_llama, [parse_arm(case.spec)], record_traces=True)
    d.send(PROMPTS[1], max_new_tokens=4)
    reply = d.send("Are you sure?", max_new_tokens=4)[0]
    n_heads = tiny_llama.model.config.num_attention_heads
    for tr in reply.traces:
        assert isinstance(tr, ReadTrace)
        assert isinstance(tr.layer, int) and isinstance(tr.position, int)
        assert tr.weights.shape == (len(tr.slot_keys),) and np.isfinite(tr.weights).all()
        assert tr.per_head is None or tr.per_head.shape == (n_heads, len(tr.slot_keys))
        assert all(isinstance(k, (int, str)) for k in tr.slot_keys)
        assert all(np.isfinite(float(v)) for v in tr.scalars.values())
        tr.to_dict()  # JSON-able


# -- Inspect draws the attention the model really used -------------------------------------------
class _EagerDialogue(Dialogue):
    """Runs every step with eager attention and keeps `output_attentions`: the reference."""

    def _forward(self, chunks, roles, turn, logits_to_keep, carried=None):
        model, rows = self.model, self.attn_rows
        real = model.forward

        def with_attentions(*args, **kwargs):
            out = real(*args, output_attentions=True, **kwargs)
            rows.append((self.arms[0].length, torch.stack([a[0] for a in out.attentions]).float()))
            return out

        model.forward = with_attentions
        try:
            return super()._forward(chunks, roles, turn, logits_to_keep, carried)
        finally:
            del model.forward


@pytest.mark.parametrize("case", CASES)
def test_capture_equals_eager_attention(tiny_llama, case):
    from engine.capture import capture_attention

    lm = tiny_llama
    d = Dialogue(lm, [parse_arm(case.spec)])
    reply = d.send(PROMPTS[1], max_new_tokens=5)[0]
    attn, tr = capture_attention(lm, parse_arm(case.spec), [(PROMPTS[1], reply.token_ids)], max_size=None)

    ref = _EagerDialogue(lm, [parse_arm(case.spec)])
    ref.attn_rows = []
    lm.model.set_attn_implementation("eager")
    try:
        ref.teacher_force(PROMPTS[1], [reply.token_ids], keep_logits=False)
    finally:
        lm.model.set_attn_implementation("sdpa")
    eager = np.zeros_like(attn)
    covered = 0
    for start, rows in ref.attn_rows:  # rows [L, H, n, start + n]: one step's queries over the cache
        n = rows.shape[2]
        eager[:, :, start : start + n, : start + n] = rows.numpy()
        covered = start + n
    assert covered >= attn.shape[-1] - 1  # all but the reply's last token, which nothing fed yet
    np.testing.assert_allclose(attn[:, :, :covered, :covered], eager[:, :, :covered, :covered], atol=2e-5)


def test_one_capture_records_every_row_as_alone(tiny_llama):
    """Inspect records every arm of a turn in one pass: each batch row's attention (its own mask and
    positions, its own buckets) equals that arm captured alone, which the test above ties to eager."""
    from engine.capture import capture_attention, capture_turn

    lm = tiny_llama
    specs = [p.values[0].spec for p in FIRST_CASES]  # each mechanism's first configuration (CI time)
    for k in range(0, len(specs), 3):
        group = ["observer"] + specs[k : k + 3]
        d = Dialogue(lm, [parse_arm(s) for s in group])
        turns = []
        for m, n in ((PROMPTS[1], 5), ("Are you sure?", 4)):
            turns.append((m, [r.token_ids for r in d.send(m, max_new_tokens=n)]))
        cap = capture_turn(lm, [parse_arm(s) for s in group], turns, max_size=None)
        assert cap.recorded == list(range(len(group)))
        for r, spec in enumerate(group):
            alone, tr = capture_attention(lm, parse_arm(spec), [(u, reps[r]) for u, reps in turns], max_size=None)
            view = cap.for_arm(r)
            assert view.focus.token_ids == tr.token_ids, spec
            np.testing.assert_allclose(view.attention, alone, atol=2e-5, err_msg=spec)
