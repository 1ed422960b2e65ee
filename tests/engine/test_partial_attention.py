"""Partial attention to the source (seed 003): exactness at linkage 0, cached == uncached, the
bidirectional source mask and separate positions, per-row sources in a batch, traces, weights
files, and Inspect's attention under the edited mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import full_forward, generate_logits, run_dialogue, stepwise_forward

from engine.dialogue import Dialogue, attention_mask_4d, build_mechanism
from engine.hooks import BatchContext, MechanismHost, RowBinding
from engine.mechanisms import MECHANISMS, StepRow
from engine.mechanisms.base import ROLE_CODE
from engine.mechanisms.partial_attention import PartialAttention
from engine.spec import SpecError, parse_arm
from engine.weights import save_weights

A, U, S = ROLE_CODE["assistant"], ROLE_CODE["user"], ROLE_CODE["system"]
CASES = [c.spec for c in PartialAttention.conformance_cases()]
CAUSAL = [c.spec for c in PartialAttention.conformance_cases() if c.causal and c.cached_exact]
BIDI = "partial_attention:linkage=1,gain=1,bidirectional=true"
PROMPT = "What is the capital of France?"
SYSTEM = "You are terse. Always answer in French."


def zero(spec: str) -> str:
    return spec.replace("linkage=1", "linkage=0")


def sequence(n=28, n_src=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (n,), generator=g).tolist()
    return ids, [S] * 4 + [U] * (n_src - 4) + [A] * (n - n_src)


# -- linkage 0 is the base model, for every option ------------------------------------------------
ALL_ON = "partial_attention:linkage=1,gain=1,bidirectional=true,spe=true,fp=true,lang_emb=true"


@pytest.mark.parametrize("spec", [ALL_ON, CASES[3]])
def test_linkage_zero_equals_plain_generate(tiny, spec):
    ref_tokens, ref_logits = generate_logits(tiny, PROMPT, 6)
    tokens, logits, _ = run_dialogue(tiny, [zero(spec)], PROMPT, 6)
    assert tokens[0] == ref_tokens
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


def test_linkage_zero_equals_plain_generate_embedded(embedded):
    ref_tokens, ref_logits = generate_logits(embedded, PROMPT, 4)
    tokens, logits, _ = run_dialogue(embedded, [zero(ALL_ON)], PROMPT, 4)
    assert tokens[0] == ref_tokens
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


# -- settings ----------------------------------------------------------------------------------------
def test_settings_refuse_fractional_mask_edits_and_describe_every_field():
    for opt in ("bidirectional", "spe"):
        with pytest.raises(SpecError, match="linkage 0 or 1"):
            parse_arm(f"partial_attention:linkage=0.5,{opt}=true")
        assert parse_arm(f"partial_attention:linkage=1,{opt}=true").settings.linkage == 1
    with pytest.raises(SpecError, match="pinned text"):
        parse_arm('partial_attention:spe=true,text="a pinned source"')
    s = parse_arm('partial_attention:linkage=0.5,text="Lima, Peru: 9 million people."').settings
    assert s.text == "Lima, Peru: 9 million people." and s.resolved_layers(30) == list(range(30))
    settings = MECHANISMS["partial_attention"].Settings
    for name, f in settings.model_fields.items():
        assert f.description, name
    schema = settings.model_json_schema()["properties"]
    for name in ("linkage", "gain", "fp_dim"):
        assert "minimum" in schema[name] and "maximum" in schema[name], name


# -- cached == uncached, causality, the bidirectional source -------------------------------------
@pytest.mark.parametrize("spec", CAUSAL)
def test_cached_equals_uncached(tiny_llama, spec):
    ids, roles = sequence()
    full = full_forward(tiny_llama, spec, ids, roles)
    steps = stepwise_forward(tiny_llama, spec, ids, roles)  # the first chunk splits the source
    assert (full - steps).abs().max() <= 1e-4
    plain = full_forward(tiny_llama, "observer", ids, roles)
    assert (full - plain).abs().max() > 1e-3


def test_bidirectional_cached_equals_uncached_when_the_prefill_holds_the_source(tiny_llama):
    ids, roles = sequence()
    full = full_forward(tiny_llama, BIDI, ids, roles)
    steps = stepwise_forward(tiny_llama, BIDI, ids, roles, first_chunk=12)
    assert (full - steps).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", CAUSAL + [BIDI])
def test_targets_never_see_later_tokens(tiny_llama, spec):
    ids, roles = sequence()
    j = 20
    changed = ids[:j] + [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    a, b = full_forward(tiny_llama, spec, ids, roles), full_forward(tiny_llama, spec, changed, roles)
    assert (a[:j] - b[:j]).abs().max() <= 1e-6
    assert (a[j:] - b[j:]).abs().max() > 1e-3


def test_bidirectional_source_positions_see_each_other(tiny_llama):
    ids, roles = sequence()
    changed = list(ids)
    changed[8] = (ids[8] * 7 + 13) % 40000 + 100  # a late source token
    for spec, sees in ((BIDI, True), ("partial_attention:linkage=1,gain=1", False)):
        a, b = full_forward(tiny_llama, spec, ids, roles), full_forward(tiny_llama, spec, changed, roles)
        diff = float((a[:8] - b[:8]).abs().max())
        assert (diff > 1e-3) if sees else (diff <= 1e-6), (spec, diff)
    # the plan: the source span is one block, nothing after it gains a pair
    mech = PartialAttention(parse_arm(BIDI).settings, tiny_llama.model)
    row = StepRow(torch.arange(28), torch.tensor(roles), torch.tensor(ids), 0, False)
    allow = mech.plan(row).allow
    assert allow[:10, :10].all() and not allow[10:].any() and not allow[:, 10:].any()


def test_spe_restarts_positions_after_the_source(tiny_llama):
    ids, roles = sequence()
    mech = PartialAttention(parse_arm("partial_attention:spe=true").settings, tiny_llama.model)
    row = StepRow(torch.arange(28), torch.tensor(roles), torch.tensor(ids), 0, False)
    pos = mech.plan(row).position_ids
    assert pos[:10].tolist() == list(range(10)) and pos[10:].tolist() == list(range(18))


# -- per-row sources in a batch ------------------------------------------------------------------
def test_batched_rows_with_different_source_lengths_equal_each_row_alone(tiny_llama):
    spec = "partial_attention:linkage=1,gain=1"
    rows = [sequence(28, 10, seed=1), sequence(22, 4, seed=2), sequence(20, 16, seed=3)]
    d = Dialogue(tiny_llama, [parse_arm(spec), parse_arm(spec + ",spe=true"), parse_arm(BIDI)])
    batched = d._forward([r[0] for r in rows], [r[1] for r in rows], 0, logits_to_keep=0)
    T = batched.shape[1]
    for i, (arm, (ids, roles)) in enumerate(zip([spec, spec + ",spe=true", BIDI], rows)):
        alone = full_forward(tiny_llama, arm, ids, roles)
        assert (batched[i, T - len(ids) :] - alone).abs().max() <= 1e-4, arm
    assert [len(a.mechanism.source_positions()) for a in d.arms] == [10, 4, 16]


def test_dialogue_arms_with_pinned_and_dialogue_sources_match_alone(tiny_llama):
    arms = [
        "partial_attention:linkage=1,gain=1,bidirectional=true",
        'partial_attention:linkage=1,gain=1,text="Lima is the capital of Peru."',
        "observer",
    ]
    batched, _, db = run_dialogue(tiny_llama, arms, PROMPT, 6, system=SYSTEM)
    lb = db.teacher_force("Are you sure?", [[5, 6, 7]] * 3)
    for i, arm in enumerate(arms):
        alone, _, da = run_dialogue(tiny_llama, [arm], PROMPT, 6, system=SYSTEM)
        assert batched[i] == alone[0], arm
        la = da.teacher_force("Are you sure?", [[5, 6, 7]])
        assert (lb[i] - la[0]).abs().max() <= 1e-4, arm


# -- the source K/V are written once and kept -----------------------------------------------------
def test_source_kv_written_once_kept_across_turns_and_rolled_back(tiny_llama):
    spec = "partial_attention:linkage=1,gain=1,fp=true,fp_dim=8"
    d = Dialogue(tiny_llama, [parse_arm(spec)], system=SYSTEM, record_traces=True)
    d.send(PROMPT, max_new_tokens=4)
    mech = d.arms[0].mechanism
    src = mech.source_positions()
    roles = np.asarray(d.arms[0].roles)
    assert src == np.nonzero(np.isin(roles, [S, U]))[0].tolist()  # = Inspect's source mask
    k0 = mech.kv[0][0]
    first = d.send("Are you sure?", max_new_tokens=5)[0].token_ids
    assert mech.kv[0][0] is k0 and mech.source_positions() == src  # the user's 2nd message is no source
    traces = d.arms[0].replies[-1].traces
    assert traces and all(t.slot_keys == src and abs(t.weights.sum() - 1) < 1e-4 for t in traces)
    assert all(0 < t.scalars["branch_share"] < 1 for t in traces)
    assert {t.layer for t in traces} == set(range(4))
    d.rollback()
    assert d.send("Are you sure?", max_new_tokens=5)[0].token_ids == first
    d2 = Dialogue(tiny_llama, [parse_arm(spec)], system=SYSTEM)
    d2.send(PROMPT, max_new_tokens=1)
    d2.rollback()
    assert d2.arms[0].mechanism.source_positions() == []


# -- trained parameters: a weights file round-trips -------------------------------------------------
def test_weights_file_round_trips(tiny_llama, tmp_path):
    spec = "partial_attention:linkage=1,gain=1,fp=true,fp_dim=8,lang_emb=true,layers=1/3"
    arm = parse_arm(spec)
    fresh = PartialAttention.build_weights(arm.settings, tiny_llama.model, None)
    tensors = {k: v.clone() for k, v in fresh.state_dict().items()}
    path = tmp_path / "pa.safetensors"
    save_weights(
        path,
        tensors,
        mechanism="partial_attention",
        settings=arm.settings.model_dump(),
        model=tiny_llama.model,
        identity=tiny_llama.identity,
    )
    ids, roles = sequence()
    base = full_forward(tiny_llama, spec, ids, roles)
    same = full_forward(tiny_llama, f'partial_attention:linkage=1,gain=1,weights="{path}"', ids, roles)
    assert torch.equal(base, same)  # the file's settings are the arm's defaults; fresh = cloned
    tensors["branches.3.lang"][1] += 0.5  # a trained target embedding changes the branch
    save_weights(
        path,
        tensors,
        mechanism="partial_attention",
        settings=arm.settings.model_dump(),
        model=tiny_llama.model,
        identity=tiny_llama.identity,
    )
    moved = full_forward(tiny_llama, f'partial_attention:linkage=1,gain=1,weights="{path}"', ids, roles)
    assert (moved - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no place"):
        PartialAttention.build_weights(parse_arm("partial_attention:layers=1").settings, tiny_llama.model, tensors)


# -- Inspect's attention is eager attention under the edited mask and positions --------------------
def test_capture_equals_eager_under_the_edited_mask(tiny_llama):
    from engine.capture import capture_attention

    spec = "partial_attention:linkage=1,gain=1,bidirectional=true,spe=true"
    _, _, d = run_dialogue(tiny_llama, [spec], PROMPT, 6, system=SYSTEM)
    attn, tr = capture_attention(
        tiny_llama, parse_arm(spec), [(PROMPT, d.arms[0].replies[0].token_ids)], SYSTEM, max_size=None
    )
    T = len(tr.token_ids)
    mech = build_mechanism(parse_arm(spec), tiny_llama)
    row = StepRow(torch.arange(T), torch.tensor(tr.roles), torch.tensor(tr.token_ids), 0, False)
    plan = mech.plan(row)
    model = tiny_llama.model
    model.set_attn_implementation("eager")
    try:
        mask = attention_mask_4d(torch.ones(1, T, dtype=torch.long), T, {0: plan.allow}, "eager", model.dtype)
        ctx = BatchContext([RowBinding(0, mech, torch.ones(T, dtype=torch.bool), row)])
        with torch.inference_mode(), MechanismHost.of(model).use(ctx):
            out = model(
                torch.tensor([tr.token_ids]),
                attention_mask=mask,
                position_ids=plan.position_ids[None],
                output_attentions=True,
                logits_to_keep=1,
            )
    finally:
        model.set_attn_implementation("sdpa")
    eager = torch.stack([a[0] for a in out.attentions]).numpy()
    assert eager.shape == attn.shape
    np.testing.assert_allclose(attn, eager, atol=2e-5)
    src = np.nonzero(tr.source_mask())[0]
    assert eager[:, :, src[0], src[-1]].min() > 0  # the first source token sees the last one


# -- LoRA on the branch: the weights file holds only what trains --------------------------------------
LORA = "partial_attention:linkage=1,gain=1,fp=true,fp_dim=8,lang_emb=true,layers=1/3,lora_rank=4"


def test_lora_weights_file_holds_adapters_and_rebuilds_the_branch_from_the_model(tiny_llama, tmp_path):
    from engine.dialogue import build_mechanism

    arm = parse_arm(LORA)
    fresh = PartialAttention.build_weights(arm.settings, tiny_llama.model, None)
    trains = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trains and all("lora_" in n or ".fp_w" in n or n.endswith(".lang") for n in trains)
    assert any("k_proj.lora_A" in n for n in trains) and any("o_proj.lora_B" in n for n in trains)
    tensors = fresh.to_tensors()  # adapters (peft's names), Fp, language embeddings: never the clones
    assert not any("base_layer" in k or k.endswith("_proj.weight") for k in tensors)
    assert {k.replace("lora_A.default", "lora_A").replace("lora_B.default", "lora_B") for k in trains} == set(tensors)
    ids, roles = sequence()
    untrained = full_forward(tiny_llama, LORA.replace(",lora_rank=4", ""), ids, roles)
    assert torch.equal(full_forward(tiny_llama, LORA, ids, roles), untrained)  # fresh adapters: B = 0
    g = torch.Generator().manual_seed(0)
    trained = {k: torch.randn(v.shape, generator=g) * 0.2 if "lora_B" in k else v.clone() for k, v in tensors.items()}
    path = tmp_path / "lora.safetensors"
    save_weights(
        path,
        trained,
        mechanism="partial_attention",
        settings=arm.settings.model_dump(exclude={"weights"}),
        model=tiny_llama.model,
        identity=tiny_llama.identity,
    )
    spec = f'partial_attention:linkage=1,gain=1,weights="{path}"'
    loaded = full_forward(tiny_llama, spec, ids, roles)
    assert (loaded - untrained).abs().max() > 1e-3
    # an arm's (frozen, shared) module merges its adapters; the training-time unmerged path agrees
    mech = build_mechanism(parse_arm(spec), tiny_llama)
    lora_layers = [m for m in mech.weights.modules() if hasattr(m, "merged")]
    assert len(lora_layers) == 8 and all(m.merged for m in lora_layers)
    rebuilt = PartialAttention.build_weights(parse_arm(spec).settings, tiny_llama.model, trained)
    assert all(torch.equal(rebuilt.to_tensors()[k], trained[k]) for k in trained)
    d = Dialogue(tiny_llama, [parse_arm(spec)])
    d.arms[0].mechanism = PartialAttention(parse_arm(spec).settings, tiny_llama.model, rebuilt)
    unmerged = d._forward([ids], [roles], 0, logits_to_keep=0)[0]
    assert not any(m.merged for m in rebuilt.modules() if hasattr(m, "merged"))
    assert (unmerged - loaded).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="shape"):
        PartialAttention.build_weights(
            parse_arm(LORA.replace("lora_rank=4", "lora_rank=2")).settings, tiny_llama.model, trained
        )
    with pytest.raises(ValueError, match="no place"):
        PartialAttention.build_weights(parse_arm(LORA.replace(",lora_rank=4", "")).settings, tiny_llama.model, trained)
