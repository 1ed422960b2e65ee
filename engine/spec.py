"""Arm specifications: `observer` or `NAME:key=value,...`, e.g. `continuity:linkage=1,gain=0.3,layers=15/22/28`.

An arm is the shared model plus one mechanism's settings plus sampling settings. Sampling keys
(greedy, temperature, top_p, seed, max_new_tokens) and `label` may appear in the same string.
Lists are written `a/b/c`; a value in double quotes is taken literally (`weights="runs/bank.safetensors"`).
Every mistake is one `SpecError` with a message meant for a person.

An arm that names a weights file takes the file's embedded mechanism settings as its defaults
(keys written in the spec win), and its `to_dict()` records the file's content hash, which
`from_dict` (replay, reopening a session) checks against the file on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .mechanisms import MECHANISMS, MechanismSettings
from .mechanisms.registry import use_arm_parser
from .weights import WeightsError, file_sha256, read_header, resolve_path

OBSERVER = "observer"


class SpecError(ValueError):
    """An arm specification is wrong; the message says which key and why."""


class SamplingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    greedy: bool = True
    temperature: float = Field(0.7, gt=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # logged as a SQLite INTEGER (signed 64-bit)
    max_new_tokens: int = Field(128, ge=1, le=8192)


_SAMPLING_KEYS = set(SamplingSettings.model_fields)


class _Quoted(str):
    """A value that was written in double quotes: never split, never cast."""


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, buf, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if quoted:
        raise SpecError(f"unbalanced double quote in '{text}'")
    parts.append("".join(buf))
    return parts


def _parse_value(raw: str):
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return _Quoted(raw[1:-1])
    if "/" in raw:
        return [_parse_value(part) for part in raw.split("/") if part.strip()]
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "/".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    if not isinstance(value, str):
        return text
    if any(c in text for c in '/,=": ') or text.lower() in ("true", "false", "yes", "no", "on", "off", "none", "null"):
        return f'"{text}"'
    try:  # a string that reads as a number must stay a string
        float(text)
        return f'"{text}"'
    except ValueError:
        return text


def _first_error(e: ValidationError, what: str) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or what
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}' for {what}"
    msg = err["msg"]
    if not err["loc"] and err["type"] == "value_error":  # a check across keys: its own sentence says it all
        return f"{what}: {msg.removeprefix('Value error, ')}"
    msg = msg.removeprefix("Value error, ")  # a key's own check: its sentence, without pydantic's prefix
    return f"{what}: {key}: {msg[:1].lower() + msg[1:]} (got {err.get('input')!r})"


@dataclass
class ArmSpec:
    """One arm: mechanism name (None = observer) and its settings, plus sampling settings."""

    mechanism: str | None = None
    settings: MechanismSettings | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    label: str | None = None

    @property
    def linkage(self) -> float:
        return 0.0 if self.settings is None else self.settings.linkage

    @property
    def display_label(self) -> str:
        if self.label:
            return self.label
        if self.mechanism is None:
            return OBSERVER
        return f"{self.mechanism} λ={_format_value(self.linkage)}"

    @property
    def caveat(self) -> str | None:
        """What a person must be told about this arm before reading its replies as memory (None: nothing)."""
        return None if self.settings is None else self.settings.caveat()

    def to_string(self, include_sampling: bool = True) -> str:
        """The canonical spec string (only non-default values)."""
        pairs = []
        if self.settings is not None:  # linkage always shown: it is what a reader looks for first
            pairs.append(f"linkage={_format_value(self.settings.linkage)}")
            pairs += [
                f"{k}={_format_value(v)}"
                for k, v in self.settings.model_dump(exclude_defaults=True).items()
                if k != "linkage"
            ]
        if include_sampling:
            pairs += [f"{k}={_format_value(v)}" for k, v in self.sampling.model_dump(exclude_defaults=True).items()]
        if self.label:
            pairs.append(f"label={self.label}")
        head = self.mechanism or OBSERVER
        return head + (":" + ",".join(pairs) if pairs else "")

    @property
    def weights_path(self) -> str | None:
        if self.settings is None:
            return None  # a control arm (noise) records the file of the arm it matches
        return getattr(self.settings, "weights", None) or getattr(self.settings, "referenced_weights", None)

    def to_dict(self) -> dict:
        d = {
            "mechanism": self.mechanism,
            "settings": None if self.settings is None else self.settings.model_dump(),
            "sampling": self.sampling.model_dump(),
            "label": self.label,
            "spec": self.to_string(),
        }
        if self.weights_path:
            try:
                d["weights_sha256"] = file_sha256(resolve_path(self.weights_path))
            except WeightsError as e:
                raise SpecError(str(e)) from None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArmSpec":
        """Rebuild a logged arm; a weights file must still be there with the logged content."""
        mech = d.get("mechanism")
        settings = None
        if mech is not None:
            if mech not in MECHANISMS:
                raise SpecError(f"unknown mechanism '{mech}'")
            try:
                settings = MECHANISMS[mech].Settings(**(d.get("settings") or {}))
            except ValidationError as e:
                raise SpecError(_first_error(e, mech)) from None
        spec = cls(mech, settings, SamplingSettings(**(d.get("sampling") or {})), d.get("label"))
        logged = d.get("weights_sha256")
        if spec.weights_path and logged:
            path = resolve_path(spec.weights_path)
            try:
                now = file_sha256(path)
            except WeightsError:
                raise SpecError(f"the weights file {path} this arm was run with is missing") from None
            if now != logged:
                raise SpecError(
                    f"the weights file {path} has changed since this arm was run "
                    f"(logged sha256 {logged[:12]}…, now {now[:12]}…)"
                )
        return spec

    def with_sampling(self, **changes) -> "ArmSpec":
        """A copy with some sampling settings changed, validated like a spec string's."""
        try:
            sampling = SamplingSettings(**{**self.sampling.model_dump(), **changes})
        except ValidationError as e:
            raise SpecError(_first_error(e, "sampling")) from None
        return ArmSpec(self.mechanism, self.settings, sampling, self.label)

    def validate_for(self, n_layers: int) -> None:
        """Check settings that depend on the model (layers that exist)."""
        if self.settings is not None:
            try:
                self.settings.resolved_layers(n_layers)
                share = getattr(self.settings, "share_from", None)
                if share is not None and not 0 <= share < n_layers:
                    raise ValueError(
                        f"share_from layer {share} does not exist: this model has layers 0..{n_layers - 1}"
                    )
            except ValueError as e:
                raise SpecError(f"{self.to_string(False)}: {e}") from None


def weights_defaults(mechanism: str, path: str, fields) -> dict:
    """The settings embedded in a weights file, as defaults for an arm that names it (the spec parser's
    and the lab's: keys the spec writes, or a pane changes from its default, win)."""
    try:
        wf = read_header(path)
    except WeightsError as e:
        raise SpecError(str(e)) from None
    if wf.mechanism != mechanism:
        raise SpecError(f"weights file {wf.path} is for mechanism '{wf.mechanism}', not '{mechanism}'")
    return {k: v for k, v in wf.settings.items() if k in fields and k not in ("linkage", "gain", "weights")}


def parse_arm(text: str) -> ArmSpec:
    """Parse `observer` or `NAME[:key=value,...]`."""
    text = (text or "").strip()
    if not text:
        raise SpecError("empty arm spec; use 'observer' or NAME:key=value,...")
    head, _, rest = text.partition(":")
    name = head.strip().lower()
    raw: dict = {}
    for part in filter(None, (p.strip() for p in _split_outside_quotes(rest, ","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"'{part}' in '{text}' is not key=value")
        raw[key.strip().lower()] = _parse_value(value)
    label = raw.pop("label", None)
    sampling_raw = {k: raw.pop(k) for k in list(raw) if k in _SAMPLING_KEYS}
    try:
        sampling = SamplingSettings(**sampling_raw)
    except ValidationError as e:
        raise SpecError(_first_error(e, "sampling")) from None
    if name == OBSERVER:
        if raw:
            raise SpecError(f"observer takes no mechanism settings (got {', '.join(raw)})")
        return ArmSpec(None, None, sampling, None if label is None else str(label))
    if name not in MECHANISMS:
        known = ", ".join([OBSERVER, *MECHANISMS])
        raise SpecError(f"unknown mechanism '{name}' (known: {known})")
    fields = MECHANISMS[name].Settings.model_fields
    for key, value in raw.items():  # 'none' means "unset" only where unset is a legal value
        if (
            not isinstance(value, _Quoted)
            and value in ("none", "null")
            and key in fields
            and fields[key].default is None
        ):
            raw[key] = None
    if "layers" in raw and not isinstance(raw["layers"], list):
        raw["layers"] = [raw["layers"]]
    if isinstance(raw.get("weights"), list):
        path = "/".join(map(str, raw["weights"]))
        raise SpecError(
            f"weights={path}: '/' separates list items in an arm spec; quote the path (weights=\"{path}\") "
            "or name a file of $LAB_WEIGHTS_DIR as weights=@NAME"
        )
    if raw.get("weights") is not None and "weights" in fields:
        raw = {**weights_defaults(name, str(raw["weights"]), fields), **raw}
    try:
        settings = MECHANISMS[name].Settings(**raw)
    except ValidationError as e:
        raise SpecError(_first_error(e, name)) from None
    return ArmSpec(name, settings, sampling, None if label is None else str(label))


use_arm_parser(parse_arm)  # a mechanism whose settings name another arm (noise's match) parses it through this
