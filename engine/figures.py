"""Plotly figures for the Inspect views; usable from a notebook as well as the lab.

Every builder takes plain numbers and labels (numpy arrays, lists, dicts as made by
`engine.capture` / `experiments.inspect`) and returns a `plotly.graph_objects.Figure`.
Export: `to_html(fig, path)` always works; `to_png(fig, path)` needs kaleido and a Chromium.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .capture import band_edges

SEQ = "Viridis"
ARM_COLOURS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]
BAND_DASH = ["solid", "dash", "dot", "dashdot"]


def _short(s: str, n: int = 18) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def _axis_labels(labels: list[str]) -> list[str]:
    """Unique tick text (plotly merges equal category labels): position-prefixed."""
    return [f"{i}:{_short(l)}" for i, l in enumerate(labels)]


def empty_figure(message: str, height: int = 260) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=html.escape(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(height=height, xaxis_visible=False, yaxis_visible=False, margin=dict(l=20, r=20, t=30, b=20))
    return fig


# --------------------------------------------------------------------------------------------------
def attention_heatmap(
    attn: np.ndarray,
    labels: list[str],
    *,
    title: str = "",
    exclude_sink: bool = True,
    row_range: tuple[int, int] | None = None,
    height: int = 620,
) -> go.Figure:
    """Token x token attention [S, S] (rows = queries, sum to 1). The sink column is kept out of the colour range.

    Values are shown as they are (no row renormalisation); the colour scale's top is the 99th
    percentile of the non-sink entries, so the first token's column (the attention sink) does not
    wash everything else out. Its mean mass is written in the title.
    """
    attn = np.asarray(attn, dtype=np.float32)
    S = attn.shape[0]
    r0, r1 = row_range if row_range else (0, S)
    z = attn[r0:r1]
    ticks = _axis_labels(labels)
    body = z[:, 1:] if exclude_sink and S > 1 else z
    vals = body[np.isfinite(body) & (body > 0)]  # the causal zeros above the diagonal do not count
    zmax = float(np.quantile(vals, 0.99)) if vals.size else 1.0
    zmax = max(zmax, 1e-6)
    sink = float(np.nanmean(attn[:, 0])) if S else 0.0
    hover = "query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=ticks,
            y=ticks[r0:r1],
            colorscale=SEQ,
            zmin=0.0,
            zmax=zmax,
            hovertemplate=hover,
            colorbar=dict(title="weight"),
        )
    )
    note = (
        f"colour range 0–{zmax:.3g} (99th pct, first-token column excluded; mean sink mass {sink:.2f})"
        if exclude_sink
        else f"colour range 0–{zmax:.3g}"
    )
    fig.update_layout(
        title=dict(text=f"{html.escape(title)}<br><sup>{note}</sup>", x=0.01),
        height=height,
        margin=dict(l=10, r=10, t=70, b=10),
        xaxis=dict(title="key (attended to)", showticklabels=S <= 80, tickangle=-60),
        yaxis=dict(title="query", autorange="reversed", showticklabels=S <= 80),
    )
    return fig


def overview_grid(
    grid: np.ndarray, metric: str, description: str = "", *, selected: tuple | None = None, height: int = 520
) -> go.Figure:
    """Layer x head grid of one metric (entropy, source/sink/own-answer mass) to pick a head from."""
    grid = np.asarray(grid, dtype=np.float32)
    L, H = grid.shape
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[f"h{h}" for h in range(H)],
            y=[f"L{l}" for l in range(L)],
            colorscale="Cividis" if metric == "entropy" else SEQ,
            hovertemplate="layer %{y} head %{x}<br>" + metric + " %{z:.3f}<extra></extra>",
            colorbar=dict(title=metric),
        )
    )
    if selected is not None:
        l, h = selected
        xs = list(range(H)) if h in (None, "mean") else [int(h)]
        for x in xs:
            fig.add_shape(
                type="rect", x0=x - 0.5, x1=x + 0.5, y0=int(l) - 0.5, y1=int(l) + 0.5, line=dict(color="red", width=2)
            )
    fig.update_layout(
        title=dict(text=f"layer × head: {html.escape(description or metric)}", x=0.01),
        height=height,
        margin=dict(l=10, r=10, t=50, b=10),
        yaxis=dict(autorange="reversed"),
    )
    return fig


# --------------------------------------------------------------------------------------------------
def memory_read_figure(
    tokens: list[str],
    slots: list[dict],
    weights: np.ndarray,
    *,
    title: str = "",
    current_turn: int | None = None,
    height: int = 520,
) -> go.Figure:
    """What the mechanism read for each generated token: weights [n_tokens, n_slots] over labelled slots.

    Rows are the generated tokens (the read behind token q was made at position q-1); columns are
    memory slots labelled by their source token, role and turn. Slots from earlier turns and from
    the current turn are told apart in the hover and by a divider line.
    """
    W = np.asarray(weights, dtype=np.float32)
    if W.size == 0 or not slots:
        return empty_figure("no memory reads for this turn (observer arm, or the memory was empty)")
    xt = [f"{i}:{_short(s.get('text', s.get('label', '?')), 12)}" for i, s in enumerate(slots)]
    yt = _axis_labels(tokens)
    custom = np.array([[s.get("label", str(s.get("key"))) for s in slots]] * W.shape[0], dtype=object)
    signed = bool(np.isfinite(W).any() and np.nanmin(W) < 0)  # e.g. a linear memory's implicit attention
    top = float(np.nanmax(np.abs(W))) if np.isfinite(W).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=W,
            x=xt,
            y=yt,
            customdata=custom,
            colorscale="RdBu_r" if signed else SEQ,
            zmin=-top if signed else 0.0,
            zmax=top if signed else (top or 1.0),
            hovertemplate="token %{y}<br>slot %{customdata}<br>weight %{z:.4f}<extra></extra>",
            colorbar=dict(title="read weight"),
        )
    )
    if current_turn is not None:
        earlier = [i for i, s in enumerate(slots) if s.get("turn") is not None and s["turn"] < current_turn]
        if earlier and len(earlier) < len(slots):
            fig.add_vline(x=max(earlier) + 0.5, line=dict(color="white", width=2, dash="dash"))
    fig.update_layout(
        title=dict(
            text=html.escape(title) + "<br><sup>rows: generated tokens · columns: memory "
            "slots (source token @position, turn, role); dashed line: earlier turns | this turn"
            "</sup>",
            x=0.01,
        ),
        height=height,
        margin=dict(l=10, r=10, t=70, b=10),
        xaxis=dict(tickangle=-60, showticklabels=len(slots) <= 120),
        yaxis=dict(autorange="reversed", showticklabels=len(tokens) <= 120),
    )
    return fig


def scalar_families(names) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """Split scalar names into single ones and families `<family> <k>` (e.g. a memory bank's
    `chapter 0`, `chapter 1`, ...): a family of two or more is drawn as one heatmap (tokens x members)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        head, _, tail = n.rpartition(" ")
        if head and tail.isdigit():
            groups.setdefault(head, []).append((int(tail), n))
    families = {h: sorted(m) for h, m in groups.items() if len(m) >= 2}
    members = {n for m in families.values() for _, n in m}
    return [n for n in names if n not in members], families


def scalar_curves_figure(
    curves: dict | None,
    labels: list[str],
    *,
    reply_span: tuple[int, int] | None = None,
    title: str = "",
    height_per: int = 170,
) -> go.Figure:
    """Each named read scalar (e.g. surprise, write strength, memory norm) as a curve over the
    transcript's positions, one line per layer, one panel per scalar; a family of numbered scalars
    (a memory bank's per-chapter weights) as one heatmap, position x member, averaged over layers —
    the chapter-usage view; the focus reply shaded."""
    if not curves or not curves.get("layers") or not curves.get("positions"):
        return empty_figure(
            "no read scalars (observer arm, a mechanism without scalars, or a capture made "
            "before curves were recorded: recompute)"
        )
    from plotly.subplots import make_subplots

    names = sorted({n for e in curves["layers"] for n in e["series"]})
    singles, families = scalar_families(names)
    pos = curves["positions"]
    text = [labels[p] if 0 <= p < len(labels) else "?" for p in pos]
    panels = [(n, None) for n in singles] + [(f, m) for f, m in sorted(families.items())]
    fig = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[n.replace("_", " ") if m is None else f"{n} usage (mean over layers)" for n, m in panels],
    )
    for i, (name, members) in enumerate(panels, start=1):
        if members is not None:
            fig.add_trace(_family_heatmap(name, members, curves["layers"], pos, text), row=i, col=1)
        else:
            for trace in _scalar_lines(name, curves["layers"], pos, text, legend=i == 1):
                fig.add_trace(trace, row=i, col=1)
        if reply_span is not None and reply_span[1] > reply_span[0]:
            fig.add_vrect(
                x0=reply_span[0] - 1.5,
                x1=reply_span[1] - 1.5,
                fillcolor="orange",
                opacity=0.12,
                line_width=0,
                row=i,
                col=1,
            )
    heights = [height_per if m is None else max(height_per, 14 * len(m) + 60) for _, m in panels]
    fig.update_layout(
        title=dict(
            text=html.escape(title) + "<br><sup>per token and layer, over the transcript "
            "(x: position of the reading token); shaded: the reads behind this turn's reply"
            "</sup>",
            x=0.01,
        ),
        height=90 + sum(heights),
        margin=dict(l=10, r=10, t=80, b=10),
    )
    fig.update_xaxes(title_text="position", row=len(panels), col=1)
    return fig


def _family_heatmap(name: str, members: list, layers: list[dict], pos: list[int], text: list[str]) -> go.Heatmap:
    """A numbered scalar family (a bank's per-chapter weights) as position x member, mean over layers."""
    z = np.full((len(members), len(pos)), np.nan)
    for j, (_, member) in enumerate(members):
        rows = [e["series"][member] for e in layers if member in e["series"]]
        vals = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
        if vals.size and not np.isnan(vals).all():
            z[j] = np.nanmean(vals, axis=0)
    return go.Heatmap(
        x=pos,
        y=[f"{name} {k}" for k, _ in members],
        z=z,
        colorscale="Blues",
        showscale=False,
        customdata=np.array([text] * len(members), dtype=object),
        hovertemplate="%{y}: %{z:.3f}<br>@%{x} %{customdata}<extra></extra>",
    )


def _scalar_lines(name: str, layers: list[dict], pos: list[int], text: list[str], legend: bool) -> list[go.Scatter]:
    """One read scalar as one line per layer (the legend shown on the first panel only)."""
    out = []
    for e in layers:
        ys = e["series"].get(name)
        if ys is None:
            continue
        out.append(
            go.Scatter(
                x=pos,
                y=[np.nan if v is None else v for v in ys],
                mode="lines",
                name=f"layer {e['layer']}",
                legendgroup=str(e["layer"]),
                showlegend=legend,
                customdata=text,
                hovertemplate=f"{html.escape(name)} %{{y:.4g}}<br>@%{{x}} %{{customdata}}"
                f"<extra>layer {e['layer']}</extra>",
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
STRIP_PER_ROW = 12  # tokens per row: at the lab's default width a cell holds a 14-character label at 13 px
STRIP_ROWS_PER_PAGE = 10  # longer replies are paged (buttons above the strip) rather than shrunk
STRIP_FONT_PX = 13
STRIP_LABEL_CHARS = 14


def _strip_label(token: str) -> str:
    """A token as the strip writes it: without its spaces (the hover has it exactly), a newline as ⏎, a
    blank token as ␣, escaped, cut only past 14 characters."""
    t = str(token).replace("\n", "⏎").strip(" ")
    return html.escape(_short(t or "␣", STRIP_LABEL_CHARS))


def _strip_pages(rows: int, per_row: int, n: int, rows_per_page: int) -> list[dict]:
    """Plotly buttons that show one page of rows each (the y axis runs top-down, rows are reversed)."""
    pages = []
    for first in range(0, rows, rows_per_page):
        last = min(rows, first + rows_per_page)
        pages.append(
            dict(
                label=f"tokens {first * per_row + 1}–{min(n, last * per_row)}",
                method="relayout",
                args=[{"yaxis.range": [first + rows_per_page - 0.5, first - 0.5]}],
            )
        )
    return pages


def divergence_strip(
    tokens: list[str],
    kl: list[float],
    *,
    max_abs_dlogit: list[float] | None = None,
    top1_agree: list[bool] | None = None,
    observer_top: list[list] | None = None,
    summary: dict | None = None,
    title: str = "",
    per_row: int = STRIP_PER_ROW,
    rows_per_page: int = STRIP_ROWS_PER_PAGE,
) -> go.Figure:
    """The reply as rows of tokens coloured by KL(P_arm || P_observer); hover: observer's top alternatives.

    Labels are drawn at a fixed 13 px (plotly would otherwise shrink them to fit, ~6 px at 24 per row)
    and cut only past 14 characters; a reply of more than `rows_per_page` rows is paged with buttons."""
    n = len(tokens)
    if n == 0:
        return empty_figure("empty reply")
    rows = (n + per_row - 1) // per_row
    z, text, hover = _strip_cells(tokens, kl, max_abs_dlogit, top1_agree, observer_top, rows, per_row)
    top = max(float(np.nanmax(z)), 1e-6)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            textfont=dict(size=STRIP_FONT_PX),
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Reds",
            zmin=0.0,
            zmax=top,
            xgap=2,
            ygap=2,
            colorbar=dict(title="KL"),
        )
    )
    head = ""
    if summary:
        head = (
            f"KL mean {summary.get('kl_mean', 0):.4f} · max {summary.get('kl_max', 0):.4f} · "
            f"max |Δlogit| {summary.get('max_abs_dlogit', 0):.3f} · mean |Δlogit| "
            f"{summary.get('mean_abs_dlogit', 0):.4f} · top-1 agreement {summary.get('top1_agreement', 1):.0%}"
        )
    shown = min(rows, rows_per_page)
    paged = rows > rows_per_page
    if paged:
        head += f"{' · ' if head else ''}{n} tokens in {rows} rows: pick a page above the strip"
    fig.update_layout(
        title=dict(text=f"{html.escape(title)}<br><sup>{head}</sup>", x=0.01),
        # Gradio's Plot fails below ~80 px of plot area ('axis scaling'): keep room
        height=150 + 40 * shown + (40 if paged else 0),
        margin=dict(l=10, r=10, t=70 + (40 if paged else 0), b=10),
        xaxis=dict(visible=False),
        yaxis=dict(visible=False, autorange="reversed"),
    )
    if paged:
        fig.update_layout(
            yaxis=dict(visible=False, autorange=False, range=[shown - 0.5, -0.5]),
            updatemenus=[
                dict(
                    type="buttons",
                    direction="right",
                    showactive=True,
                    active=0,
                    x=0.0,
                    xanchor="left",
                    y=1.0,
                    yanchor="bottom",
                    pad=dict(t=4, b=4),
                    buttons=_strip_pages(rows, per_row, n, rows_per_page),
                )
            ],
        )
    return fig


def _strip_cells(tokens, kl, max_abs_dlogit, top1_agree, observer_top, rows: int, per_row: int):
    """The strip's (KL, label, hover) grids, row-major: token i sits at divmod(i, per_row)."""
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    hover = np.full((rows, per_row), "", dtype=object)
    for i in range(len(tokens)):
        r, c = divmod(i, per_row)
        z[r, c] = kl[i]
        text[r, c] = _strip_label(tokens[i])
        alts = ""
        if observer_top and i < len(observer_top):
            alts = "<br>".join(f"{html.escape(str(t))!s}: {p:.3f}" for t, p in observer_top[i])
        extra = ""
        if max_abs_dlogit is not None:
            extra += f"<br>max |Δlogit| {max_abs_dlogit[i]:.3f}"
        if top1_agree is not None:
            extra += f"<br>top-1 {'agrees' if top1_agree[i] else 'DIFFERS'}"
        hover[r, c] = f"#{i + 1} {html.escape(tokens[i])}<br>KL {kl[i]:.4f}{extra}<br><b>observer top:</b><br>{alts}"
    return z, text, hover


# --------------------------------------------------------------------------------------------------
def source_attention_curves(arms: list[dict], n_layers: int, bands: int = 3, *, title: str = "") -> go.Figure:
    """'Context rot': share of attention on system prompt + first user message over generated position.

    `arms`: [{'label', 'curve': [L][n] or None}]; one line per arm and layer band (thirds by default).
    """
    fig = go.Figure()
    edges = band_edges(n_layers, bands)
    for i, arm in enumerate(arms):
        curve = arm.get("curve")
        if curve is None:
            continue
        C = np.asarray(curve, dtype=np.float32)
        for b, (a, e) in enumerate(edges):
            y = C[a:e].mean(0)
            fig.add_trace(
                go.Scatter(
                    x=list(range(len(y))),
                    y=y,
                    mode="lines+markers",
                    name=f"{arm['label']} · layers {a}-{e - 1}",
                    line=dict(color=ARM_COLOURS[i % len(ARM_COLOURS)], dash=BAND_DASH[b % len(BAND_DASH)]),
                    customdata=(arm.get("tokens") or [""] * len(y))[: len(y)],
                    hovertemplate="token %{x} %{customdata}<br>share %{y:.3f}<extra></extra>",
                )
            )
    if not fig.data:
        return empty_figure("no source-attention curve for this turn")
    fig.update_layout(
        title=dict(text=html.escape(title or "attention on system prompt + first user message"), x=0.01),
        xaxis_title="generated token",
        yaxis_title="share of attention mass",
        height=420,
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(font=dict(size=10)),
    )
    return fig


def turn_summary_figure(rows: list[dict], *, title: str = "") -> go.Figure:
    """Per arm and turn: memory size, and mean read weight on the model's own earlier answers (arms named from 1)."""
    if not rows:
        return empty_figure("no turns")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("memory size (entries)", "read weight on own earlier answers"))
    labels = sorted({(r["arm"], r["label"]) for r in rows})
    for i, (arm, label) in enumerate(labels):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["turn"])
        x = [r["turn"] + 1 for r in mine]  # turns counted from 1, as every view counts
        colour = ARM_COLOURS[i % len(ARM_COLOURS)]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[r["memory_size"] for r in mine],
                name=f"arm {arm + 1}: {label}",
                mode="lines+markers",
                line=dict(color=colour),
                legendgroup=str(arm),
            ),
            1,
            1,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[r["own_answer_read"] for r in mine],
                name=f"arm {arm + 1}: {label}",
                mode="lines+markers",
                line=dict(color=colour),
                legendgroup=str(arm),
                showlegend=False,
            ),
            1,
            2,
        )
    fig.update_xaxes(title_text="turn", dtick=1)
    fig.update_layout(
        title=dict(text=html.escape(title or "across the dialogue"), x=0.01),
        height=380,
        margin=dict(l=10, r=10, t=70, b=10),
    )
    return fig


# --------------------------------------------------------------------------------------------------
def to_html(fig: go.Figure, path) -> Path:
    """A standalone HTML file (plotly.js inlined: opens offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


class PngExportError(RuntimeError):
    pass


def _chromium() -> str | None:
    for cand in (
        os.environ.get("BROWSER_PATH"),
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        shutil.which("chromium"),
        shutil.which("google-chrome"),
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def png_available() -> tuple[bool, str]:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, "PNG export needs the 'kaleido' package (pip install kaleido); HTML export works without it"
    if _chromium() is None:
        return False, "PNG export needs a Chromium (apt-get install chromium, or set BROWSER_PATH); HTML works"
    return True, ""


def to_png(fig: go.Figure, path, *, scale: float = 2.0) -> Path:
    """A PNG via kaleido, using the system Chromium (BROWSER_PATH) — raises PngExportError if unavailable."""
    ok, why = png_available()
    if not ok:
        raise PngExportError(why)
    os.environ.setdefault("BROWSER_PATH", _chromium())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(str(path), format="png", scale=scale)
    except Exception as e:  # kaleido's errors are long; one line for a person
        raise PngExportError(
            f"PNG export failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        )
    return path
