"""The scorer and stance-judge registries: each scorer and judge registers itself where it is defined.

A scorer is a function ``score(item, replies, **options) -> DialogueScore`` registered with
`register_scorer(name, options=Model)`; `Model` (a pydantic `ScorerOptions`) lists what a protocol's
``scorer_options:`` may set for it, and protocol validation asks the registry (`option_problems`).
A judge is a `StanceJudge` subclass registered with `register_judge(name, options=Model)`. Names are
written once, at registration; everything else (protocol schema, CLI choices, error messages)
reads `scorer_names()` / `judge_names()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, NamedTuple, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from experiments.wording import describe


class DialogueScore(NamedTuple):
    """`turns`: one {"label": str|None, "value": float|None, "data": dict} per assistant turn;
    `summary`: one JSON-able dict for the dialogue."""

    turns: list[dict]
    summary: dict


def turn_row(label, value, data) -> dict:
    """One per-turn score row (one DB row): a label, a float value or None, JSON-able data."""
    return {"label": label, "value": None if value is None else float(value), "data": data}


# ----------------------------------------------------------------------- options models


class ScorerOptions(BaseModel):
    """What a protocol may set for one scorer; validated with context {"n_turns": n}."""

    model_config = ConfigDict(extra="forbid")


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message is shown to the researcher as written."""
    return PydanticCustomError("scorer_option", message)


def turn_index_problem(turn: Any, n: int) -> Optional[str]:
    """Why `turn` is no valid index into n turns (None when it is one)."""
    if isinstance(turn, bool) or not isinstance(turn, int):
        return f"expected a turn index (an integer), got {describe(turn)}"
    if not -n <= turn < n:
        return f"expected a turn index from 0 to {n - 1} (or -{n} to -1 from the end), got {turn}"
    return None


def _check_turn(value: Any, info: ValidationInfo) -> int:
    n = (info.context or {}).get("n_turns")
    why = (
        turn_index_problem(value, n)
        if n is not None
        else (None if isinstance(value, int) and not isinstance(value, bool) else turn_index_problem(value, 1))
    )
    if why:
        raise problem(why)
    return value


# A turn index checked against the protocol's number of turns (negative counts from the end).
TurnIndex = Annotated[Any, AfterValidator(_check_turn)]


def turn_list(value: Any, exactly: Optional[int] = None, what: str = "") -> Any:
    """The shape check of a list of turn indices (the indices themselves are `TurnIndex`)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise problem(f"expected a non-empty list of turn indices, got {describe(value)}")
    if exactly is not None and len(value) != exactly:
        raise problem(f"expected {what}, got {describe(list(value))}")
    return value


# ----------------------------------------------------------------------- scorers


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[..., DialogueScore]
    options: type[ScorerOptions]
    # options a protocol supplies itself (its system prompt, its top-level stance_turns)
    from_protocol: Optional[Callable[[Any], dict]] = None
    # item checks: (items, where) -> [(key path, message)]; `where(i, ".answer")` names a key
    item_problems: Optional[Callable[[list, Callable], list]] = None
    # calls on the judges' scale for `python -m experiments score` (None: this scorer makes none)
    stance_calls: Optional[Callable[..., list]] = None


SCORERS: dict[str, Scorer] = {}


class NoOptions(ScorerOptions):
    """A scorer a protocol cannot configure."""


def register_scorer(name: str, options: type[ScorerOptions] = NoOptions, **hooks):
    """Decorator: register `score(item, replies, **options)` under `name` (written only here)."""

    def wrap(fn):
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is registered twice")
        SCORERS[name] = Scorer(name, fn, options, **hooks)
        return fn

    return wrap


def scorer_names() -> tuple[str, ...]:
    return tuple(SCORERS)


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise KeyError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name]


def option_problems(name: str, options: dict, n_turns: int) -> list[tuple[str, str]]:
    """(key path under the scorer, message) for each problem of a protocol's options for `name`."""
    spec = get_scorer(name)
    try:
        spec.options.model_validate(options, context={"n_turns": n_turns})
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(spec.options.model_fields) or "none"
                out.append((path, f"unknown option for {name}; expected: {allowed}"))
            elif err["type"] == "scorer_option":
                out.append((path, err["msg"]))
            else:
                out.append((path, f"{err['msg']}; got {describe(err.get('input'))}"))
        return out
    return []


def protocol_options(name: str, protocol, settings: Optional[dict]) -> dict:
    """The keyword options a protocol gives scorer `name`: what the scorer takes from the protocol
    itself, then the protocol's `scorer_options` entry (validated, so it wins with clean types)."""
    spec = get_scorer(name)
    out = dict(spec.from_protocol(protocol)) if spec.from_protocol else {}
    if settings:
        model = spec.options.model_validate(settings, context={"n_turns": protocol.n_turns})
        out.update(model.model_dump(include=set(settings)))
    return out


# ----------------------------------------------------------------------- stance judges


@dataclass(frozen=True)
class Judge:
    name: str
    cls: type
    options: type[BaseModel]


JUDGES: dict[str, Judge] = {}


class NoJudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def register_judge(name: str, options: type[BaseModel] = NoJudgeOptions):
    """Class decorator: register a `StanceJudge` subclass under `name` (sets `cls.name`)."""

    def wrap(cls):
        if name in JUDGES:
            raise ValueError(f"judge {name!r} is registered twice")
        cls.name = name
        JUDGES[name] = Judge(name, cls, options)
        return cls

    return wrap


def judge_names() -> tuple[str, ...]:
    return tuple(JUDGES)
