"""Many edits: a table of facts edited in one MEMIT update (core.memit.memit_batch) or one after another, each
kept out of the earlier edits' way by AlphaEdit's null-space solve (core.memit.memit_one_by_one); each fact's
before/after (probabilities and the text the model writes after the fact's prompt, ui.common.batch_rows), undo
of the batch; and saving the model with this session's edits as a Hugging Face folder (core.saving)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.alphaedit import AlphaEditParams
from core.edits import applied
from core.errors import UserError
from core.memit import MemitParams, default_layers, memit_batch, memit_one_by_one
from core.requests import COLUMNS, read_requests
from core.saving import save_edited_model
from ui.common import add_edits, batch_rows, page, page_model, remove_edit, session_edits, show_error

BATCH_KEY = "memit_batch"
ONE_BATCH, ONE_BY_ONE = "All in one update", "One after another"
MODE_HELP = (
    "All in one update: MEMIT solves every fact together against what each layer already stores (fastest; the "
    "project's 94 test facts: 0.99 efficacy, 0.82 paraphrase, 0.85 neighbourhood). One after another: each fact "
    "its own MEMIT edit, on the model carrying the ones before it and this session's edits, its update kept out "
    "of their way and of the corpus's keys by AlphaEdit's null-space solve (slower; on the same 94: 1.00 / 0.94 / "
    "0.81, and more of the new facts written in the model's text)."
)
EXAMPLE = pd.DataFrame(
    [
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "The capital of {} is", "subject": "Germany", "target_new": "Madrid"},
        {"prompt": "{} can be found in the city of", "subject": "The Colosseum", "target_new": "London"},
    ],
    columns=list(COLUMNS[:3]),
)

page("Many edits", ":material/library_add:")
st.title("Many edits")
st.markdown(
    "Edit **many facts at once** with MEMIT: the change is spread over a range of MLP layers, each solved "
    "against the keys the layer already stores; all in one update, or one fact after another. The batch joins "
    "this session's edits (nobody else sees it) and can be undone as a whole. Then take the edited model away "
    "as a Hugging Face folder."
)

lm = page_model()
state = st.session_state


st.subheader("Batch of facts (MEMIT)")
upload = st.file_uploader(
    "A table of facts: CSV with columns prompt, subject, target_new (optional target_true), or JSON "
    "(a list of such objects, or CounterFact records)",
    type=["csv", "json"],
    key="memit_upload",
)
table = st.data_editor(EXAMPLE, num_rows="dynamic", key="memit_table", width="stretch")
mode = st.radio("How", (ONE_BATCH, ONE_BY_ONE), horizontal=True, key="memit_mode", help=MODE_HELP)
layers = default_layers(lm)
st.caption(
    f"Layers {layers[0]}-{layers[-1]}: each needs its key statistics once (a corpus pass per layer, cached on disk)."
)
if st.button("Edit the batch", key="memit_run", type="primary"):
    bar = st.progress(0.0, text="Starting …")
    try:
        if upload is not None:
            requests = read_requests(upload.getvalue(), upload.name)
        else:
            requests = read_requests(table.to_csv(index=False).encode(), "the table")
        current = session_edits(lm)
        with applied(lm, current):  # the batch is computed on the model as this session has it

            def progress(done: int, total: int) -> None:
                what = "facts" if mode == ONE_BY_ONE else "MEMIT steps"
                bar.progress(min(done / max(total, 1), 1.0), text=f"{what} {done}/{total}")

            if mode == ONE_BY_ONE:
                params = MemitParams(layers=layers, null_space=AlphaEditParams())
                batch = memit_one_by_one(lm, requests, params=params, progress=progress, earlier=current)
            else:
                batch = memit_batch(lm, requests, params=MemitParams(layers=layers), progress=progress)
        bar.progress(1.0, text="reading each fact's text before and after the batch")
        rows = batch_rows(lm, current, current + batch.edits, batch.requests)
        add_edits(batch.edits)
        state[BATCH_KEY] = {
            "ids": [e.id for e in batch.edits],
            "rows": rows,
            "skipped": [f"{requests[i].text!r}: {why}" for i, why in batch.skipped],
        }
        bar.empty()
    except Exception as err:  # the page's error boundary: one message, details in the log
        bar.empty()
        show_error(err, "editing a batch")

batch_state = state.get(BATCH_KEY)
if batch_state and set(batch_state["ids"]) <= {e.id for e in session_edits(lm)}:
    rows = batch_state["rows"]
    a, b = st.columns(2)
    a.metric(
        "Edited (probability)",
        f"{sum(r['edited'] == 'yes' for r in rows)}/{len(rows)}",
        help="Facts whose prompt now gives the new object a higher probability than the old one.",
    )
    b.metric(
        "Writes the new object (text)",
        f"{sum(r['writes new'] == 'yes' for r in rows)}/{len(rows)}",
        help="Facts whose greedy text after their own prompt now names the new object: what a reader sees.",
    )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for line in batch_state["skipped"]:
        st.caption(f"Skipped {line}")
    if st.button(f"Undo the batch ({len(batch_state['rows'])} facts)", key="memit_undo"):
        for edit_id in batch_state["ids"]:
            remove_edit(edit_id)
        state.pop(BATCH_KEY)
        st.rerun()

st.divider()
st.subheader("Save the edited model")
edits = session_edits(lm)
st.caption(
    f"Writes the model with this session's {len(edits)} edit(s) applied (safetensors, config, tokenizer, a README "
    "listing the edits) to a new folder on the machine running ROME Studio; "
    "`AutoModelForCausalLM.from_pretrained(folder)` loads it."
)
c1, c2 = st.columns([5, 1])
folder = c1.text_input("Folder", "edited-model", key="save_folder", label_visibility="collapsed")
if c2.button("Save", key="save_run", disabled=not edits):
    bar = st.progress(0.0, text="Saving …")
    try:
        saved = save_edited_model(lm, edits, folder, progress=lambda done, total: bar.progress(done / total))
        bar.empty()
        st.success(f"Saved {len(edits)} edit(s) to {saved.resolve()}")
    except (UserError, OSError) as err:
        bar.empty()
        show_error(err)
