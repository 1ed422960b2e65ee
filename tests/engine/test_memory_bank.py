"""The memory bank (seed 001): exactness, routing causality, router losses, variants, weights files."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward

from engine.dialogue import Dialogue, DialogueError
from engine.mechanisms import MECHANISMS, MemoryBank
from engine.mechanisms.memory_bank import MemoryBankSettings, router_losses
from engine.spec import SpecError, parse_arm
from engine.weights import save_weights, shared_weights

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [c.spec for c in MemoryBank.conformance_cases()]


def test_registered_and_settings_described():
    assert MECHANISMS["memory_bank"] is MemoryBank
    for key, field in MemoryBankSettings.model_fields.items():
        assert field.description, key
    assert MemoryBankSettings.model_fields["weights"].json_schema_extra["file"] is True


@pytest.mark.parametrize("spec", CASES)
def test_linkage_zero_is_plain_generate_and_cached_equals_uncached(tiny_llama, spec):
    ref_tokens, ref_logits = generate_logits(tiny_llama, PROMPTS[0], 6)
    tokens, logits = dialogue_logits(tiny_llama, [spec.replace("linkage=1", "linkage=0")], PROMPTS[0], 6)
    assert tokens[0] == ref_tokens and all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))
    ids, roles = mixed_sequence(30)
    full = full_forward(tiny_llama, spec, ids, roles)
    assert (full - stepwise_forward(tiny_llama, spec, ids, roles)).abs().max() <= 1e-4
    assert (full - full_forward(tiny_llama, "observer", ids, roles)).abs().max() > 1e-3


def test_linkage_zero_embedded_bit_identical(embedded):
    spec = "memory_bank:linkage=0,slots=64,chapters=4,top_k=2,routing=prefix_mean"
    ref_tokens, ref_logits = generate_logits(embedded, PROMPTS[1], 8)
    tokens, logits = dialogue_logits(embedded, [spec], PROMPTS[1], 8)
    assert tokens[0] == ref_tokens and all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


def _chapters_by_position(lm, spec, ids, roles):
    d = Dialogue(lm, [parse_arm(spec)], record_traces=True)
    logits = d._forward([ids], [roles], 0, logits_to_keep=0)[0]
    picks = {(t.layer, t.position): t.scalars["top_chapter"] for t in d.arms[0].mechanism.traces}
    return logits, picks


@pytest.mark.parametrize("routing", ["token", "prefix_mean"])
def test_routing_is_causal(tiny_llama, routing):
    """Changing later tokens never changes an earlier position's chapter choice or logits."""
    spec = f"memory_bank:linkage=1,slots=32,chapters=8,top_k=2,routing={routing},sharing=per_layer"
    ids, roles = mixed_sequence(30)
    j = 18
    changed = ids[:j] + [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    a, pa = _chapters_by_position(tiny_llama, spec, ids, roles)
    b, pb = _chapters_by_position(tiny_llama, spec, changed, roles)
    assert (a[:j] - b[:j]).abs().max() <= 1e-6
    assert {k: v for k, v in pa.items() if k[1] < j} == {k: v for k, v in pb.items() if k[1] < j}
    assert (a[j:] - b[j:]).abs().max() > 1e-3
    assert len(set(pa.values())) > 1  # the router does choose among chapters


def test_router_losses_hand_computed():
    # two tokens, two chapters, top-1: probs (.5, .5) and (.75, .25); both pick chapter 0
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = router_losses(logits, torch.tensor([[0], [0]]), 2)
    # f = (1, 0), P = (.625, .375): balance = 2·(1·.625); aux = ((1-.5)² + (0-.5)²)/2; z = (ln² 2 + ln² 4)/2
    assert out["router_balance"].item() == pytest.approx(1.25)
    assert out["router_aux"].item() == pytest.approx(0.25)
    assert out["router_z"].item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_router_losses_reach_call_aux(tiny_llama):
    from engine.hooks import BatchContext, MechanismHost, RowBinding
    from engine.mechanisms import StepRow

    settings = parse_arm("memory_bank:linkage=1,slots=16,chapters=4,top_k=2,layers=1/2").settings
    mech = MemoryBank(settings, tiny_llama.model, MemoryBank.build_weights(settings, tiny_llama.model, None))
    ids = torch.tensor([mixed_sequence(10)[0]])
    row = StepRow(torch.arange(10), torch.zeros(10, dtype=torch.long), ids[0], 0, False)
    ctx = BatchContext([RowBinding(0, mech, torch.ones(10, dtype=torch.bool), row)])
    with torch.enable_grad(), MechanismHost.of(tiny_llama.model).use(ctx):
        out = tiny_llama.model(input_ids=ids)
    assert set(ctx.aux[0]) == {f"{n}.{l}" for n in ("router_balance", "router_aux", "router_z") for l in (1, 2)}
    (out.logits.float().mean() + sum(ctx.aux[0].values())).backward()
    assert mech.weights.bank_0_router_weight.grad.abs().sum() > 0
    assert mech.weights.bank_0_slots.grad.abs().sum() > 0


def test_factorized_equals_its_dense_product(tiny_llama):
    fact = parse_arm("memory_bank:linkage=1,slots=16,variant=factorized,rank=4,chapters=2,layers=1/3").settings
    dense = parse_arm("memory_bank:linkage=1,slots=16,chapters=2,layers=1/3").settings
    wf = MemoryBank.build_weights(fact, tiny_llama.model, None)
    wd = MemoryBank.build_weights(dense, tiny_llama.model, None)
    with torch.no_grad():
        wd.bank_0_slots.copy_(wf.bank_0_a @ wf.bank_0_b.T)
        wd.bank_0_router_weight.copy_(wf.bank_0_router_weight)
    ids, roles = mixed_sequence(20)
    outs = []
    for s, w in ((fact, wf), (dense, wd)):
        d = Dialogue(tiny_llama, [parse_arm("observer")])
        from engine.dialogue import ArmState

        d.arms = [ArmState(parse_arm("memory_bank:linkage=1"), MemoryBank(s, tiny_llama.model, w))]
        outs.append(d._forward([ids], [roles], 0, logits_to_keep=0)[0])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_fresh_bank_is_deterministic(tiny_llama):
    s = MemoryBankSettings(slots=8)
    a = MemoryBank.build_weights(s, tiny_llama.model, None).to_tensors()
    b = MemoryBank.build_weights(s, tiny_llama.model, None).to_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _save(tmp_path, lm, spec, name="bank.safetensors", labels=None):
    settings = parse_arm(spec).settings
    w = MemoryBank.build_weights(settings, lm.model, None)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if labels:
        w.labels[0] = labels
    path = tmp_path / name
    save_weights(
        path,
        w.to_tensors(),
        mechanism="memory_bank",
        settings=settings.model_dump(exclude={"weights"}),
        model=lm.model,
        identity=lm.identity,
    )
    return path, w


def test_save_load_round_trip_exact(tiny_llama, tmp_path):
    spec = "memory_bank:linkage=1,slots=8,chapters=2,top_k=1,layers=1/2,sharing=per_layer"
    labels = [f"'tok{i}'" for i in range(8)]
    path, w = _save(tmp_path, tiny_llama, spec, labels=labels)
    arm = parse_arm(f'memory_bank:linkage=1,weights="{path}"')
    assert arm.settings.slots == 8 and arm.settings.sharing == "per_layer"  # the file's settings are defaults
    loaded, sha = shared_weights(MemoryBank, arm.settings, tiny_llama.model, tiny_llama.identity)
    want, got = w.to_tensors(), loaded.to_tensors()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert loaded.slot_labels(0)[5] == "chapter 1 / 'tok5'"
    d = Dialogue(tiny_llama, [arm], record_traces=True)
    d.send(PROMPTS[0], max_new_tokens=2)
    assert d.arms[0].mechanism.traces[0].slot_keys[0] == "chapter 0 / 'tok0'"
    one, _ = _save(tmp_path, tiny_llama, spec.replace("chapters=2", "chapters=1"), "one.safetensors", labels)
    one_chapter = parse_arm(f'memory_bank:linkage=1,weights="{one}"')
    d = Dialogue(tiny_llama, [one_chapter], record_traces=True)
    d.send(PROMPTS[0], max_new_tokens=1)
    assert d.arms[0].mechanism.traces[0].slot_keys[:2] == ["'tok0'", "'tok1'"]  # one chapter: the text alone
    unlabelled = MemoryBank.build_weights(parse_arm("memory_bank:slots=4,chapters=1").settings, tiny_llama.model, None)
    assert unlabelled.slot_labels(0) == ["slot 0", "slot 1", "slot 2", "slot 3"]


def test_bad_files_refused(tiny_llama, embedded, tmp_path):
    path, _ = _save(tmp_path, tiny_llama, "memory_bank:linkage=1,slots=8,layers=1")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("trunc", "junk"):
        with pytest.raises(SpecError, match="not a readable safetensors file"):
            parse_arm(f'memory_bank:weights="{tmp_path / name}.safetensors"')
    arm = parse_arm(f'memory_bank:weights="{path}"')
    with pytest.raises(DialogueError, match="made for another model"):
        Dialogue(embedded, [arm])
    with pytest.raises(DialogueError, match="does not fit these settings"):
        Dialogue(tiny_llama, [parse_arm(f'memory_bank:weights="{path}",slots=16')])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("memory_bank:slots=10,chapters=4", "equal chapters"),
        ("memory_bank:slots=16,chapters=4,top_k=5", "top_k"),
        ("memory_bank:slots=16,chapters=2,shared_chapters=2", "no chapter to route"),
        ("memory_bank:placement=all,layers=1/2", "placement=custom"),
        ("memory_bank:variant=huge", "variant"),
    ],
)
def test_bad_settings_one_line(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_arm(spec)


def test_placement_and_sharing():
    s = MemoryBankSettings(placement="every_n", placement_k=3, sharing="every_k", share_k=2)
    layers = s.resolved_layers(12)
    assert layers == [2, 5, 8, 11] and s.bank_of(layers) == {2: 0, 5: 0, 8: 1, 11: 1}
    assert MemoryBankSettings(placement="last_k", placement_k=2).resolved_layers(30) == [28, 29]
    assert MemoryBankSettings(placement="first_k", placement_k=2).resolved_layers(30) == [0, 1]
    assert len(MemoryBankSettings(placement="all").resolved_layers(30)) == 30


def test_chapter_usage_view_is_a_tokens_by_chapters_heatmap(tiny_llama):
    """Inspect's read-scalar figure draws the bank's per-chapter weights as one heatmap (the seed's
    'which chapters are selected' view), not one panel per chapter."""
    from engine import Dialogue, parse_arm
    from engine import figures as F
    from engine.capture import scalar_curves

    d = Dialogue(
        tiny_llama, [parse_arm("memory_bank:linkage=1,slots=16,chapters=4,top_k=2,routing=token")], record_traces=True
    )
    reply = d.send("Which chapters do you read?", max_new_tokens=5)[0]
    curves = scalar_curves(reply.traces)
    names = {n for e in curves["layers"] for n in e["series"]}
    singles, families = F.scalar_families(sorted(names))
    assert [k for k, _ in families["chapter"]] == [0, 1, 2, 3]
    fig = F.scalar_curves_figure(curves, ["t"] * 200, title="bank")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 1 and heat[0].z.shape == (4, len(curves["positions"]))
    z = heat[0].z
    # top-2 of 4 chapters, renormalised: each token's chapter weights sum to one (averaged over layers)
    import numpy as np

    assert np.allclose(np.nansum(z, axis=0), 1.0, atol=1e-4)
    assert not any(t.type == "scatter" and (t.hovertemplate or "").startswith("chapter ") for t in fig.data)
    assert "top_chapter" in singles and "router_entropy" in singles
