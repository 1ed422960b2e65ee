"""A pane's controls -> arm spec, generated from the registered mechanisms' settings (no model, no server)."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from engine import SpecError, parse_arm
from engine.mechanisms import MECHANISMS, Mechanism, MechanismSettings, register
from lab.settings import PaneLayout, controls_for, layers_text, mechanism_choices, spec_string


def values(**changes):
    layout = PaneLayout.current()
    samp = {k: v for k, v in changes.items() if k in {c.key for c in layout.sampling}}
    mech = {k: v for k, v in changes.items() if k not in samp}
    return layout, layout.values_from("continuity", mech, samp)


def test_defaults_and_layers():
    layout = PaneLayout.current()
    assert layout.defaults(0)[0] == "observer" and layout.defaults(1)[0] == "continuity"
    assert layers_text(" 15, 22 28 ") == "15/22/28" and layers_text("") == ""
    layout, v = values(layers="3, 5", gain=0.5, linkage=0.5)
    spec = layout.spec(v, n_layers=30)
    assert spec.settings.layers == [3, 5] and spec.settings.linkage == 0.5 and spec.display_label == "continuity λ=0.5"
    obs = layout.spec(layout.defaults(0), n_layers=30)
    assert obs.mechanism is None and obs.sampling.max_new_tokens == 128
    assert "greedy=false" in layout.spec(values(greedy=False)[1]).to_string()
    # only the mechanism's own keys are written, and the string parses back to the same arm
    text = spec_string("continuity", {"linkage": 0.5, "source": "all"}, {"seed": 3})
    assert text == "continuity:linkage=0.5,source=all,seed=3"
    assert (
        parse_arm(text).to_dict()
        == layout.spec(layout.values_from("continuity", {"linkage": 0.5, "source": "all"}, {"seed": 3})).to_dict()
    )
    assert spec_string("observer", None, {"max_new_tokens": 9}) == "observer:max_new_tokens=9"


def test_continuity_controls_follow_its_settings_model():
    cs = {c.key: c for c in controls_for(MECHANISMS["continuity"].Settings)}
    assert cs["linkage"].kind == "number" and (cs["linkage"].minimum, cs["linkage"].maximum) == (0.0, 1.0)
    assert cs["source"].kind == "dropdown" and cs["source"].choices == ("assistant", "all", "user")
    assert cs["layers"].kind == "list" and cs["window"].optional and cs["window"].integer
    assert "gate" in cs["linkage"].info  # the field's description is the help text


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(layers="99"), "layer 99 does not exist"),
        (dict(layers="a/b"), "layers"),
        (dict(linkage=1.5), "continuity: linkage: input should be less than or equal to 1"),
        (dict(max_new_tokens=""), "max_new_tokens is empty"),
        (dict(seed="x"), "seed must be a number"),
        (dict(seed=1e20), "seed is too large"),
        (dict(seed=float("nan")), "finite"),
        (dict(window=0), "window"),
        (dict(variant="seed", window=3), "variant=seed"),
    ],
)
def test_bad_settings_are_one_line_spec_errors(changes, message):
    layout, v = values(**changes)
    with pytest.raises(SpecError, match=message) as e:
        layout.spec(v, n_layers=30)
    assert "\n" not in str(e.value)


class ToySettings(MechanismSettings):
    """A toy written only in this test file."""

    mode: Literal["mask", "none"] = Field("mask", description="what the toy does")
    strength: float = Field(2.0, ge=0.5, le=8.0, description="how hard")
    steps: int = Field(3, ge=1, le=9, description="how many")
    sticky: bool = Field(False, description="keep between turns")
    document: str | None = Field(None, description="a text file to read", json_schema_extra={"file": True})


class Toy(Mechanism):
    name = "toy_mask"
    Settings = ToySettings

    def forward(self, layer, attn, x_hat, position_embeddings, attn_out, row):
        return None


@pytest.fixture()
def toy():
    register(Toy)
    yield Toy
    MECHANISMS.pop(Toy.name, None)


def test_a_toy_mechanism_gets_its_own_controls(toy):
    assert "toy_mask" in mechanism_choices()
    plugins = {c.key: c for c in PaneLayout.current().mechanisms.get("vector_toy", [])}  # via $LAB_PLUGINS
    assert plugins and plugins["weights"].kind == "file" and plugins["weights"].suffix == ".safetensors"
    layout = PaneLayout.current()
    cs = {c.key: c for c in layout.mechanisms["toy_mask"]}
    assert cs["mode"].kind == "dropdown" and cs["mode"].choices == ("mask", "none")
    assert cs["strength"].kind == "number" and (cs["strength"].minimum, cs["strength"].maximum) == (0.5, 8.0)
    assert cs["steps"].integer and cs["sticky"].kind == "checkbox" and cs["document"].kind == "file"
    assert cs["strength"].info.startswith("how hard")
    assert "arm2_toy_mask_strength" in layout.api_names(1)
    v = layout.values_from("toy_mask", {"strength": 4, "sticky": True, "document": "notes.txt"}, {"seed": 2})
    spec = layout.spec(v, n_layers=30)
    assert spec.mechanism == "toy_mask" and spec.settings.strength == 4.0 and spec.settings.document == "notes.txt"
    assert spec.to_string() == "toy_mask:linkage=1,strength=4,sticky=true,document=notes.txt,seed=2"
    # a path is written in double quotes by the engine's writer and parses back to the same arm
    spec = layout.spec(layout.values_from("toy_mask", {"document": "runs/my notes.txt"}))
    assert 'document="runs/my notes.txt"' in spec.to_string()
    assert parse_arm(spec.to_string()).settings.document == "runs/my notes.txt"
    with pytest.raises(SpecError, match="toy_mask: strength: input should be less than or equal to 8"):
        layout.spec(layout.values_from("toy_mask", {"strength": 9}))
    with pytest.raises(SpecError, match="toy_mask: mode"):
        layout.spec(layout.values_from("toy_mask", {"mode": "other"}))


def test_settings_metadata_shapes_the_controls():
    """Training-only and rarely changed keys are marked advanced (the Arena hides them behind "Advanced"),
    a key meaningful for one value of another says so, a small useful range is shown, and a storage
    bound (the 64-bit seed) is not printed as 9.22337e+18."""
    layout = PaneLayout.current()
    by = {name: {c.key: c for c in cs} for name, cs in layout.mechanisms.items()}
    pa, bank, nm = by["partial_attention"], by["memory_bank"], by["neural_memory"]
    assert {k for k, c in pa.items() if c.advanced} >= {"lora_rank", "lora_alpha", "sae"}
    assert pa["lora_rank"].info.startswith("training only") and pa["sae"].info.count("training only") == 1
    assert bank["init_std"].advanced and bank["gate_init"].advanced and not bank["slots"].advanced
    assert not any(c.advanced for c in by["continuity"].values())
    assert nm["hidden"].only_when == ("memory", "mlp") and not nm["hidden"].advanced
    assert "useful 0–0.05" in nm["forget"].info
    seed = {c.key: c for c in layout.sampling}["seed"]
    assert "e+" not in seed.info and seed.info == "≥ 0"
    assert "≤ 8,192" in {c.key: c for c in layout.sampling}["max_new_tokens"].info


def test_untrained_notes_and_mechanism_help():
    from lab.settings import OBSERVER_HELP, arm_spec, mechanism_help, untrained_note

    assert mechanism_help("observer") == OBSERVER_HELP
    for name in MECHANISMS:
        assert mechanism_help(name).startswith(f"{name}: ") and mechanism_help(name) != OBSERVER_HELP
    assert untrained_note(arm_spec("observer", {}, {})) is None
    assert untrained_note(arm_spec("continuity", {}, {})) is None
    assert "fresh random bank: expect noise" in untrained_note(arm_spec("memory_bank", {}, {}))
    assert untrained_note(arm_spec("memory_bank", {"linkage": 0}, {})) is None  # the observer, bit for bit
    assert untrained_note(arm_spec("memory_bank", {"gate_init": 0}, {})) is None  # starts as the base model
    assert "untrained branch" in untrained_note(arm_spec("partial_attention", {}, {}))
    trained = str(Path(__file__).resolve().parents[2] / "weights" / "constraint_palm.safetensors")
    assert untrained_note(arm_spec("partial_attention", {"weights": trained}, {})) is None
    with pytest.raises(SpecError, match="w.safetensors does not exist"):  # refused while the pane is edited
        arm_spec("partial_attention", {"weights": "w.safetensors"}, {})
    assert "not a memory" in untrained_note(arm_spec("noise", {}, {}))  # the control says what it is


def test_a_weak_default_says_so():
    """neural_memory at its default gain barely moves off the observer (measured: 48/48 greedy tokens equal on
    the embedded model), so its pane says so; at gain 1 or more the note goes."""
    from lab.settings import arm_spec, untrained_note

    assert "close to the observer's" in untrained_note(arm_spec("neural_memory", {}, {}))
    assert untrained_note(arm_spec("neural_memory", {"gain": 1.0}, {})) is None
    assert "untrained" in untrained_note(arm_spec("neural_memory", {"gain": 1.0, "persistent": 4}, {}))


def test_a_pane_naming_a_weights_file_takes_its_settings_where_it_left_defaults(embedded, tmp_path):
    """As a spec string does for keys it does not write: a pane with a distilled bank's file and blank
    layers runs on the file's layers and slots (found in the browser: it was refused, 'does not fit')."""
    from engine.distill import distill

    doc = tmp_path / "doc.safetensors"
    distill(embedded, "Orla Vennick lives in Tarrowby. Orla keeps a tin whistle.", "memory_bank:layers=12/16", out=doc)
    layout = PaneLayout.current()
    spec = layout.spec(layout.values_from("memory_bank", {"weights": str(doc)}), n_layers=30)
    from_string = parse_arm(f'memory_bank:weights="{doc}"')
    assert spec.settings.layers == [12, 16] and spec.settings.slots == from_string.settings.slots
    assert spec.to_dict() == from_string.to_dict()
    changed = layout.spec(layout.values_from("memory_bank", {"weights": str(doc), "layers": "12"}))
    assert changed.settings.layers == [12]  # a key the pane changed wins (and will not fit: refused at start)
    with pytest.raises(SpecError, match="not found|no such|does not exist"):
        layout.spec(layout.values_from("memory_bank", {"weights": str(tmp_path / "missing.safetensors")}))
