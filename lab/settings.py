"""A pane's settings controls <-> an arm spec. Pure Python: no Gradio, no model.

The controls of one pane, in order (`FIELDS`), are turned into a spec string and parsed by the
engine's own `parse_arm`, so the UI refuses exactly what the engine refuses, with its messages.
"""
from __future__ import annotations

import re

from engine import ArmSpec, SpecError, parse_arm

FIELDS = ["mechanism", "linkage", "gain", "layers", "source", "scope", "seed", "greedy", "temperature", "top_p",
          "max_new_tokens"]
MECHANISM_CHOICES = ["observer", "continuity"]
SOURCES = ["assistant", "all", "user"]
SCOPES = ["dialogue", "turn"]

DEFAULT_SAMPLING = {"seed": 0, "greedy": True, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 128}
DEFAULT_MECH = {"linkage": 1.0, "gain": 0.3, "layers": "", "source": "assistant", "scope": "dialogue"}


PANE_LINKAGE = [1.0, 1.0, 0.5, 0.25]  # panes 3 and 4, when shown, step the linkage down


def pane_defaults(pane: int) -> dict:
    """Pane 1 is the plain observer; pane 2 the continuity stream at full linkage; 3 and 4 at λ=0.5, 0.25."""
    return {"mechanism": "observer" if pane == 0 else "continuity", **DEFAULT_MECH,
            "linkage": PANE_LINKAGE[pane], **DEFAULT_SAMPLING}


def _num(value, what: str, cast=float):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SpecError(f"{what} is empty")
    try:
        return cast(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        raise SpecError(f"{what} must be a number (got {value!r})") from None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def layers_text(raw) -> str:
    """'15/22/28', '15, 22, 28' or '15 22 28' -> '15/22/28'; blank -> ''."""
    parts = [p for p in re.split(r"[\s,/;]+", str(raw or "").strip()) if p]
    return "/".join(parts)


def spec_string(mechanism, linkage, gain, layers, source, scope, seed, greedy, temperature, top_p,
                max_new_tokens) -> str:
    """The arm spec string for one pane's controls (raises SpecError for values that are not numbers)."""
    mech = (mechanism or "observer").strip().lower()
    sampling = [f"seed={_num(seed, 'seed', int)}", f"greedy={'true' if greedy else 'false'}",
                f"temperature={_fmt(_num(temperature, 'temperature'))}", f"top_p={_fmt(_num(top_p, 'top_p'))}",
                f"max_new_tokens={_num(max_new_tokens, 'max new tokens', int)}"]
    if mech == "observer":
        return "observer:" + ",".join(sampling)
    pairs = [f"linkage={_fmt(_num(linkage, 'linkage'))}", f"gain={_fmt(_num(gain, 'gain'))}"]
    lay = layers_text(layers)
    if lay:
        pairs.append(f"layers={lay}")
    pairs += [f"source={source or 'assistant'}", f"scope={scope or 'dialogue'}"]
    return f"{mech}:" + ",".join(pairs + sampling)


def spec_from_controls(values, n_layers: int) -> ArmSpec:
    """Parse and check one pane's controls against the loaded model; SpecError with a one-line message."""
    spec = parse_arm(spec_string(*values))
    spec.validate_for(n_layers)
    return spec


def summary(spec: ArmSpec) -> str:
    """One line for a pane header: what this arm is."""
    s = spec.sampling
    samp = "greedy" if s.greedy else f"T={_fmt(s.temperature)}, top-p={_fmt(s.top_p)}, seed={s.seed}"
    if spec.settings is None:
        return f"observer · {samp} · ≤{s.max_new_tokens} tokens"
    st = spec.settings
    layers = "/".join(map(str, st.layers)) if st.layers else "default layers"
    return (f"{spec.mechanism} · λ={_fmt(st.linkage)} · gain {_fmt(st.gain)} · {layers} · "
            f"source {getattr(st, 'source', '?')} · scope {getattr(st, 'scope', '?')} · {samp} · ≤{s.max_new_tokens} tokens")
