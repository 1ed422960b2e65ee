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


def _save_reader(lm, path, settings, reader: ReaderWeights | None = None) -> None:
    """Write a reader file as the trainer does (a fresh reader with these settings unless given)."""
    reader = reader if reader is not None else ReaderWeights(settings, lm.model)
    save_weights(
        path,
        reader.to_tensors(),
        mechanism="memory_bank",
        settings=settings.model_dump(exclude={"weights", "linkage"}),
        model=lm.model,
        identity=lm.identity,
        extra={"reader": True},
    )


@pytest.fixture(scope="module")
def files(embedded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    distill(embedded, DOC, "memory_bank:layers=20/26", out=tmp / "doc.safetensors")
    settings = MemoryBank.Settings(layers=LAYERS, sharing="per_layer")
    _save_reader(embedded, tmp / "fresh_reader.safetensors", settings)
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


def test_windowed_readers_key_by_the_slots_before_and_carry_the_slots_after(embedded, files, tmp_path):
    """reader_key_window / reader_value_window: a fresh windowed reader reads as the plain one; once
    the maps are non-zero, slot i's key moves with slots i-w..i (never later or farther ones) and its
    value term with slots i+1..i+w; reader_match scores a slot by its similarity, highest on itself
    (with reader_match_lag, on the slots just after it); the file round-trips through an arm's reader=."""
    settings = MemoryBank.Settings(
        layers=LAYERS,
        sharing="per_layer",
        reader_key_window=3,
        reader_value_window=2,
        reader_window_rank=4,
    )
    reader = ReaderWeights(settings, embedded.model)
    layer = reader.layer(LAYERS[0])
    x = torch.randn(10, embedded.model.config.hidden_size)
    changed = x.clone()
    changed[4] += 1.0
    with torch.no_grad():
        assert torch.equal(layer.keys(x), layer.k_read(x))  # the up maps are zero at start
        assert not layer.value_context(x).any()
        assert layer.match_scores(x, x) is None  # no similarity score unless asked for
        torch.nn.init.normal_(layer.ctx_key_up.weight, std=0.5)
        torch.nn.init.normal_(layer.ctx_value_up.weight, std=0.5)
        key_moved = (layer.keys(changed) - layer.keys(x)).abs().amax(-1) > 1e-6
        value_moved = (layer.value_context(changed) - layer.value_context(x)).abs().amax(-1) > 1e-6
    assert key_moved.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert value_moved.tolist() == [False] * 2 + [True] * 2 + [False] * 6
    assert {"ctx_key_up", "ctx_value_down"} <= {k.split(".")[-2] for k in reader.to_tensors()}
    path = tmp_path / "windowed.safetensors"
    _save_reader(embedded, path, settings, reader)
    bank = f'memory_bank:linkage=1,weights="{files / "doc.safetensors"}"'
    fresh_file = tmp_path / "fresh_windowed.safetensors"
    _save_reader(embedded, fresh_file, settings)
    torch.testing.assert_close(
        _logits(embedded, bank + f',reader="{fresh_file}"'),
        _logits(embedded, bank + f',reader="{files / "fresh_reader.safetensors"}"'),
        atol=1e-4,
        rtol=1e-4,
    )
    matching = ReaderWeights(settings.model_copy(update={"reader_match": 8.0}), embedded.model).layer(LAYERS[0])
    with torch.no_grad():
        scores = matching.match_scores(x, x)
    assert scores.shape == (embedded.model.config.num_attention_heads, 10, 10)
    assert torch.allclose(scores.diagonal(dim1=1, dim2=2), torch.full((1, 10), 8.0))  # w_h starts at reader_match
    assert bool((scores.argmax(-1) == torch.arange(10)).all())  # each slot is most like itself
    lagged = ReaderWeights(
        settings.model_copy(update={"reader_match": 8.0, "reader_match_lag": 2}), embedded.model
    ).layer(LAYERS[0])
    with torch.no_grad():
        scores = lagged.match_scores(x, x)[0]
    assert torch.allclose(scores[torch.arange(8), torch.arange(1, 9)], torch.full((8,), 8.0))  # the slot after me
    assert torch.allclose(scores[torch.arange(8), torch.arange(2, 10)], torch.full((8,), 8.0))  # and the one after
    assert torch.allclose(scores[:, 0], torch.full((10,), -8.0))  # nothing before the first slot
    windowed = _logits(embedded, bank + f',reader="{path}"')
    fresh = _logits(embedded, bank + f',reader="{files / "fresh_reader.safetensors"}"')
    assert not torch.allclose(windowed, fresh, atol=1e-3)  # the loaded windows take part in the read


def test_a_query_window_reader_is_the_same_cached_or_not_and_refused_without_match(embedded, files, tmp_path):
    """reader_query_window keeps the conversation's last tokens as state: the reply fed token by
    token (cached, the state carried across passes) reads exactly as one pass does, and a rollback
    restores it; without reader_match the setting is refused in one line."""
    settings = MemoryBank.Settings(layers=LAYERS, sharing="per_layer", reader_match=16.0, reader_query_window=6)
    path = tmp_path / "query_window.safetensors"
    _save_reader(embedded, path, settings)
    spec = parse_arm(f'memory_bank:linkage=1,weights="{files / "doc.safetensors"}",reader="{path}"')
    reply = embedded.tokenizer("It is Tarrowby, I think.", add_special_tokens=False)["input_ids"]
    one_pass = Dialogue(embedded, [spec]).teacher_force("Where does Orla Vennick live?", [reply])[0]
    stepwise = Dialogue(embedded, [spec]).teacher_force("Where does Orla Vennick live?", [reply], chunk=1)[0]
    torch.testing.assert_close(stepwise, one_pass, atol=1e-4, rtol=1e-4)
    d = Dialogue(embedded, [spec])
    d.teacher_force("Where is Quillmarsh?", [reply])
    d.rollback()  # the query window's state goes back with the turn
    again = d.teacher_force("Where does Orla Vennick live?", [reply])[0]
    torch.testing.assert_close(again, one_pass, atol=1e-4, rtol=1e-4)
    plain = parse_arm(
        f'memory_bank:linkage=1,weights="{files / "doc.safetensors"}",reader="{files / "fresh_reader.safetensors"}"'
    )
    assert not torch.allclose(
        one_pass, Dialogue(embedded, [plain]).teacher_force("Where does Orla Vennick live?", [reply])[0], atol=1e-3
    )
    with pytest.raises(ValueError, match="set reader_match > 0 too"):
        MemoryBank.Settings(layers=LAYERS, reader_query_window=4)


def test_a_reader_file_from_before_the_match_loads_with_the_match_at_its_start(embedded, files):
    """A reader trained before reader_match (no match weights in its file) starts a matching
    reader: its adapters and gates as saved, the match weights at 1; an unknown tensor is refused."""
    from engine.weights import load_tensors, read_header

    old = load_tensors(read_header(files / "fresh_reader.safetensors"))
    old = {k: v + 0.5 if k.endswith(".gate") else v for k, v in old.items()}
    settings = MemoryBank.Settings(layers=LAYERS, sharing="per_layer", reader_match=8.0, reader_match_lag=2)
    reader = ReaderWeights(settings, embedded.model)
    reader.load_tensors(old)
    loaded = reader.to_tensors()
    assert all(torch.equal(loaded[k], v) for k, v in old.items())
    assert all(bool((loaded[k] == 1).all()) for k in loaded if k.endswith(".match_weight"))
    with pytest.raises(ValueError, match="do not fit"):
        reader.load_tensors(old | {"readers.99.gate": torch.ones(9)})
