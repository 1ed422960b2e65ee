"""Every weights file shipped under weights/ loads on the embedded model and matches its config,
and keeps the conformance suite's invariants there.

Each `weights/NAME.safetensors` has a manifest `weights/NAME.json` naming the training config and
command that made it; the file's embedded settings must be that config's mechanism settings, its
recorded training config the config as it is now, and `NAME:weights=@NAME` must build an arm.
The trained arms join tests/engine/test_conformance.py's invariants on the model they were trained
for (the suite itself runs fresh configurations on tiny models): linkage 0 is plain `generate`
bit for bit, a cached forward equals an uncached one, and no token sees a later one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward

from engine import parse_arm
from engine.dialogue import Dialogue
from engine.train import TrainConfig, load_config
from engine.weights import check_fits, read_header

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "weights").glob("*.safetensors"))


def test_weights_are_shipped():
    assert SHIPPED, "weights/ holds no trained files"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_loads_and_matches_its_config(embedded, path, monkeypatch, tmp_path):
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["file"] == path.name and manifest["command"] and manifest["training_seconds"] > 0
    cfg = load_config(ROOT / manifest["config"])
    wf = read_header(path)
    check_fits(wf, cfg.mechanism.name, embedded.model, embedded.identity)  # made for the embedded model
    assert wf.mechanism == manifest["mechanism"] == cfg.mechanism.name
    settings = cfg.settings()
    want = settings.model_dump(exclude={"weights", "linkage", "gain"}) | {"gain": settings.gain}
    assert set(wf.settings) <= set(want)  # settings keys added since the file was made take their defaults
    embedded_settings = type(settings).model_validate(wf.settings)
    got = embedded_settings.model_dump(exclude={"weights", "linkage", "gain"}) | {"gain": embedded_settings.gain}
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(want))
    recorded = TrainConfig.model_validate(wf.extra["trained"]["config"])  # keys added since take their defaults
    assert json.loads(json.dumps(recorded.model_dump())) == json.loads(json.dumps(cfg.model_dump()))
    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(path.parent))
    arm = parse_arm(_trained_arm(embedded, path, tmp_path, 1))
    assert arm.caveat is None  # trained: no warning
    d = Dialogue(embedded, [arm])  # builds the module from the file's tensors
    assert d.arms[0].mechanism.weights is not None
    if wf.extra.get("reader"):
        assert d.arms[0].mechanism.reader is not None


def _trained_arm(lm, path: Path, tmp_path: Path, linkage: float) -> str:
    """The arm spec a researcher writes for a shipped file (LAB_WEIGHTS_DIR pointing at its folder)."""
    wf = read_header(path)
    if wf.extra.get("reader"):  # a bank reader reads a distilled bank: distil one on its layers
        from engine.distill import distill

        bank = tmp_path / "doc.safetensors"
        layers = "/".join(str(l) for l in wf.settings["layers"])
        distill(lm, "Orla Vennick lives in Tarrowby.", f"memory_bank:layers={layers}", out=bank)
        return f'memory_bank:linkage={linkage},weights="{bank}",reader=@{path.stem}'
    return f"{wf.mechanism}:linkage={linkage},weights=@{path.stem}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_at_linkage_zero_is_plain_generate(embedded, path, monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(path.parent))
    ref_tokens, ref_logits = generate_logits(embedded, PROMPTS[1], 8)
    tokens, logits = dialogue_logits(embedded, [_trained_arm(embedded, path, tmp_path, 0)], PROMPTS[1], 8)
    assert tokens[0] == ref_tokens
    assert all(torch.equal(g[0], w) for g, w in zip(logits, ref_logits))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_cached_equals_uncached_and_is_causal(embedded, path, monkeypatch, tmp_path):
    """Every shipped file's settings claim both (none is bidirectional or the seed's variant)."""
    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(path.parent))
    spec = _trained_arm(embedded, path, tmp_path, 1)
    ids, roles = mixed_sequence(32)
    full = full_forward(embedded, spec, ids, roles)
    assert (full - stepwise_forward(embedded, spec, ids, roles)).abs().max() <= 5e-4
    assert (full - full_forward(embedded, "observer", ids, roles)).abs().max() > 1e-3  # the trained arm acts
    j = 20
    changed = ids[:j] + [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    later = full_forward(embedded, spec, changed, roles)
    assert (full[:j] - later[:j]).abs().max() <= 1e-5
