"""core/charts.py: the heat maps, line plots and exports carry the numbers they are given."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import charts
from core.aie import CATEGORIES, AIEResult
from core.sentiment_trace import SentimentTrace
from core.tracing import TraceResult

TOKENS = ["The", " E", "iff", "el", " Tower", " is", " in"]


@pytest.fixture
def result() -> TraceResult:
    rng = np.random.RandomState(0)
    return TraceResult(
        model="m",
        prompt="The Eiffel Tower is in",
        subject="The Eiffel Tower",
        tokens=TOKENS,
        input_ids=list(range(7)),
        subject_range=(0, 5),
        answer=" Paris",
        answer_id=9,
        clean_score=0.7,
        corrupted_score=0.05,
        scores={k: rng.rand(7, 4) for k in ("hidden", "mlp", "attn")},
        noise=0.3,
        samples=10,
        window=10,
        engine="fast",
        seconds=1.0,
    )


def data_of(chart) -> pd.DataFrame:
    spec = chart.to_dict()
    return pd.DataFrame(spec["datasets"][spec["data"]["name"]])


def test_token_labels_mark_the_corrupted_span_and_stay_unique():
    labels = charts.token_labels(["a", " b", " b", "\n"], (1, 3))
    assert labels == [" 0 a", " 1 b*", " 2 b*", " 3 \\n"]
    assert len(set(labels)) == 4


def test_trace_heatmap_holds_every_cell_and_says_what_the_colour_is(result):
    chart = charts.trace_heatmap(result, "mlp")
    frame = data_of(chart)
    assert len(frame) == 7 * 4
    table = frame.pivot(index="position", columns="layer", values="score").to_numpy()
    np.testing.assert_allclose(table, result.scores["mlp"])
    np.testing.assert_allclose(frame["effect"], frame["score"] - 0.05)
    assert frame["token"].str.endswith("*").sum() == 4 * 5  # 5 subject tokens x 4 layers
    spec = chart.to_dict()
    assert spec["mark"]["type"] == "rect"
    assert spec["encoding"]["y"]["sort"] == charts.token_labels(TOKENS, (0, 5))  # prompt order, top to bottom
    assert spec["encoding"]["color"]["title"] == "p(Paris) after restoring"
    assert spec["encoding"]["color"]["scale"]["scheme"] == "greens"
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "' Paris'" in subtitle and "0.700" in subtitle and "0.050" in subtitle
    assert "MLP" in spec["title"]["text"]
    assert {t["field"] for t in spec["encoding"]["tooltip"]} == {"token", "layer", "score", "effect"}


def test_each_kind_has_its_own_colour_scheme(result):
    schemes = {charts.trace_heatmap(result, k).to_dict()["encoding"]["color"]["scale"]["scheme"] for k in result.scores}
    assert schemes == {"purples", "greens", "reds"}


def test_heatmap_rejects_a_table_that_does_not_fit_the_tokens():
    with pytest.raises(ValueError):
        charts.heatmap(TOKENS, np.zeros((3, 4)), "hidden", marked=None, title="t", legend="p")


def test_sentiment_heatmap_is_titled_with_the_positive_probability():
    trace = SentimentTrace(
        text="great",
        prompt="great I am feeling",
        tokens=["great", " I", " am", " feeling"],
        text_range=(0, 1),
        corrupt_range=(0, 1),
        clean_score=0.9,
        corrupted_score=0.4,
        scores={"attn": np.full((4, 3), 0.5)},
        samples=2,
        window=10,
        noise=0.3,
        seconds=1.0,
    )
    spec = charts.sentiment_heatmap(trace, "attn").to_dict()
    assert spec["encoding"]["color"]["title"] == "p(positive) after restoring"
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "0.900" in subtitle and "0.400" in subtitle


def test_aie_lines_draw_one_line_per_category_and_skip_missing_values():
    table = np.arange(6 * 5, dtype=float).reshape(6, 5)
    table[1] = np.nan  # e.g. no middle subject tokens
    result = AIEResult(
        model="m",
        n=3,
        skipped=1,
        seconds=2.0,
        tables={"hidden": table.tolist()},
        counts={"hidden": [3] * 6},
        mean_clean_score=0.5,
        mean_corrupted_score=0.1,
    )
    chart = charts.aie_lines(result, "hidden")
    frame = data_of(chart)
    assert set(frame["category"]) == set(CATEGORIES) - {CATEGORIES[1]}
    assert len(frame) == 5 * 5
    last = frame[frame["category"] == "last token"].sort_values("layer")["effect"].tolist()
    assert last == table[5].tolist()
    spec = chart.to_dict()
    assert spec["mark"]["type"] == "line"
    assert "3 facts" in spec["title"]["subtitle"]


def test_confusion_chart_writes_the_counts():
    chart = charts.confusion_chart([[5, 1], [2, 7]], ["negative", "positive"])
    spec = chart.to_dict()
    frame = pd.DataFrame(spec["datasets"][spec["data"]["name"]])
    got = {(r.true, r.predicted): r.count for r in frame.itertuples()}
    assert got == {
        ("negative", "negative"): 5,
        ("negative", "positive"): 1,
        ("positive", "negative"): 2,
        ("positive", "positive"): 7,
    }


def test_tables_csv_round_trips_the_scores(result):
    frame = pd.read_csv(
        pd.io.common.StringIO(charts.tables_csv(result.tokens, result.scores, result.subject_range)),
        keep_default_na=False,
    )
    assert len(frame) == 3 * 7 * 4
    for kind, table in result.scores.items():
        part = frame[frame["kind"] == kind].pivot(index="position", columns="layer", values="score").to_numpy()
        np.testing.assert_allclose(part, table)
    assert frame.groupby("position")["corrupted"].first().tolist() == [True] * 5 + [False] * 2


def test_png_and_svg_export(result):
    chart = charts.trace_heatmap(result, "hidden")
    png = charts.to_png(chart, scale=1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    svg = charts.to_svg(chart)
    assert svg.lstrip().startswith("<svg") and "Paris" in svg
    json.loads(chart.to_json())  # the spec itself is plain JSON


def test_sweep_chart_draws_each_measure_by_layer_beside_the_effect():
    rows = [
        {"layer": 0, "efficacy": 1.0, "neighborhood": 0.5, "trace_effect": 0.02},
        {"layer": 3, "efficacy": 0.5, "neighborhood": 1.0, "trace_effect": None},  # not traced: no bar
        {"layer": 6, "efficacy": 0.0, "neighborhood": 1.0, "trace_effect": -0.01},
    ]
    chart = charts.sweep_chart(rows, {"efficacy": "efficacy", "neighborhood": "kept neighbours"})
    spec = chart.to_dict()
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["bar", "line"]
    assert spec["resolve"]["scale"]["y"] == "independent"
    datasets = [pd.DataFrame(data) for data in spec["datasets"].values()]
    lines = next(d for d in datasets if "measure" in d)
    bars = next(d for d in datasets if "effect" in d)
    assert sorted(lines[lines["measure"] == "kept neighbours"]["value"]) == [0.5, 1.0, 1.0]
    assert bars["layer"].tolist() == [0, 6] and bars["effect"].tolist() == [0.02, -0.01]
