"""The Arena's default panes reply in language (issue 22): never a fresh random bank or an untrained branch.

Measured on the real embedded model: each arm's greedy reply is scored by the plain model, teacher-forced
(mean negative log-likelihood per token). The default linked arm scores close to the observer's own reply;
a fresh memory bank, the kind of arm that must not be a default, scores far worse, so the measure can fail.
"""

from __future__ import annotations

import pytest
import torch

from engine import Dialogue, parse_arm
from lab.settings import PaneLayout, untrained_note

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"


def reply_nll(lm, user: str, reply: list[int]) -> float:
    logits = Dialogue(lm, [parse_arm("observer")]).teacher_force(user, [reply])[0]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(reply)))


def test_default_panes_carry_no_warning():
    layout = PaneLayout.current()
    specs = [layout.spec(layout.defaults(p)) for p in range(4)]
    assert specs[0].mechanism is None and all(s.mechanism == "continuity" for s in specs[1:])
    assert [untrained_note(s) for s in specs] == [None] * 4


def test_the_default_linked_arm_replies_in_language(embedded):
    layout = PaneLayout.current()
    default = layout.spec(layout.defaults(1))
    arms = [parse_arm("observer"), default, parse_arm("memory_bank:linkage=1")]
    replies = Dialogue(embedded, arms).send(PROMPT, max_new_tokens=24)
    observer, linked, bank = (reply_nll(embedded, PROMPT, r.token_ids) for r in replies)
    assert linked < observer + 1.0, (observer, linked, [r.text for r in replies])
    assert bank > linked + 2.0, (bank, linked, [r.text for r in replies])  # gibberish scores far worse
