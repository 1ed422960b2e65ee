"""The neural long-term memory (seed 002): chunked == token-by-token for both memories, the implicit
attention is the linear memory's read, linkage 0 is the base model, cached == uncached, no future
leakage, snapshot -> continue == uninterrupted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPTS, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward

from engine.dialogue import Dialogue
from engine.mechanisms.neural_memory import (
    NeuralMemorySettings,
    coefficients,
    implicit_attention,
    linear_chunk,
    linear_sequential,
)
from engine.spec import parse_arm


def _random_kvq(T=70, h=2, g=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(h, T, d, generator=gen), dim=-1)
    v = torch.randn(h, T, d, generator=gen)
    q = F.normalize(torch.randn(h, g, T, d, generator=gen), dim=-1)
    return k, v, q


@pytest.mark.parametrize("step", ["constant", "surprise"])
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_linear_chunked_equals_sequential(step, chunk):
    s = NeuralMemorySettings(step=step, chunk=chunk, momentum=0.6, forget=0.03, lr=0.2)
    k, v, q = _random_kvq()
    h, T, d = k.shape
    M0, S0 = torch.zeros(h, d, d), torch.zeros(h, d, d)
    M_ref, S_ref, y_ref, e_ref, th_ref, n_ref = linear_sequential(s, M0, S0, k, v, q)
    M, S, ys, es, ths, ns = M0, S0, [], [], [], []
    for a in range(0, T, chunk):
        M, S, y, e, th, n = linear_chunk(
            s, M, S, k[:, a : a + chunk], v[:, a : a + chunk], q[:, :, a : a + chunk], True
        )
        ys.append(y), es.append(e), ths.append(th), ns.append(n)
    assert torch.allclose(M, M_ref, atol=1e-5) and torch.allclose(S, S_ref, atol=1e-5)
    assert torch.allclose(torch.cat(ys, 2), y_ref, atol=1e-5)
    assert torch.allclose(torch.cat(es, 1), e_ref, atol=1e-5)
    assert torch.allclose(torch.cat(ths, 1), th_ref, atol=1e-6)
    assert torch.allclose(torch.cat(ns, 1), n_ref, atol=1e-4)
    if step == "surprise":  # the step size really follows the error
        assert th_ref.std() > 1e-3


def test_implicit_attention_reproduces_the_read():
    """y_t = Σ_{i<t} w_{t,i} e_i with w = 2 c_{t-1-i} θ_i k_iᵀq_t, exactly (float64)."""
    s = NeuralMemorySettings(step="surprise", momentum=0.7, forget=0.02, lr=0.3, chunk=16)
    k, v, q = (x.double() for x in _random_kvq(T=50))
    h, T, d = k.shape
    _, _, y, e, th, _ = linear_sequential(
        s, torch.zeros(h, d, d, dtype=torch.float64), torch.zeros(h, d, d, dtype=torch.float64), k, v, q
    )
    w = implicit_attention(s, q, k, th, torch.arange(T), torch.arange(T))  # [h, g, T, T]
    assert torch.equal(w.triu(), torch.zeros_like(w))  # read before write: nothing at or after t
    assert torch.allclose(torch.einsum("hgtn,hnd->hgtd", w, e), y, atol=1e-10, rtol=0)
    # the closed form of c_n
    a, eta = 1 - s.forget, s.momentum
    n = torch.arange(20, dtype=torch.float64)
    assert torch.allclose(coefficients(a, eta, 19), (a ** (n + 1) - eta ** (n + 1)) / (a - eta))


def _mech(d: Dialogue, i=0):
    return d.arms[i].mechanism


def test_dialogue_history_is_the_memory_and_traces_are_its_read(tiny_llama):
    """After two turns the stored history unrolls to the memory M, and each trace's weights are the
    head-mean of the implicit attention over exactly the earlier tokens."""
    spec = "neural_memory:linkage=1,gain=1,layers=1/3,chunk=8,step=surprise"
    d = Dialogue(tiny_llama, [parse_arm(spec)], record_traces=True)
    d.send(PROMPTS[0], max_new_tokens=6)
    replies = d.send(PROMPTS[1], max_new_tokens=6)
    mech = _mech(d)
    s = mech.settings
    for layer in (1, 3):
        st = mech.state[layer]
        N = st.steps
        assert st.hist_k.shape[1] == N == len(d.arms[0].token_ids)
        c = coefficients(1 - s.forget, s.momentum, N)
        coef = c[(N - 1 - st.hist_step).long()].float()
        M = torch.einsum("n,hn,hnd,hne->hde", coef, 2 * st.hist_theta, st.hist_e, st.hist_k)
        assert torch.allclose(M, st.params[0], atol=1e-4)
    traces = [t for t in replies[0].traces if t.layer == 1]
    assert len(traces) == len(replies[0].prompt_token_ids) + 5  # prompt + fed reply tokens
    for t in traces:
        assert t.slot_keys == list(range(t.position))  # every earlier token, never itself or later
        assert len(t.weights) == t.position
        assert set(t.scalars) == {"surprise", "write_strength", "memory_norm", "gate"}
        assert t.scalars["surprise"] >= 0 and t.scalars["write_strength"] >= 0


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_chunked_prefill_equals_token_by_token_in_the_model(tiny_llama, memory):
    arm = f"neural_memory:linkage=1,gain=1,memory={memory},hidden=16,chunk=8"
    ids, roles = mixed_sequence(30)
    full = full_forward(tiny_llama, arm, ids, roles)
    steps = stepwise_forward(tiny_llama, arm, ids, roles, first_chunk=1)
    assert (full - steps).abs().max() <= 1e-4
    plain = full_forward(tiny_llama, "observer", ids, roles)
    assert (full - plain).abs().max() > 1e-3  # the memory is on the path


@pytest.mark.parametrize(
    "arm",
    [
        "neural_memory:linkage=1,gain=1,wiring=layer,step=surprise,chunk=5",
        "neural_memory:linkage=1,gain=1,memory=mlp,hidden=16",
    ],
)
def test_no_future_leakage(tiny_llama, arm):
    ids, roles = mixed_sequence(30)
    j = 18
    changed = ids[:j] + [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    a, b = full_forward(tiny_llama, arm, ids, roles), full_forward(tiny_llama, arm, changed, roles)
    assert (a[:j] - b[:j]).abs().max() <= 1e-6
    assert (a[j:] - b[j:]).abs().max() > 1e-3


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_linkage_zero_equals_plain_generate(tiny_llama, memory):
    ref_tokens, ref_logits = generate_logits(tiny_llama, PROMPTS[0], 8)
    tokens, logits = dialogue_logits(tiny_llama, [f"neural_memory:linkage=0,memory={memory}"], PROMPTS[0], 8)
    assert tokens[0] == ref_tokens
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_snapshot_then_continue_equals_uninterrupted(tiny_llama, memory):
    spec = [parse_arm(f"neural_memory:linkage=1,gain=1,memory={memory},hidden=16,layers=0/2")]
    plan = [("Hello there, I am Ada.", 5), ("My colour is teal.", 5), ("What is my colour?", 6)]
    whole = Dialogue(tiny_llama, spec)
    want = [whole.send(u, max_new_tokens=n)[0].token_ids for u, n in plan]
    # interrupted: a snapshot after turn 1, a different turn 2, restore, then the planned turns
    d = Dialogue(tiny_llama, spec)
    d.send(*plan[0][:1], max_new_tokens=plan[0][1])
    state, size = _mech(d).snapshot(), _mech(d).memory_size()
    d.send("Something else entirely, to change the memory.", max_new_tokens=4)
    assert _mech(d).memory_size() > size
    d.rollback()
    assert _mech(d).memory_size() == size == len(d.arms[0].token_ids)
    got = [d.send(u, max_new_tokens=n)[0].token_ids for u, n in plan[1:]]
    assert got == want[1:]
    # a copy, not live references: the restored state is the snapshot, and the snapshot stays usable
    m = _mech(d)
    m.restore(state)
    m.state[sorted(m.state)[0]].params[0].add_(1.0)
    fresh = Dialogue(tiny_llama, spec)
    _mech(fresh).restore(state)
    for layer, st in _mech(fresh).state.items():
        assert torch.equal(st.params[0], state[str(layer)]["params"][0])


def test_scope_turn_resets_and_settings_are_bounded(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("neural_memory:linkage=1,scope=turn,layers=1")])
    d.send(PROMPTS[0], max_new_tokens=3)
    first = _mech(d).memory_size()
    r = d.send("Again?", max_new_tokens=3)
    assert _mech(d).memory_size() == len(r[0].prompt_token_ids) + 2 < first + len(r[0].prompt_token_ids)
    for field in NeuralMemorySettings.model_fields.values():
        assert field.description
    from engine.spec import SpecError

    with pytest.raises(SpecError, match="momentum"):
        parse_arm("neural_memory:momentum=1.5")
    with pytest.raises(SpecError, match="unknown key"):
        parse_arm("neural_memory:eta=0.5")


def test_read_scalars_become_curves_over_the_transcript(tiny_llama):
    """Inspect draws every named scalar (generic): surprise and write strength over all positions, per layer."""
    from engine import figures as F
    from engine.capture import scalar_curves

    d = Dialogue(tiny_llama, [parse_arm("neural_memory:linkage=1,layers=1/3")], record_traces=True)
    traces = [t for u in (PROMPTS[0], "And then?") for t in d.send(u, max_new_tokens=4)[0].traces]
    curves = scalar_curves(traces)
    assert curves["positions"] == sorted({t.position for t in traces})
    assert [e["layer"] for e in curves["layers"]] == [1, 3]
    series = curves["layers"][0]["series"]
    assert {"surprise", "write_strength", "memory_norm"} <= set(series)
    assert all(v is not None and v >= 0 for v in series["write_strength"])
    labels = [str(t) for t in d.arms[0].token_ids]
    fig = F.scalar_curves_figure(curves, labels, reply_span=(10, 14), title="t")
    names = {a.text for a in fig.layout.annotations}
    assert {"surprise", "write strength", "memory norm"} <= names
    assert len(fig.data) == 2 * len({n for e in curves["layers"] for n in e["series"]})
    assert "no read scalars" in F.scalar_curves_figure(None, []).layout.annotations[0].text
