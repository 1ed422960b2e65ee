"""Protocol files: a YAML script of user turns filled from items, validated into a `Protocol`.

A protocol is what the runner plays against every arm: the same user turns, rendered from each
item with `str.format` placeholders, optionally with a system prompt. Everything wrong with a file
is reported in ONE `ProtocolError` whose message names the file, the key path (`turns[1]`,
`items[3].answer`) and what was expected, so that a researcher who uploads a file in the lab sees
all mistakes at once, never a traceback or a pydantic dump.

Schema (top-level keys; anything else is rejected)::

    name: are_you_sure              # required, [a-z0-9_]+
    description: ...                # optional
    version: "1.0"                  # optional metadata: version, source (citation / URL), license
    source: Sharma et al. 2023
    license: CC-BY-4.0
    system: ...                     # optional system prompt, may use item placeholders
    turns: ["{question} ...", ...]  # required, non-empty list of strings; {key} or {key[0]} placeholders
    items: [{question: ..., ...}]   # inline items (values: strings, numbers, or lists of them), OR
    items_file: items.jsonl         #   a JSONL file relative to the YAML file (exactly one)
    scoring: [answer_flip, ...]     # registered scorers (experiments.scoring.scorer_names())
    stance_turns: [0, 2, 4]         # optional: turns whose reply states a stance (stance_drift); -1 = last
    scorer_options:                 # optional, per scorer:
      stance_drift: {judge: nli, threshold: 0.8, stance_turns: [0, -1]}
      answer_flip: {answer_turns: [0, -1]}
    max_new_tokens: 96              # optional positive integer
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StrictStr, StringConstraints, ValidationError

from experiments import scoring
from experiments.jsonl import jsonl_lines
from experiments.wording import describe as _describe

SCORER_NAMES = scoring.scorer_names()  # asked of the registry once every built-in scorer has registered

PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"
YAML_KEYS = (
    "name",
    "description",
    "version",
    "source",
    "license",
    "system",
    "turns",
    "items",
    "items_file",
    "scoring",
    "stance_turns",
    "scorer_options",
    "max_new_tokens",
)
MAX_NEW_TOKENS_LIMIT = 8192
MAX_WINDOW = 1_000_000  # the largest attention window (tokens) a protocol or a lab session may set
MAX_LISTED_PROBLEMS = 20

_EXPECTED = {
    "name": "an identifier of lowercase letters, digits and underscores ([a-z0-9_]+)",
    "description": "a string",
    "version": "a string or number (the protocol's version)",
    "source": "a string (where the protocol or its items come from)",
    "license": "a string (the licence of the items)",
    "scorer_options": "a mapping from scorer name to its options",
    "system": "a string (the system prompt)",
    "turns": "a non-empty list of strings, one per user turn",
    "items": "a non-empty list of mappings, one per item",
    "items_file": "a path to a .jsonl file, relative to the protocol file",
    "scoring": "a list of scorer names from: " + ", ".join(SCORER_NAMES),
    "stance_turns": "a list of 0-based turn indices (negative counts from the end)",
    "max_new_tokens": f"a positive integer (at most {MAX_NEW_TOKENS_LIMIT})",
}


class ProtocolError(Exception):
    """Every problem of one protocol source, as readable `source: key: expected ...` lines."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"{key}: {msg}" if key else msg for key, msg in self.problems]
        if len(lines) == 1:
            return f"{self.source}: {lines[0]}"
        shown = lines[:MAX_LISTED_PROBLEMS]
        text = f"{self.source}: {len(lines)} problems\n" + "\n".join(f"  - {s}" for s in shown)
        if len(lines) > len(shown):
            text += f"\n  ... and {len(lines) - len(shown)} more"
        return text


class Protocol(BaseModel):
    """A validated protocol; build it with `load_protocol` / `protocol_from_yaml_text`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: Annotated[StrictStr, StringConstraints(pattern=r"^[a-z0-9_]+$")]
    description: Optional[StrictStr] = None
    version: Optional[StrictStr | StrictInt | float] = None
    source: Optional[StrictStr] = None
    license: Optional[StrictStr] = None
    system: Optional[StrictStr] = None
    turns: Annotated[list[StrictStr], Field(min_length=1)]
    items: Annotated[list[dict[StrictStr, Any]], Field(min_length=1)]
    items_file: Optional[Annotated[StrictStr, StringConstraints(min_length=1)]] = None
    scoring: list[Literal[SCORER_NAMES]] = Field(default_factory=list)
    stance_turns: Optional[list[StrictInt]] = None
    # `scorer_options:` in YAML; named otherwise here because `scorer_options(name)` is the method
    scorer_settings: Optional[dict[StrictStr, dict[StrictStr, Any]]] = Field(default=None, alias="scorer_options")
    max_new_tokens: Optional[Annotated[StrictInt, Field(gt=0, le=MAX_NEW_TOKENS_LIMIT)]] = None
    # attention window of every arm (engine.dialogue): the sink plus the last `window` tokens
    window: Optional[Annotated[StrictInt, Field(gt=0, le=MAX_WINDOW)]] = None
    _source_path: Optional[Path] = PrivateAttr(default=None)

    @property
    def source_path(self) -> Optional[Path]:
        """The YAML file this protocol was loaded from (None for uploaded text)."""
        return self._source_path

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    def render_turns(self, item: dict) -> list[str]:
        """The user messages for one item, placeholders filled."""
        return [self._fill(t, item, f"turns[{i}]") for i, t in enumerate(self.turns)]

    def render_system(self, item: Optional[dict] = None) -> Optional[str]:
        """The system prompt for one item, or None when the protocol has none."""
        return None if self.system is None else self._fill(self.system, item or {}, "system")

    def item_ids(self) -> list[str]:
        """Stable ids for clustering and the DB: an item's `id` key, else its index."""
        return [str(item.get("id", i)) for i, item in enumerate(self.items)]

    def scorer_options(self, scorer_name: str) -> dict:
        """Keyword options `scoring.score_dialogue` takes from the protocol for this scorer:
        top-level stance_turns, then the scorer's `scorer_options` entry (which wins)."""
        return scoring.protocol_options(scorer_name, self, (self.scorer_settings or {}).get(scorer_name))

    def _fill(self, template: str, item: dict, key: str) -> str:
        try:
            return template.format_map(item)
        except KeyError as exc:
            raise ProtocolError(self.name, [(key, f"expected the item to have key {exc.args[0]!r}")]) from None


# ---------------------------------------------------------------- entry points


def load_protocol(path: str | Path) -> Protocol:
    """Read, validate and resolve one protocol YAML file (items_file relative to it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProtocolError(path.name, [("", f"expected a protocol file at {path}, found none")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError(path.name, [("", f"expected a readable UTF-8 text file ({exc})")]) from None
    protocol = protocol_from_yaml_text(text, path.name, base_dir=path.parent)
    protocol._source_path = path.resolve()
    return protocol


def protocol_from_yaml_text(
    text: str, name_for_errors: str = "<uploaded protocol>", base_dir: str | Path | None = None
) -> Protocol:
    """Validate YAML text (the lab's upload box). Without `base_dir`, `items_file` is refused:
    uploaded text must not read files on the server."""
    return protocol_from_dict(_parse_yaml(text, name_for_errors), name_for_errors, base_dir)


def protocol_from_dict(data: Any, name_for_errors: str = "<protocol>", base_dir: str | Path | None = None) -> Protocol:
    """Validate an already parsed mapping; all problems are raised together."""
    source = name_for_errors
    if not isinstance(data, dict):
        raise ProtocolError(
            source,
            [
                (
                    "",
                    "expected a mapping of keys ("
                    + ", ".join(YAML_KEYS)
                    + f") at the top level, got {_describe(data)}",
                )
            ],
        )
    problems: list[tuple[str, str]] = []
    items, item_lines = _resolve_items(data, Path(base_dir) if base_dir is not None else None, problems)
    where = _item_locator(item_lines, data.get("items_file"))
    payload = dict(data)
    payload["items"] = items if items is not None else [{}]
    try:
        protocol = Protocol.model_validate(payload)
    except ValidationError as exc:
        problems += [(_loc_path(err["loc"], where), _expectation(err)) for err in exc.errors()]
        protocol = None
    if protocol is not None and not problems:
        problems += _semantic_problems(protocol, where)
    if problems:
        raise ProtocolError(source, problems)
    return protocol


def list_protocols() -> list[Protocol]:
    """The protocols shipped in experiments/protocols/, sorted by name."""
    return sorted((load_protocol(p) for p in PROTOCOL_DIR.glob("*.yaml")), key=lambda p: p.name)


def get_protocol(name: str) -> Protocol:
    """A shipped protocol by name; KeyError lists the available names."""
    protocols = {p.name: p for p in list_protocols()}
    if name not in protocols:
        raise KeyError(f"no shipped protocol {name!r}; available: {', '.join(sorted(protocols))}")
    return protocols[name]


# ---------------------------------------------------------------- YAML and items_file


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would silently overwrite."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ProtocolError(source, [(where, f"expected valid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise ProtocolError(source, [("", f"expected valid YAML: {exc}")]) from None


def _resolve_items(data: dict, base_dir: Optional[Path], problems: list) -> tuple[Any, Optional[list[int]]]:
    """Inline items, or the parsed items_file with each item's line number (None on problems)."""
    has_items = data.get("items") is not None
    has_file = data.get("items_file") is not None
    if has_items and has_file:
        problems.append(("items, items_file", "expected exactly one of inline `items` or `items_file`, got both"))
        return None, None
    if not has_items and not has_file:
        problems.append(
            (
                "items",
                "required key is missing; expected inline `items` (a list of "
                "mappings) or `items_file: path.jsonl` (exactly one of the two)",
            )
        )
        return None, None
    if has_items:
        return data["items"], None
    name = data["items_file"]
    if not isinstance(name, str) or not name.strip():
        return None, None  # the type error is reported by the schema
    if base_dir is None:
        problems.append(
            ("items_file", "expected inline `items`: uploaded protocol text cannot refer to files on the server")
        )
        return None, None
    path = base_dir / name
    if not path.is_file():
        problems.append(
            ("items_file", f"expected an existing JSONL file relative to the protocol file, but {name!r} was not found")
        )
        return None, None
    return _read_jsonl(path, name, problems)


def _read_jsonl(path: Path, name: str, problems: list) -> tuple[Any, Optional[list[int]]]:
    items, lines, before = [], [], len(problems)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(("items_file", f"expected a readable UTF-8 file {name!r} ({exc})"))
        return None, None
    for lineno, obj in jsonl_lines(text):
        if isinstance(obj, json.JSONDecodeError):
            problems.append(
                (
                    f"items_file {name} line {lineno}",
                    f"expected one JSON object per line ({obj.msg} at column {obj.colno})",
                )
            )
            continue
        if not isinstance(obj, dict):
            problems.append(
                (f"items_file {name} line {lineno}", f"expected a JSON object {{...}}, got {_describe(obj)}")
            )
            continue
        items.append(obj)
        lines.append(lineno)
    if len(problems) > before:
        return None, None
    if not items:
        problems.append(("items_file", f"expected at least one JSON object in {name!r}, found none"))
        return None, None
    return items, lines


# ---------------------------------------------------------------- error wording


def _item_locator(item_lines: Optional[list[int]], items_file: Any):
    """`where(i, '.answer')` -> 'items[3].answer', plus '(file.jsonl line 4)' for file items."""

    def where(index: int, suffix: str = "") -> str:
        path = f"items[{index}]{suffix}"
        if item_lines is not None and 0 <= index < len(item_lines):
            path += f" ({items_file} line {item_lines[index]})"
        return path

    return where


def _loc_path(loc: tuple, where) -> str:
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
        return where(loc[1], "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[2:]))
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _expectation(err: dict) -> str:
    """One plain sentence for one pydantic error: what was expected, what was found."""
    loc, kind, got = err["loc"], err["type"], _describe(err.get("input"))
    if kind == "missing":
        return f"required key is missing; expected {_EXPECTED.get(loc[-1], 'a value')}"
    if kind == "extra_forbidden":
        return "unknown key; expected only: " + ", ".join(YAML_KEYS)
    if len(loc) == 1 and loc[0] in _EXPECTED:
        return f"expected {_EXPECTED[loc[0]]}, got {got}"
    if kind == "literal_error":
        return f"unknown scorer; expected one of {', '.join(SCORER_NAMES)}, got {got}"
    if kind.startswith("string_"):
        return f"expected a string, got {got}"
    if kind.startswith("int_"):
        return f"expected an integer, got {got}"
    if kind == "dict_type":
        return f"expected a mapping of keys to values, got {got}"
    return f"{err['msg']}; got {got}"


# ---------------------------------------------------------------- cross-field checks

_FIELD = re.compile(r"^(?P<key>[A-Za-z_]\w*)(?P<index>(?:\[\d+\])*)$")


def _placeholders(template: str) -> tuple[dict[str, list[tuple[int, ...]]], Optional[str]]:
    """Placeholders of a str.format template as {key: [index tuples]} ({q} -> (), {q[1]} -> (1,)),
    or the reason the template is invalid, worded for the person who wrote it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return {}, (
            f"expected a valid template, but it has a lone brace ({exc}); placeholders look like "
            "{question} or {pushbacks[0]}, and a literal brace is written as {{ and }}"
        )
    names: dict[str, list[tuple[int, ...]]] = {}
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            return names, (
                f"the placeholder {{{field}}} names no item key (positional placeholders have nothing "
                "to fill them); write the key, e.g. {question} or {pushbacks[0]}, or a literal brace as {{ }}"
            )
        m = _FIELD.match(field)
        if not m:
            if "." in field:
                return names, (
                    f"the placeholder {{{field}}} uses attribute access, which is not supported; "
                    "use an item key {key} or a list entry {key[0]}"
                )
            return names, (
                f"the placeholder {{{field}}} is not an item key; keys are letters, digits and "
                "underscores, optionally with list indices: {question}, {pushbacks[0]}"
            )
        if spec or conversion:
            return names, f"expected a plain placeholder {{{field}}}, without format spec or conversion (!r, :>10)"
        index = tuple(int(i) for i in re.findall(r"\[(\d+)\]", m.group("index")))
        names.setdefault(m.group("key"), []).append(index)
    return names, None


def _item_value_problem(value: Any) -> Optional[str]:
    if isinstance(value, (str, int, float, bool)):
        return None
    if isinstance(value, list):
        if all(isinstance(v, (str, int, float, bool)) for v in value):
            return None
        return f"expected a list of strings or numbers, got a list holding {_describe(next(v for v in value if not isinstance(v, (str, int, float, bool))))}"
    return f"expected a string, a number, or a list of them, got {_describe(value)}"


def _use_problem(item: dict, key: str, index: tuple, template_key: str) -> Optional[str]:
    """Why {key[index]} cannot be filled from this item (None if it can)."""
    value = item[key]
    shown = "{" + key + "".join(f"[{i}]" for i in index) + "}"
    if not index:
        if isinstance(value, list):
            return (
                f"'{key}' is a list of {len(value)}, used whole as {shown} in {template_key}; "
                f"use one entry such as {{{key}[0]}}"
            )
        return None
    if len(index) > 1:
        return f"{shown} in {template_key} indexes twice, but item values are at most lists of strings"
    if not isinstance(value, list):
        return f"'{key}' is {_describe(value)}, not a list, but {template_key} uses {shown}"
    if index[0] >= len(value):
        return f"'{key}' has {len(value)} entries, but {template_key} uses {shown} (entries count from 0)"
    return None


def _semantic_problems(p: Protocol, where) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    templates = ([("system", p.system)] if p.system is not None else []) + [
        (f"turns[{i}]", t) for i, t in enumerate(p.turns)
    ]
    used: dict[str, list[tuple[tuple, str]]] = {}
    for key, template in templates:
        if not template.strip():
            problems.append((key, "expected a non-empty string"))
        names, error = _placeholders(template)
        if error:
            problems.append((key, error))
        for name in sorted(names):
            for index in names[name]:
                used.setdefault(name, []).append((index, key))
    for i, item in enumerate(p.items):
        for key, value in item.items():
            why = _item_value_problem(value)
            if why:
                problems.append((where(i, f".{key}"), why))
        for name, uses in used.items():
            if name not in item:
                problems.append((where(i), f"missing key {name!r}, used as {{{name}}} in {uses[0][1]}"))
                continue
            if _item_value_problem(item[name]):
                continue
            for index, template_key in uses:
                why = _use_problem(item, name, index, template_key)
                if why:
                    problems.append((where(i, f".{name}"), why))
                    break
    for name in p.scoring:
        check = scoring.get_scorer(name).item_problems
        if check is not None:
            problems += check(p.items, where)
    problems += _list_problems(p, where)
    problems += _scorer_option_problems(p)
    return problems


def _scorer_option_problems(p: Protocol) -> list[tuple[str, str]]:
    """scorer_options: registered scorers, and what each one's options model accepts."""
    problems = []
    for scorer, options in (p.scorer_settings or {}).items():
        base = f"scorer_options.{scorer}"
        if scorer not in scoring.SCORERS:
            problems.append((base, f"unknown scorer; expected one of {', '.join(SCORER_NAMES)}"))
            continue
        problems += [(f"{base}.{key}", why) for key, why in scoring.option_problems(scorer, options, p.n_turns)]
    return problems


def _list_problems(p: Protocol, where) -> list[tuple[str, str]]:
    """Duplicates in scoring and item ids, stance_turns out of range."""
    problems = []
    for j, name in enumerate(p.scoring):
        if name in p.scoring[:j]:
            problems.append((f"scoring[{j}]", f"expected each scorer once, got {name!r} again"))
    for j, turn in enumerate(p.stance_turns or []):
        why = scoring.registry.turn_index_problem(turn, p.n_turns)
        if why:
            problems.append((f"stance_turns[{j}]", why))
    first_seen: dict[str, int] = {}
    for i, item in enumerate(p.items):
        if "id" in item:
            item_id = str(item["id"])
            if item_id in first_seen:
                problems.append(
                    (where(i, ".id"), f"expected a unique id, {item_id!r} is also items[{first_seen[item_id]}]")
                )
            first_seen.setdefault(item_id, i)
    return problems
