"""The unseen-value items for window recall: every value is new to its attribute, and a file that
reuses a training value or a protocol answer is refused in one line."""

from __future__ import annotations

import json

import pytest

from experiments.protocol import get_protocol
from studies.window_data import ATTRS
from studies.window_recall import load_items


def test_shipped_unseen_values_load_and_are_new_to_their_attribute():
    items = load_items("data/window_values/test.jsonl", get_protocol("window_recall"))
    assert len(items) == 22 and len({it["id"] for it in items}) == 22
    seen = {q: set(v) for _, q, v in ATTRS}
    assert all(it["question"] in seen and it["answer"] not in seen[it["question"]] for it in items)


@pytest.mark.parametrize(
    "item, problem",
    [
        (
            {
                "id": "a",
                "fact": "My aunt lives in Oslo.",
                "question": "In which city does my aunt live?",
                "answer": "Oslo",
            },
            "a value the training data plants",
        ),
        (
            {"id": "b", "fact": "My cat is called Biscuit.", "question": "What is my cat called?", "answer": "Biscuit"},
            "window_recall protocol's items",
        ),
        ({"id": "c", "fact": "x"}, "line 1: missing question, answer"),
        ("{not json", "line 1: not a JSON object"),
    ],
)
def test_a_reused_or_incomplete_item_is_refused(tmp_path, item, problem):
    path = tmp_path / "items.jsonl"
    path.write_text((item if isinstance(item, str) else json.dumps(item)) + "\n")
    with pytest.raises(SystemExit, match=problem):
        load_items(str(path), get_protocol("window_recall"))
