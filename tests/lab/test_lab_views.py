"""Plain helpers of the Experiments and Inspect views (no server, no model)."""

import pandas as pd
import plotly.graph_objects as go

from lab.experiments_view import compact_summary, say_when_empty, say_when_flat
from lab.inspect_view import _progress_words, _turn_index, _turns_from_one


def test_summary_is_a_row_per_metric_and_a_column_per_arm():
    wide = pd.DataFrame(
        [["observer", 4, "0.250 [0.0, 0.6]", "4/2i", "–"], ["continuity λ=1", 4, "0.500 [0.1, 0.9]", "4/2i", "0.31"]],
        columns=["arm", "dialogues", "flip_rate", "flip_rate n", "flip_rate p"],
    )
    t = compact_summary(wide)
    assert list(t.columns) == ["metric", "observer", "continuity λ=1"]
    assert list(t["metric"]) == ["dialogues", "flip_rate"]
    assert t.iloc[1]["observer"] == "0.250 [0.0, 0.6] · n 4/2i"
    assert t.iloc[1]["continuity λ=1"] == "0.500 [0.1, 0.9] · n 4/2i · p 0.31"
    assert compact_summary(pd.DataFrame()).empty


def test_a_flat_plot_says_so():
    zero = say_when_flat(go.Figure(go.Bar(x=["a", "b"], y=[0.0, 0.0])))
    assert "every arm is 0" in zero.layout.annotations[0].text
    none = say_when_flat(go.Figure(go.Bar(x=["a"], y=[float("nan")])))
    assert "nothing was scored" in none.layout.annotations[0].text
    assert not say_when_flat(go.Figure(go.Bar(x=["a"], y=[0.5]))).layout.annotations
    assert say_when_flat(None) is None
    empty = say_when_empty(go.Figure(go.Scatter(x=[], y=[])))
    assert "nothing to plot" in empty.layout.annotations[0].text
    assert not say_when_empty(go.Figure(go.Scatter(x=[1], y=[0.0]))).layout.annotations


def test_inspect_counts_turns_from_one():
    assert _turn_index(1) == 0 and _turn_index("3") == 2 and _turn_index(None) == 0
    assert (
        _turns_from_one("session s has turns 0..1; there is no turn 5")
        == "session s has turns 1..2; there is no turn 6"
    )
    words = _progress_words("comparing 2 arms with the observer (teacher-forced, turn 0)")
    assert "turn 1" in words and "with the observer" not in words


def test_divergence_strip_labels_are_legible_and_long_replies_paged():
    """Labels at a fixed legible size, whole words uncut (issue 22: ~6 px and 'longstan…'); a long reply is
    paged with buttons instead of shrunk; a short one has no pager."""
    from engine.figures import STRIP_FONT_PX, divergence_strip

    toks = [" The", " sky", " is", " a", " longstanding", " misconception", "\n"] * 20
    fig = divergence_strip(toks, [0.1] * len(toks))
    hm = fig.data[0]
    assert hm.textfont.size == STRIP_FONT_PX >= 12
    labels = [t for row in hm.text for t in row if t]
    assert "longstanding" in labels and "misconception" in labels and not any(t.endswith("…") for t in labels)
    assert "⏎" in labels
    pages = fig.layout.updatemenus[0].buttons
    assert [b.label for b in pages] == ["tokens 1–120", "tokens 121–140"]
    assert list(fig.layout.yaxis.range) == [9.5, -0.5]  # the first page: rows 1-10
    short = divergence_strip(toks[:7], [0.0] * 7)
    assert not short.layout.updatemenus and short.layout.height >= 150 + 40
