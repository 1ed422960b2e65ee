"""The adapter (engine/mechanisms/adapter.py): the matched control must really match its mechanism's
size, read back what it wrote, and refuse a file of the wrong shape in one line."""

from __future__ import annotations

import pytest
import torch

from engine.mechanisms.adapter import Adapter, AdapterSettings
from engine.train import load_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_matched_configs_have_the_matched_sizes(monkeypatch, embedded):
    """rank 4 on 3 layers = the 3 x 8 persistent tokens; rank 60 = the partial-attention branch within 1%."""
    from conftest import ROOT

    from engine.mechanisms import MECHANISMS

    monkeypatch.chdir(ROOT)
    model = embedded.model
    counts = {}
    for name in (
        "adapter_matched_tiny_cpu",
        "neural_persistent_tiny_cpu",
        "adapter_matched_palm_tiny_cpu",
        "palm_tiny_cpu",
    ):
        cfg = load_config(f"configs/{name}.yaml")
        counts[name] = _count(MECHANISMS[cfg.mechanism.name].build_weights(cfg.settings(), model, None))
    assert counts["adapter_matched_tiny_cpu"] == counts["neural_persistent_tiny_cpu"] == 13_824
    assert abs(counts["adapter_matched_palm_tiny_cpu"] / counts["palm_tiny_cpu"] - 1) < 0.01


def test_weights_round_trip_and_fresh_adds_zero(tiny_llama):
    model = tiny_llama.model
    s = AdapterSettings(layers=[0, 1], rank=3, init="random")
    w = Adapter.build_weights(s, model, None)
    back = Adapter.build_weights(s, model, w.to_tensors())
    for k, t in w.to_tensors().items():
        assert torch.equal(t, back.to_tensors()[k])
    fresh = Adapter.build_weights(AdapterSettings(layers=[0, 1], rank=3), model, None)
    assert all(torch.count_nonzero(b) == 0 for b in fresh.b.values())
    assert all(torch.count_nonzero(a) > 0 for a in fresh.a.values())


def test_wrong_shape_is_one_line(tiny_llama):
    model = tiny_llama.model
    w = Adapter.build_weights(AdapterSettings(layers=[0, 1], rank=3), model, None)
    with pytest.raises(ValueError, match="do not fit rank=2") as e:
        Adapter.build_weights(AdapterSettings(layers=[0, 1], rank=2), model, w.to_tensors())
    assert "\n" not in str(e.value)
