"""The engine CLI and arm specs: clear one-line errors, a JSON contract, round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.spec import ArmSpec, SpecError, parse_arm

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("continuity:linkage=7", "linkage"),
        ("continuity:linkage=-0.1", "linkage"),
        ("continuity:layers=99", "layer 99 does not exist"),
        ("bogus", "unknown mechanism 'bogus'"),
        ("continuity:foo=1", "unknown key 'foo'"),
        ("continuity:linkage", "is not key=value"),
        ("observer:linkage=1", "observer takes no mechanism settings"),
        ("continuity:source=everything", "source"),
        ("continuity:temperature=0", "temperature"),
    ],
)
def test_invalid_specs_exit_nonzero_with_one_line(spec, message, capsys):
    from engine.__main__ import main

    assert main(["generate", "--prompt", "Hi", "--arm", spec, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_invalid_spec_in_a_real_process():
    r = cli("generate", "--prompt", "Hi", "--arm", "continuity:linkage=7")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_missing_model_is_one_line():
    r = cli("generate", "--prompt", "Hi", "--arm", "observer", "--model", "/no/such/model")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model not found" in r.stderr


def test_generate_json_contract():
    r = cli(
        "generate",
        "--prompt",
        "Name a colour.",
        "--arm",
        "observer",
        "--arm",
        "continuity:linkage=1,gain=0.3,layers=15/22/28",
        "--max-new-tokens",
        "6",
        "--greedy",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["name"] == "SmolLM2-135M-Instruct" and len(out["model"]["weights_hash"]) == 64
    assert [a["spec"] for a in out["arms"]] == ["observer", "continuity:linkage=1,layers=15/22/28"]
    for arm in out["arms"]:
        assert 1 <= len(arm["token_ids"]) <= 6 and isinstance(arm["text"], str)


def test_spec_round_trip():
    s = parse_arm(
        "continuity:linkage=0.5,gain=0.3,layers=15/22/28,source=all,rope=none,window=none,seed=4,"
        "greedy=false,label=linked"
    )
    assert s.settings.rope == "none" and s.settings.window is None and s.settings.layers == [15, 22, 28]
    assert s.sampling.seed == 4 and not s.sampling.greedy and s.display_label == "linked"
    again = parse_arm(s.to_string())
    assert again.to_dict() == s.to_dict()
    assert ArmSpec.from_dict(s.to_dict()).to_dict() == s.to_dict()


def test_share_from_must_not_be_above_reads(embedded):
    from engine import Dialogue

    with pytest.raises(ValueError, match="share_from"):
        Dialogue(embedded, [parse_arm("continuity:layers=10/20,share_from=15")])
    with pytest.raises(SpecError):
        parse_arm("continuity:variant=seed,window=4")


def test_with_sampling_validates_like_a_spec_string():
    s = parse_arm("continuity:linkage=1,seed=3")
    assert s.with_sampling(seed=7, greedy=False).sampling.seed == 7 and s.sampling.seed == 3
    for changes, message in (
        ({"seed": -5}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"temperature": 0}, "temperature"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ):
        with pytest.raises(SpecError, match=message):
            s.with_sampling(**changes)
    assert parse_arm(f"observer:seed={2**63 - 1}").sampling.seed == 2**63 - 1
    with pytest.raises(SpecError, match="seed"):
        parse_arm(f"observer:seed={2**63}")


def test_a_message_that_is_not_valid_text_is_a_dialogue_error(tiny_llama):
    from engine import Dialogue
    from engine.dialogue import DialogueError

    d = Dialogue(tiny_llama, [parse_arm("observer:max_new_tokens=2")])
    with pytest.raises(DialogueError, match="the message is not valid text: character 2 is a lone surrogate"):
        d.send("a\udcffb")
    assert d.turn == 0
    d = Dialogue(tiny_llama, [parse_arm("observer:max_new_tokens=2")], system="be \ud800 brief")
    with pytest.raises(DialogueError, match="the system prompt is not valid text"):
        d.send("Hi")
    assert d.turn == 0
