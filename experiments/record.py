"""Logging a dialogue to the database, and replaying a logged turn to identical tokens.

Both the lab and the protocol runner log through `SessionRecorder`, so a session opened in the lab
and a dialogue run headless carry the same provenance: the model identity, each arm's full
settings (mechanism + sampling, seed), the system prompt, and per arm-turn the exact token ids
fed and generated, the generation settings actually used and the timings.

Replay rebuilds the arms from those rows, feeds every earlier turn's logged tokens through the same
batched step schedule as the original run (so every floating-point operation repeats), and
generates the asked turn afresh; with the same model, settings and seeds it gives identical tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from db import Store
from engine import ArmReply, ArmSpec, Dialogue, LoadedModel


def arm_rows(specs: list[ArmSpec]) -> list[dict]:
    return [
        {"index": i, "label": s.display_label, "spec": s.to_string(), "settings": s.to_dict(), "seed": s.sampling.seed}
        for i, s in enumerate(specs)
    ]


def window_meta(dialogue: Dialogue) -> dict:
    """What a session must remember of the dialogue's attention window to replay it."""
    return {"window": dialogue.window, "sink": dialogue.sink} if dialogue.window else {}


def session_window(session: dict) -> dict:
    """Dialogue keyword arguments for a logged session's attention window ({} when it had none)."""
    meta = session.get("meta") or {}
    return {"window": int(meta["window"]), "sink": int(meta.get("sink", 4))} if meta.get("window") else {}


def session_fields(lm: LoadedModel, dialogue: Dialogue, meta: dict | None = None) -> dict:
    """The session row's model, arms, system prompt and meta for a dialogue (as create_session takes them)."""
    return {
        "model": lm.identity.to_dict(),
        "arms": arm_rows([a.spec for a in dialogue.arms]),
        "system_prompt": dialogue.system,
        "meta": {**(meta or {}), **window_meta(dialogue)},
    }


def turn_rows(
    dialogue: Dialogue,
    user: str,
    replies: list[ArmReply],
    turn_index: int | None = None,
    errors: dict[int, str] | None = None,
) -> list[dict]:
    """The rows of one exchange, user message then reply per arm, as `Store.log_turn` keyword arguments
    (with arm_index): what the recorder logs one by one and a Ray actor hands the driver whole."""
    turn = dialogue.turn - 1 if turn_index is None else turn_index
    rows = []
    for r in replies:
        mech = dialogue.arms[r.arm].mechanism
        rows.append(
            {
                "arm_index": r.arm,
                "turn_index": turn,
                "role": "user",
                "text": user,
                "token_ids": r.prompt_token_ids,
                "started_at": r.started_at,
                "finished_at": r.started_at,
            }
        )
        meta = {
            "memory_size": 0 if mech is None else mech.memory_size(),
            "on_path_calls": {} if mech is None else {str(k): v for k, v in mech.call_counts.items()},
        }
        rows.append(
            {
                "arm_index": r.arm,
                "turn_index": turn,
                "role": "assistant",
                "text": r.text,
                "token_ids": r.token_ids,
                "started_at": r.started_at,
                "finished_at": r.started_at + r.duration_s,
                "ttft_s": r.ttft_s,
                "duration_s": r.duration_s,
                "finish_reason": r.finish_reason,
                "gen_settings": r.gen_settings,
                "error": (errors or {}).get(r.arm),
                "meta": meta,
            }
        )
    return rows


class SessionRecorder:
    """Writes each finished turn of a `Dialogue` to the store, one transaction per arm-message."""

    def __init__(
        self,
        store: Store,
        lm: LoadedModel,
        dialogue: Dialogue,
        *,
        kind: str = "lab",
        title: str = "",
        user: str | None = None,
        blind: bool = False,
        pane_order: list[int] | None = None,
        experiment_id: str | None = None,
        item_key: str | None = None,
        seed: int | None = None,
        meta: dict | None = None,
        session_id: str | None = None,
    ):
        self.store, self.lm, self.dialogue = store, lm, dialogue
        self.session_id = session_id or store.create_session(
            kind,
            title=title,
            blind=blind,
            pane_order=pane_order,
            user=user,
            experiment_id=experiment_id,
            item_key=item_key,
            seed=seed,
            **session_fields(lm, dialogue, meta),
        )

    def log(
        self, user: str, replies: list[ArmReply], turn_index: int | None = None, errors: dict[int, str] | None = None
    ) -> list[int]:
        """Log the user message and every arm's reply; return the assistant turn ids by arm."""
        ids = []
        for row in turn_rows(self.dialogue, user, replies, turn_index, errors):
            tid = self.store.log_turn(self.session_id, **row)
            if row["role"] == "assistant":
                ids.append(tid)
        return ids

    def undo_last(self) -> None:
        """Forget the last turn in the DB too (regenerate)."""
        turn = self.dialogue.turn - 1
        for i in range(self.dialogue.n_arms):
            self.store.delete_turns_from(self.session_id, i, turn)


@dataclass
class Replay:
    turn_index: int
    original: list[list[int]]
    replayed: list[list[int]]
    seconds: float

    @property
    def identical(self) -> bool:
        return self.original == self.replayed


def session_turns(store: Store, session_id: str) -> tuple[dict, dict[int, dict[int, dict]]]:
    """A session and its logged messages as turns[turn_index][arm_index][role] (StoreError if unknown)."""
    session = store.get_session(session_id)
    turns: dict[int, dict[int, dict]] = {}
    for t in store.get_turns(session_id):
        turns.setdefault(t["turn_index"], {}).setdefault(t["arm_index"], {})[t["role"]] = t
    return session, turns


def session_specs(session: dict) -> list[ArmSpec]:
    """The session's arms, in arm-index order, rebuilt from their stored settings."""
    return [ArmSpec.from_dict(a["settings"]) for a in sorted(session["arms"], key=lambda a: a["index"])]


def other_weights(session: dict, lm: LoadedModel, action: str) -> str | None:
    """Why `lm` cannot `action` this session (it was run on other weights), or None if it can."""
    if session["model"].get("weights_hash") == lm.identity.weights_hash:
        return None
    return (
        f"session {session['id']} was run on {session['model'].get('name')} with other weights "
        f"({session['model'].get('weights_hash', '?')[:12]}); load that model to {action} it"
    )


def dialogue_from_session(store: Store, lm: LoadedModel, session_id: str, record_traces: bool = False):
    """Rebuild the arms (and the logged turns by index) of a session."""
    session, turns = session_turns(store, session_id)
    d = Dialogue(
        lm,
        session_specs(session),
        system=session["system_prompt"],
        record_traces=record_traces,
        **session_window(session),
    )
    return session, d, turns


def replay_turn(store: Store, lm: LoadedModel, session_id: str, turn_index: int) -> Replay:
    """Regenerate turn `turn_index` of a logged session from its rows alone."""
    session, d, turns = dialogue_from_session(store, lm, session_id)
    why = other_weights(session, lm, "replay")
    if why:
        raise ValueError(why)
    if turn_index not in turns:
        raise ValueError(f"session {session_id} has no turn {turn_index}")
    start = time.perf_counter()
    for k in range(turn_index):
        rows = turns[k]
        user = rows[0]["user"]["text"]
        list(d.stream(user, forced=[rows[i]["assistant"]["token_ids"] for i in range(d.n_arms)]))
    rows = turns[turn_index]
    original = [rows[i]["assistant"]["token_ids"] for i in range(d.n_arms)]
    for i, arm in enumerate(d.arms):  # the limits actually used, and a stop where a person pressed one
        limit = rows[i]["assistant"]["gen_settings"].get("max_new_tokens", arm.spec.sampling.max_new_tokens)
        if rows[i]["assistant"]["finish_reason"] == "stopped":
            limit = len(original[i])
        arm.spec = arm.spec.with_sampling(max_new_tokens=max(1, limit))
    replies = d.send(rows[0]["user"]["text"])
    return Replay(turn_index, original, [r.token_ids for r in replies], time.perf_counter() - start)
