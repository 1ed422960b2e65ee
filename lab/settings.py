"""A pane's settings controls <-> an arm spec, generated from the mechanisms' settings models.

Pure Python: no Gradio, no model. Every mechanism registered in `engine.mechanisms.MECHANISMS`
gets controls built from its pydantic `Settings` model: a bool is a checkbox, a `Literal` a
dropdown, an int/float a number with the field's bounds, a `list[int]` (layers) a text box, a
string marked `json_schema_extra={"file": True}` a path box with an upload button; the field's
`description` is the help text. Nothing here names a mechanism.

A pane's values are turned into an `ArmSpec` by constructing `MECHANISMS[name].Settings(**values)`
(the same model `engine.spec.parse_arm` builds, refused with the same one-line message) and the
spec string is `ArmSpec.to_string()`, the engine's canonical writer, so it holds only keys the
mechanism has.

`PaneLayout` fixes the order of a pane's values in the flat list Gradio passes to an event:
`mechanism`, the sampling keys, then every mechanism's keys (each mechanism its own group of
controls, visible when it is selected).
"""

from __future__ import annotations

import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ValidationError

from engine import ArmSpec, SpecError
from engine.mechanisms import MECHANISMS, MechanismSettings
from engine.spec import OBSERVER, SamplingSettings, _first_error, weights_defaults

INT64_MAX = 2**63 - 1  # what SQLite's INTEGER (and so the session's seed column) holds
PANE_LINKAGE = [1.0, 1.0, 0.5, 0.25]  # panes 3 and 4, when shown, step the linkage down
# The Arena's default linked arm: continuity at its default gain 0.3 replies in language (measured by
# `python -m studies.default_panes`: its replies score about as the observer's own under the plain model),
# and it needs no weights file. A fresh memory bank (random slots) or an untrained partial-attention branch
# at gain 1 garble replies, so they are never a default; if continuity is missing the panes are observers.
DEFAULT_MECHANISM = "continuity"


@dataclass(frozen=True)
class Control:
    """One settings field as a control: what to draw and how to read its value back."""

    key: str
    kind: str  # 'checkbox' | 'dropdown' | 'number' | 'list' | 'text' | 'file'
    label: str
    info: str = ""
    default: Any = None  # the control's initial value (None -> blank)
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    optional: bool = False  # blank means None
    item_integer: bool = True  # for 'list': whole numbers
    suffix: str = ""  # for 'file': the expected file type, e.g. '.safetensors'
    advanced: bool = False  # training-only or rarely useful: the Arena puts it behind "Advanced"
    only_when: tuple = ()  # (other key, value): meaningful only when that key has that value


def _unwrap_optional(ann):
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return ann, False


def _bounds(metadata) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo = m.gt
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi = m.lt
        elif isinstance(m, at.Interval):
            lo = m.ge if m.ge is not None else m.gt
            hi = m.le if m.le is not None else m.lt
    return lo, hi


def is_file_field(info) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("file"))


def _extra(info) -> dict:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _bound_text(lo, hi, integer: bool) -> str:
    """'≥ 0, ≤ 1'; a bound that is only a storage limit (a 64-bit seed) is left out: it says nothing."""

    def fmt(x):
        return f"{x:,}" if integer else f"{x:g}"

    parts = []
    if lo is not None and abs(lo) < 2**31:
        parts.append(f"≥ {fmt(lo)}")
    if hi is not None and abs(hi) < 2**31:
        parts.append(f"≤ {fmt(hi)}")
    return ", ".join(parts)


def _label(key: str) -> str:
    return {"linkage": "Linkage λ", "top_p": "Top-p", "max_new_tokens": "Max new tokens"}.get(
        key, key.replace("_", " ").capitalize()
    )


def control_for(key: str, info) -> Control:
    ann, optional = _unwrap_optional(info.annotation)
    optional = optional or info.default is None
    default = info.default if info.default is not None else None
    desc = info.description or ""
    lo, hi = _bounds(info.metadata)
    label = info.title or _label(key)
    extra = _extra(info)
    meta = dict(
        advanced=bool(extra.get("advanced") or extra.get("training_only")),
        only_when=tuple(extra.get("only_when") or ()),
    )
    if extra.get("training_only"):
        desc = desc if desc.startswith("training only") else ("training only: " + desc if desc else "training only")
    if is_file_field(info):
        suffix = str(info.json_schema_extra.get("suffix") or "")
        return Control(key, "file", label, desc, default or "", optional=optional, suffix=suffix, **meta)
    if ann is bool:
        return Control(key, "checkbox", label, desc, bool(default), **meta)
    if typing.get_origin(ann) is Literal:
        choices = tuple(str(c) for c in typing.get_args(ann))
        return Control(
            key,
            "dropdown",
            label,
            desc,
            None if default is None else str(default),
            choices=choices,
            optional=optional,
            **meta,
        )
    if ann in (int, float):
        bounds = _bound_text(lo, hi, ann is int)
        useful = extra.get("useful")  # a small useful range inside wide bounds, e.g. (0, 0.05)
        if useful:
            bounds = (bounds + "; " if bounds else "") + f"useful {useful[0]:g}–{useful[1]:g}"
        info_text = desc + (f" ({bounds})" if bounds and desc else bounds)
        if optional:
            info_text += "; blank = unset"
        return Control(
            key,
            "number",
            label,
            info_text,
            default,
            minimum=lo,
            maximum=hi,
            integer=ann is int,
            optional=optional,
            **meta,
        )
    if typing.get_origin(ann) in (list, tuple):
        args = typing.get_args(ann)
        item_int = not args or args[0] is int
        text = "" if default is None else "/".join(str(x) for x in default)
        return Control(
            key,
            "list",
            label,
            desc + ("; e.g. 15/22/28" if desc else "e.g. 15/22/28"),
            text,
            optional=optional,
            item_integer=item_int,
            **meta,
        )
    return Control(key, "text", label, desc, "" if default is None else str(default), optional=optional, **meta)


def controls_for(model: type[BaseModel]) -> list[Control]:
    return [control_for(k, f) for k, f in model.model_fields.items()]


def sampling_controls() -> list[Control]:
    return controls_for(SamplingSettings)


def mechanism_choices() -> list[str]:
    return [OBSERVER, *MECHANISMS]


OBSERVER_HELP = "observer: the plain model, no memory — the reference the other arms are compared with"


def mechanism_help(name: str) -> str:
    """One line about the chosen mechanism: the first line of its module's (or class's) docstring."""
    name = (name or OBSERVER).strip().lower()
    if name == OBSERVER or name not in MECHANISMS:
        return OBSERVER_HELP
    cls = MECHANISMS[name]
    doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or cls.__doc__ or ""
    first = next((line.strip() for line in doc.splitlines() if line.strip()), "")
    return f"{name}: {first}" if first else name


def untrained_note(spec: ArmSpec) -> str | None:
    """What a person must know before reading this arm's replies: a short note when the arm runs random or
    untrained parameters (the settings model's `untrained_note`, shown while it has no weights file),
    else the settings' own caveat, else a weak-gain note (the model's `weak_below_gain`); None for an arm
    whose replies mean what they seem to."""
    s = spec.settings
    if s is None or s.linkage == 0:
        return None
    note = getattr(type(s), "untrained_note", None)
    if type(s).caveat is not MechanismSettings.caveat:  # the mechanism itself says when an arm is untrained
        if spec.caveat:
            return note or spec.caveat
    elif note and "weights" in type(s).model_fields and getattr(s, "weights", None) is None:
        return note
    weak = getattr(type(s), "weak_below_gain", None)  # below this gain the arm barely moves off the observer
    if weak is not None and s.gain < weak:
        return (
            f"gain {s.gain:g} is weak for {spec.mechanism}: expect replies close to the observer's, often "
            "token for token — raise the gain to see its effect"
        )
    return None


# -------------------------------------------------------------------------------- values -> spec
def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _number(c: Control, v, what: str):
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise SpecError(f"{what}: {c.key} must be a number (got {v!r})") from None
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SpecError(f"{what}: {c.key} must be a finite number (got {v!r})")
        if c.integer and v.is_integer():
            if abs(v) > INT64_MAX:
                raise SpecError(f"{what}: {c.key} is too large (at most {INT64_MAX}, got {v:g})")
            v = int(v)
    if isinstance(v, int) and abs(v) > INT64_MAX:
        raise SpecError(f"{what}: {c.key} is too large (at most {INT64_MAX}, got {v})")
    return v


def control_value(c: Control, v, what: str):
    """A control's value as the settings model expects it (SpecError: one line naming the key)."""
    if c.kind == "checkbox":
        return bool(v) if not isinstance(v, str) else v.strip().lower() in ("true", "1", "yes", "on")
    if _blank(v):
        if c.optional:
            return None
        raise SpecError(f"{what}: {c.key} is empty")
    if c.kind == "number":
        return _number(c, v, what)
    if c.kind == "list":
        if isinstance(v, (list, tuple)):
            parts = list(v)
        else:
            parts = [p for p in re.split(r"[\s,/;]+", str(v).strip()) if p]
        if not c.item_integer:
            return parts
        out = []
        for p in parts:
            try:
                out.append(int(p) if not isinstance(p, float) or p.is_integer() else p)
            except (TypeError, ValueError):
                raise SpecError(f"{what}: {c.key}: {p!r} is not a whole number") from None
        return out
    return v.strip() if isinstance(v, str) else v


def settings_from_values(
    model: type[BaseModel], values: dict, what: str, file_defaults: dict | None = None
) -> BaseModel:
    """Construct `model` from control values, refused as the engine refuses (its one-line message).
    `file_defaults` (a weights file's settings) replace the values left at their defaults."""
    controls = {c.key: c for c in controls_for(model)}
    clean = {}
    for key, v in values.items():
        if key not in controls:
            raise SpecError(f"unknown key '{key}' for {what}")
        clean[key] = control_value(controls[key], v, what)
    for key, v in (file_defaults or {}).items():
        if (
            key in model.model_fields
            and clean.get(key, model.model_fields[key].default) == model.model_fields[key].default
        ):
            clean[key] = v
    try:
        return model(**clean)
    except ValidationError as e:
        raise SpecError(_first_error(e, what)) from None


def arm_spec(mechanism: str, settings: dict | None, sampling: dict | None, label: str | None = None) -> ArmSpec:
    """One pane's values -> ArmSpec (SpecError with a one-line message)."""
    name = (mechanism or OBSERVER).strip().lower()
    samp = settings_from_values(SamplingSettings, sampling or {}, "sampling")
    if name == OBSERVER:
        return ArmSpec(None, None, samp, label)
    if name not in MECHANISMS:
        raise SpecError(f"unknown mechanism '{name}' (known: {', '.join(mechanism_choices())})")
    cls = MECHANISMS[name].Settings
    path = str((settings or {}).get("weights") or "").strip()
    # a pane naming a weights file runs with the file's settings wherever it left a default, as a spec
    # string does for keys it does not write: a distilled bank's layers and slots need not be typed
    from_file = weights_defaults(name, path, cls.model_fields) if path and "weights" in cls.model_fields else None
    return ArmSpec(name, settings_from_values(cls, settings or {}, name, from_file), samp, label)


def spec_string(mechanism: str, settings: dict | None = None, sampling: dict | None = None) -> str:
    """The canonical arm spec string for one pane's values (the engine's own writer)."""
    return arm_spec(mechanism, settings, sampling).to_string()


def layers_text(raw) -> str:
    """'15/22/28', '15, 22, 28' or '15 22 28' -> '15/22/28'; blank -> ''."""
    return "/".join(p for p in re.split(r"[\s,/;]+", str(raw or "").strip()) if p)


def _fmt(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def summary(spec: ArmSpec) -> str:
    """One line for a pane header: what this arm is (only the settings that differ from the defaults)."""
    s = spec.sampling
    samp = "greedy" if s.greedy else f"T={_fmt(s.temperature)}, top-p={_fmt(s.top_p)}, seed={s.seed}"
    if spec.settings is None:
        return f"observer · {samp} · ≤{s.max_new_tokens} tokens"
    parts = [spec.mechanism, f"λ={_fmt(spec.settings.linkage)}"]
    for k, v in spec.settings.model_dump(exclude_defaults=True).items():
        if k == "linkage":
            continue
        parts.append(f"{k} {'/'.join(map(str, v)) if isinstance(v, list) else _fmt(v)}")
    line = " · ".join(parts + [samp, f"≤{s.max_new_tokens} tokens"])
    return line + (f" · ⚠ {spec.caveat}" if spec.caveat else "")  # e.g. a fresh bank is noise, not memory


# -------------------------------------------------------------------------------- the flat layout
@dataclass
class PaneLayout:
    """Where each of a pane's values sits in the flat list of an event's inputs.

    Slots: ('mechanism', None), ('sampling', key) for each sampling key, then (mechanism name, key)
    for every registered mechanism's keys. Built from the registry when the lab is built.
    """

    mechanisms: dict[str, list[Control]] = field(default_factory=dict)
    sampling: list[Control] = field(default_factory=list)

    @classmethod
    def current(cls) -> "PaneLayout":
        return cls({name: controls_for(m.Settings) for name, m in MECHANISMS.items()}, sampling_controls())

    @property
    def slots(self) -> list[tuple[str, str | None]]:
        return (
            [("mechanism", None)]
            + [("sampling", c.key) for c in self.sampling]
            + [(name, c.key) for name, cs in self.mechanisms.items() for c in cs]
        )

    def __len__(self) -> int:
        return len(self.slots)

    def api_names(self, pane: int) -> list[str]:
        """arm{p}_mechanism, arm{p}_{sampling key}, arm{p}_{mechanism}_{key}."""
        out = []
        for group, key in self.slots:
            if group == "mechanism":
                out.append(f"arm{pane + 1}_mechanism")
            elif group == "sampling":
                out.append(f"arm{pane + 1}_{key}")
            else:
                out.append(f"arm{pane + 1}_{group}_{key}")
        return out

    def pane_values(self, flat, pane: int) -> list:
        n = len(self)
        return list(flat[pane * n : (pane + 1) * n])

    def split(self, values) -> tuple[str, dict, dict]:
        """One pane's values -> (mechanism, that mechanism's settings, sampling)."""
        values = list(values)
        if len(values) != len(self):
            raise SpecError(f"expected {len(self)} settings values, got {len(values)}")
        mech = str(values[0] or OBSERVER).strip().lower()
        samp, settings = {}, {}
        for (group, key), v in zip(self.slots[1:], values[1:]):
            if group == "sampling":
                samp[key] = v
            elif group == mech:
                settings[key] = v
        return mech, settings, samp

    def spec(self, values, n_layers: int | None = None) -> ArmSpec:
        """One pane's values -> a checked ArmSpec (against the model's layers when n_layers is given)."""
        spec = arm_spec(*self.split(values))
        if n_layers is not None:
            spec.validate_for(n_layers)
        return spec

    def defaults(self, pane: int) -> list:
        """Pane 1 is the plain observer; the others DEFAULT_MECHANISM (λ 1, 1, 0.5, 0.25): an arm that replies
        in language, never whichever mechanism happens to register first."""
        first = DEFAULT_MECHANISM if DEFAULT_MECHANISM in self.mechanisms else None
        mech = OBSERVER if pane == 0 or first is None else first
        out = [mech]
        for group, key in self.slots[1:]:
            cs = self.sampling if group == "sampling" else self.mechanisms[group]
            c = next(c for c in cs if c.key == key)
            v = c.default
            if group == first and key == "linkage":
                v = PANE_LINKAGE[pane % len(PANE_LINKAGE)]
            out.append(v)
        return out

    def values_from(
        self, mechanism: str, settings: dict | None = None, sampling: dict | None = None, pane: int = 1
    ) -> list:
        """A pane's flat values from a mechanism name and some changed keys (for tests and API clients)."""
        vals = self.defaults(pane)
        vals[0] = mechanism
        for i, (group, key) in enumerate(self.slots):
            if group == "sampling" and sampling and key in sampling:
                vals[i] = sampling[key]
            elif group == mechanism and settings and key in settings:
                vals[i] = settings[key]
        return vals
