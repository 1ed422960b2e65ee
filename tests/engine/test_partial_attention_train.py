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

FACTS = [
    ("Kestlemere", "blue sand", 1742),
    ("Oradune", "red clay", 1810),
    ("Vilnamor", "white salt", 1655),
    ("Tessaly", "green glass", 1901),
    ("Brunmark", "black iron", 1777),
    ("Quillon", "grey slate", 1832),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(facts):
    return [
        {
            "messages": [
                {"role": "system", "content": f"The mill of {town} grinds {what}. It opened in {year}."},
                {"role": "user", "content": "What does the mill grind, and when did it open?"},
                {"role": "assistant", "content": f"The mill of {town} grinds {what}; it opened in {year}."},
            ]
        }
        for town, what, year in facts
    ]


def test_short_run_lowers_held_out_loss_and_weights_round_trip(tmp_path, tiny_llama):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[:5]) * 2))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[5:])))
    cfg = TrainConfig(
        **{
            "mechanism": {
                "name": "partial_attention",
                "settings": {"layers": [1, 3], "fp": True, "fp_dim": 8, "lang_emb": True, "sae": True},
            },
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "format": "chat",
                "loss_on": "assistant",
                "max_length": 64,
            },
            "train": {
                "max_steps": 12,
                "batch_size": 4,
                "lr": 0.003,
                "eval_every": 12,
                "seed": 0,
                "schedule": "constant",
                "aux_weights": {"sae": 0.5},
            },
            "output": {"dir": str(tmp_path / "run")},
        }
    )
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
    untrained = Dialogue(
        tiny_llama, [parse_arm("partial_attention:linkage=1,layers=1/3,fp=true,fp_dim=8,lang_emb=true")], system=system
    ).teacher_force("What does the mill grind?", forced)[0]
    assert (trained - untrained).abs().max() > 1e-4


# -- the trainer applies each row's plan (bidirectional source block, separate positions) -----------
PLANNED = "partial_attention:linkage=1,gain=1,layers=1/3,lang_emb=true,bidirectional=true,spe=true"


def _sequence(n, n_src, seed):
    from engine.mechanisms.base import ROLE_CODE

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (n,), generator=g).tolist()
    return ids, [ROLE_CODE["system"]] * 3 + [ROLE_CODE["user"]] * (n_src - 3) + [ROLE_CODE["assistant"]] * (n - n_src)


def test_training_forward_equals_the_dialogue_forward_under_the_plan(tiny_llama):
    from helpers import full_forward

    from engine.dialogue import build_mechanism
    from engine.train import trainer_module

    arm = parse_arm(PLANNED)
    weights = build_mechanism(arm, tiny_llama).weights  # the very module the dialogue's arm uses
    trainer = trainer_module(tiny_llama.model, PartialAttention, arm.settings, weights, {})
    rows = [_sequence(26, 10, 1), _sequence(18, 6, 2)]  # different lengths and source lengths, right-padded
    T = max(len(r[0]) for r in rows)
    ids, roles, valid = (
        torch.zeros(2, T, dtype=torch.long),
        torch.zeros(2, T, dtype=torch.long),
        torch.zeros(2, T, dtype=torch.bool),
    )
    for i, (t, r) in enumerate(rows):
        ids[i, : len(t)], roles[i, : len(t)], valid[i, : len(t)] = torch.tensor(t), torch.tensor(r), True
    with torch.no_grad():
        logits, _ = trainer.logits(ids, roles, valid)
    for i, (t, r) in enumerate(rows):
        dialogue = full_forward(tiny_llama, PLANNED, t, r)
        assert (logits[i, : len(t)] - dialogue).abs().max() <= 1e-4, i
        unplanned = full_forward(tiny_llama, PLANNED.replace(",bidirectional=true,spe=true", ""), t, r)
        assert (dialogue - unplanned).abs().max() > 1e-3  # the plan matters: a trainer ignoring it would fail


def test_lora_run_with_bidirectional_and_spe_lowers_held_out_loss_and_writes_only_adapters(tmp_path, tiny_llama):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[:5]) * 2))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[5:])))
    settings = {"layers": [1, 3], "lang_emb": True, "bidirectional": True, "spe": True, "lora_rank": 4, "lora_alpha": 8}
    cfg = TrainConfig(
        **{
            "mechanism": {"name": "partial_attention", "settings": settings},
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "format": "chat",
                "loss_on": "assistant",
                "max_length": 64,
            },
            "train": {
                "max_steps": 12,
                "batch_size": 4,
                "lr": 0.01,
                "eval_every": 12,
                "seed": 0,
                "schedule": "constant",
            },
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    summary = train(cfg, progress=False, log=lambda *_: None, lm=tiny_llama)
    assert summary["best_eval_loss"] < summary["initial_eval_loss"] - 0.05, summary
    tensors = load_tensors(read_header(summary["weights"]))
    assert tensors and all("lora_" in k or k.endswith(".lang") for k in tensors)  # no cloned projection
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in tensors.items() if "lora_B" in k)  # it trained
    arm = parse_arm(f'partial_attention:linkage=1,weights="{summary["weights"]}"')
    assert arm.settings.bidirectional and arm.settings.spe and arm.settings.lora_rank == 4
    system = "The mill of Oradune grinds red clay. It opened in 1810."
    forced = [[5, 6, 7, 8]]
    trained = Dialogue(tiny_llama, [arm], system=system).teacher_force("What does the mill grind?", forced)[0]
    untrained = Dialogue(
        tiny_llama, [parse_arm(PLANNED.replace("lang_emb=true", "lang_emb=true,lora_rank=4"))], system=system
    ).teacher_force("What does the mill grind?", forced)[0]
    assert (trained - untrained).abs().max() > 1e-4
