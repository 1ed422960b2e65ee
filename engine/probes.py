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
        return {
            **self.summary(),
            "token_ids": self.token_ids,
            "max_abs_dlogit_per_pos": self.max_abs_dlogit,
            "mean_abs_dlogit_per_pos": self.mean_abs_dlogit,
            "kl_per_pos": self.kl,
            "top1_agree_per_pos": self.top1_agree,
            "observer_top": self.observer_top,
            "arm_top": self.arm_top,
        }


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
        token_ids=list(token_ids),
        max_abs_dlogit=delta.max(-1).values.tolist(),
        mean_abs_dlogit=delta.mean(-1).tolist(),
        kl=kl.tolist(),
        top1_agree=(arm.argmax(-1) == observer.argmax(-1)).tolist(),
        observer_top=pack(top_o),
        arm_top=pack(top_a),
    )


def compare_on_transcript(
    lm: LoadedModel,
    arm: ArmSpec,
    turns: list[tuple[str, list[int]]],
    system: str | None = None,
    record_traces: bool = False,
) -> tuple[list[Divergence], Dialogue]:
    """Teacher-force (user message, arm's reply tokens) turns through [observer, arm]; one Divergence per turn."""
    d = Dialogue(lm, [parse_arm("observer"), arm], system=system, record_traces=record_traces)
    out = []
    for user, reply in turns:
        observer_logits, arm_logits = d.teacher_force(user, [reply, reply])
        out.append(compare_logits(arm_logits, observer_logits, reply))
    return out, d


def logit_delta_probe(
    lm: LoadedModel,
    arm: ArmSpec,
    prompt: str,
    system: str | None = None,
    reply: list[int] | None = None,
    max_new_tokens: int = 48,
) -> dict:
    """The seed's probe, over a whole reply: by default the arm's own greedy reply to `prompt`."""
    if reply is None:
        d = Dialogue(lm, [arm.with_sampling(greedy=True)], system=system)
        reply = d.send(prompt, max_new_tokens=max_new_tokens)[0].token_ids
    (div,), d = compare_on_transcript(lm, arm, [(prompt, reply)], system)
    mech = d.arms[1].mechanism
    calls = {} if mech is None else {str(k): v for k, v in sorted(mech.call_counts.items())}
    return {
        "arm": arm.to_string(),
        "prompt": prompt,
        "reply": lm.tokenizer.decode(reply, skip_special_tokens=True),
        **div.summary(),
        "on_path_calls": calls,
        "per_position": div.to_dict(),
    }


# The published README states continuity_gain 0.3 as the current value (the code also used 0.8
# and 3.0; see shared/reference/seed-systems.md). Used when the arm's spec does not set a gain.
SEED_PROBE_GAIN = 0.3


def seed_probe(lm: LoadedModel, arm: ArmSpec, prompt: str, gain: float | None = None) -> dict:
    """The seed's own logit-delta probe, for a like-for-like comparison with its table (max 7.21 /
    mean 0.75 / KL 0.76 on Llama-3.1-8B): the RAW prompt (tokenised as is, no chat template), ONE
    uncached forward pass of the whole prompt, the last position's logits of the arm against the
    observer's. The arm's gain is the seed's default (SEED_PROBE_GAIN) unless its spec sets one or
    `gain` is given. Unlike `logit_delta_probe` this is not the regime the arm generates in."""
    from .dialogue import build_mechanism
    from .hooks import BatchContext, MechanismHost, RowBinding
    from .mechanisms import StepRow
    from .mechanisms.base import ROLE_CODE

    if arm.settings is not None and (gain is not None or "gain" not in arm.settings.model_fields_set):
        settings = arm.settings.model_copy(update={"gain": SEED_PROBE_GAIN if gain is None else float(gain)})
        arm = ArmSpec(arm.mechanism, settings, arm.sampling, arm.label)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    T = ids.shape[1]
    model = lm.model
    with torch.inference_mode():
        observer = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        mech = build_mechanism(arm, lm)
        if mech is None:
            linked = observer.clone()
            calls = {}
        else:
            row = StepRow(
                positions=torch.arange(T, device=lm.device),
                roles=torch.full((T,), ROLE_CODE["user"], device=lm.device),
                token_ids=ids[0],
                turn=0,
                record=False,
            )
            ctx = BatchContext([RowBinding(0, mech, torch.ones(T, dtype=torch.bool, device=lm.device), row)])
            with MechanismHost.of(model).use(ctx):
                linked = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            calls = {str(k): v for k, v in sorted(mech.call_counts.items())}
    div = compare_logits(linked[None], observer[None], [int(observer.argmax())])
    s = div.summary()
    return {
        "mode": "seed",
        "arm": arm.to_string(),
        "prompt": prompt,
        "n_prompt_tokens": T,
        "gain": None if arm.settings is None else arm.settings.gain,
        "max_abs_dlogit": s["max_abs_dlogit"],
        "mean_abs_dlogit": s["mean_abs_dlogit"],
        "kl": s["kl_mean"],
        "top1_agreement": s["top1_agreement"],
        "on_path_calls": calls,
        "observer_top": div.observer_top[0],
        "arm_top": div.arm_top[0],
    }
