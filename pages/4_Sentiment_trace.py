"""Sentiment trace: fit the "I am feeling" proxy (core.sentiment), then trace a text with the proxy's
p(positive) as the restored quantity (core.sentiment_trace)."""

from __future__ import annotations

import json

import streamlit as st

from core import charts
from core.budget import check_trace
from core.errors import UserError
from core.sentiment import CLASSES
from core.sentiment_trace import text_token_range
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS
from ui.common import (
    bar_progress,
    cancel_button,
    fit_proxy,
    page,
    page_model,
    show_error,
    show_size,
    trace_sentiment_progressively,
)

page("Sentiment trace", ":material/sentiment_satisfied:")
st.title("Sentiment trace")
st.markdown(
    'Where does the model read the sentiment of a text? The **proxy** appends *" I am feeling"* and compares '
    'p(" good") with p(" bad") through a logistic regression. A sentiment trace corrupts the text\'s tokens '
    "and restores one state at a time, recording the proxy's **probability of positive**."
)

lm = page_model()
state = st.session_state

st.subheader("1 · Fit the proxy")
with st.container(border=True):
    source = st.radio(
        "Labelled texts",
        ["The project's set (data/sentiment_texts.tsv)", "Upload a CSV/TSV file"],
        key="sent_source",
        horizontal=True,
    )
    upload = None
    if source.startswith("Upload"):
        upload = st.file_uploader(
            "A header row with columns text and label (negative / neutral / positive, or 0 / 1)",
            type=["csv", "tsv", "txt"],
            key="sent_upload",
        )
    st.caption("70% of the texts fit the proxy, the other 30% measure it (neutral rows are dropped).")
    fit = st.button("Fit the proxy", type="primary", key="sent_fit")

if fit:
    try:
        if source.startswith("Upload") and upload is None:
            raise UserError("upload a CSV or TSV file first")
        bar = st.progress(0.0, text="reading the texts with the model")
        cancel = cancel_button("sent_fit_cancel")
        data, name = (None, "") if upload is None else (upload.getvalue(), upload.name)
        report, proxy = fit_proxy(lm, data, name, progress=bar_progress(bar, "texts read"))
        bar.empty()
        cancel.empty()
        state["sent_proxy"] = (lm.name, report, proxy, name or "data/sentiment_texts.tsv")
        state.pop("sent_trace", None)
    except Exception as err:  # the page's error boundary: one message, details in the log
        show_error(err, "fitting the proxy")

fitted = state.get("sent_proxy")
if fitted is not None and fitted[0] == lm.name:
    _, report, proxy, source_name = fitted
    left, right = st.columns([2, 1], gap="large")
    with left:
        m = st.columns(4)
        m[0].metric("Test accuracy", f"{report.accuracy:.1%}")
        m[1].metric("Train accuracy", f"{report.train_accuracy:.1%}")
        m[2].metric("Test texts", report.n)
        m[3].metric("Train texts", report.n_train)
        st.caption(
            f"Proxy fitted on {source_name}: logistic regression on log p({proxy.words[0]!r}) and "
            f"log p({proxy.words[1]!r}) after {proxy.suffix!r}."
        )
    with right:
        st.altair_chart(
            charts.confusion_chart(report.confusion, CLASSES, "Confusion matrix (test texts)"),
            width="content",
            height=270,
        )
else:
    st.info("Fit the proxy first: the trace restores its probability of *positive*.")

st.subheader("2 · Trace a text")
with st.container(border=True):
    text = st.text_input("Text", "What a wonderful, sunny day at the beach!", key="sent_text")
    c1, c2, c3 = st.columns([3, 1, 1])
    kinds = c1.multiselect(
        "Kinds", KINDS, default=list(KINDS), key="sent_kinds", format_func=lambda k: charts.KIND_LABELS[k]
    )
    samples = c2.number_input("Samples", 1, 100, DEFAULT_SAMPLES, key="sent_samples")
    window = c3.number_input("Window", 1, 50, DEFAULT_WINDOW, key="sent_window")
    run = st.button("Trace", type="primary", key="sent_run", disabled=fitted is None)


def size():
    ids, _ = text_token_range(lm, text, fitted[2].suffix)
    return check_trace(lm, len(ids), samples=int(samples), kinds=max(len(kinds), 1))


if fitted is not None:
    show_size(size)

stop = st.button("Stop", key="sent_stop", help="Stop the exact trace; what is done so far stays shown.")
if stop:
    st.info("Stopped: the estimate, and the exact rows done before the stop, are shown below.")

if run and fitted is not None:
    if not kinds:
        show_error(UserError("choose at least one kind to trace"))
    else:
        bar = st.progress(0.0, text="preparing: clean and corrupted runs")
        cancel = cancel_button("sent_trace_cancel")
        note = st.empty()
        slots = {kind: col.empty() for kind, col in zip(kinds, st.columns(len(kinds)))}

        def draw_kind(trace, view, kind: str) -> None:
            with slots[kind].container():
                st.altair_chart(charts.sentiment_heatmap(trace, kind, width="container"), width="stretch")
                st.caption(view.label(kind))

        def draw(trace, view, kind: str | None) -> None:
            state["sent_trace"] = trace
            state["sent_labels"] = {k: view.label(k) for k in trace.scores}
            if kind is None:
                if view.forecast:
                    note.info(
                        f"Estimate shown in {view.result.seconds:.1f} s. The exact trace takes about "
                        f"{view.forecast:.0f} s: its rows replace the estimate as they come (Stop keeps what is done)."
                    )
                for k in kinds:
                    draw_kind(trace, view, k)
            else:
                draw_kind(trace, view, kind)

        try:
            trace, exact, message = trace_sentiment_progressively(
                lm,
                text,
                fitted[2],
                kinds,
                samples=int(samples),
                window=int(window),
                on_view=draw,
                progress=lambda f, t: bar.progress(min(f, 1.0), text=t),
            )
            bar.empty()
            note.empty()
            cancel.empty()
            if message:
                st.info(message)
            state["sent_trace"] = trace
        except Exception as err:  # the page's error boundary: one message, details in the log
            bar.empty()
            state.pop("sent_trace", None)
            show_error(err, "tracing")

trace = state.get("sent_trace")
if trace is not None and fitted is not None:
    m = st.columns(4)
    m[0].metric("p(positive), clean", f"{trace.clean_score:.4f}")
    m[1].metric("p(positive), text corrupted", f"{trace.corrupted_score:.4f}")
    m[2].metric("Tokens", len(trace.tokens))
    m[3].metric("Time", f"{trace.seconds:.1f} s")
    if not run:
        labels = state.get("sent_labels", {})
        for col, kind in zip(st.columns(len(trace.scores)), trace.scores):
            col.altair_chart(charts.sentiment_heatmap(trace, kind, width="container"), width="stretch")
            if kind in labels:
                col.caption(labels[kind])
    st.caption(
        "Rows: the text's tokens (corrupted ones marked *) and the proxy's suffix. Colour: the proxy's p(positive) "
        "after restoring that state in the corrupted run; hover a cell for its value."
    )
    d = st.columns(2)
    d[0].download_button(
        "Tables (CSV)",
        charts.tables_csv(trace.tokens, trace.scores, trace.corrupt_range),
        file_name="sentiment_trace.csv",
        mime="text/csv",
    )
    d[1].download_button(
        "Result (JSON)",
        json.dumps(trace.as_dict(), indent=1),
        file_name="sentiment_trace.json",
        mime="application/json",
    )
