"""Persistent-memory tokens of the neural memory (Titans' learned, data-independent tokens): written
before the arm's first token and after every reset, read by every token as if prepended, listed by
the exact implicit attention; trained by `python -m engine train` and round-tripped into an arm."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPTS, full_forward, mixed_sequence, stepwise_forward
from test_neural_memory import _random_kvq

from engine.dialogue import Dialogue, DialogueError
from engine.mechanisms.neural_memory import (
    NeuralMemory,
    NeuralMemorySettings,
    coefficients,
    implicit_attention,
    linear_sequential,
)
from engine.spec import SpecError, parse_arm
from engine.train import TrainConfig, load_config, train
from engine.weights import load_tensors, read_header

pytestmark = pytest.mark.usefixtures("one_thread")


def test_implicit_attention_with_a_persistent_prefix_reproduces_the_read():
    """P persistent writes first (they read nothing), then T tokens: each token's read is exactly the
    implicit attention over the persistent tokens and the earlier tokens (float64)."""
    s = NeuralMemorySettings(step="surprise", momentum=0.6, forget=0.03, lr=0.3, persistent=5)
    k, v, q = (x.double() for x in _random_kvq(T=40))
    P = s.persistent
    q = q.clone()
    q[:, :, :P] = 0  # the persistent tokens do not read
    h, N, d = k.shape
    zeros = torch.zeros(h, d, d, dtype=torch.float64)
    _, _, y, e, th, _ = linear_sequential(s, zeros, zeros, k, v, q)
    now = torch.arange(P, N)
    w = implicit_attention(s, q[:, :, P:], k, th, torch.arange(N), now)  # [h, g, T, N]
    assert w[..., :P].abs().amax() > 0  # the persistent slots are read
    assert torch.allclose(torch.einsum("hgtn,hnd->hgtd", w, e), y[:, :, P:], atol=1e-10, rtol=0)


def test_persistent_tokens_are_written_first_and_listed_in_the_traces(tiny_llama):
    spec = "neural_memory:linkage=1,gain=1,layers=1/3,chunk=4,step=surprise,persistent=3"
    d = Dialogue(tiny_llama, [parse_arm(spec)], record_traces=True)
    r1 = d.send(PROMPTS[0], max_new_tokens=4)
    mech = d.arms[0].mechanism
    s = mech.settings
    n_tokens = len(d.arms[0].token_ids)
    assert mech.memory_size() == 3 + n_tokens
    for layer in (1, 3):  # the state unrolls to M over the persistent writes and every token's write
        st = mech.state[layer]
        N = st.steps
        ks = torch.cat([st.pers_k, st.hist_k], 1)
        es = torch.cat([st.pers_e, st.hist_e], 1)
        ths = torch.cat([st.pers_theta, st.hist_theta], 1)
        steps = torch.cat([torch.arange(3), st.hist_step])
        coef = coefficients(1 - s.forget, s.momentum, N)[(N - 1 - steps).long()].float()
        M = torch.einsum("n,hn,hnd,hne->hde", coef, 2 * ths, es, ks)
        assert torch.allclose(M, st.params[0], atol=1e-4)
    traces = [t for t in r1[0].traces if t.layer == 1]
    first = traces[0]
    assert first.position == 0 and first.slot_keys == ["persistent 0", "persistent 1", "persistent 2"]
    assert abs(first.weights).sum() > 0  # the very first token already reads something
    for t in traces:
        assert t.slot_keys == ["persistent 0", "persistent 1", "persistent 2"] + list(range(t.position))
    # the persistent tokens change the output; without them nothing is read at position 0
    ids, roles = mixed_sequence(20)
    with_p = full_forward(tiny_llama, spec, ids, roles)
    without = full_forward(tiny_llama, spec.replace(",persistent=3", ""), ids, roles)
    assert (with_p[0] - without[0]).abs().max() > 1e-4
    # cached == uncached with them
    assert (with_p - stepwise_forward(tiny_llama, spec, ids, roles, first_chunk=2)).abs().max() <= 1e-4


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_scope_turn_rewrites_them_and_snapshot_restores(tiny_llama, memory):
    spec = [parse_arm(f"neural_memory:linkage=1,gain=1,scope=turn,persistent=2,memory={memory},hidden=8,layers=2")]
    d = Dialogue(tiny_llama, spec)
    d.send(PROMPTS[0], max_new_tokens=3)
    state = d.arms[0].mechanism.snapshot()
    r = d.send("Again?", max_new_tokens=3)
    assert d.arms[0].mechanism.memory_size() == 2 + len(r[0].prompt_token_ids) + 2
    d.arms[0].mechanism.restore(state)
    again = d.arms[0].mechanism.state[2]
    assert again.n_persistent == 2 and again.steps == state["2"]["steps"]


def test_persistent_text_and_bad_values(tiny_llama):
    text = "The lighthouse keeper counts ships every night."
    arm = parse_arm(f'neural_memory:linkage=1,layers=1/2,persistent=4,persistent_text="{text}"')
    w = NeuralMemory.build_weights(arm.settings, tiny_llama.model, None)
    seen = {}
    ids = tiny_llama.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    layers = tiny_llama.model.model.layers

    def keep(l):
        def hook(module, args, kwargs):
            seen[l] = kwargs["hidden_states"][0].clone()

        return hook

    hooks = [layers[l].self_attn.register_forward_pre_hook(keep(l), with_kwargs=True) for l in (1, 2)]
    with torch.no_grad():
        tiny_llama.model(input_ids=ids)
    for h in hooks:
        h.remove()
    for l in (1, 2):  # x̂ of the text's last 4 tokens at the layer
        assert torch.allclose(w.layer(l), seen[l][-4:], atol=1e-5)
    Dialogue(tiny_llama, [arm]).send("Hi", max_new_tokens=2)
    with pytest.raises(DialogueError, match="fewer than persistent=40"):
        Dialogue(tiny_llama, [parse_arm(f'neural_memory:persistent=40,persistent_text="{text}"')])
    with pytest.raises(SpecError, match="persistent=0"):
        parse_arm('neural_memory:persistent_text="hello"')
    with pytest.raises(SpecError, match="persistent"):
        parse_arm("neural_memory:persistent=-1")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


TEXTS = [
    "The keeper of the north light writes the ships in the ledger: {n} ships tonight, all safe.",
    "At the north light the ledger says: {n} ships passed, the sea was calm and all are safe.",
    "Ledger of the north light: {n} ships, calm water, the keeper slept at dawn, all safe.",
]


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_training_lowers_held_out_loss_and_weights_round_trip(tmp_path, tiny_llama, memory):
    rows = [{"text": TEXTS[i % 3].format(n=i + 3)} for i in range(12)]
    _write_jsonl(tmp_path / "train.jsonl", rows[:10])
    _write_jsonl(tmp_path / "eval.jsonl", rows[10:])
    settings = {
        "layers": [1, 3],
        "persistent": 4,
        "gain": 1.0,
        "wiring": "layer",
        "memory": memory,
        "hidden": 8,
        "lr": 0.5,
    }
    steps = 12 if memory == "linear" else 3
    cfg = TrainConfig(
        **{
            "mechanism": {"name": "neural_memory", "settings": settings},
            "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
            "train": {
                "max_steps": steps,
                "batch_size": 5,
                "lr": 0.3,
                "eval_every": steps,
                "seed": 0,
                "schedule": "constant",
            },
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    summary = train(cfg, progress=False, log=lambda *_: None, lm=tiny_llama)
    if memory == "linear":
        assert summary["best_eval_loss"] < summary["initial_eval_loss"] - 0.05, summary
    else:  # second-order steps: short, only that the gradient reaches the tokens and the loss moves
        assert summary["best_eval_loss"] < summary["initial_eval_loss"], summary
    wf = read_header(summary["weights"])
    tensors = load_tensors(wf)
    assert wf.mechanism == "neural_memory" and set(tensors) == {"tokens.1", "tokens.3"}
    arm = parse_arm(f'neural_memory:linkage=1,weights="{summary["weights"]}"')
    assert arm.settings.persistent == 4 and arm.settings.layers == [1, 3] and arm.settings.memory == memory
    fresh = NeuralMemory.build_weights(arm.settings, tiny_llama.model, None)
    assert not torch.equal(fresh.layer(1).detach(), tensors["tokens.1"])  # it did train
    d = Dialogue(tiny_llama, [arm])
    assert torch.equal(d.arms[0].mechanism.weights.layer(3), tensors["tokens.3"])
    forced = [[5, 6, 7, 8]]
    trained = d.teacher_force("How many ships?", forced)[0]
    spec = f"neural_memory:linkage=1,gain=1,wiring=layer,layers=1/3,persistent=4,memory={memory},hidden=8,lr=0.5"
    untrained = Dialogue(tiny_llama, [parse_arm(spec)]).teacher_force("How many ships?", forced)[0]
    assert (trained - untrained).abs().max() > 1e-4
    # a file whose tensors do not fit the settings is one line
    with pytest.raises(DialogueError, match="do not fit"):
        Dialogue(tiny_llama, [parse_arm(f'neural_memory:weights="{summary["weights"]}",layers=1/2')])


def test_shipped_config_is_valid(monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # its data paths are relative to the repository
    cfg = load_config("configs/neural_persistent_tiny_cpu.yaml")
    s = cfg.settings()
    assert cfg.mechanism.name == "neural_memory" and s.persistent == 8 and s.weights is None


def test_window_training_data_and_mask(tokenizer):
    """studies/persistent_window.py: facts disjoint from the protocol's items, labels only on the
    answer, and the sliding window mask (sink + last N, causal, padding rows see themselves)."""
    from experiments.protocol import get_protocol
    from studies.persistent_window import encode_item, make_items, mismatched, window_mask

    protocol = get_protocol("window_recall")
    train_items, held = make_items(0)
    evaluated = {str(it["answer"]).lower() for it in protocol.items}
    assert not evaluated & {it["answer"].lower() for it in train_items + held}
    assert not {it["fact"] for it in held} & {it["fact"] for it in train_items}
    wrong = mismatched(held, train_items)
    assert all(w["fact"] != h["fact"] and w["answer"] == h["answer"] for w, h in zip(wrong, held))
    enc = encode_item(tokenizer, protocol, held[0])
    answer = tokenizer(held[0]["answer"], add_special_tokens=False).input_ids
    assert [t for t in enc["labels"] if t != -100] == answer
    valid = torch.tensor([[True] * 12, [True] * 9 + [False] * 3])
    m = window_mask(valid, window=3, sink=2)[:, 0]
    assert m[0, 10].tolist() == [True, True] + [False] * 5 + [True] * 4 + [False]
    assert not m[1, 5, 9:].any() and m[1, 10].tolist() == [False] * 10 + [True, False]
