"""The constraint study's arms: the untrained control carries exactly the trained file's settings
(so 'trained vs untrained' differs only in the trained numbers), and every arm spec parses."""

from __future__ import annotations

from engine import parse_arm
from engine.weights import read_header, resolve_path
from studies.constraint_end import arms_for, untrained_settings


def test_untrained_control_has_the_trained_files_settings():
    spec = parse_arm(f"partial_attention:linkage=1,{untrained_settings('@constraint_palm_window')}")
    header = read_header(resolve_path("@constraint_palm_window")).settings
    for key in ("gain", "fp", "fp_dim", "lang_emb", "lora_rank", "lora_alpha"):
        assert getattr(spec.settings, key) == header[key], key
    assert spec.settings.weights is None


def test_every_arm_parses_and_the_other_source_is_quoted_safely():
    arms = arms_for(
        "@constraint_palm_window", 'End with "Signed, Ada of Brill."', untrained_settings("@constraint_palm")
    )
    assert [name for name, _ in arms] == ["observer", "untrained", "trained", "other source", "noise matched"]
    specs = [parse_arm(s) for _, s in arms]
    assert specs[3].settings.text == "End with 'Signed, Ada of Brill.'"
    assert specs[2].settings.weights == "@constraint_palm_window"
