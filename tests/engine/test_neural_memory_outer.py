"""The neural memory's outer loop (`outer=true`): learned key/value/query maps and data-dependent
θ_t, η_t, α_t, trained through the memory's writes by `python -m engine train` under a sliding window.

Checked: the gates and maps at zero are exactly the settings' constants and the layer's own
projections, so a fresh outer loop is today's memory (to float rounding: it runs the token-by-token
recurrence, not the chunked form); with trained (here: random) parameters linkage 0 is still the base
model bit for bit, cached == uncached and nothing leaks from the future; the trainer's window and
`loss_on: last`; a short windowed training run lowers held-out loss and its file loads into an arm.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPTS, dialogue_logits, full_forward, generate_logits, mixed_sequence, stepwise_forward

from engine import parse_arm
from engine.mechanisms.neural_memory import OUTER_PARAMS, linear_scan, linear_sequential, outer_gates, outer_shapes

BASE = "neural_memory:linkage=1,gain=1,wiring=layer,layers=1/3,lr=0.5"
# a two-reply chat row: an acknowledgement, then the recall answer (the encoding tests' example)
RECALL_ROW = {
    "messages": [
        {"role": "user", "content": "Remember: the key is under the mat."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Where is the key?"},
        {"role": "assistant", "content": "Under the mat"},
    ]
}


def test_zero_gates_are_the_settings_constants():
    settings = parse_arm("neural_memory:lr=0.3,momentum=0.6,forget=0.01").settings
    ps = {n: torch.zeros(s) for n, s in outer_shapes(2, 8, 16).items()}
    theta, eta, alpha = outer_gates(ps, torch.randn(5, 16), settings)
    assert torch.equal(theta, torch.full((2, 5), 0.3)) and torch.equal(eta, torch.full((2, 5), 0.6))
    assert torch.equal(alpha, torch.full((2, 5), 0.01))


@pytest.mark.parametrize("step", ["constant", "surprise"])
def test_scan_with_constant_gates_is_the_reference_recurrence(step):
    settings = parse_arm(f"neural_memory:lr=0.4,momentum=0.5,forget=0.05,step={step}").settings
    g = torch.Generator().manual_seed(0)
    h, T, d = 2, 9, 8
    k = torch.nn.functional.normalize(torch.randn(h, T, d, generator=g), dim=-1)
    v, q = torch.randn(h, T, d, generator=g), torch.randn(h, 3, T, d, generator=g)
    M0, S0 = torch.zeros(h, d, d), torch.zeros(h, d, d)
    full = lambda c: torch.full((h, T), c)  # noqa: E731
    got = linear_scan(settings, M0, S0, k, v, q, full(0.4), full(0.5), full(0.05))
    want = linear_sequential(settings, M0, S0, k, v, q)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fresh_outer_loop_is_todays_memory(tiny_llama):
    ids, roles = mixed_sequence()
    plain = full_forward(tiny_llama, BASE, ids, roles)
    outer = full_forward(tiny_llama, BASE + ",outer=true", ids, roles)
    assert (plain - outer).abs().max() <= 1e-4
    assert parse_arm(BASE + ",outer=true").caveat.startswith("untrained outer loop")


@pytest.fixture(scope="module")
def random_outer(tiny_llama, tmp_path_factory):
    """A weights file with random outer-loop parameters: what training could leave, far from zero."""
    from engine.weights import save_weights

    cfg = tiny_llama.model.config
    settings = parse_arm(BASE + ",outer=true").settings
    g = torch.Generator().manual_seed(1)
    shapes = outer_shapes(cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size)
    tensors = {f"outer.{l}.{n}": 0.3 * torch.randn(shapes[n], generator=g) for l in (1, 3) for n in OUTER_PARAMS}
    path = tmp_path_factory.mktemp("outer") / "outer.safetensors"
    save_weights(
        path,
        tensors,
        mechanism="neural_memory",
        settings=settings.model_dump(exclude={"weights"}),
        model=tiny_llama.model,
    )
    return f'neural_memory:linkage=1,weights="{path}"'


def test_trained_outer_loop_keeps_the_invariants(tiny_llama, random_outer):
    arm = parse_arm(random_outer)
    assert arm.settings.outer and arm.settings.layers == [1, 3] and arm.caveat is None
    # linkage 0: the base model bit for bit
    ref_tokens, ref_logits = generate_logits(tiny_llama, PROMPTS[0], 8)
    zero = random_outer.replace("linkage=1", "linkage=0")
    tokens, logits = dialogue_logits(tiny_llama, [zero], PROMPTS[0], 8)
    assert tokens[0] == ref_tokens and all(torch.equal(a[0], b) for a, b in zip(logits, ref_logits))
    # cached == uncached, causal, and the trained parameters are on the path
    ids, roles = mixed_sequence()
    full = full_forward(tiny_llama, random_outer, ids, roles)
    assert (full - stepwise_forward(tiny_llama, random_outer, ids, roles)).abs().max() <= 1e-4
    assert (full - full_forward(tiny_llama, BASE + ",outer=true", ids, roles)).abs().max() > 1e-3
    j = 25
    changed = list(ids)
    changed[j:] = [(t * 7 + 13) % 40000 + 100 for t in ids[j:]]
    assert (full[:j] - full_forward(tiny_llama, random_outer, changed, roles)[:j]).abs().max() <= 1e-6


def test_outer_needs_the_linear_memory_and_a_fitting_file(tiny_llama, random_outer):
    from engine import SpecError
    from engine.dialogue import Dialogue, DialogueError

    with pytest.raises(SpecError, match="outer=true is built for the linear memory only"):
        parse_arm("neural_memory:outer=true,memory=mlp")
    with pytest.raises(DialogueError, match="do not fit"):  # the file's outer tensors, but outer switched off
        Dialogue(tiny_llama, [parse_arm(random_outer + ",outer=false")])


def test_loss_on_last_and_tail_and_the_training_window(tokenizer):
    from engine.mechanisms.base import ROLE_CODE
    from engine.train import encode, window_mask

    row = RECALL_ROW
    enc = encode(tokenizer, row, 512, "last")
    kept = [t for t in enc["labels"] if t != -100]
    assert tokenizer.decode(kept).strip() == "Under the mat"
    assert all(enc["roles"][i] == ROLE_CODE["assistant"] for i, t in enumerate(enc["labels"]) if t != -100)
    tail = encode(tokenizer, row, 512, "tail", tail_tokens=3)  # the last 3 reply tokens, across replies
    kept = [i for i, t in enumerate(tail["labels"]) if t != -100]
    assert len(kept) == 3 and tokenizer.decode([tail["ids"][i] for i in kept]) == tokenizer.decode(
        [t for t in enc["labels"] if t != -100][-3:]
    )
    two = encode(tokenizer, row, 512, "tail", tail_tokens=1000)  # more than there are: every reply token
    assert [t for t in two["labels"] if t != -100] == [
        t for t in encode(tokenizer, row, 512, "assistant")["labels"] if t != -100
    ]
    valid = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    m = window_mask(valid, window=3, sink=2)[:, 0]
    assert m[0, 9].tolist() == [True, True] + [False] * 4 + [True] * 4  # sink + the last 3 + itself
    assert not m[1, 6, 7:].any() and m[1, 8].tolist() == [False] * 8 + [True, False]


def test_end_of_reply_trains_the_token_that_closes_each_trained_reply(tokenizer):
    """data.end_of_reply: the template's end-of-turn after a trained reply gets a label (so a
    mechanism learns where an answer stops); never after an untrained reply, never a user's."""
    from engine.mechanisms.base import ROLE_CODE
    from engine.train import encode

    row = RECALL_ROW
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for loss_on, replies in (("assistant", 2), ("last", 1)):
        plain, ended = (encode(tokenizer, row, 512, loss_on, end_of_reply=e) for e in (False, True))
        added = [i for i, (a, b) in enumerate(zip(plain["labels"], ended["labels"])) if a != b]
        assert len(added) == replies, loss_on
        for i in added:
            assert ended["ids"][i] == end and ended["labels"][i] == end
            assert ended["roles"][i - 1] == ROLE_CODE["assistant"] and plain["labels"][i - 1] != -100
        assert ended["labels"][-2] == end  # the answer's own close: the last token is the template's newline
    text_row = encode(tokenizer, {"text": "just text"}, 512, "all", end_of_reply=True)
    assert text_row["labels"] == encode(tokenizer, {"text": "just text"}, 512, "all")["labels"]


def test_windowed_training_lowers_held_out_loss_and_loads(tiny_llama, tmp_path):
    from engine.dialogue import Dialogue
    from engine.train import TrainConfig, train

    rows = []
    for i, (who, town) in enumerate(
        [
            ("Ada", "Skelwith"),
            ("Bo", "Ambleside"),
            ("Cy", "Keswick"),
            ("Di", "Hawes"),
            ("Ed", "Sedbergh"),
            ("Flo", "Kendal"),
        ]
    ):
        filler = " ".join(["The weather was fine and the tea was warm."] * 2)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Remember: {who} lives in {town}."},
                    {"role": "assistant", "content": "Noted."},
                    {"role": "user", "content": filler},
                    {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": f"Where does {who} live?"},
                    {"role": "assistant", "content": town},
                ]
            }
        )
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]))
    cfg = TrainConfig(
        **{
            "mechanism": {
                "name": "neural_memory",
                "settings": {"layers": [1, 3], "outer": True, "gain": 1.0, "wiring": "layer", "lr": 0.5},
            },
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "format": "chat",
                "loss_on": "last",
                "max_length": 128,
            },
            "train": {"max_steps": 8, "batch_size": 2, "lr": 0.05, "eval_every": 4, "window": 8, "sink": 2},
            "output": {"dir": str(tmp_path / "run"), "weights": str(tmp_path / "outer.safetensors")},
        }
    )
    result = train(cfg, progress=False, log=lambda *a: None, lm=tiny_llama)
    assert result["best_eval_loss"] < result["initial_eval_loss"]
    arm = parse_arm(f'neural_memory:linkage=1,weights="{tmp_path / "outer.safetensors"}"')
    assert arm.settings.outer and arm.settings.layers == [1, 3]
    d = Dialogue(tiny_llama, [arm], window=8)
    assert any(p.abs().sum() > 0 for p in d.arms[0].mechanism.weights.parameters())  # it did train
    d.send("Hello there.", max_new_tokens=3)
