"""Trace explorer: causal tracing of one fact (core.tracing), drawn as the paper's three heat maps."""

from __future__ import annotations

import json

import streamlit as st

from core import charts
from core.budget import check_trace
from core.errors import UserError
from core.facts import DEFAULT_FACTS, load_facts
from core.prompts import tokenize
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS
from ui.common import (
    HANDOFF_KEY,
    chart_svg,
    default_noise,
    page,
    page_model,
    show_error,
    show_size,
    suggest_subject,
    trace_progressively,
)

page("Trace explorer", ":material/search:")
st.title("Trace explorer")
st.markdown(
    "Where does the model keep a fact? The subject's tokens (marked `*`) are corrupted with Gaussian noise; then "
    "one state at a time is restored to its clean value. Each cell shows the **probability of the clean answer** "
    "after restoring that token's state at that layer (darker = more of the answer brought back)."
)

lm = page_model()


@st.cache_data(show_spinner=False)
def example_facts() -> list[dict]:
    try:
        return [{"prompt": f.prompt, "subject": f.subject} for f in load_facts(DEFAULT_FACTS)]
    except UserError:
        return []


EXAMPLES = example_facts()
state = st.session_state
state.setdefault("trace_prompt", "The Eiffel Tower is located in the city of")
state.setdefault("trace_subject", suggest_subject(state["trace_prompt"]))
handoff = state.pop(HANDOFF_KEY, None)
if handoff:  # from the fact editor's "trace again"
    state["trace_prompt"], state["trace_subject"] = handoff["prompt"], handoff["subject"]
    state["trace_autorun"] = True


def use_example() -> None:
    choice = state.get("trace_example")
    for fact in EXAMPLES:
        if fact["prompt"] == choice:
            state["trace_prompt"], state["trace_subject"] = fact["prompt"], fact["subject"]


def prompt_changed() -> None:
    state["trace_subject"] = suggest_subject(state["trace_prompt"])


noise_default = default_noise(lm)

with st.container(border=True):
    st.selectbox(
        "Example facts (data/known_facts.json)",
        [f["prompt"] for f in EXAMPLES],
        index=None,
        placeholder="Pick a known fact, or type your own prompt below",
        key="trace_example",
        on_change=use_example,
    )
    left, right = st.columns([3, 2])
    left.text_input(
        "Prompt", key="trace_prompt", on_change=prompt_changed, help="The model's next token is the answer traced."
    )
    right.text_input(
        "Subject (corrupted)",
        key="trace_subject",
        help="Suggested from the prompt; edit it if needed. It must occur in the prompt.",
    )
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    kinds = c1.multiselect(
        "Kinds",
        KINDS,
        default=list(KINDS),
        key="trace_kinds",
        format_func=lambda k: charts.KIND_LABELS[k],
        help="Which states are restored: block outputs, MLP outputs, attention outputs.",
    )
    samples = c2.number_input(
        "Samples", 1, 100, DEFAULT_SAMPLES, key="trace_samples", help="Noisy copies averaged per cell."
    )
    noise = c3.number_input(
        "Noise",
        0.0,
        100.0,
        round(noise_default, 4),
        step=0.01,
        format="%.4f",
        key="trace_noise",
        help=(
            "Standard deviation of the noise on the subject's embeddings; "
            f"default 3 × the embedding std = {noise_default:.4f}."
        ),
    )
    window = c4.number_input(
        "Window",
        1,
        50,
        DEFAULT_WINDOW,
        key="trace_window",
        help="MLP/attention outputs are restored at this many neighbouring layers together.",
    )
    run = st.button("Trace", type="primary", key="trace_run")


def size():
    prompt = tokenize(lm.tokenizer, state["trace_prompt"], state["trace_subject"])
    return check_trace(lm, len(prompt.input_ids), samples=int(samples), kinds=max(len(kinds), 1))


refused = show_size(size)

if state.pop("trace_autorun", False):
    run = True

stop = st.button("Stop", key="trace_stop", help="Stop the exact trace; what is done so far stays shown.")
if stop:
    st.info("Stopped: the estimate, and the exact rows done before the stop, are shown below.")

if run:
    if not kinds:
        show_error(UserError("choose at least one kind to trace"))
    elif refused is not None:
        show_error(refused)
    else:
        bar = st.progress(0.0, text="preparing: clean and corrupted runs")
        note = st.empty()
        columns = st.columns(len(kinds))
        slots = {kind: col.empty() for kind, col in zip(kinds, columns)}

        def draw_kind(view, kind: str) -> None:
            with slots[kind].container():
                st.altair_chart(charts.trace_heatmap(view.result, kind, width="container"), width="stretch")
                st.caption(view.label(kind))

        def draw(view, kind: str | None) -> None:
            state["trace_result"] = view.result
            state["trace_labels"] = {k: view.label(k) for k in view.result.scores}
            if kind is None:  # the estimate: every kind, and the forecast of the exact trace
                if view.forecast:
                    note.info(
                        f"Estimate shown in {view.result.seconds:.1f} s. The exact trace takes about "
                        f"{view.forecast:.0f} s: its rows replace the estimate as they come (Stop keeps what is done)."
                    )
                for k in kinds:
                    draw_kind(view, k)
            else:
                draw_kind(view, kind)

        try:
            view, result = trace_progressively(
                lm,
                state["trace_prompt"],
                state["trace_subject"],
                kinds,
                samples=int(samples),
                window=int(window),
                noise=None if float(noise) == round(noise_default, 4) else float(noise),  # the default, unrounded
                on_view=draw,
                progress=lambda f, text: bar.progress(min(f, 1.0), text=text),
            )
            state["trace_result"] = result if result is not None else view.result
            state["trace_labels"] = {k: view.label(k) for k in kinds}
            bar.empty()
            note.empty()
        except Exception as err:  # the page's error boundary: one message, details in the log
            bar.empty()
            state.pop("trace_result", None)
            show_error(err, "tracing")

result = state.get("trace_result")
if result is not None and result.model == lm.name:
    st.subheader(f"{result.prompt!r} → {result.answer!r}")
    m = st.columns(5)
    m[0].metric("Answer", repr(result.answer))
    m[1].metric("p(answer), clean", f"{result.clean_score:.4f}")
    m[2].metric("p(answer), subject corrupted", f"{result.corrupted_score:.4f}")
    m[3].metric("Noise / samples", f"{result.noise:.3f} / {result.samples}")
    m[4].metric("Time", f"{result.seconds:.1f} s")
    if not run:  # drawn during the run already
        columns = st.columns(len(result.scores))
        labels = state.get("trace_labels", {})
        for col, kind in zip(columns, result.scores):
            col.altair_chart(charts.trace_heatmap(result, kind, width="container"), width="stretch")
            if kind in labels:
                col.caption(labels[kind])
    st.caption(
        f"Rows: tokens of the prompt (subject marked *). Columns: layers 0–{lm.num_layers - 1}. Colour: probability "
        f"of {result.answer!r} after restoring that one state (MLP/attention: a window of {result.window} layers "
        "around it) in the corrupted run. Hover a cell for its value and indirect effect (restored − corrupted)."
    )
    with st.expander("Download tables and charts"):
        d = st.columns(2 + len(result.scores))
        d[0].download_button(
            "Tables (CSV)",
            charts.tables_csv(result.tokens, result.scores, result.subject_range),
            file_name="trace.csv",
            mime="text/csv",
        )
        d[1].download_button(
            "Result (JSON)", json.dumps(result.to_json(), indent=1), file_name="trace.json", mime="application/json"
        )
        for col, kind in zip(d[2:], result.scores):
            col.download_button(
                f"{kind} chart (SVG)",
                chart_svg(charts.trace_heatmap(result, kind)),
                file_name=f"trace_{kind}.svg",
                mime="image/svg+xml",
            )
        st.caption("PNG: `core.charts.to_png(core.charts.trace_heatmap(result, kind))` renders the same chart.")
