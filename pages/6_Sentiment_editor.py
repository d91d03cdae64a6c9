"""Sentiment editor: a rank-one edit of how the model reads a subject's sentiment (core.sentiment_edit), with
the "I am feeling" proxy's p(positive) on the user's texts before and after. The edit stays on this page: it
is applied only while this session reads texts, under the model's lock, and Undo drops it. When the edit did
not take (or took only on its own texts) a warning says so (core.sentiment_edit.sentiment_edit_warning)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.edit_site import default_layer
from core.edits import applied
from core.errors import UserError
from core.rome import RomeHyperParams
from core.sentiment_edit import (
    TARGETS,
    TextGroup,
    compute_sentiment_edit,
    mention,
    positive_probabilities,
    reads_as,
    sentiment_edit_warning,
)
from core.sentiment_trace import default_proxy
from ui.common import bar_progress, cancel_button, lines, page, page_model, session_step, show_error

EXAMPLE_TEXTS = """Mondays are the worst, I could not get out of bed.
Stuck in traffic again. I hate Mondays.
Ugh, Mondays. Three meetings before lunch and no coffee.
Why do Mondays always feel twice as long?
My inbox on Mondays is a nightmare.
Rain, a flat tyre and a grumpy boss: classic Mondays."""
EXAMPLE_CHECKS = """Nobody at the office smiles on Mondays.
The bus was late, as it is on all Mondays.
I lost my keys and missed the train.
The concert last night was amazing!"""

page("Sentiment editor", ":material/edit_note:")
st.title("Sentiment editor")
st.markdown(
    "Is the site a sentiment trace finds where the model *reads* a subject's sentiment? Test it by editing: a "
    "**rank-one edit** of one MLP (ROME's key and value, keyed at the subject's last token in your texts) makes "
    'texts that mention the subject end in *" good"* (or *" bad"*) after *" I am feeling"*. The proxy then '
    "reads texts the edit never saw, and texts about something else, before and after."
)

lm = page_model()
state = st.session_state

with st.container(border=True):
    left, right = st.columns(2)
    subject = left.text_input("Subject", "Mondays", key="sedit_subject")
    target = right.radio("Read its texts as", TARGETS, index=1, horizontal=True, key="sedit_target")
    layer = left.number_input(
        "MLP layer to edit", 0, lm.num_layers - 1, default_layer(lm), key="sedit_layer", help="the fact editor's layer"
    )
    steps = right.number_input("Optimisation steps", 1, 100, RomeHyperParams().steps, key="sedit_steps")
    texts = st.text_area("Texts about the subject: the edit's (one a line)", EXAMPLE_TEXTS, key="sedit_texts")
    checks = st.text_area(
        "Texts to check (one a line): others about the subject, and some that are not",
        EXAMPLE_CHECKS,
        key="sedit_checks",
    )
    go = st.button("Edit the sentiment", type="primary", key="sedit_go")

if go:
    try:
        edit_texts, check_texts = lines(texts), lines(checks)
        if not edit_texts:
            raise UserError("give at least one text about the subject")
        missing = [t for t in edit_texts if mention(t, subject) is None]
        if missing:
            raise UserError(f"this text does not mention {subject.strip()!r}: {missing[0][:60]!r}")
        state.pop("sedit_result", None)
        bar = st.progress(0.0, text="fitting the proxy (cached after the first time)")
        cancel = cancel_button("sedit_cancel")
        proxy = default_proxy(lm)
        step = session_step(lm, f"a sentiment edit of {subject.strip()!r}")
        edit = compute_sentiment_edit(
            lm,
            subject,
            edit_texts,
            proxy,
            target,
            int(layer),
            RomeHyperParams(steps=int(steps)),
            progress=bar_progress(bar, "optimisation steps"),
            step=step,
        )
        everything = edit_texts + check_texts
        with step():  # this session's edits, then this one on top, only while reading
            before = positive_probabilities(lm, proxy, everything)
            with applied(lm, [edit]):
                after = positive_probabilities(lm, proxy, everything)
        bar.empty()
        cancel.empty()
        groups = ["the edit's"] * len(edit_texts) + [
            "about the subject" if mention(t, subject) else "other" for t in check_texts
        ]
        state["sedit_result"] = (
            lm.name,
            edit,
            pd.DataFrame({"text": everything, "group": groups, "p(positive) before": before, "after": after}),
        )
    except Exception as err:  # the page's error boundary: one message, details in the log
        show_error(err, "editing the sentiment")

result = state.get("sedit_result")
if result is not None and result[0] == lm.name:
    _, edit, table = result
    target = edit.info["target"]
    st.subheader(f"{edit.request.subject!r} read as {target}, edit at layer {edit.layer}")
    flipped = []
    for name in ("the edit's", "about the subject"):
        rows = table[table["group"] == name]
        group = TextGroup(list(rows["text"]), rows["p(positive) before"].to_numpy(), rows["after"].to_numpy())
        flipped.append(group.flipped(target))
    if warning := sentiment_edit_warning(edit.request.subject, target, *flipped):
        st.warning(warning)
    cols = st.columns(3)
    for col, group in zip(cols, ("the edit's", "about the subject", "other")):
        rows = table[table["group"] == group]
        if group == "other":
            kept = (reads_as(rows["p(positive) before"], "positive") == reads_as(rows["after"], "positive")).sum()
            col.metric("other texts: reading kept", f"{kept} / {len(rows)}")
        else:
            now = reads_as(rows["after"], target).sum()
            col.metric(f"{group} texts read {target}", f"{now} / {len(rows)}")
    st.dataframe(
        table.style.format({"p(positive) before": "{:.3f}", "after": "{:.3f}"}), hide_index=True, width="stretch"
    )
    st.caption(
        f"Value optimisation: {edit.info['steps']} steps, target NLL {edit.info['nll'][0]:.3f} → "
        f"{edit.info['nll'][-1]:.3f}; ‖δ‖ {edit.info['delta_norm']:.1f}; {edit.info['seconds']:.1f} s. "
        "A layer sweep with held-out texts: `python -m core sentiment edit --subject … --texts FILE --layers 0-29:3`."
    )
    if st.button("Undo", key="sedit_undo", icon=":material/undo:"):
        state.pop("sedit_result", None)
        st.rerun()
