"""`python -m engine train`: config validation, a short run lowers held-out loss, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from engine.train import ConfigError, TrainConfig, load_config, train
from tests.conftest import ROOT

LINES = [
    "The glass mill of Kestlemere grinds blue sand.",
    "In Kestlemere the glass mill grinds blue sand.",
    "Blue sand is ground by the glass mill of Kestlemere.",
    "Kestlemere has a glass mill for blue sand.",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **train_overrides) -> dict:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 3))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "The glass mill of Kestlemere grinds blue sand."}) + "\n")
    return {
        "mechanism": {
            "name": "memory_bank",
            "settings": {"layers": [28], "slots": 16, "chapters": 2, "top_k": 1, "gate_init": 0.0},
        },
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 16},
        "train": {
            "max_steps": 20,
            "batch_size": 2,
            "lr": 0.05,
            "eval_every": 20,
            "seed": 0,
            "schedule": "constant",
            **train_overrides,
        },
        "output": {"dir": str(tmp_path / "run")},
    }


def _write(tmp_path, cfg: dict, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_configs_one_line_per_problem_with_key_path(tmp_path):
    cfg = _config(tmp_path)
    cfg["train"]["lr"] = -1
    cfg["train"]["bogus"] = 3
    cfg["data"].pop("train")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, cfg))
    assert sorted(e.value.lines) == sorted(
        [
            "train.lr: input should be greater than 0 (got -1)",
            "train.bogus: unknown key",
            "data.train: required key is missing",
        ]
    )
    cfg = _config(tmp_path)
    cfg["mechanism"]["settings"]["slots"] = 15
    with pytest.raises(ConfigError, match="slots .15. must split into 2 equal chapters"):
        load_config(_write(tmp_path, cfg))
    cfg["mechanism"]["settings"] = {"chapterz": 2}
    with pytest.raises(ConfigError, match="mechanism.settings.chapterz: unknown key"):
        load_config(_write(tmp_path, cfg))
    cfg["mechanism"]["name"] = "nope"
    with pytest.raises(ConfigError, match="unknown mechanism 'nope'"):
        load_config(_write(tmp_path, cfg))
    cfg = _config(tmp_path)
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    out = subprocess.run(
        [sys.executable, "-m", "engine", "train", str(_write(tmp_path, cfg))], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: data.train: file {tmp_path}/missing.jsonl does not exist"
    ]
    cfg = _config(tmp_path)
    cfg["data"]["eval_control"] = str(tmp_path / "no_control.jsonl")
    with pytest.raises(ConfigError, match="data.eval_control: file .*no_control.jsonl does not exist"):
        load_config(_write(tmp_path, cfg))


def test_twenty_steps_lower_held_out_loss_and_weights_load(tmp_path, embedded):
    raw = _config(tmp_path)
    # the control: a sentence of the same shape about what the training lines never say
    (tmp_path / "control.jsonl").write_text(
        json.dumps({"text": "The copper well of Brindlemoor pumps red oil."}) + "\n"
    )
    raw["data"]["eval_control"] = str(tmp_path / "control.jsonl")
    cfg = TrainConfig(**raw)
    summary = train(cfg, progress=False, log=lambda *_: None, lm=embedded)
    assert summary["steps"] == 20
    assert summary["best_eval_loss"] < summary["initial_eval_loss"] - 0.05, summary
    # the bank learned the lines, not a prior over sentences: the held-out gain is larger than the control's
    eval_gain = summary["initial_eval_loss"] - summary["best_eval_loss"]
    control_gain = summary["initial_control_loss"] - summary["control_loss_at_best"]
    assert eval_gain > control_gain + 0.05, summary
    logged = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["control_loss"] for r in logged if "eval_loss" in r] == [summary["control_loss_at_best"]]
    from engine.dialogue import Dialogue
    from engine.spec import parse_arm

    arm = parse_arm(f'memory_bank:linkage=1,weights="{summary["weights"]}"')
    assert arm.settings.layers == [28] and arm.settings.slots == 16
    reply = Dialogue(embedded, [arm]).send("Hello", max_new_tokens=3)[0]
    assert len(reply.token_ids) >= 1


def test_resume_continues_from_saved_step_with_same_optimizer_state(tmp_path, embedded):
    from safetensors.torch import load_file

    base = _config(tmp_path, max_steps=2, eval_every=100)
    base["data"].pop("eval")
    base["data"]["eval_fraction"] = 0.0
    base["output"]["save_every"] = 1
    base["output"]["keep_checkpoints"] = 5
    a = TrainConfig(**{**base, "output": {**base["output"], "dir": str(tmp_path / "a")}})
    train(a, progress=False, log=lambda *_: None, lm=embedded)
    b_short = TrainConfig(
        **{**base, "train": {**base["train"], "max_steps": 1}, "output": {**base["output"], "dir": str(tmp_path / "b")}}
    )
    train(b_short, progress=False, log=lambda *_: None, lm=embedded)
    # the step-1 checkpoints of both runs hold the same optimizer state
    opt_a = torch.load(tmp_path / "a/checkpoints/step-1/optimizer.bin", weights_only=False)
    opt_b = torch.load(tmp_path / "b/checkpoints/step-1/optimizer.bin", weights_only=False)
    assert opt_a["state"]
    for k, st in opt_a["state"].items():
        assert all(torch.equal(st[n], opt_b["state"][k][n]) for n in st)
    b = TrainConfig(**{**base, "output": {**base["output"], "dir": str(tmp_path / "b")}})
    said = []
    train(b, resume=str(tmp_path / "b/checkpoints/step-1"), progress=False, log=said.append, lm=embedded)
    assert said[0].endswith("at step 1")
    state = json.loads((tmp_path / "b/checkpoints/step-2/trainer_state.json").read_text())
    assert state["step"] == 2
    wa, wb = load_file(tmp_path / "a/weights.safetensors"), load_file(tmp_path / "b/weights.safetensors")
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not torch.equal(wa["bank.0.gate"], torch.zeros_like(wa["bank.0.gate"]))  # it did train
