"""The noise control (`noise:match=SPEC`) and the caveats shown beside arms that are not memory.

The conformance suite checks the noise arm's exactness (it registers like any mechanism); here:
the residual it adds has the matched mechanism's norm token by token and layer by layer but not its
direction, it is the same function of position in every run, bad specs are one line, a matched
weights file is recorded with the arm, and a fresh memory bank is labelled as noise everywhere.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPTS

from engine import SpecError, parse_arm
from engine.dialogue import Dialogue
from engine.mechanisms.noise import unit_noise
from lab.settings import summary


def _record(mech, out: list):
    """Wrap a mechanism's forward: append (layer, positions, returned delta · its scale)."""
    real = mech.forward

    def forward(call):
        d = real(call)
        if d is not None:
            out.append((call.layer, call.row.positions.clone(), (mech.scale * d).detach().float().clone()))
        return d

    mech.forward = forward


@pytest.mark.parametrize(
    "matched",
    [
        "continuity:linkage=1,gain=1,source=all",
        "neural_memory:linkage=1,gain=1",
        "memory_bank:linkage=1,slots=16,gain=0.5",
    ],
)
def test_noise_has_the_matched_norm_and_not_its_direction(tiny_llama, matched):
    d = Dialogue(tiny_llama, [parse_arm(matched), parse_arm(f'noise:linkage=1,match="{matched}"')])
    linked, noise = d.arms[0].mechanism, d.arms[1].mechanism
    seen_linked, seen_inner, seen_noise = [], [], []
    _record(linked, seen_linked), _record(noise.inner, seen_inner), _record(noise, seen_noise)
    d.send(PROMPTS[1], max_new_tokens=5)
    d.send("Are you sure?", max_new_tokens=5)
    assert len(seen_noise) == len(seen_inner) > 0
    for (l1, p1, inner), (l2, p2, added) in zip(seen_inner, seen_noise):
        assert l1 == l2 and torch.equal(p1, p2)
        # per token: the norm the matched mechanism would have added here, in another direction
        torch.testing.assert_close(added.norm(dim=-1), inner.norm(dim=-1), rtol=1e-5, atol=1e-6)
        big = inner.norm(dim=-1) > 1e-6
        if big.any():
            cos = torch.nn.functional.cosine_similarity(added[big], inner[big], dim=-1)
            assert cos.abs().max() < 0.5
    # the first hooked layer of the first forward sees the same hidden states in both arms
    first = seen_linked[0]
    torch.testing.assert_close(seen_noise[0][2].norm(dim=-1), first[2].norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_noise_is_a_fixed_function_of_seed_layer_and_position():
    pos = torch.tensor([0, 5, 300, 5, 1023])
    a = unit_noise(0, 3, pos, 64)
    assert torch.equal(a, unit_noise(0, 3, pos, 64))
    assert torch.equal(a[1], a[3])  # the same position, the same direction
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    assert not torch.equal(a, unit_noise(1, 3, pos, 64)) and not torch.equal(a, unit_noise(0, 4, pos, 64))
    assert torch.equal(unit_noise(0, 3, torch.tensor([300]), 64)[0], a[2])  # drawn alone or together


def test_gain_and_linkage_scale_the_noise(tiny_llama):
    spec = "continuity:linkage=1,gain=1,source=all"
    norms = {}
    for arm in (f'noise:match="{spec}"', f'noise:linkage=0.5,gain=2,match="{spec}"', f'noise:gain=3,match="{spec}"'):
        d = Dialogue(tiny_llama, [parse_arm(arm)])
        got: list = []
        _record(d.arms[0].mechanism, got)
        d.send(PROMPTS[1], max_new_tokens=1)  # the prefill alone: the same tokens in every arm
        norms[arm] = got[0][2].norm(dim=-1)  # first hooked layer, prefill: scale · ||ε|| · ||matched||
    a, b, c = norms.values()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # 0.5 · 2 = 1
    torch.testing.assert_close(3 * a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ('noise:match="observer"', "match names the observer"),
        ('noise:match="noise:linkage=1"', "match names another noise arm"),
        ('noise:match="continuity:linkage=0"', "match has linkage 0"),
        ('noise:match="continuity:linkage=1,seed=3"', "match takes the mechanism's settings only"),
        ('noise:match="bogus:x=1"', "unknown mechanism 'bogus'"),
        ('noise:match="continuity:linkage=2"', "continuity: linkage: input should be less than or equal to 1"),
        ("noise:layers=3", "set layers inside match"),
        ('noise:match="memory_bank:weights=@no_such_bank"', "does not exist"),
    ],
)
def test_bad_noise_specs_are_one_line(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        parse_arm(spec)
    assert "\n" not in str(e.value) and "Value error" not in str(e.value) and "value error" not in str(e.value)


def test_spec_round_trip_and_layers_are_the_matched_arms():
    arm = parse_arm('noise:match="continuity:gain=0.5, layers=3/5"')
    assert arm.settings.match == "continuity:linkage=1,gain=0.5,layers=3/5"  # canonical
    assert parse_arm(arm.to_string()).to_dict() == arm.to_dict()
    assert arm.settings.resolved_layers(8) == [3, 5]
    with pytest.raises(SpecError, match="layer 9 does not exist"):
        parse_arm('noise:match="continuity:layers=9"').validate_for(8)


def test_a_matched_weights_file_is_recorded_and_checked(tiny_llama, tmp_path, monkeypatch):
    from engine.distill import distill

    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(tmp_path))
    distill(
        tiny_llama,
        "Ada lives in Skelwith and mends clocks.",
        arm="memory_bank:layers=1/3",
        out=tmp_path / "b.safetensors",
    )
    arm = parse_arm('noise:match="memory_bank:weights=@b,linkage=1"')
    d = arm.to_dict()
    assert d["weights_sha256"] and arm.caveat.startswith("control:")
    Dialogue(tiny_llama, [arm]).send(PROMPTS[1], max_new_tokens=2)  # builds the matched bank from the file
    distill(
        tiny_llama,
        "Bo lives in Ambleside and bakes bread.",
        arm="memory_bank:layers=1/3",
        out=tmp_path / "b.safetensors",
    )  # another document, the same settings
    from engine.spec import ArmSpec

    with pytest.raises(SpecError, match="has changed since this arm was run"):
        ArmSpec.from_dict(d)


def test_caveats_name_arms_that_are_not_memory(tmp_path):
    fresh = parse_arm("memory_bank:linkage=1")
    assert "untrained" in fresh.caveat and "random slots" in fresh.caveat
    assert parse_arm("memory_bank:linkage=0").caveat is None  # the observer in disguise
    assert parse_arm("memory_bank:linkage=1,gate_init=0").caveat is None  # starts as the base model
    assert parse_arm("continuity:linkage=1").caveat is None and parse_arm("observer").caveat is None
    assert "seeded random" in parse_arm("neural_memory:linkage=1,persistent=4").caveat
    assert parse_arm('neural_memory:linkage=1,persistent=2,persistent_text="a b c"').caveat is None
    # the lab's pane header line carries it
    assert "⚠ untrained: a fresh memory bank is random slots" in summary(fresh)
    assert "⚠" not in summary(parse_arm("continuity:linkage=1"))


def test_cli_warns_about_a_fresh_bank(capsys):
    from engine.__main__ import main

    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "1",
                "--arm",
                "observer",
                "--arm",
                "memory_bank:linkage=1",
                "--json",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("warning: arm memory_bank")]
    assert len(lines) == 1 and "random slots" in lines[0]
