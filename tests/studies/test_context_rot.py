"""Context rot: the source_grounding scorer (entity precision, adherence at start vs end), the source
ablation and the run/summary on a tiny model."""

from __future__ import annotations

import pytest

from experiments.protocol import get_protocol
from experiments.scoring import adherence, entities, entity_precision, reply_segments, score_dialogue
from studies.context_rot import ablated_system, format_summary, run_context_rot, summarise


def test_entities_and_precision():
    assert entities("I met Anna Smith in Lyon in 1999. The tour costs 14 euros.") == [
        "anna smith",
        "lyon",
        "1999",
        "14",
    ]
    src = "Claire Martin guides visitors in Lyon; tours cost 14 euros and the hall opened in 1971."
    assert entity_precision("Visit Lyon with Claire Martin for 14 euros.", src) == 1.0
    assert entity_precision("Visit Lyon, then Paris in 2020.", src) == pytest.approx(1 / 3)
    assert entity_precision("nothing named here.", src) is None


def test_adherence_start_vs_end():
    item = {"avoid_words": "very,really", "avoid_chars": "!?", "keywords": "lyon,food", "no_lists": 1}
    good = "We love Lyon and its fine food. " * 20
    bad = "We saw Paris, really nice! " * 20
    start, end = reply_segments(good + bad, n_words=30)
    assert adherence(start, item) == 1.0 and adherence(end, item) == pytest.approx(0.5)
    assert adherence("- a list line about lyon", item) == pytest.approx(5 / 6)
    res = score_dialogue(
        "source_grounding",
        {**item, "city": "Lyon"},
        [good + bad],
        system="You guide visitors in {city}.",
        first_turn="Tell me about food.",
        n_words=30,
    )
    d = res.turns[0]["data"]
    assert d["adherence_drift"] == pytest.approx(-0.5) and res.turns[0]["label"] == "drifted"
    assert d["entity_precision_start"] == 1.0 and d["entity_precision_end"] == 0.0


def test_protocol_passes_the_source_to_the_scorer():
    p = get_protocol("context_rot")
    opts = p.scorer_options("source_grounding")
    assert opts["system"] == p.system and opts["first_turn"] == p.turns[0]
    assert p.max_new_tokens >= 200 and len(p.render_system(p.items[0])) > 600


def test_source_ablation(tokenizer):
    system = get_protocol("context_rot").render_system(get_protocol("context_rot").items[0])
    n = len(tokenizer(system, add_special_tokens=False)["input_ids"])
    rnd = ablated_system(tokenizer, system, "random", seed=1)
    assert rnd != system and abs(len(tokenizer(rnd, add_special_tokens=False)["input_ids"]) - n) <= n * 0.3
    assert ablated_system(tokenizer, system, "none") is None and ablated_system(tokenizer, system, "real") == system
    with pytest.raises(ValueError, match="unknown source condition"):
        ablated_system(tokenizer, system, "shuffled")


def test_run_and_summary_on_a_tiny_model(tiny_llama):
    recs = run_context_rot(
        tiny_llama,
        get_protocol("context_rot"),
        ["observer", "partial_attention:linkage=1"],
        items=2,
        max_new_tokens=10,
        conditions=("real", "none"),
        window=3,
    )
    assert len(recs) == 2 * 2 * 2
    real = [r for r in recs if r["condition"] == "real"]
    assert all(0 <= r["source_mass_start"] <= 1 and len(r["source_curve"]) == r["n_tokens"] for r in real)
    pa = [r for r in real if r["arm"] != "observer"]
    assert all(0 < r["branch_share_start"] < 1 for r in pa)
    assert all(r.get("branch_share_start") is None for r in real if r["arm"] == "observer")
    s = summarise(recs)
    assert "real / partial_attention λ=1 - observer" in s["vs_observer"]
    assert "source_mass_start" in s["by_arm"]["real / observer"]
    assert "paired differences" in format_summary(s)
