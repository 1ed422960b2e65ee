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


# ---------------------------------------------------------------- negatives: the margin term

PEOPLE = [
    ("Orla Vennick lives in Tarrowby. Bram Solvey lives in Quillmarsh.", "Orla Vennick", "Tarrowby", "Quillmarsh"),
    ("Orla Vennick lives in Tarrowby. Bram Solvey lives in Quillmarsh.", "Bram Solvey", "Quillmarsh", "Tarrowby"),
    ("Idris Pallow lives in Dunmere. Sela Morrick lives in Hathwick.", "Idris Pallow", "Dunmere", "Hathwick"),
    ("Idris Pallow lives in Dunmere. Sela Morrick lives in Hathwick.", "Sela Morrick", "Hathwick", None),
]


def _reader_config(tmp_path, **train_overrides) -> dict:
    (tmp_path / "towns.jsonl").write_text("".join(line + "\n" for line in _reader_rows_text()))
    return {
        "mechanism": {"name": "memory_bank", "settings": {"layers": [1, 3], "sharing": "per_layer", "reader_rank": 4}},
        "data": {
            "train": str(tmp_path / "towns.jsonl"),
            "eval": str(tmp_path / "towns.jsonl"),
            "format": "chat",
            "loss_on": "assistant",
            "documents": True,
            "negatives": True,
            "max_length": 48,
        },
        "train": {
            "max_steps": 12,
            "batch_size": 4,
            "lr": 0.1,
            "eval_every": 12,
            "schedule": "constant",
            "margin_weight": 1.0,
            "margin": 4.0,
            **train_overrides,
        },
        "output": {"dir": str(tmp_path / "run")},
    }


def test_negatives_collate_one_wrong_row_per_pair_and_no_nll_on_them(tokenizer):
    from engine.train import collate, encode

    rows = [json.loads(line) for line in _reader_rows_text()]
    enc = [encode(tokenizer, r, 48, "assistant", documents=True, negatives=True) for r in rows]
    assert ["neg" in e for e in enc] == [True, True, True, False]  # the last row has no wrong reply
    batch = collate(enc, 0)
    assert batch["ids"].shape[0] == 4 + 3 and batch["pair"].tolist() == [0, 1, 2]
    assert (batch["labels"][4:] == -100).all()  # a wrong reply is never a target of the answer loss
    assert batch["doc_ids"].shape[0] == 4  # documents stay one per row; negatives reuse theirs
    right = tokenizer.decode([t for t in batch["reply"][0].tolist() if t != -100])
    wrong = tokenizer.decode([t for t in batch["reply"][4].tolist() if t != -100])
    assert right.startswith("Tarrowby") and wrong.startswith("Quillmarsh"), (right, wrong)
    # the row's prompt is the same up to the reply: only the reply differs
    n = int((batch["reply"][0] != -100).nonzero()[0])
    assert torch.equal(batch["ids"][0, :n], batch["ids"][4, :n])


def _reader_rows_text() -> list[str]:
    return [
        json.dumps(
            {
                "document": doc,
                "wrong": wrong,
                "messages": [
                    {"role": "user", "content": f"Where does {p} live?"},
                    {"role": "assistant", "content": town},
                ],
            }
        )
        for doc, p, town, wrong in PEOPLE
    ]


def test_margin_is_right_minus_wrong_log_prob_summed_over_the_reply():
    from engine.train import MechanismTrainer

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    reply = torch.full((3, 5), -100)
    reply[0, 2:4] = torch.tensor([1, 2])  # row 0: the right reply
    reply[1, 1] = 6  # row 1: a row without a negative
    reply[2, 2:5] = torch.tensor([3, 4, 5])  # row 2: row 0's wrong reply
    lp = torch.log_softmax(logits, -1)
    expected = (lp[0, 2, 1] + lp[0, 3, 2]) - (lp[2, 2, 3] + lp[2, 3, 4] + lp[2, 4, 5])
    got = MechanismTrainer.margins(logits, reply, torch.tensor([0]))
    torch.testing.assert_close(got, expected.reshape(1))


def test_a_negative_row_reads_the_document_of_its_row(tokenizer, tiny_llama):
    """Up to the reply a negative row is its row: same tokens, same document bound, same logits."""
    from engine.mechanisms.memory_bank import MemoryBank, ReaderWeights
    from engine.train import collate, encode, trainer_module

    settings = MemoryBank.Settings(layers=[1, 3], sharing="per_layer", linkage=1.0)
    reader = ReaderWeights(settings, tiny_llama.model)
    rows = [json.loads(line) for line in _reader_rows_text()]
    batch = collate([encode(tokenizer, r, 48, "assistant", documents=True, negatives=True) for r in rows], 0)
    module = trainer_module(tiny_llama.model, MemoryBank, settings, reader, {})
    with torch.no_grad():
        logits, _ = module.logits(
            batch["ids"], batch["roles"], batch["valid"], batch["doc_ids"], batch["doc_len"], batch["pair"]
        )
        no_doc, _ = trainer_module(tiny_llama.model, MemoryBank, settings, reader, {}).logits(
            batch["ids"], batch["roles"], batch["valid"]
        )
    for k, row in enumerate(batch["pair"].tolist()):
        n = int((batch["reply"][row] != -100).nonzero()[0])
        torch.testing.assert_close(logits[4 + k, :n], logits[row, :n], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[2, :n], logits[0, :n], atol=1e-3)  # another document reads otherwise
    assert not torch.allclose(logits[4, :n], no_doc[4, :n], atol=1e-3)


def _bank_config(tmp_path, **train_overrides) -> dict:
    """A trainable bank (no documents) on chat rows with wrong replies."""
    cfg = _config(tmp_path, max_steps=15, eval_every=15, **train_overrides)
    rows = [json.loads(line) | {"wrong": "Dunmere"} for line in _reader_rows_text()[:2]]  # one wrong town to learn
    (tmp_path / "towns.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["mechanism"]["settings"] = {"layers": [1, 3], "slots": 8, "gate_init": 1.0}
    cfg["data"] |= {
        "train": str(tmp_path / "towns.jsonl"),
        "eval": str(tmp_path / "towns.jsonl"),
        "format": "chat",
        "loss_on": "assistant",
        "negatives": True,
        "max_length": 48,
    }
    return cfg


def test_negatives_run_raises_the_held_out_margin(tmp_path, tiny_llama):
    cfg = TrainConfig(**_bank_config(tmp_path, margin=6.0, lr=0.2))
    summary = train(cfg, progress=False, log=lambda *_: None, lm=tiny_llama)
    [[step, margin, _]] = summary["eval_margins"]
    assert step == 15 and margin > summary["initial_eval_margin"] + 1.0, summary
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_margin"] == margin and "eval_objective" in log[-1]
    # weight 0: the margin is still measured, but only the answer loss trains
    cfg = TrainConfig(
        **_bank_config(tmp_path, margin=6.0, margin_weight=0.0) | {"output": {"dir": str(tmp_path / "z")}}
    )
    zero = train(cfg, progress=False, log=lambda *_: None, lm=tiny_llama)
    assert zero["initial_eval_margin"] == pytest.approx(summary["initial_eval_margin"], abs=1e-4)
    assert zero["eval_margins"][0][1] < margin - 0.5, (zero, summary)


def test_bad_negatives_are_one_line(tmp_path, tiny_llama):
    cfg = _reader_config(tmp_path)
    cfg["data"]["format"] = "text"
    with pytest.raises(ConfigError, match=r"^data.negatives: a 'wrong' reply replaces a chat row's last reply"):
        load_config(_write(tmp_path, cfg))
    cfg = _reader_config(tmp_path)
    cfg["train"]["margin"] = -1
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, cfg))
    assert e.value.lines == ["train.margin: input should be greater than or equal to 0 (got -1)"]
    rows = [json.loads(line) for line in _reader_rows_text()]
    cfg = _reader_config(tmp_path)
    cfg["data"]["train"] = cfg["data"]["eval"] = str(tmp_path / "bad.jsonl")
    for wrong, match in (
        (3, "a row's 'wrong' must be a non-empty string or null"),
        (None, "no row of .* has a 'wrong'"),
    ):
        (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r | {"wrong": wrong}) + "\n" for r in rows))
        with pytest.raises(ConfigError, match=f"^data.negatives: {match}") as e:
            train(TrainConfig(**cfg), progress=False, log=lambda *_: None, lm=tiny_llama)
        assert len(e.value.lines) == 1
