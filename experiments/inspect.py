"""Inspect a logged turn: attention, memory reads, divergence from the observer, source attention.

`inspect_turn(store, lm, session_id, arm_index, turn_index)` computes what the Inspect views draw,
on demand, and caches it in the database so reopening a turn is instant:

* big arrays (the bucketed attention [L, H, S, S] in float16, the layer x head grid, the memory-read
  matrices) go to one compressed `.npz` per (arm, turn) under `<store.dir>/captures/<session>/`,
  referenced by a relative path from `put_capture`;
* small things (labels, divergence, source curves, turn summary) are JSON in the capture rows.

Every capture row carries a key (capture version, model weights hash, arms, max_size); a row whose
key differs (other weights, a newer capture format) is recomputed, never shown.
Capture kinds on the arm's assistant turn: inspect.attention, inspect.memory, inspect.source,
inspect.summary (one capture pass makes all four, for every arm of the turn at once: each batch
row has its own accumulators), inspect.divergence (a probe pass per arm, every arm's run in the same
call), so Inspect on any other arm of a captured turn is served from the store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from db import Store
from db.blind import is_blinded
from engine import LoadedModel
from engine.capture import (
    CAPTURE_VERSION,
    DEFAULT_MAX_SIZE,
    GRID_METRICS,
    CaptureError,
    bucket_starts,
    capture_turn,
    memory_read_table,
    scalar_curves,
    token_label,
    token_labels,
    turn_summary,
)
from engine.mechanisms.base import ROLES
from engine.probes import compare_on_transcript
from experiments.record import other_weights, session_specs, session_turns

KINDS = ("attention", "memory", "divergence", "source", "summary")
CAPTURE_KINDS = ("attention", "memory", "source", "summary")
PREFIX = "inspect."
STATS: Counter = Counter()  # how many passes ran (tests and the UI read it)


class InspectError(ValueError):
    """The turn cannot be inspected; the message is meant for a person."""


@dataclass
class InspectResult:
    session_id: str
    arm_index: int
    turn_index: int
    arm_labels: list[str]
    n_turns: int
    attention: dict | None = None  # meta: labels, buckets, grid; arrays via attention_matrix()
    memory: dict | None = None
    divergence: dict | None = None
    source: dict | None = None
    summary: list | None = None
    cached: dict = field(default_factory=dict)  # kind -> True if it came from the cache
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # kind -> absolute path of its array file

    @property
    def from_cache(self) -> bool:
        return bool(self.cached) and all(self.cached.values())

    def _arrays(self) -> dict:
        if getattr(self, "_mem_arrays", None) is not None:
            return self._mem_arrays
        path = self.files.get("attention") or self.files.get("memory")
        if path is None:
            raise InspectError("no array file for this turn")
        return _load_npz(path, os.path.getmtime(path))

    def attention_matrix(self, layer: int, head: int | str = "mean") -> np.ndarray:
        """[S, S] bucketed attention of one layer and head (or the mean over heads); rows sum to 1."""
        if self.attention is None:
            raise InspectError("attention was not captured for this turn")
        att = self._arrays()["attention"]
        L, H = att.shape[:2]
        if not 0 <= int(layer) < L:
            raise InspectError(f"layer {layer} does not exist: 0..{L - 1}")
        if head in (None, "mean"):
            return att[int(layer)].astype(np.float32).mean(0)
        if not 0 <= int(head) < H:
            raise InspectError(f"head {head} does not exist: 0..{H - 1}")
        return att[int(layer), int(head)].astype(np.float32)

    def grid(self, metric: str) -> np.ndarray:
        if self.attention is None:
            raise InspectError("attention was not captured for this turn")
        return np.asarray(self.attention["grid"][metric], dtype=np.float32)

    def memory_layers(self) -> list[dict]:
        """Per read layer: slots (labelled) and weights [n_tokens, n_slots] (+ per_head)."""
        if not self.memory or not self.memory.get("layers"):
            return []
        arrays = self._arrays()
        out = []
        for entry in self.memory["layers"]:
            l = entry["layer"]
            out.append(
                {
                    **entry,
                    "weights": arrays[f"mem_w_{l}"],
                    "per_head": arrays.get(f"mem_h_{l}") if f"mem_h_{l}" in arrays else None,
                }
            )
        return out


@functools.lru_cache(maxsize=6)
def _load_npz(path: str, mtime: float) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------------
def _key(session: dict, lm_hash: str, max_size) -> dict:
    return {
        "v": CAPTURE_VERSION,
        "weights": lm_hash,
        "max_size": max_size,
        "arms": [a["spec"] for a in sorted(session["arms"], key=lambda a: a["index"])],
    }


def _captures_root(store: Store, captures_dir: str | None) -> Path | None:
    if store.dir is not None:
        return Path(store.dir)
    return Path(captures_dir) if captures_dir else None


def inspect_turn(
    store: Store,
    lm: LoadedModel | None,
    session_id: str,
    arm_index: int,
    turn_index: int,
    kinds=KINDS,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    lock=None,
    recompute: bool = False,
    captures_dir: str | None = None,
    progress=None,
) -> InspectResult:
    """Everything the Inspect views need for one (session, arm, turn), from the cache or computed.

    `lock`: held around model work only (the lab passes its model lock). `lm` may be None when every
    asked kind is cached. A pass that runs covers every arm of the turn: one capture stores the views
    of all arms (each arm's own turn row and array file), and the divergence probe runs for every arm
    not yet compared, so inspecting another arm of the turn afterwards runs no model. `progress(text)`
    is called before each model pass (the lab shows it). Errors the user can act on raise
    `InspectError` (or the store's error for an unknown session).
    """
    t0 = time.perf_counter()
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InspectError(f"unknown kind {bad[0]!r}; use {', '.join(KINDS)}")
    session, turns = session_turns(store, session_id)
    if is_blinded(session):
        # memory reads and divergence from the observer show which arm is linked: no amount of
        # relabelling keeps a blind annotation blind, so Inspect waits for the reveal
        raise InspectError(
            "this is a blind session and its arms are not revealed yet: inspecting would show "
            "which arm is which. Press Reveal in the Arena first (after labelling)."
        )
    if (session.get("meta") or {}).get("window"):
        raise InspectError(
            f"session {session_id} ran with an attention window of {session['meta']['window']} tokens; "
            "Inspect captures full-attention dialogues only (its attention views would not match "
            "what the arms saw)"
        )
    arms = sorted(session["arms"], key=lambda a: a["index"])
    try:
        arm_index, turn_index = int(arm_index), int(turn_index)
    except (TypeError, ValueError):
        raise InspectError("arm and turn must be whole numbers") from None
    if not 0 <= arm_index < len(arms):
        raise InspectError(f"session {session_id} has arms 0..{len(arms) - 1}; there is no arm {arm_index}")
    complete = [k for k in sorted(turns) if all("assistant" in turns[k].get(a["index"], {}) for a in arms)]
    if turn_index not in turns:
        n = len(turns)
        raise InspectError(
            f"session {session_id} has {'no turns yet' if n == 0 else f'turns 0..{n - 1}'}; "
            f"there is no turn {turn_index}"
        )
    if any(k not in complete for k in range(turn_index + 1)):
        raise InspectError(f"turn {turn_index} (or an earlier one) has no logged reply for every arm")
    turn_id = _row_id(turns[turn_index][arm_index]["assistant"])
    lm_hash = lm.identity.weights_hash if lm is not None else session["model"].get("weights_hash")
    key = _key(session, lm_hash, max_size)
    root = _captures_root(store, captures_dir)
    result = InspectResult(session_id, arm_index, turn_index, [a["label"] for a in arms], len(turns))

    # -- the cache
    missing = []
    for kind in kinds:
        row = None if recompute else _cached_row(store, turn_id, kind, key, root)
        if row is not None:
            if row.get("path"):
                result.files[kind] = str(root / row["path"])
            _attach(result, kind, row["data"])
            result.cached[kind] = True
        else:
            missing.append(kind)
    if not missing:
        result.seconds = time.perf_counter() - t0
        return result

    if lm is None:
        raise InspectError("this turn has not been inspected yet and no model is loaded")
    why = other_weights(session, lm, "inspect")
    if why:
        raise InspectError(why)
    specs = session_specs(session)
    system = session["system_prompt"]
    forced = [
        (turns[k][0]["user"]["text"], [turns[k][a["index"]]["assistant"]["token_ids"] for a in arms])
        for k in range(turn_index + 1)
    ]
    guard = lock if lock is not None else contextlib.nullcontext()
    # every pass covers every arm of the turn: Inspect on another arm then needs no model at all
    turn_ids = [_row_id(turns[turn_index][a["index"]]["assistant"]) for a in arms]

    if any(k in CAPTURE_KINDS for k in missing):
        if progress is not None:
            progress(
                f"capturing turn {turn_index} (attention and memory reads of all {len(arms)} arms, "
                "one teacher-forced pass)"
            )
        with guard:
            try:
                # without a folder for the arrays only the asked arm's views can be kept: record it alone
                cap = capture_turn(
                    lm,
                    specs,
                    forced,
                    system,
                    focus_arm=arm_index,
                    focus_turn=turn_index,
                    max_size=max_size,
                    dtype=torch.float16,
                    record=None if root is not None else [arm_index],
                )
            except CaptureError as e:
                raise InspectError(str(e)) from None
        STATS["capture_runs"] += 1
        # the asked arm first, so that an arm whose rows cannot be written does not cost it its views
        for r in [arm_index] + [r for r in range(len(arms)) if r != arm_index]:
            if r not in cap.recorded:
                continue
            view = cap.for_arm(r)
            check = _check_transcript(view, turns, r, turn_index)
            data = _capture_payloads(lm, view, key, [check] if check else [])
            arrays = data.pop("_arrays")
            rel = None
            if root is not None:
                rel = f"captures/{_safe(session_id)}/a{r}-t{turn_index}.npz"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.stem + ".tmp.npz")
                np.savez_compressed(tmp, **arrays)
                os.replace(tmp, path)
                if r == arm_index:
                    for kind in ("attention", "memory"):
                        result.files[kind] = str(path)
            elif r == arm_index:
                result.notes.append("no folder for capture files: arrays are kept in memory only")
                result._mem_arrays = arrays  # type: ignore[attr-defined]
                result.files = {}
            del arrays
            for kind in CAPTURE_KINDS:
                payload = data[kind]
                store.put_capture(
                    turn_ids[r], PREFIX + kind, path=rel if kind in ("attention", "memory") else None, data=payload
                )
                if r == arm_index:
                    _attach(result, kind, payload)
                    result.cached[kind] = False
            if r == arm_index:
                result.notes += view.notes + ([check] if check else [])
        del cap
        if root is None:
            _load_npz.cache_clear()

    if "divergence" in missing:
        todo = [arm_index] + [
            r
            for r in range(len(arms))
            if r != arm_index and _cached_row(store, turn_ids[r], "divergence", key, root) is None
        ]
        if progress is not None:
            progress(f"{_divergence_todo_words([specs[r] for r in todo])} (teacher-forced, turn {turn_index})")
        for r in todo:
            with guard:
                divs, _ = compare_on_transcript(lm, specs[r], [(u, reps[r]) for u, reps in forced], system)
            STATS["divergence_runs"] += 1
            payload = _divergence_payload(lm, divs[turn_index], key)
            store.put_capture(turn_ids[r], PREFIX + "divergence", data=payload)
            if r == arm_index:
                _attach(result, "divergence", payload)
                result.cached["divergence"] = False

    # keep only the asked kinds' flags
    result.cached = {k: v for k, v in result.cached.items() if k in kinds}
    result.seconds = time.perf_counter() - t0
    return result


def _divergence_todo_words(specs: list) -> str:
    """What the divergence pass compares, exactly: the observer itself is no arm 'compared with the observer'."""
    linked = sum(s.mechanism is not None for s in specs)
    words = f"divergence from the observer for {linked} linked arm{'' if linked == 1 else 's'}" if linked else ""
    if linked < len(specs):
        words += (" and " if words else "divergence of ") + "the observer itself (0 by definition)"
    return words


def _row_id(row: dict) -> int:
    return row["id"] if "id" in row else row["turn_id"]


def _cached_row(store: Store, turn_id: int, kind: str, key: dict, root: Path | None) -> dict | None:
    """The stored capture row of this kind if it is current (same key) and its array file exists."""
    row = store.get_capture(turn_id, PREFIX + kind)
    if row is None or not isinstance(row.get("data"), dict) or row["data"].get("key") != key:
        return None
    if row.get("path") and (root is None or not (root / row["path"]).is_file()):
        return None
    return row


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def _attach(result: InspectResult, kind: str, data: dict):
    if data.get("unavailable"):
        result.notes.append(f"{kind}: {data['unavailable']}")
        setattr(result, kind, None)
    elif kind == "summary":
        result.summary = data["rows"]
    else:
        setattr(result, kind, data)


def _check_transcript(cap, turns, arm_index, turn_index) -> str | None:
    expected: list[int] = []
    for k in range(turn_index + 1):
        expected += list(turns[k][arm_index]["user"].get("token_ids") or [])
        expected += list(turns[k][arm_index]["assistant"]["token_ids"])[:-1]
    last = turns[turn_index][arm_index]["assistant"]["token_ids"]
    expected += list(last[-1:])
    got = cap.focus.token_ids
    if expected and expected != got:
        return (
            "the rebuilt transcript differs from the logged prompt tokens "
            f"({len(got)} vs {len(expected)} tokens); the views follow the rebuilt one"
        )
    return None


def _r(x, nd=5):
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else round(float(x), nd)


def _capture_payloads(lm, cap, key, notes=()) -> dict:
    """The stored views of `cap.focus_arm`: JSON payloads per kind and the arrays for its file."""
    tok = lm.tokenizer
    f = cap.focus
    labels = token_labels(tok, f.token_ids)
    arrays: dict[str, np.ndarray] = {}
    a, b = f.reply_spans[cap.focus_turn]
    transcript = {
        "tokens": labels,
        "roles": [ROLES[r] for r in f.roles],
        "turns": f.msg_turns,
        "reply_span": [a, b],
        "label": f.label,
        "spec": f.spec,
    }
    att = None
    notes = [n for n in cap.notes if not n.startswith("arm ") or n.startswith(f"arm {cap.focus_arm}:")] + list(notes)
    if cap.attention is not None:
        arrays["attention"] = cap.attention.astype(np.float16, copy=False)
        starts = bucket_starts(cap.bucket_of)
        ends = starts[1:] + [len(cap.bucket_of)]
        bl = [labels[s] if e - s == 1 else f"{labels[s]}…{labels[e - 1]} [{s}-{e - 1}]" for s, e in zip(starts, ends)]
        bucket_turn = [f.msg_turns[s] for s in starts]
        bucket_role = [ROLES[f.roles[s]] for s in starts]
        att = {
            "key": key,
            "T": len(f.token_ids),
            "S": len(starts),
            "n_layers": cap.n_layers,
            "n_heads": cap.n_heads,
            "bucket_starts": starts,
            "bucket_labels": bl,
            "bucket_turns": bucket_turn,
            "bucket_roles": bucket_role,
            "rows": "rows: mean over the bucket's rows; columns: sum over the bucket's columns",
            "grid_metrics": GRID_METRICS,
            "grid": {m: [[_r(v) for v in row] for row in g] for m, g in cap.grid.items()},
            "transcript": transcript,
            "notes": notes,
            "capture_seconds": round(cap.seconds, 3),
        }
    else:
        att = {"key": key, "unavailable": "; ".join(notes) or "attention was not captured"}
    for m, g in cap.grid.items():
        arrays[f"grid_{m}"] = g
    table = memory_read_table(cap.traces[cap.focus_arm][cap.focus_turn], f, cap.focus_turn, tok)
    mem_layers = []
    for entry in table["layers"]:
        l = entry["layer"]
        arrays[f"mem_w_{l}"] = entry["weights"]
        if entry["per_head"] is not None:
            arrays[f"mem_h_{l}"] = entry["per_head"].astype(np.float16)
        mem_layers.append(
            {
                "layer": l,
                "slots": entry["slots"],
                "scalars": [{k: _r(v) for k, v in s.items()} for s in entry["scalars"]],
            }
        )
    history = [tr for k in range(cap.focus_turn + 1) for tr in cap.traces[cap.focus_arm][k]]
    curves = scalar_curves(history)
    for entry in curves["layers"]:
        entry["series"] = {name: [_r(v) for v in vals] for name, vals in entry["series"].items()}
    memory = {
        "key": key,
        "tokens": table["tokens"],
        "positions": table["positions"],
        "layers": mem_layers,
        "curves": curves,
        "mechanism": f.spec,
        "read_at": "the read behind generated token q is made at position q-1",
        "transcript": transcript,
    }
    source = {"key": key, "n_layers": cap.n_layers, "arms": []}
    for r, arm in enumerate(cap.arms):
        curve = cap.source_curves[r]
        s0, s1 = arm.reply_spans[cap.focus_turn]
        source["arms"].append(
            {
                "index": r,
                "label": arm.label,
                "tokens": [token_label(tok, t) for t in arm.token_ids[s0:s1]],
                "curve": None if curve is None else [[_r(v) for v in row] for row in curve],
                "source_tokens": int(arm.source_mask().sum()),
            }
        )
    summary = {
        "key": key,
        "rows": [{**row, "own_answer_read": _r(row["own_answer_read"])} for row in turn_summary(cap)],
    }
    return {"attention": att, "memory": memory, "source": source, "summary": summary, "_arrays": arrays}


def _divergence_payload(lm, div, key) -> dict:
    tok = lm.tokenizer
    d = div.to_dict()
    d["tokens"] = token_labels(tok, div.token_ids)
    d["observer_top_text"] = [[(token_label(tok, i), p) for i, p in alts] for alts in div.observer_top]
    d["arm_top_text"] = [[(token_label(tok, i), p) for i, p in alts] for alts in div.arm_top]
    d["key"] = key
    return d
