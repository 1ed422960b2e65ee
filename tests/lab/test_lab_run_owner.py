"""A run started in one browser tab is stopped only from that tab; other tabs watch it."""

from __future__ import annotations

import pytest

from db import Store

pytestmark = pytest.mark.slow


def test_stop_belongs_to_the_tab_that_started_the_run(embedded, tmp_path):
    from lab import experiments_view as V
    from lab.context import LabContext

    store = Store(tmp_path / "lab.db")
    ctx = LabContext(store=store, lm=embedded)
    said = []

    def at_start(done, total, info):
        if info.get("event") == "start":
            said.append(V.stop_run(ctx, "tab-2"))  # another tab: refused, the run goes on
            said.append(V.stop_run(ctx, "tab-1"))  # the tab that started it

    message, eid = V.start_run(ctx, "are_you_sure", "", None, "observer", 1, 1, 4, progress=at_start, owner="tab-1")
    assert "another tab" in said[0] and said[1].startswith("stopping"), said
    assert message.startswith("⏸") and store.get_experiment(eid)["status"] == "interrupted"
    assert V.stop_run(ctx, "tab-1") == "no run is in progress in this lab"
    store.close()
