"""Probes: how much an arm's next-token distribution differs from the observer's, token by token.

The seed's logit-delta probe compared one prompt's logits. Here the arm and the observer are two
rows of one dialogue that are teacher-forced through the same transcript (user messages and the
arm's own replies), in the same cached regime as generation, so the figures describe exactly the
distributions the arm sampled from. Per position: max and mean |Δlogit|, KL(P_arm || P_observer),
top-1 agreement, and the observer's top alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dialogue import Dialogue
from .model import LoadedModel
from .spec import ArmSpec, parse_arm


@dataclass
class Divergence:
    """Per-position comparison of an arm with the observer over one assistant reply."""

    token_ids: list[int]
    max_abs_dlogit: list[float]
    mean_abs_dlogit: list[float]
    kl: list[float]
    top1_agree: list[bool]
    observer_top: list[list[tuple[int, float]]] = field(default_factory=list)
    arm_top: list[list[tuple[int, float]]] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.kl)
        return {
            "n_positions": n,
            "max_abs_dlogit": max(self.max_abs_dlogit, default=0.0),
            "mean_abs_dlogit": sum(self.mean_abs_dlogit) / n if n else 0.0,
            "kl_mean": sum(self.kl) / n if n else 0.0,
            "kl_max": max(self.kl, default=0.0),
            "top1_agreement": sum(self.top1_agree) / n if n else 1.0,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "token_ids": self.token_ids, "max_abs_dlogit_per_pos": self.max_abs_dlogit,
                "mean_abs_dlogit_per_pos": self.mean_abs_dlogit, "kl_per_pos": self.kl,
                "top1_agree_per_pos": self.top1_agree, "observer_top": self.observer_top, "arm_top": self.arm_top}


def compare_logits(arm: torch.Tensor, observer: torch.Tensor, token_ids: list[int], top_k: int = 5) -> Divergence:
    """arm, observer: [T, vocab] logits predicting `token_ids`."""
    arm, observer = arm.float(), observer.float()
    delta = (arm - observer).abs()
    log_pa, log_po = torch.log_softmax(arm, -1), torch.log_softmax(observer, -1)
    kl = (log_pa.exp() * (log_pa - log_po)).sum(-1).clamp_min(0.0)
    top_o = torch.topk(log_po.exp(), top_k, dim=-1)
    top_a = torch.topk(log_pa.exp(), top_k, dim=-1)
    pack = lambda t: [[(int(i), round(float(p), 5)) for i, p in zip(ti, tp)] for ti, tp in zip(t.indices, t.values)]
    return Divergence(
        token_ids=list(token_ids), max_abs_dlogit=delta.max(-1).values.tolist(),
        mean_abs_dlogit=delta.mean(-1).tolist(), kl=kl.tolist(),
        top1_agree=(arm.argmax(-1) == observer.argmax(-1)).tolist(), observer_top=pack(top_o), arm_top=pack(top_a))


def compare_on_transcript(lm: LoadedModel, arm: ArmSpec, turns: list[tuple[str, list[int]]],
                          system: str | None = None, record_traces: bool = False) -> tuple[list[Divergence], Dialogue]:
    """Teacher-force (user message, arm's reply tokens) turns through [observer, arm]; one Divergence per turn."""
    d = Dialogue(lm, [parse_arm("observer"), arm], system=system, record_traces=record_traces)
    out = []
    for user, reply in turns:
        observer_logits, arm_logits = d.teacher_force(user, [reply, reply])
        out.append(compare_logits(arm_logits, observer_logits, reply))
    return out, d


def logit_delta_probe(lm: LoadedModel, arm: ArmSpec, prompt: str, system: str | None = None,
                      reply: list[int] | None = None, max_new_tokens: int = 48) -> dict:
    """The seed's probe, over a whole reply: by default the arm's own greedy reply to `prompt`."""
    if reply is None:
        d = Dialogue(lm, [arm.with_sampling(greedy=True)], system=system)
        reply = d.send(prompt, max_new_tokens=max_new_tokens)[0].token_ids
    (div,), d = compare_on_transcript(lm, arm, [(prompt, reply)], system)
    mech = d.arms[1].mechanism
    calls = {} if mech is None else {str(k): v for k, v in sorted(mech.call_counts.items())}
    return {"arm": arm.to_string(), "prompt": prompt, "reply": lm.tokenizer.decode(reply, skip_special_tokens=True),
            **div.summary(), "on_path_calls": calls, "per_position": div.to_dict()}
