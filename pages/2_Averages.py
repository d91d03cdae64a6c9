"""Averages: the average indirect effect over known facts by token category (core.aie), as the paper's Fig. 2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import streamlit as st

from core import charts
from core.aie import aie_size
from core.errors import UserError
from core.facts import DEFAULT_FACTS, load_facts
from core.tracing import KINDS
from ui.common import (
    bar_progress,
    cancel_button,
    digest,
    page,
    page_model,
    run_aie,
    show_error,
    show_size,
)

page("Averages", ":material/show_chart:")
st.title("Average indirect effect")
st.markdown(
    "Trace many facts the model knows and average the **indirect effect** (restored probability of the answer "
    "minus its corrupted probability) by token category and layer. The paper finds an early site at the last "
    "subject token in middle-layer MLPs and a late site at the last token in attention."
)

lm = page_model()
state = st.session_state

with st.container(border=True):
    source = st.radio(
        "Facts",
        ["The project's known facts (data/known_facts.json)", "Upload a facts file (JSON)"],
        key="aie_source",
        horizontal=True,
    )
    upload = None
    if source.startswith("Upload"):
        upload = st.file_uploader(
            "JSON list of records {subject, prompt, attribute}",
            type=["json"],
            key="aie_upload",
            help=(
                'e.g. [{"subject": "The Eiffel Tower", '
                '"prompt": "The Eiffel Tower is located in the city of", "attribute": "Paris"}]'
            ),
        )
    c1, c2, c3 = st.columns([1, 1, 3])
    limit = c1.number_input(
        "Facts to trace",
        1,
        1000,
        5,
        key="aie_limit",
        help="Facts the model does not predict are skipped and not counted.",
    )
    samples = c2.number_input("Samples", 1, 100, 10, key="aie_samples", help="Noisy copies per cell.")
    kinds = c3.multiselect(
        "Kinds", KINDS, default=list(KINDS), key="aie_kinds", format_func=lambda k: charts.KIND_LABELS[k]
    )
    st.caption("Each fact takes about as long as one trace on the Trace explorer (tens of seconds per kind on a CPU).")
    run = st.button("Run", type="primary", key="aie_run")


def read_facts():
    if upload is None:
        if source.startswith("Upload"):
            raise UserError("upload a facts file first")
        return load_facts(DEFAULT_FACTS), "project:" + digest(DEFAULT_FACTS.read_bytes())
    data = upload.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "facts.json"
        path.write_bytes(data)
        try:
            facts = load_facts(path)
        except UserError as err:
            raise UserError(str(err).replace(repr(str(path)), repr(upload.name))) from None
    return facts, "upload:" + digest(data)


show_size(
    lambda: aie_size(lm, read_facts()[0], int(limit), int(samples), max(len(kinds), 1)),
    "Memory (the longest fact, traced one at a time)",
    "",
)


if run:
    if not kinds:
        show_error(UserError("choose at least one kind"))
    else:
        try:
            facts, facts_key = read_facts()
            bar = st.progress(0.0, text=f"tracing up to {int(limit)} of {len(facts)} facts")
            cancel = cancel_button("aie_cancel")
            result = run_aie(
                lm,
                facts,
                facts_key,
                limit=int(limit),
                samples=int(samples),
                kinds=kinds,
                progress=bar_progress(bar, "facts traced"),
            )
            bar.empty()
            cancel.empty()
            if result.n == 0:
                raise UserError(
                    f"the model predicts none of the {result.skipped} facts tried, so there is nothing to average"
                )
            state["aie_result"] = result
        except Exception as err:  # the page's error boundary: one message, details in the log
            state.pop("aie_result", None)
            show_error(err, "averaging")

result = state.get("aie_result")
if result is not None and result.model == lm.name:
    m = st.columns(5)
    m[0].metric("Facts averaged", result.n)
    m[1].metric("Skipped (not known)", result.skipped)
    m[2].metric("Mean p(answer), clean", f"{result.mean_clean_score:.3f}")
    m[3].metric("Mean p(answer), corrupted", f"{result.mean_corrupted_score:.3f}")
    m[4].metric("Time", f"{result.seconds:.0f} s")
    columns = st.columns(len(result.tables))
    for col, kind in zip(columns, result.tables):
        col.altair_chart(charts.aie_lines(result, kind, width="container"), width="stretch", height=480)
        category, layer, effect = result.peak(kind)
        col.caption(f"Peak: **{category}**, layer **{layer}**, effect **{effect:+.3f}**")
    st.caption(
        "Token categories as in the paper: first/middle/last subject token, the first token after the subject, "
        "further tokens, and the last token. y: restored p(answer) − corrupted p(answer), averaged over facts."
    )
    st.download_button(
        "Averages (JSON)", json.dumps(result.to_json(), indent=1), file_name="aie.json", mime="application/json"
    )
