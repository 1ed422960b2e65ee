"""A pane's controls -> arm spec (no model, no server)."""
import pytest

from engine import SpecError
from lab.settings import FIELDS, layers_text, pane_defaults, spec_from_controls, spec_string


def controls(**changes):
    d = {**pane_defaults(1), **changes}
    return [d[f] for f in FIELDS]


def test_defaults_and_layers():
    assert pane_defaults(0)["mechanism"] == "observer" and pane_defaults(1)["linkage"] == 1.0
    assert layers_text(" 15, 22 28 ") == "15/22/28" and layers_text("") == ""
    spec = spec_from_controls(controls(layers="3, 5", gain=0.5, linkage=0.5), n_layers=30)
    assert spec.settings.layers == [3, 5] and spec.settings.linkage == 0.5 and spec.display_label == "continuity λ=0.5"
    obs = spec_from_controls([pane_defaults(0)[f] for f in FIELDS], n_layers=30)
    assert obs.mechanism is None and obs.sampling.max_new_tokens == 128
    assert "greedy=false" in spec_string(*controls(greedy=False))


@pytest.mark.parametrize("changes, message", [
    (dict(layers="99"), "layer 99 does not exist"),
    (dict(layers="a/b"), "layers"),
    (dict(linkage=1.5), "linkage"),
    (dict(max_new_tokens=""), "max new tokens is empty"),
    (dict(seed="x"), "seed must be a number"),
])
def test_bad_settings_are_one_line_spec_errors(changes, message):
    with pytest.raises(SpecError, match=message) as e:
        spec_from_controls(controls(**changes), n_layers=30)
    assert "\n" not in str(e.value)
