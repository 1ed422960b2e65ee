"""Fine-tuning partial attention through `python -m engine train`: a short run on a tiny model lowers
the held-out loss, and its weights file round-trips into an arm."""
from __future__ import annotations

import json

import pytest
import torch

from engine.dialogue import Dialogue
from engine.mechanisms.partial_attention import PartialAttention
from engine.spec import parse_arm
from engine.train import TrainConfig, train
from engine.weights import load_tensors, read_header

FACTS = [("Kestlemere", "blue sand", 1742), ("Oradune", "red clay", 1810), ("Vilnamor", "white salt", 1655),
         ("Tessaly", "green glass", 1901), ("Brunmark", "black iron", 1777), ("Quillon", "grey slate", 1832)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(facts):
    return [{"messages": [{"role": "system", "content": f"The mill of {town} grinds {what}. It opened in {year}."},
                          {"role": "user", "content": "What does the mill grind, and when did it open?"},
                          {"role": "assistant", "content": f"The mill of {town} grinds {what}; it opened in {year}."}]}
            for town, what, year in facts]


def test_short_run_lowers_held_out_loss_and_weights_round_trip(tmp_path, tiny_llama):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[:5]) * 2))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[5:])))
    cfg = TrainConfig(**{
        "mechanism": {"name": "partial_attention",
                      "settings": {"layers": [1, 3], "fp": True, "fp_dim": 8, "lang_emb": True, "sae": True}},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "format": "chat",
                 "loss_on": "assistant", "max_length": 64},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 0.003, "eval_every": 12, "seed": 0, "schedule": "constant",
                  "aux_weights": {"sae": 0.5}},
        "output": {"dir": str(tmp_path / "run")}})
    summary = train(cfg, progress=False, log=lambda *_: None, lm=tiny_llama)
    assert summary["best_eval_loss"] < summary["initial_eval_loss"] - 0.05, summary
    wf = read_header(summary["weights"])
    tensors = load_tensors(wf)
    assert wf.mechanism == "partial_attention" and wf.settings["layers"] == [1, 3]
    arm = parse_arm(f'partial_attention:linkage=1,weights="{summary["weights"]}"')
    assert arm.settings.fp and arm.settings.lang_emb and arm.settings.layers == [1, 3]
    rebuilt = PartialAttention.build_weights(arm.settings, tiny_llama.model, tensors).state_dict()
    assert set(rebuilt) == set(tensors) and all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)
    fresh = PartialAttention.build_weights(arm.settings, tiny_llama.model, None).state_dict()
    assert not torch.equal(fresh["branches.3.lang"], tensors["branches.3.lang"])  # it did train
    system = "The mill of Oradune grinds red clay. It opened in 1810."
    forced = [[5, 6, 7, 8]]
    trained = Dialogue(tiny_llama, [arm], system=system).teacher_force("What does the mill grind?", forced)[0]
    untrained = Dialogue(tiny_llama, [parse_arm("partial_attention:linkage=1,layers=1/3,fp=true,fp_dim=8,lang_emb=true")],
                         system=system).teacher_force("What does the mill grind?", forced)[0]
    assert (trained - untrained).abs().max() > 1e-4
