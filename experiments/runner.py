"""Running a protocol against several arms: items x seeds dialogues, logged, scored, resumable.

One *run* is one experiment record (`store.create_experiment`). It plays the protocol's user turns,
seed by seed and item by item, to ALL arms at once (one batched `Dialogue` per (item, seed)), logs
every message through `SessionRecorder(kind="experiment", experiment_id, item_key, seed)`, then runs
the protocol's scorers on each arm's assistant replies:

- per arm-turn: `store.put_score(assistant_turn_id, scorer, label, value, data)` (the scorer's
  `DialogueScore.turns[t]`);
- per dialogue: the session's `meta` holds ``{"complete": true, "item_index": i,
  "summaries": {"<arm_index>": {"<scorer>": DialogueScore.summary}}}``. `complete` is written
  LAST, after every turn and score, so a session with ``complete: true`` is whole; anything else
  (missing key aside: sessions logged outside the runner) is an interrupted dialogue.

Seeds: dialogue seed ``s`` in ``range(seeds)`` becomes every arm's sampling seed. A greedy arm
(the default) stays greedy, so its seeds give the same dialogue; write ``greedy=false`` in the spec
for seeds to matter.

Resume (`run_protocol(..., experiment_id=ID)`, `python -m experiments run --resume ID`): the run's
stored protocol, arms, seeds, items and max_new_tokens are used; complete dialogues are skipped;
an incomplete one has all its turns (with their scores) deleted and is played again in the same
session row, so a resumed run ends with exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from db import Store
from engine import ArmSpec, Dialogue, LoadedModel, SpecError, parse_arm
from experiments.protocol import Protocol, ProtocolError, get_protocol, load_protocol, protocol_from_dict
from experiments.record import SessionRecorder
from experiments.scoring import score_dialogue

ProgressFn = Callable[[int, int, dict], None]


class RunConfigError(ValueError):
    """The run cannot start as asked (resume of another configuration, zero seeds...)."""


@dataclass
class RunConfig:
    """Everything that defines a run; stored as the experiment's `args` (plus the protocol)."""

    protocol: Protocol
    specs: list[ArmSpec]
    seeds: int = 1
    items: Optional[int] = None  # first K items; None = all
    max_new_tokens: Optional[int] = None  # None = the protocol's, else the spec's
    window: Optional[int] = None  # attention window; None = the protocol's (None there: full attention)
    extra: dict = field(default_factory=dict)

    @property
    def item_indices(self) -> list[int]:
        n = len(self.protocol.items)
        return list(range(n if self.items is None else min(self.items, n)))

    @property
    def n_dialogues(self) -> int:
        return len(self.item_indices) * self.seeds

    @property
    def effective_max_new_tokens(self) -> Optional[int]:
        return self.max_new_tokens or self.protocol.max_new_tokens

    @property
    def effective_window(self) -> Optional[int]:
        return self.window or self.protocol.window

    def args(self) -> dict:
        return {
            "arms": [s.to_string() for s in self.specs],
            "arm_labels": [arm_label(s) for s in self.specs],
            "arm_greedy": [is_greedy(s) for s in self.specs],
            "arm_settings": [s.to_dict() for s in self.specs],
            "seeds": self.seeds,
            "items": self.items,
            "n_items": len(self.item_indices),
            "max_new_tokens": self.effective_max_new_tokens,
            **({"window": self.effective_window} if self.effective_window else {}),
            "n_dialogues": self.n_dialogues,
            "n_turns": self.protocol.n_turns,
            "scoring": list(self.protocol.scoring),
            **({"protocol_path": str(self.protocol.source_path)} if self.protocol.source_path else {}),
            **self.extra,
        }


# ------------------------------------------------------------------ inputs


def resolve_protocol(name_or_path: str | Protocol) -> Protocol:
    """A Protocol, a YAML path, or the name of a shipped protocol (`are_you_sure`)."""
    if isinstance(name_or_path, Protocol):
        return name_or_path
    text = str(name_or_path)
    from pathlib import Path

    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists() or "/" in text:
        return load_protocol(path)
    try:
        return get_protocol(text)
    except KeyError as exc:
        raise ProtocolError(text, [("", str(exc.args[0]))]) from None


def parse_arms(specs: Sequence[str | ArmSpec]) -> list[ArmSpec]:
    """Arm specs from strings (SpecError on the first bad one) or ArmSpec objects."""
    out = [s if isinstance(s, ArmSpec) else parse_arm(s) for s in specs]
    if not out:
        raise SpecError("at least one arm is needed, e.g. --arm observer")
    return out


def protocol_record(protocol: Protocol) -> dict:
    """The protocol as stored with the run: items inline, so the run does not depend on files."""
    data = protocol.model_dump(exclude_none=True)
    data.pop("items_file", None)
    return data


_SAMPLING_NOT_IN_LABEL = ("seed", "max_new_tokens")  # the run sets these for every arm alike


def arm_label(spec: ArmSpec) -> str:
    """The arm's display label with its sampling when that is not the default greedy decoding:
    'observer' vs 'observer · greedy=false, temperature=0.7' (an explicit label= is kept)."""
    if spec.label:
        return spec.label
    changed = {
        k: v for k, v in spec.sampling.model_dump(exclude_defaults=True).items() if k not in _SAMPLING_NOT_IN_LABEL
    }
    if not changed:
        return spec.display_label
    return (
        spec.display_label
        + " · "
        + ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items())
    )


def specs_for_seed(specs: Sequence[ArmSpec], seed: int, max_new_tokens: Optional[int]) -> list[ArmSpec]:
    """The arms of one dialogue: the dialogue's seed (and max_new_tokens) set, labels naming sampling."""
    changes: dict[str, Any] = {"seed": int(seed)}
    if max_new_tokens:
        changes["max_new_tokens"] = int(max_new_tokens)
    out = []
    for s in specs:
        labelled = s.with_sampling(**changes)
        label = arm_label(s)
        out.append(
            labelled
            if label == labelled.display_label
            else ArmSpec(labelled.mechanism, labelled.settings, labelled.sampling, label)
        )
    return out


def is_greedy(spec: ArmSpec) -> bool:
    """Greedy decoding: every seed of an item gives the same dialogue."""
    return bool(spec.sampling.greedy)


def load_run(store: Store, experiment_id: str) -> RunConfig:
    """Rebuild the configuration of a stored run (for resume)."""
    exp = store.get_experiment(experiment_id)
    args = exp.get("args") or {}
    protocol = protocol_from_dict(exp.get("protocol") or {}, f"run {experiment_id} protocol")
    if args.get("arm_settings"):
        specs = [ArmSpec.from_dict(d) for d in args["arm_settings"]]
    else:
        specs = parse_arms(args.get("arms") or [])
    return RunConfig(
        protocol, specs, int(args.get("seeds", 1)), args.get("items"), args.get("max_new_tokens"), args.get("window")
    )


def find_matching_run(store: Store, config: RunConfig, weights_hash: Optional[str] = None) -> Optional[dict]:
    """The newest stored run with exactly this configuration (protocol, arms, seeds, items,
    max_new_tokens) on the same weights, preferring an unfinished one; None if there is none.
    A command run again uses it: an unfinished run is resumed, a finished one is not run twice."""
    matches = []
    for exp in store.list_experiments():
        try:
            stored = load_run(store, exp["id"])
            _check_same_run(stored, config, exp["id"])
        except (RunConfigError, ProtocolError, SpecError, ValueError, TypeError, KeyError):
            continue
        stored_hash = (exp.get("model") or {}).get("weights_hash")
        if weights_hash and stored_hash and stored_hash != weights_hash:
            continue
        matches.append(exp)
    if not matches:
        return None
    matches.sort(key=lambda e: str(e.get("created_at")), reverse=True)
    return next((e for e in matches if e["status"] != "finished"), matches[0])


def _check_same_run(stored: RunConfig, asked: RunConfig, experiment_id: str) -> None:
    problems = []
    if protocol_record(stored.protocol) != protocol_record(asked.protocol):
        problems.append(f"protocol ({stored.protocol.name} as stored differs from {asked.protocol.name})")
    if [s.to_string() for s in stored.specs] != [s.to_string() for s in asked.specs]:
        problems.append("arms (" + ", ".join(s.to_string() for s in stored.specs) + ")")
    if stored.seeds != asked.seeds:
        problems.append(f"seeds ({stored.seeds})")
    if stored.item_indices != asked.item_indices:
        problems.append(f"items ({len(stored.item_indices)})")
    if stored.effective_max_new_tokens != asked.effective_max_new_tokens:
        problems.append(f"max_new_tokens ({stored.effective_max_new_tokens})")
    if stored.effective_window != asked.effective_window:
        problems.append(f"window ({stored.effective_window or 'none'})")
    if problems:
        raise RunConfigError(
            f"run {experiment_id} was started with other "
            + "; ".join(problems)
            + f"; resume it with the same settings, or just `--resume {experiment_id}`"
        )


# ------------------------------------------------------------------ the run


def dialogue_plan(config: RunConfig) -> list[tuple[int, str, int]]:
    """(item_index, item_key, seed) for every dialogue, in run order: seed-major, so a run cut
    short holds whole seeds over every item (fewer seeds, never fewer items)."""
    ids = config.protocol.item_ids()
    return [(i, ids[i], s) for s in range(config.seeds) for i in config.item_indices]


def completed_keys(store: Store, experiment_id: str) -> set[tuple[str, int]]:
    """(item_key, seed) of the run's complete dialogues."""
    return {
        (s["item_key"], s["seed"])
        for s in store.list_sessions(experiment_id=experiment_id)
        if (s.get("meta") or {}).get("complete") is True
    }


def make_config(
    protocol: Protocol | str,
    specs: Sequence[str | ArmSpec],
    seeds: int = 1,
    items: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    window: Optional[int] = None,
) -> RunConfig:
    """A checked RunConfig (RunConfigError, SpecError or ProtocolError naming the first problem)."""
    config = RunConfig(resolve_protocol(protocol), parse_arms(specs), int(seeds), items, max_new_tokens, window)
    if config.seeds < 1:
        raise RunConfigError("seeds must be at least 1")
    if config.items is not None and config.items < 1:
        raise RunConfigError("items must be at least 1")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise RunConfigError("max_new_tokens must be at least 1")
    if config.window is not None and (
        isinstance(config.window, bool) or not isinstance(config.window, int) or config.window < 1
    ):
        raise RunConfigError(f"window must be a whole number of tokens >= 1 (got {config.window!r})")
    return config


def open_run(
    store: Store,
    config: RunConfig,
    model: dict,
    n_layers: int,
    experiment_id: Optional[str] = None,
    name: Optional[str] = None,
) -> str:
    """Create the run's experiment record, or check that a stored one is this run on these weights
    and mark it running again; returns its id. `model` is the model identity (to_dict())."""
    for s in config.specs:
        s.validate_for(n_layers)
    if experiment_id is None:
        return store.create_experiment(
            name or f"{config.protocol.name} x {len(config.specs)} arms",
            config.protocol.name,
            protocol=protocol_record(config.protocol),
            args=config.args(),
            model=model,
        )
    exp = store.get_experiment(experiment_id)
    _check_same_run(load_run(store, experiment_id), config, experiment_id)
    stored_hash = (exp.get("model") or {}).get("weights_hash")
    if stored_hash and stored_hash != model.get("weights_hash"):
        raise RunConfigError(
            f"run {experiment_id} was run on {(exp.get('model') or {}).get('name')} with other "
            f"weights; load that model to resume it"
        )
    store.update_experiment(experiment_id, status="running")
    return experiment_id


def run_protocol(
    store: Store,
    lm: LoadedModel,
    protocol: Protocol | str,
    specs: Sequence[str | ArmSpec],
    seeds: int = 1,
    items: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    experiment_id: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    stop_event: Optional[threading.Event] = None,
    name: Optional[str] = None,
    scorer_options: Optional[dict[str, dict]] = None,
    window: Optional[int] = None,
    stream: Optional[Callable[..., Iterator]] = None,
) -> str:
    """Run (or resume) a protocol; returns the experiment id.

    `progress(done, total, info)` is called once before the first dialogue (info["event"] ==
    "start") and after every dialogue ("done" or "skipped", with item, seed, session_id).
    Setting `stop_event` stops at the next decoding step: the unfinished dialogue is left
    incomplete (a resume replays it), the run is marked 'interrupted' and its id returned.
    A KeyboardInterrupt (or one raised by `progress`) marks it 'interrupted' and propagates;
    any other error marks it 'failed' (best effort) and propagates.
    `scorer_options` adds keyword options per scorer to the protocol's own (tests inject a
    stance embedder this way). `stream(dialogue, user, max_new_tokens=...)` runs each turn (default
    `Dialogue.stream`); the lab passes its step scheduler's, so a run shares passes with the Arena.
    """
    config = make_config(protocol, specs, seeds, items, max_new_tokens, window)
    experiment_id = open_run(store, config, lm.identity.to_dict(), lm.config.num_hidden_layers, experiment_id, name)

    plan = dialogue_plan(config)
    done_keys = completed_keys(store, experiment_id)
    done = sum((key, s) in done_keys for _, key, s in plan)
    total = len(plan)
    if progress:
        progress(done, total, {"event": "start", "experiment_id": experiment_id})
    with RunStatus(store, experiment_id) as status:
        for item_index, item_key, seed in plan:
            if (item_key, seed) in done_keys:
                continue
            if stop_event is not None and stop_event.is_set():
                status.value = "interrupted"
                return experiment_id
            sid = _run_dialogue(
                store, lm, config, experiment_id, item_index, item_key, seed, stop_event, scorer_options or {}, stream
            )
            if sid is None:  # stopped mid-dialogue
                status.value = "interrupted"
                return experiment_id
            done += 1
            if progress:
                progress(
                    done,
                    total,
                    {
                        "event": "done",
                        "experiment_id": experiment_id,
                        "item": item_key,
                        "seed": seed,
                        "session_id": sid,
                    },
                )
        status.value = "finished"
    return experiment_id


class RunStatus:
    """The run record's status, written however the run ends: what the body set ("finished",
    "interrupted"), "interrupted" on Ctrl-C, else "failed". Shared by the plain and the Ray runner. A
    failing write (a locked database) must not hide the error that ended the run, so it is dropped."""

    def __init__(self, store: Store, experiment_id: str):
        self.store, self.experiment_id, self.value = store, experiment_id, "failed"

    def __enter__(self) -> "RunStatus":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is not None and issubclass(kind, KeyboardInterrupt):  # Ctrl-C, or SIGTERM raised as one
            self.value = "interrupted"
        elif kind is not None:
            self.value = "failed"
        try:
            self.store.update_experiment(self.experiment_id, status=self.value)
        except Exception:  # noqa: BLE001 - see the class doc
            pass
        return False


def start_dialogue(lm: LoadedModel, config: RunConfig, item_index: int, seed: int) -> tuple[Dialogue, dict]:
    """The batched Dialogue of one (item, seed) and its session's starting meta (complete: False)."""
    protocol = config.protocol
    item = protocol.items[item_index]
    specs = specs_for_seed(config.specs, seed, config.effective_max_new_tokens)
    d = Dialogue(lm, specs, system=protocol.render_system(item), window=config.effective_window)
    meta = {
        "complete": False,
        "protocol": protocol.name,
        "item_index": item_index,
        **({"window": d.window, "sink": d.sink} if d.window else {}),
    }
    return d, meta


def play_dialogue(
    d: Dialogue,
    config: RunConfig,
    item_index: int,
    stop_event: Optional[threading.Event] = None,
    on_turn: Optional[Callable] = None,
    stream: Optional[Callable[..., Iterator]] = None,
) -> Optional[list[tuple[str, list]]]:
    """Play the protocol's user turns to every arm at once: [(user, replies)] per turn, or None when
    stopped before the end. on_turn(user, replies) is called after each turn (the recorder logs there);
    `stream(d, user, max_new_tokens=...)` runs a turn (default `d.stream`; the lab: its scheduler's)."""
    protocol = config.protocol
    item = protocol.items[item_index]
    turns = []
    for user in protocol.render_turns(item):
        replies = None
        stopped = False
        turn = (
            d.stream(user, max_new_tokens=config.effective_max_new_tokens)
            if stream is None
            else stream(d, user, max_new_tokens=config.effective_max_new_tokens)
        )
        for event in turn:
            if stop_event is not None and stop_event.is_set() and not stopped:
                d.stop_all()
                stopped = True
            replies = event.replies
        if stopped:
            return None
        if on_turn is not None:
            on_turn(user, replies)
        turns.append((user, replies))
    return turns


def score_turns(
    config: RunConfig, item_index: int, turns: list[tuple[str, list]], n_arms: int, scorer_options: dict
) -> dict[int, dict[str, Any]]:
    """{arm: {scorer: DialogueScore}} of a played dialogue's assistant replies."""
    protocol = config.protocol
    item = protocol.items[item_index]
    texts: list[list[str]] = [[] for _ in range(n_arms)]
    for _, replies in turns:
        for r in replies:
            texts[r.arm].append(r.text)
    out: dict[int, dict[str, Any]] = {}
    for arm in range(n_arms):
        out[arm] = {}
        for scorer in protocol.scoring:
            opts = {**protocol.scorer_options(scorer), **scorer_options.get(scorer, {})}
            out[arm][scorer] = score_dialogue(scorer, item, texts[arm], **opts)
    return out


def complete_meta(meta: dict, scores: dict[int, dict[str, Any]]) -> dict:
    """The session meta that marks a dialogue whole: complete, with each arm's scorer summaries."""
    summaries = {str(arm): {scorer: r.summary for scorer, r in by.items()} for arm, by in scores.items()}
    return {**meta, "complete": True, "summaries": summaries, "finished_at": time.time()}


def _run_dialogue(
    store: Store,
    lm: LoadedModel,
    config: RunConfig,
    experiment_id: str,
    item_index: int,
    item_key: str,
    seed: int,
    stop_event: Optional[threading.Event],
    scorer_options: dict,
    stream: Optional[Callable[..., Iterator]] = None,
) -> Optional[str]:
    """Play, log and score one (item, seed) dialogue; None when stopped before its end."""
    protocol = config.protocol
    d, meta = start_dialogue(lm, config, item_index, seed)
    existing = store.find_session(experiment_id, item_key, seed)
    if existing is not None:  # interrupted earlier: start it again from nothing, same row
        store.delete_turns_from(existing["id"], None, 0)
        store.update_session(existing["id"], meta=meta)
        rec = SessionRecorder(store, lm, d, session_id=existing["id"])
    else:
        rec = SessionRecorder(
            store,
            lm,
            d,
            kind="experiment",
            experiment_id=experiment_id,
            item_key=item_key,
            seed=seed,
            title=dialogue_title(protocol, item_key, seed),
            meta=meta,
        )
    turn_ids: list[list[int]] = [[] for _ in range(d.n_arms)]

    def log(user, replies):
        for arm, tid in enumerate(rec.log(user, replies)):
            turn_ids[arm].append(tid)

    turns = play_dialogue(d, config, item_index, stop_event, on_turn=log, stream=stream)
    if turns is None:
        return None
    scores = score_turns(config, item_index, turns, d.n_arms, scorer_options)
    for arm, by in scores.items():
        for scorer, result in by.items():
            for tid, turn in zip(turn_ids[arm], result.turns):
                store.put_score(tid, scorer, turn["label"], turn["value"], turn["data"])
    store.update_session(rec.session_id, meta=complete_meta(meta, scores))  # last: the dialogue is whole
    return rec.session_id


def dialogue_title(protocol: Protocol, item_key: str, seed: int) -> str:
    return f"{protocol.name} · {item_key} · seed {seed}"
