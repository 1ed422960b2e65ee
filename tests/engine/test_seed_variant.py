"""`continuity:variant=seed` against the published TripletAttention behaviour, re-implemented here.

The reference below is written from the published module's behaviour (seed 000, TripletAttention,
as documented in shared/reference/seed-systems.md and issue 12), not copied: a cross-attention
whose weights are the layer's own W_q, W_k, W_v, W_o with the GQA key/value heads expanded to one
per query head; its "memory" is the previous forward call's normed input; the first call of a turn
(memory empty) attends over its own input with no mask and no RoPE; every later call reads only the
memory's LAST row (`memory[:, -1, :]`); the memory is replaced by the current input after each call;
its output, times gain and linkage, is added to the self-attention output; every turn the memory is
reset and the WHOLE transcript is prefilled again from position 0 with a fresh cache, then tokens are
decoded one at a time with the cache.

The engine runs the same arm batched next to an observer; both turns' logits must match the
reference at every decoded step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from engine import Dialogue, parse_arm

LAYERS, GAIN, LINKAGE, STEPS = (1, 3), 0.8, 1.0, 6


class ReferenceTriplet:
    """One target layer's published-style continuity stream (multi-head, expanded K/V weights)."""

    def __init__(self, attn, config):
        self.attn = attn
        self.h = config.num_attention_heads
        self.kv = config.num_key_value_heads
        self.d = config.hidden_size // self.h
        group = self.h // self.kv
        # GQA -> MHA: each query head gets a copy of its key/value head's rows
        self.w_k = attn.k_proj.weight.view(self.kv, self.d, -1).repeat_interleave(group, 0).reshape(self.h * self.d, -1)
        self.w_v = attn.v_proj.weight.view(self.kv, self.d, -1).repeat_interleave(group, 0).reshape(self.h * self.d, -1)
        self.memory = None

    def reset(self):
        self.memory = None

    def residual(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, hidden]
        B, T, _ = x.shape
        mem = x if self.memory is None else self.memory[:, -1:, :]
        q = (x @ self.attn.q_proj.weight.T).view(B, T, self.h, self.d).transpose(1, 2)
        k = (mem @ self.w_k.T).view(B, mem.shape[1], self.h, self.d).transpose(1, 2)
        v = (mem @ self.w_v.T).view(B, mem.shape[1], self.h, self.d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1)  # no mask, no RoPE
        out = (att @ v).transpose(1, 2).reshape(B, T, self.h * self.d) @ self.attn.o_proj.weight.T
        self.memory = x.detach()
        return GAIN * LINKAGE * out


class ReferenceModel:
    """The tiny model with reference streams hooked into the target layers' self-attention."""

    def __init__(self, model):
        self.model = model
        self.streams = {l: ReferenceTriplet(model.model.layers[l].self_attn, model.config) for l in LAYERS}
        self.handles = []

    def __enter__(self):
        for layer, stream in self.streams.items():

            def hook(module, args, kwargs, output, stream=stream):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return (output[0] + stream.residual(x),) + tuple(output[1:])

            self.handles.append(self.model.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @torch.no_grad()
    def turn(self, transcript: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
        """Reset the memory, prefill the whole transcript from position 0, decode n tokens greedily."""
        for s in self.streams.values():
            s.reset()
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([transcript]), past_key_values=cache, use_cache=True)
        tokens, logits = [], []
        for _ in range(n):
            step = out.logits[0, -1].float()
            logits.append(step)
            tokens.append(int(step.argmax()))
            out = self.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        return tokens, logits


def engine_turns(lm, prompts):
    """The engine's seed arm (batched with an observer): per turn its prompt ids, tokens, step logits."""
    seen = []
    handle = lm.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].float().clone()))
    try:
        arm = parse_arm(f"continuity:linkage={LINKAGE},gain={GAIN},variant=seed,layers={'/'.join(map(str, LAYERS))}")
        d = Dialogue(lm, [arm, parse_arm("observer")])
        turns = []
        for prompt in prompts:
            seen.clear()
            reply = d.send(prompt, max_new_tokens=STEPS)[0]
            turns.append((reply.prompt_token_ids, reply.token_ids, list(seen[: len(reply.token_ids)])))
        return turns
    finally:
        handle.remove()


def test_seed_variant_matches_the_published_module_over_two_turns(tiny_llama):
    turns = engine_turns(
        tiny_llama,
        ["Take a firm stance: should voting be compulsory?", "List the strongest arguments against your stance."],
    )
    (p1, r1, l1), (p2, r2, l2) = turns
    assert len(r1) == len(r2) == STEPS  # a random tiny model does not stop early
    assert p2[0] == r1[-1]  # the turn's new tokens: turn 1's last token (fed now), then the new piece
    transcript = p1 + r1 + p2[1:]  # turn 2 re-prefills all of it from position 0
    with ReferenceModel(tiny_llama.model) as ref:
        for prompt, reply, logits in ((p1, r1, l1), (transcript, r2, l2)):
            tokens, ref_logits = ref.turn(prompt, STEPS)
            assert tokens == reply
            for step, (a, b) in enumerate(zip(logits, ref_logits)):
                assert torch.allclose(a, b, atol=1e-4), f"step {step}: max diff {(a - b).abs().max():.3g}"


def test_seed_variant_differs_from_incremental_prefill(tiny_llama):
    """The regime matters: the same reference without the re-prefill (turn 2 fed on top of turn 1's
    cache) gives other logits, so the test above would catch an engine that prefills incrementally."""
    (p1, r1, _), (p2_new, r2, l2) = engine_turns(tiny_llama, ["Is tea better than coffee?", "Are you sure?"])
    p2 = p1 + r1 + p2_new[1:]
    with ReferenceModel(tiny_llama.model) as ref, torch.no_grad():
        ref.turn(p1, STEPS)
        for s in ref.streams.values():
            s.reset()
        cache = DynamicCache(config=tiny_llama.model.config)
        tiny_llama.model(input_ids=torch.tensor([p1 + r1[:-1]]), past_key_values=cache, use_cache=True)
        for s in ref.streams.values():
            s.reset()
        new = p2[len(p1) + len(r1) - 1 :]
        out = tiny_llama.model(
            input_ids=torch.tensor([new]),
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.arange(len(p1) + len(r1) - 1, len(p2))[None],
        )
        assert (out.logits[0, -1].float() - l2[0]).abs().max() > 1e-3


def test_seed_probe_mode_is_raw_prompt_last_position_uncached(tiny_llama):
    from engine.probes import SEED_PROBE_GAIN, seed_probe

    prompt = "Should voting be compulsory?"
    arm = parse_arm("continuity:linkage=1,variant=seed,layers=1/3")
    out = seed_probe(tiny_llama, arm, prompt)
    assert out["mode"] == "seed" and out["gain"] == SEED_PROBE_GAIN and out["on_path_calls"] == {"1": 1, "3": 1}
    ids = tiny_llama.tokenizer(prompt)["input_ids"]  # raw: no chat template
    assert out["n_prompt_tokens"] == len(ids)
    # the same numbers by hand: the reference stream at the seed's gain, one uncached pass
    global GAIN
    saved, GAIN = GAIN, SEED_PROBE_GAIN
    try:
        with torch.no_grad():
            observer = tiny_llama.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            with ReferenceModel(tiny_llama.model):
                linked = tiny_llama.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    finally:
        GAIN = saved
    assert out["max_abs_dlogit"] == pytest.approx(float((linked - observer).abs().max()), abs=1e-4)
    assert out["mean_abs_dlogit"] == pytest.approx(float((linked - observer).abs().mean()), abs=1e-5)
    assert out["max_abs_dlogit"] > 0 and out["kl"] >= 0
    # linkage 0 is the observer exactly; an explicit gain in the spec is kept
    assert seed_probe(tiny_llama, parse_arm("continuity:linkage=0,variant=seed"), prompt)["max_abs_dlogit"] == 0.0
    assert seed_probe(tiny_llama, parse_arm("continuity:linkage=1,gain=2,variant=seed"), prompt)["gain"] == 2.0
