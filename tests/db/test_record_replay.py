"""Provenance: a logged session replays to identical tokens on the embedded model."""

from __future__ import annotations

import pytest

from db import Store
from engine import Dialogue, parse_arm
from experiments.record import SessionRecorder, replay_turn


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lab.db")
    yield s
    s.close()


def test_replay_to_identical_tokens(embedded, store):
    arms = [
        parse_arm("observer:greedy=false,seed=11,temperature=1.0"),
        parse_arm("continuity:linkage=1,gain=0.5,greedy=false,seed=5,temperature=1.0"),
        parse_arm("continuity:linkage=0.5,source=all"),
    ]
    d = Dialogue(embedded, arms, system="You are terse.")
    rec = SessionRecorder(store, embedded, d, title="replay test")
    for msg in ["Is it ever right to lie? One sentence.", "Are you sure?", "Summarise your view."]:
        rec.log(msg, d.send(msg, max_new_tokens=14))
    turns = store.get_turns(rec.session_id)
    assert len(turns) == 3 * 3 * 2  # turns x arms x (user, assistant)
    for k in (0, 2):
        replay = replay_turn(store, embedded, rec.session_id, k)
        assert replay.identical, (replay.original, replay.replayed)
    # a sampled arm's tokens depend on its seed: the replay is not identical by accident
    session = store.get_session(rec.session_id)
    assert session["arms"][1]["settings"]["sampling"]["seed"] == 5


def test_replay_refuses_other_weights(embedded, tiny_llama, store):
    d = Dialogue(tiny_llama, [parse_arm("observer")])
    rec = SessionRecorder(store, tiny_llama, d)
    rec.log("Hello", d.send("Hello", max_new_tokens=3))
    with pytest.raises(ValueError, match="other weights"):
        replay_turn(store, embedded, rec.session_id, 0)


def test_replay_with_a_weights_file_and_refusal_when_it_changed(embedded, store, tmp_path):
    """The arm row records the weights file's hash; replay uses the file, and refuses it once changed."""
    import torch

    from engine import SpecError
    from engine.weights import save_weights

    path = tmp_path / "vec.safetensors"
    h = embedded.model.config.hidden_size

    def write(scale):
        save_weights(
            path,
            {"vector.15": torch.ones(h) * scale},
            mechanism="vector_toy",
            settings={"layers": [15]},
            model=embedded.model,
            identity=embedded.identity,
        )

    write(0.05)
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm(f'vector_toy:weights="{path}",linkage=1')])
    rec = SessionRecorder(store, embedded, d)
    rec.log("Name a colour.", d.send("Name a colour.", max_new_tokens=6))
    arm = store.get_session(rec.session_id)["arms"][1]
    assert len(arm["settings"]["weights_sha256"]) == 64 and str(path) in arm["spec"]
    assert replay_turn(store, embedded, rec.session_id, 0).identical
    write(0.07)
    with pytest.raises(SpecError, match=f"weights file {path} has changed"):
        replay_turn(store, embedded, rec.session_id, 0)
