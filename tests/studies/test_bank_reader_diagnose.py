"""The bank reader diagnostic on one dev question with the shipped reader: the oracle masks reach
the read (the bank masked to the right town's slots favours the right town over the wrong one, and
the other way round), and the read weights it reports are fractions of one read."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masks_reach_the_read_and_weights_are_fractions(embedded, tmp_path, monkeypatch, capsys):
    from studies import bank_reader_diagnose

    monkeypatch.setenv("LAB_WEIGHTS_DIR", "weights")
    out = tmp_path / "diagnose.json"
    bank_reader_diagnose.main(["--items", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    oracle = {k: v[0] for k, v in result["oracle"].items()}
    assert oracle["right town only"] > 0 > oracle["wrong town only"]
    assert oracle["right town only"] - oracle["full bank"] > 1.0
    for looks in result["looks"].values():
        assert all(0.0 <= x <= 1.0 for x in looks) and looks[0] + looks[1] + looks[2] <= 1.0 + 1e-6
    assert "oracle masks: not arms" in capsys.readouterr().out
