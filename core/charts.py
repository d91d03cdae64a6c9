"""Charts in the paper's style (Altair), and their export to PNG/SVG (vl-convert, no browser needed).

- `heatmap`: a causal-trace table, tokens as rows (corrupted tokens marked with "*"), layers as columns,
  colour = the score after restoring that one state (one colour scheme per kind, as the paper's figures).
  `trace_heatmap` and `sentiment_heatmap` fill it from a TraceResult / SentimentTrace.
- `category_lines`: average indirect effect per token category over the layers (the paper's line plots);
  `aie_lines` fills it from an AIEResult.
- `confusion_chart`: a 2 x 2 confusion matrix with counts.
- `sweep_chart`: edit success by layer (lines, left axis) beside the trace's MLP effect at the subject's last
  token (bars, right axis), as the paper compares them; rows from core/sweep.py or core/sentiment_edit.py.
- `scores_frame` / `tables_csv`: the tables as tidy rows for download.

No Streamlit here: the app and scripts share these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

KIND_LABELS = {"hidden": "single hidden state", "mlp": "MLP output", "attn": "attention output"}
KIND_SCHEMES = {"hidden": "purples", "mlp": "greens", "attn": "reds"}
CATEGORY_COLOURS = ["#1f77b4", "#9467bd", "#d62728", "#2ca02c", "#8c564b", "#ff7f0e"]
ROW_HEIGHT = 20  # pixels per token row


def token_labels(tokens: Sequence[str], marked: tuple[int, int] | None) -> list[str]:
    """Row labels: position and token (white-space-only tokens escaped), "*" after the corrupted ones."""
    start, end = marked if marked is not None else (0, 0)
    labels = []
    for i, token in enumerate(tokens):
        text = token.strip() if token.strip() else repr(token)[1:-1] or "·"
        labels.append(f"{i:>2} {text}{'*' if start <= i < end else ''}")
    return labels


def heatmap(
    tokens: Sequence[str],
    table: np.ndarray,
    kind: str,
    *,
    marked: tuple[int, int] | None,
    title: str,
    subtitle: str | Sequence[str] = "",
    legend: str,
    baseline: float | None = None,
    width: int | str = 360,
) -> alt.Chart:
    """Tokens x layers table as a heat map; `baseline` (the corrupted score) adds an "effect" tooltip."""
    table = np.asarray(table, dtype=float)
    if table.ndim != 2 or table.shape[0] != len(tokens):
        raise ValueError(f"table shape {table.shape} does not match {len(tokens)} tokens")
    labels = token_labels(tokens, marked)
    rows, layers = np.meshgrid(np.arange(table.shape[0]), np.arange(table.shape[1]), indexing="ij")
    frame = pd.DataFrame(
        {
            "token": [labels[r] for r in rows.ravel()],
            "position": rows.ravel(),
            "layer": layers.ravel(),
            "score": table.ravel(),
        }
    )
    tooltip = [
        alt.Tooltip("token:N", title="token"),
        alt.Tooltip("layer:O", title="layer"),
        alt.Tooltip("score:Q", title=legend, format=".4f"),
    ]
    if baseline is not None:
        frame["effect"] = frame["score"] - baseline
        tooltip.append(alt.Tooltip("effect:Q", title="indirect effect", format="+.4f"))
    scheme = KIND_SCHEMES.get(kind, "viridis")
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X(
                "layer:O",
                title=f"layer of the restored {KIND_LABELS.get(kind, kind)}",
                axis=alt.Axis(labelAngle=0, labelOverlap=True),
            ),
            y=alt.Y("token:N", sort=labels, title=None, axis=alt.Axis(labelLimit=180, labelOverlap=False)),
            color=alt.Color(
                "score:Q",
                title=legend,
                scale=alt.Scale(scheme=scheme, domainMin=float(min(0.0, np.nanmin(table)))),
                legend=alt.Legend(orient="bottom", gradientLength=220, titleLimit=320),
            ),
            tooltip=tooltip,
        )
        .properties(
            title=alt.TitleParams(title, subtitle=subtitle, anchor="start", fontSize=13, subtitleFontSize=11),
            width=width,
            height=alt.Step(ROW_HEIGHT),
        )
    )


def trace_heatmap(result, kind: str, width: int | str = 360) -> alt.Chart:
    """The heat map of one kind of a core.tracing.TraceResult."""
    answer = result.answer
    return heatmap(
        result.tokens,
        result.scores[kind],
        kind,
        marked=result.subject_range,
        title=f"Restoring the {KIND_LABELS.get(kind, kind)}",
        subtitle=[
            f"answer {answer!r}",
            f"p = {result.clean_score:.3f} clean, {result.corrupted_score:.3f} with the subject (*) corrupted",
        ],
        legend=f"p({answer.strip() or repr(answer)}) after restoring",
        baseline=result.corrupted_score,
        width=width,
    )


def sentiment_heatmap(trace, kind: str, width: int | str = 360) -> alt.Chart:
    """The heat map of one kind of a core.sentiment_trace.SentimentTrace (colour = p(positive))."""
    return heatmap(
        trace.tokens,
        trace.scores[kind],
        kind,
        marked=trace.corrupt_range,
        title=f"Restoring the {KIND_LABELS.get(kind, kind)}",
        subtitle=[
            f"p(positive) = {trace.clean_score:.3f} clean",
            f"{trace.corrupted_score:.3f} with the text (*) corrupted",
        ],
        legend="p(positive) after restoring",
        baseline=trace.corrupted_score,
        width=width,
    )


def category_lines(
    table: Sequence[Sequence[float]],
    categories: Sequence[str],
    kind: str,
    *,
    title: str,
    subtitle: str = "",
    y_title: str = "average indirect effect",
    width: int | str = 360,
) -> alt.Chart:
    """One line per token category over the layers (rows of `table` in `categories` order; NaN rows skipped)."""
    table = np.asarray(table, dtype=float)
    records = [
        {"category": category, "layer": layer, "effect": value}
        for category, row in zip(categories, table)
        for layer, value in enumerate(row)
        if np.isfinite(value)
    ]
    frame = pd.DataFrame(records, columns=["category", "layer", "effect"])
    return (
        alt.Chart(frame)
        .mark_line(point=True, strokeWidth=2)
        .encode(
            x=alt.X(
                "layer:Q",
                title=f"layer of the restored {KIND_LABELS.get(kind, kind)}",
                scale=alt.Scale(domain=[0, table.shape[1] - 1]),
            ),
            y=alt.Y("effect:Q", title=y_title),
            color=alt.Color(
                "category:N",
                sort=list(categories),
                scale=alt.Scale(domain=list(categories), range=CATEGORY_COLOURS[: len(categories)]),
                legend=alt.Legend(orient="bottom", columns=2, title="token"),
            ),
            tooltip=[
                alt.Tooltip("category:N", title="token"),
                alt.Tooltip("layer:Q", title="layer"),
                alt.Tooltip("effect:Q", title=y_title, format="+.4f"),
            ],
        )
        .properties(
            title=alt.TitleParams(title, subtitle=subtitle, anchor="start", fontSize=13, subtitleFontSize=11),
            width=width,
            height=220,
        )
    )


def aie_lines(result, kind: str, width: int | str = 360) -> alt.Chart:
    """The line plot of one kind of a core.aie.AIEResult."""
    from core.aie import CATEGORIES

    return category_lines(
        result.tables[kind],
        CATEGORIES,
        kind,
        title=f"Average indirect effect of the {KIND_LABELS.get(kind, kind)}",
        subtitle=(
            f"{result.n} facts; mean p(answer) {result.mean_clean_score:.3f} clean, "
            f"{result.mean_corrupted_score:.3f} corrupted"
        ),
        width=width,
    )


def confusion_chart(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "Confusion matrix"
) -> alt.Chart:
    """Counts of (true, predicted) classes with the numbers written in the cells."""
    frame = pd.DataFrame(
        [
            {"true": labels[t], "predicted": labels[p], "count": int(matrix[t][p])}
            for t in range(len(labels))
            for p in range(len(labels))
        ]
    )
    base = alt.Chart(frame).encode(
        x=alt.X("predicted:N", sort=list(labels), title="predicted", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("true:N", sort=list(labels), title="true label"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None),
        tooltip=["true:N", "predicted:N", "count:Q"],
    )
    threshold = max(frame["count"].max() / 2, 1)
    text = base.mark_text(fontSize=16).encode(
        text="count:Q",
        color=alt.condition(alt.datum.count > threshold, alt.value("white"), alt.value("black")),
    )
    return (cells + text).properties(title=title, width=220, height=160)


# --- tables and export --------------------------------------------------------------------------------------


def sweep_chart(
    rows: Sequence[dict], measures: dict[str, str], effect: str = "trace_effect", width: int | str = 420
) -> alt.LayerChart:
    """Layer sweep: one line per measure (`measures`: row key -> label, shares in [0, 1]) over the layers, and
    the MLP effect (`effect` row key) as grey bars on an axis of its own."""
    frame = pd.DataFrame(
        [{"layer": r["layer"], "measure": label, "value": r[key]} for r in rows for key, label in measures.items()]
    )
    effects = pd.DataFrame([{"layer": r["layer"], "effect": r[effect]} for r in rows if r.get(effect) is not None])
    x = alt.X("layer:Q", title="edited layer", axis=alt.Axis(tickMinStep=1))
    lines = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("value:Q", title="share of prompts / texts", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("measure:N", title=None, legend=alt.Legend(orient="bottom")),
            tooltip=["layer:Q", "measure:N", alt.Tooltip("value:Q", format=".3f")],
        )
    )
    bars = (
        alt.Chart(effects)
        .mark_bar(opacity=0.3, color="gray")
        .encode(
            x=x,
            y=alt.Y("effect:Q", title="MLP effect at the subject's last token"),
            tooltip=["layer:Q", alt.Tooltip("effect:Q", format="+.4f")],
        )
    )
    return alt.layer(bars, lines).resolve_scale(y="independent").properties(width=width, height=260)


def scores_frame(tokens: Sequence[str], scores: dict[str, np.ndarray], marked: tuple[int, int] | None) -> pd.DataFrame:
    """Tidy rows (kind, position, token, corrupted, layer, score) of every kind's table."""
    start, end = marked if marked is not None else (0, 0)
    records = []
    for kind, table in scores.items():
        table = np.asarray(table, dtype=float)
        for position in range(table.shape[0]):
            for layer in range(table.shape[1]):
                records.append(
                    {
                        "kind": kind,
                        "position": position,
                        "token": tokens[position],
                        "corrupted": start <= position < end,
                        "layer": layer,
                        "score": float(table[position, layer]),
                    }
                )
    return pd.DataFrame(records, columns=["kind", "position", "token", "corrupted", "layer", "score"])


def tables_csv(tokens: Sequence[str], scores: dict[str, np.ndarray], marked: tuple[int, int] | None) -> str:
    return scores_frame(tokens, scores, marked).to_csv(index=False)


def to_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """The chart as PNG bytes (rendered by vl-convert, no browser)."""
    import vl_convert

    return vl_convert.vegalite_to_png(chart.to_json(), scale=scale)


def to_svg(chart: alt.TopLevelMixin) -> str:
    """The chart as an SVG document."""
    import vl_convert

    return vl_convert.vegalite_to_svg(chart.to_json())
