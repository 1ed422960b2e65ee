"""Every weights file shipped under weights/ loads on the embedded model and matches its config.

Each `weights/NAME.safetensors` has a manifest `weights/NAME.json` naming the training config and
command that made it; the file's embedded settings must be that config's mechanism settings, its
recorded training config the config as it is now, and `NAME:weights=@NAME` must build an arm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    want = cfg.settings().model_dump(exclude={"weights", "linkage", "gain"}) | {"gain": cfg.settings().gain}
    assert wf.settings == json.loads(json.dumps(want))
    recorded = TrainConfig.model_validate(wf.extra["trained"]["config"])  # keys added since take their defaults
    assert json.loads(json.dumps(recorded.model_dump())) == json.loads(json.dumps(cfg.model_dump()))
    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(path.parent))
    if wf.extra.get("reader"):  # a bank reader reads a distilled bank: distil one on its layers
        from engine.distill import distill

        bank = tmp_path / "doc.safetensors"
        layers = "/".join(str(l) for l in wf.settings["layers"])
        distill(embedded, "Orla Vennick lives in Tarrowby.", f"memory_bank:layers={layers}", out=bank)
        arm = parse_arm(f'memory_bank:linkage=1,weights="{bank}",reader=@{path.stem}')
    else:
        arm = parse_arm(f"{wf.mechanism}:linkage=1,weights=@{path.stem}")
    assert arm.caveat is None  # trained: no warning
    d = Dialogue(embedded, [arm])  # builds the module from the file's tensors
    assert d.arms[0].mechanism.weights is not None
    if wf.extra.get("reader"):
        assert d.arms[0].mechanism.reader is not None
