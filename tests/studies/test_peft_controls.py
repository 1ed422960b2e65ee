"""The peft controls (studies/peft_controls.py) on a tiny random Llama: a soft prompt trains exactly
tokens x hidden numbers and a base LoRA 2 x hidden x rank per layer and module, the held-out loss is
the trainer's on the same data (a fresh LoRA is the base model exactly), and training moves it."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, steps: int = 4):
    rows = [
        {"messages": [{"role": "user", "content": f"Where is item {i}?"}, {"role": "assistant", "content": "Shelf B."}]}
        for i in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[6:]))
    cfg = {
        "model": "embedded",
        "mechanism": {"name": "adapter", "settings": {"layers": [1], "rank": 2}},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "format": "chat"},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 0.05, "warmup_steps": 1, "eval_every": 2, "threads": 1},
        "output": {"dir": str(tmp_path / "run"), "weights": str(tmp_path / "run" / "w.safetensors")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_soft_prompt_trains_tokens_x_hidden_and_measures_the_trainers_held_out_loss(tmp_path, tokenizer):
    from engine.train import load_config, train
    from studies.peft_controls import soft_prompt, train_control
    from tests.conftest import make_tiny

    cfg = load_config(_config(tmp_path))
    trained = train(cfg, lm=make_tiny("llama", tokenizer), progress=False, log=lambda *_: None)
    result = train_control(
        cfg, soft_prompt(3), tmp_path / "sp", lm=make_tiny("llama", tokenizer), progress=False, log=lambda *_: None
    )
    assert result["trained_numbers"] == 3 * 64
    # the adapter starts as the base model exactly, so the trainer's step-0 loss is the base loss
    assert result["base_loss"] == pytest.approx(trained["initial_eval_loss"], rel=1e-5)
    steps = [s for s, _ in result["history"]]
    assert steps == [0, 2, 4]
    assert result["history"][-1][1] < result["history"][0][1]
    assert (tmp_path / "sp" / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "sp" / "result.json").read_text())
    assert saved["history"] == result["history"]


def test_base_lora_matches_its_count_and_starts_as_the_base_model(tmp_path, tokenizer):
    from engine.train import load_config
    from studies.peft_controls import base_lora, train_control
    from tests.conftest import make_tiny

    cfg = load_config(_config(tmp_path))
    result = train_control(
        cfg,
        base_lora(2, [1, 3], ["q_proj"]),
        tmp_path / "lora",
        lm=make_tiny("llama", tokenizer),
        progress=False,
        log=lambda *_: None,
    )
    assert result["control"] == "base LoRA" and result["trained_numbers"] == 2 * (2 * 64 * 2)
    assert result["history"][0][1] == pytest.approx(result["base_loss"], abs=1e-6)  # B = 0: the base model
    assert result["history"][-1][1] < result["history"][0][1]


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from studies.peft_controls import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: embedded\nmechanism: {name: adapter}\ntrain: {max_steps: -1}\n")
    assert main([str(bad), "--soft-prompt", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err)
    assert main([str(bad), "--soft-prompt", "0"]) == 2
    assert main([str(_config(tmp_path)), "--lora-rank", "2", "--lora-layers", "1,x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --lora-layers")
