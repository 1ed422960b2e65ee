"""Helpers the engine's exactness tests share: plain generate, engine turns with their step logits,
cached and uncached forwards through a Dialogue, a mixed user/assistant token sequence."""

from __future__ import annotations

import torch

from engine.dialogue import Dialogue
from engine.hooks import MechanismHost
from engine.mechanisms.base import ROLE_CODE
from engine.spec import parse_arm

PROMPTS = ["What is the capital of France?", "Is it ever right to lie? Take a stance in one sentence."]
A, U = ROLE_CODE["assistant"], ROLE_CODE["user"]


def generate_logits(lm, prompt, n):
    """Plain transformers generate on the unmodified model (no hooks at all): tokens and step logits."""
    MechanismHost.of(lm.model).remove_hooks()
    from engine.chat import first_turn

    ids = torch.tensor([first_turn(lm.tokenizer, None, prompt).token_ids])
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [l[0] for l in out.logits]


def run_dialogue(lm, arms, prompt, n, system=None):
    """Greedy turn through the engine: each arm's tokens, each step's last-position logits, the Dialogue."""
    d = Dialogue(lm, [parse_arm(a) for a in arms], system=system)
    seen = []
    forward = d._forward

    def spy(*args, **kwargs):
        logits = forward(*args, **kwargs)
        seen.append(logits[:, -1].clone())
        return logits

    d._forward = spy
    replies = d.send(prompt, max_new_tokens=n)
    return [r.token_ids for r in replies], seen, d


def dialogue_logits(lm, arms, prompt, n):
    """Greedy turn through the engine, recording each step's last-position logits per arm."""
    tokens, seen, _ = run_dialogue(lm, arms, prompt, n)
    return tokens, seen


def full_forward(lm, arm, token_ids, roles):
    """Uncached: the whole sequence in one forward pass through a fresh dialogue."""
    d = Dialogue(lm, [parse_arm(arm)])
    return d._forward([token_ids], [roles], 0, logits_to_keep=0)[0]


def stepwise_forward(lm, arm, token_ids, roles, first_chunk=5):
    """Cached: a prefill chunk, then one token per forward pass."""
    d = Dialogue(lm, [parse_arm(arm)])
    out = [d._forward([token_ids[:first_chunk]], [roles[:first_chunk]], 0, logits_to_keep=0)[0]]
    for t in range(first_chunk, len(token_ids)):
        out.append(d._forward([[token_ids[t]]], [[roles[t]]], 0, logits_to_keep=0)[0])
    return torch.cat(out, 0)


def mixed_sequence(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (n,), generator=g).tolist()
    roles = ([U] * 8 + [A] * 10 + [U] * 6 + [A] * n)[:n]
    return ids, roles
