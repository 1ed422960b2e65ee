"""The bank reader: one trained read (LoRA on W_q / W_k, per-head gates) for any distilled bank.

A fresh reader reads as the layer's own projections; at linkage 0 the arm is the base model; the
trainer's on-the-fly document slots are exactly the bank `engine distill` makes; a short
`data.documents` run trains the reader and an arm loads it with `reader=`; a bank named as a
reader (and a reader as a bank) is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import parse_arm
from engine.dialogue import Dialogue, DialogueError
from engine.distill import distill
from engine.mechanisms.memory_bank import MemoryBank, ReaderWeights
from engine.spec import SpecError
from engine.train import TrainConfig, train
from engine.weights import WeightsError, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = "Orla Vennick lives in Tarrowby. Bram Solvey lives in Quillmarsh."
OTHER = "Idris Pallow lives in Dunmere. Sela Morrick lives in Hathwick."
LAYERS = [20, 26]


def _logits(lm, spec: str, question="Where does Orla Vennick live?", reply="Tarrowby"):
    ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"]
    return Dialogue(lm, [parse_arm(spec)]).teacher_force(question, [ids])[0]


@pytest.fixture(scope="module")
def files(embedded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    distill(embedded, DOC, "memory_bank:layers=20/26", out=tmp / "doc.safetensors")
    settings = MemoryBank.Settings(layers=LAYERS, sharing="per_layer")
    fresh = ReaderWeights(settings, embedded.model)
    save_weights(
        tmp / "fresh_reader.safetensors",
        fresh.to_tensors(),
        mechanism="memory_bank",
        settings=settings.model_dump(exclude={"weights", "linkage"}),
        model=embedded.model,
        identity=embedded.identity,
        extra={"reader": True},
    )
    return tmp


def test_fresh_reader_reads_as_the_layers_own_projections_and_linkage_0_is_the_base(embedded, files):
    bank = f'memory_bank:linkage=1,weights="{files / "doc.safetensors"}"'
    with_reader = bank + f',reader="{files / "fresh_reader.safetensors"}"'
    plain, read = _logits(embedded, bank), _logits(embedded, with_reader)
    observer = _logits(embedded, "observer")
    assert not torch.allclose(plain, observer, atol=1e-3)  # the bank does something ...
    torch.testing.assert_close(read, plain, atol=1e-4, rtol=1e-4)  # ... and a fresh reader reads it unchanged
    zero = _logits(embedded, with_reader.replace("linkage=1", "linkage=0"))
    assert torch.equal(zero, observer)


def test_training_slots_are_the_distilled_bank(embedded, files):
    """A trainer row with its document bound reads exactly as an arm over distill's bank does."""
    from engine.train import trainer_module
    from engine.weights import load_tensors, read_header

    settings = MemoryBank.Settings(layers=LAYERS, sharing="per_layer", linkage=1.0)
    reader = ReaderWeights(settings, embedded.model)
    reader.requires_grad_(False)
    bank_file = files / "doc.safetensors"
    bank_settings = parse_arm(
        f'memory_bank:linkage=1,weights="{bank_file}",reader="{files / "fresh_reader.safetensors"}"'
    ).settings
    bank = MemoryBank.build_weights(bank_settings, embedded.model, load_tensors(read_header(bank_file)))
    tok = embedded.tokenizer
    ids = torch.tensor([tok("Where does Bram Solvey live? Quill", add_special_tokens=False)["input_ids"]])
    roles, valid = torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)
    doc = torch.tensor([tok(DOC, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        bound, _ = trainer_module(embedded.model, MemoryBank, settings, reader, {}).logits(
            ids, roles, valid, doc, torch.tensor([doc.shape[1]])
        )
        distilled, _ = trainer_module(embedded.model, MemoryBank, bank_settings, bank, {}).logits(ids, roles, valid)
        base = embedded.model(input_ids=ids).logits
    assert not torch.allclose(bound, base, atol=1e-3)
    torch.testing.assert_close(bound, distilled, atol=1e-4, rtol=1e-4)


def test_a_short_documents_run_trains_a_reader_an_arm_loads(embedded, files, tmp_path):
    rows = [
        {
            "document": d,
            "messages": [{"role": "user", "content": f"Where does {p} live?"}, {"role": "assistant", "content": t}],
        }
        for d, pairs in (
            (DOC, [("Orla Vennick", "Tarrowby"), ("Bram Solvey", "Quillmarsh")]),
            (OTHER, [("Idris Pallow", "Dunmere"), ("Sela Morrick", "Hathwick")]),
        )
        for p, t in pairs
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.model_validate(
        {
            "mechanism": {
                "name": "memory_bank",
                "settings": {"layers": LAYERS, "sharing": "per_layer", "reader_rank": 4},
            },
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "train.jsonl"),
                "format": "chat",
                "loss_on": "assistant",
                "documents": True,
                "max_length": 48,
            },
            "train": {"max_steps": 4, "batch_size": 2, "lr": 0.01, "eval_every": 4, "schedule": "constant"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    summary = train(cfg, progress=False, log=lambda *_: None, lm=embedded)
    assert summary["best_eval_loss"] < summary["initial_eval_loss"]
    bank = f'memory_bank:linkage=1,weights="{files / "doc.safetensors"}"'
    read = _logits(embedded, bank + f',reader="{summary["weights"]}"')
    assert not torch.allclose(read, _logits(embedded, bank), atol=1e-3)
    with pytest.raises((DialogueError, WeightsError, SpecError), match="is a bank, not a reader"):
        _logits(embedded, bank + f',reader="{files / "doc.safetensors"}"')
    with pytest.raises((DialogueError, WeightsError, SpecError), match="reader"):
        _logits(embedded, f'memory_bank:linkage=1,weights="{summary["weights"]}"')
