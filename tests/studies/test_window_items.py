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


def test_the_negatives_are_other_training_values_of_the_same_attribute():
    """`train_negatives.jsonl`'s `wrong` answers (the margin term's negatives) are another value the
    training data plants for the same attribute: never the row's own answer, never the held-out value,
    never an unseen test value or a protocol answer, so the margin rewards the planted fact only."""
    from studies.window_data import make_items, with_wrong

    train, held, _ = make_items(0)
    held_value = {it["question"]: it["answer"] for it in held}
    values = {q: set(v) for _, q, v in ATTRS}
    tests = {it["answer"] for it in load_items("data/window_values/test.jsonl", get_protocol("window_recall"))}
    theirs = {str(it["answer"]) for it in get_protocol("window_recall").items}
    rows = with_wrong(train)
    assert len(rows) == len(train) and with_wrong(train) == rows  # seeded
    for row in rows:
        assert row["wrong"] in values[row["question"]]
        assert row["wrong"] not in (row["answer"], held_value[row["question"]])
        assert row["wrong"] not in tests | theirs
    shipped = [json.loads(x) for x in open("experiments/window_data/train_negatives.jsonl")]
    assert [r["wrong"] for r in shipped] == [r["wrong"] for r in rows]
    assert all(r["messages"][-1]["content"] == it["answer"] for r, it in zip(shipped, rows))


def test_an_arm_whose_weights_path_has_slashes_is_refused_in_one_line(capsys):
    """A weights path in an arm spec is split at '/' (the list separator of `layers=16/22/28`): the
    study says so in one line with what to write instead, before loading the model, not with a traceback."""
    from studies.window_recall import main

    with pytest.raises(SystemExit) as e:
        main(["--arm", "neural_memory:linkage=1,weights=runs/x/y.safetensors", "--items", "1"])
    message = str(e.value)
    assert message.startswith("error: ") and "weights=@NAME" in message and "\n" not in message
