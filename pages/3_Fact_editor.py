"""Fact editor: rewrite a fact with ROME (core.rome), compare before/after, undo, export/import, trace again,
and sweep the edit over the layers beside the trace (core.sweep).

The session's edits live in its session state only; every computation applies them under the model's lock and
puts the weights back bitwise after (core.edits.applied), so other browser sessions never see them. What the
model writes is measured beside the probabilities: the likeliest next tokens after the request's prompt, whether
each greedy text names the new object, and what the model says the subject is, before and after (essence drift).
The example prompts measure the example request only: for another subject they are left out, and the request's own
prompt is continued (ui.common.editor_prompts).
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import streamlit as st

from core import charts
from core.covariance import DEFAULT_TOKENS, min_statistics_tokens, statistics_cached
from core.edit_site import default_layer
from core.edits import EditRequest, applied
from core.evaluation import edit_warning
from core.generation import GenerationSettings, generate
from core.rome import RomeHyperParams, compute_edit, validate_request
from core.sweep import layer_sweep, parse_layers
from ui.common import (
    EXAMPLE_GENERATION,
    EXAMPLE_NEIGHBOURS,
    EXAMPLE_PARAPHRASES,
    EXAMPLE_SUBJECT,
    HANDOFF_KEY,
    add_edits,
    bar_progress,
    cancel_button,
    editor_prompts,
    edits_file_bytes,
    edits_from_bytes,
    essence_shift,
    measure,
    page,
    page_model,
    remove_edit,
    reset_edits,
    session_edits,
    session_step,
    show_error,
    text_summary,
)

page("Fact editor", ":material/edit:")
st.title("Fact editor")
st.markdown(
    "Rewrite one fact with **ROME**: a rank-one change of one MLP output matrix, so that the subject now leads "
    "to the new object. Your edits stay in this browser session: nobody else's answers change."
)

lm = page_model()
state = st.session_state
layer_default = default_layer(lm)

with st.form("edit_form"):
    c1, c2, c3 = st.columns([3, 2, 2])
    prompt = c1.text_input("Prompt with {} for the subject", "{} is located in the city of", key="edit_prompt")
    subject = c2.text_input("Subject", EXAMPLE_SUBJECT, key="edit_subject")
    target = c3.text_input("New object", "Rome", key="edit_target")
    c1, c2, c3, c4 = st.columns(4)
    layer = c1.number_input(
        f"Layer (default {layer_default})",
        0,
        lm.num_layers - 1,
        layer_default,
        key="edit_layer",
        help=(
            "The MLP whose output matrix is rewritten; "
            "the default is where this model's MLP effect at the last subject token peaks."
        ),
    )
    steps = c2.number_input(
        "Optimisation steps",
        1,
        100,
        RomeHyperParams.steps,
        key="edit_steps",
        help="Adam steps for the new value v*.",
    )
    key_size = min_statistics_tokens(lm)  # fewer corpus positions leave C singular
    stats_tokens = c3.number_input(
        "Statistics tokens",
        key_size,
        1_000_000,
        max(DEFAULT_TOKENS, key_size),
        step=1024,
        key="edit_stats_tokens",
        help=(
            f"Corpus positions for the key covariance C (computed once per layer and size, then cached on disk); "
            f"at least the model's key size, {key_size:,}."
        ),
    )
    preserve = c4.number_input(
        "Preserve known subjects",
        0.0,
        100.0,
        RomeHyperParams.preserve_weight,
        step=0.5,
        key="edit_preserve",
        help=(
            "Weight of other subjects' keys (data/known_facts.json) in the update's covariance: the edit moves "
            "similar subjects less. 0 is plain ROME."
        ),
    )
    c1, c2, c3 = st.columns(3)
    generation_prompts = c1.text_area(
        "Generation prompts (one per line)",
        EXAMPLE_GENERATION,
        key="edit_generation",
        height=110,
    )
    paraphrases = c2.text_area(
        "Paraphrase checks (should change)",
        EXAMPLE_PARAPHRASES,
        key="edit_paraphrases",
        height=110,
    )
    neighbours = c3.text_area(
        "Neighbourhood checks (should not change)",
        EXAMPLE_NEIGHBOURS,
        key="edit_neighbours",
        height=110,
    )
    submitted = st.form_submit_button("Apply edit", type="primary", key="edit_apply")

# the edit's and the sweep's settings (the sweep sets the layer itself)
settings = RomeHyperParams(steps=int(steps), stats_tokens=int(stats_tokens), preserve_weight=float(preserve))

if submitted:
    edits = session_edits(lm)
    try:
        hp = replace(settings, layer=int(layer))
        hp.check(lm)
        with applied(lm, edits):
            request = validate_request(lm, EditRequest(prompt, subject, target))
        prompts = editor_prompts(request, generation_prompts, paraphrases, neighbours)
        gens = prompts.generation
        checks = [("paraphrase", p) for p in prompts.paraphrases] + [("neighbourhood", p) for p in prompts.neighbours]
        bar = st.progress(0.0, text="measuring the model before the edit")
        before = measure(lm, edits, request, gens, checks)
        stats_note = (
            ""
            if statistics_cached(lm, hp.layer, hp.stats_corpus, hp.stats_tokens)
            else f" (key statistics for layer {hp.layer} first: once, then cached)"
        )
        bar.progress(0.1, text="computing the edit" + stats_note)
        edit = compute_edit(  # on the model with this session's earlier edits, the lock taken per step
            lm,
            request,
            hp,
            progress=lambda done, total: bar.progress(
                0.1 + 0.8 * done / max(total, 1), text=f"computing the edit{stats_note}: {done} of {total}"
            ),
            step=session_step(lm, f"editing {request.text!r}"),
        )
        bar.progress(0.9, text="measuring the model after the edit")
        after = measure(lm, edits + [edit], request, gens, checks)
        bar.empty()
        add_edits([edit])
        state["edit_comparison"] = {
            "edit_id": edit.id,
            "request": edit.request,
            "before": before,
            "after": after,
            "gens": gens,
            "notes": prompts.notes,
            "seconds": edit.info["seconds"],
        }
    except Exception as err:  # the page's error boundary: one message, details in the log
        show_error(err, "editing")

comparison = state.get("edit_comparison")
if comparison is not None and comparison["edit_id"] in {e.id for e in session_edits(lm)}:
    request, before, after = comparison["request"], comparison["before"], comparison["after"]
    st.subheader(f"{request.text!r}: {request.target_true!r} → {request.target_new!r}")
    for note in comparison.get("notes", []):
        st.info(note)
    warning = edit_warning(request, after.p_new, after.p_true, after.generation_names_new)
    if warning:
        st.warning(warning)
    left, right = st.columns(2, gap="large")
    for col, name, m, other in ((left, "Before", before, None), (right, "After", after, before)):
        with col:
            st.markdown(f"##### {name}")
            a, b = st.columns(2)
            a.metric(
                f"p({request.target_new})", f"{m.p_new:.4f}", None if other is None else f"{m.p_new - other.p_new:+.4f}"
            )
            b.metric(
                f"p({request.target_true})",
                f"{m.p_true:.4f}",
                None if other is None else f"{m.p_true - other.p_true:+.4f}",
            )
            if m.next_tokens:
                st.dataframe(
                    pd.DataFrame(
                        {"next token": [repr(t) for t, _ in m.next_tokens], "p": [p for _, p in m.next_tokens]}
                    ),
                    hide_index=True,
                    column_config={"p": st.column_config.NumberColumn(format="%.4f")},
                    key=f"edit_next_{name.lower()}",
                )
            # before: does the text name the old object; after: the new one (the texts side by side stay level)
            obj, named = (
                (request.target_true, m.generation_names_true)
                if other is None
                else (request.target_new, m.generation_names_new)
            )
            for text, names in zip(m.generations, named):
                st.code(text, language=None, wrap_lines=True)
                st.caption(f"names {obj!r}: {'yes' if names else 'no'}")
    summary = text_summary(before, after)
    a, r, b, e, c = st.columns(5)
    (k, n), (kr, nr), (kb, nb) = summary["efficacy"], summary["rewrite"], summary["bleed"]
    drift = essence_shift(before, after)
    a.metric(
        "Generation efficacy (text)",
        f"{k}/{n}" if n else "-",
        help=f"Generation prompts and paraphrase checks whose greedy text names {request.target_new!r} after the edit.",
    )
    r.metric(
        "Rewritten (text)",
        f"{kr}/{nr}" if nr else "-",
        help=f"Of the generation prompts and paraphrase checks whose text named {request.target_true!r} before the "
        f"edit, those whose text names {request.target_new!r} after it: the edit shows where the model writes "
        "the fact at all.",
    )
    b.metric(
        "Bleed (text)",
        f"{kb}/{nb}" if nb else "-",
        help=f"Neighbourhood checks whose greedy text names {request.target_new!r} after the edit but not before.",
    )
    e.metric(
        "Essence drift",
        "-" if drift is None else f"{drift:.2f} nats",
        help=f"How far the edit moved what the model says {request.subject!r} is: KL(before || after) of the next "
        "token after the prompts in the table below, mean over them. 0 is unchanged; ROME's KL term holds only the "
        "first prompt during the optimisation.",
    )
    c.metric("Edit", f"{comparison.get('seconds', 0):.1f} s", help="Time to compute the edit (statistics cached).")
    if before.checks:
        rows = []
        for b, a in zip(before.checks, after.checks):
            wanted = a["p_new"] > a["p_true"] if a["check"] == "paraphrase" else a["p_true"] > a["p_new"]
            rows.append(
                {
                    "check": a["check"],
                    "prompt": a["prompt"],
                    f"p({request.target_new}) before": b["p_new"],
                    f"p({request.target_new}) after": a["p_new"],
                    f"p({request.target_true}) before": b["p_true"],
                    f"p({request.target_true}) after": a["p_true"],
                    "as wanted": "yes" if wanted else "no",
                    "text after": a["text"],
                    f"text names {request.target_new}": "yes" if a["names_new"] else "no",
                }
            )
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption(
            "Probabilities of multi-token objects are the mean token probability (geometric). Paraphrases should now "
            "prefer the new object, and their text should name it; neighbouring subjects should keep the old one."
        )
    if after.essence:
        st.markdown(f"##### What the model says {request.subject!r} is")
        st.table(pd.DataFrame({"before": before.essence, "after": after.essence}), hide_index=True)  # wraps
        st.caption(
            "Greedy text after each prompt, before and after the edit. An edit should change the fact, not who or "
            "what the subject is."
        )
    if st.button("Trace the edited model again", key="edit_trace_again"):
        state[HANDOFF_KEY] = {"prompt": request.text, "subject": request.subject}
        st.switch_page("pages/1_Trace_explorer.py")

st.divider()
history, tools = st.columns([3, 2], gap="large")
with history:
    st.subheader("Edit history (this session)")
    edits = session_edits(lm)
    if not edits:
        st.caption("No edit yet: the model answers as it was trained.")
    for i, edit in enumerate(edits):
        row = st.columns([6, 1])
        req = edit.request
        seconds = edit.info.get("seconds")
        row[0].markdown(
            f"**{i + 1}.** {req.text!r}: {req.target_true!r} → **{req.target_new!r}** · layer {edit.layer}"
            + (f" · {seconds:.0f} s" if seconds is not None else "")
            + f" · `{edit.id}`"
        )
        if row[1].button("Undo", key=f"undo_{edit.id}"):
            remove_edit(edit.id)
            st.rerun()
    if edits and st.button("Reset: undo all edits", key="edit_reset"):
        reset_edits()
        st.rerun()

with tools:
    st.subheader("Export / import")
    if edits:
        st.download_button(
            f"Export {len(edits)} edit{'s' if len(edits) != 1 else ''} (safetensors)",
            edits_file_bytes(edits),
            file_name="rome_edits.safetensors",
            mime="application/octet-stream",
            key="edit_export",
        )
    upload = st.file_uploader("Import edits (.safetensors from ROME Studio)", type=["safetensors"], key="edit_upload")
    if upload is not None and st.button("Import", key="edit_import"):
        try:
            added = add_edits(edits_from_bytes(upload.getvalue(), lm, upload.name))
            st.success(f"Imported {added} edit{'s' if added != 1 else ''}.")
            st.rerun()
        except Exception as err:  # the page's error boundary: one message, details in the log
            show_error(err, "importing edits")

st.divider()
st.subheader("Try the model (with this session's edits)")
c1, c2 = st.columns([5, 1])
try_prompt = c1.text_input("Prompt", "The Eiffel Tower is located in", key="try_prompt", label_visibility="collapsed")
if c2.button("Generate", key="try_run"):
    try:
        with applied(lm, session_edits(lm)):
            state["try_text"] = generate(lm, [try_prompt], GenerationSettings(max_new_tokens=20))[0]
    except Exception as err:  # the page's error boundary: one message, details in the log
        state.pop("try_text", None)
        show_error(err, "generating")
if "try_text" in state:
    with st.container(key="try_output"):
        st.code(state["try_text"], language=None, wrap_lines=True)

st.divider()
st.subheader("Where to edit: the same edit at each layer")
st.markdown(
    "Does the layer where a trace *locates* the fact say where an edit *works*? The request above is made at "
    "each chosen layer in turn (never stacked; on the model with this session's edits), measured alike, beside "
    "the causal trace's MLP effect at the subject's last token (grey bars)."
)
c1, c2 = st.columns([3, 1])
sweep_layers = c1.text_input(
    "Layers", f"0-{lm.num_layers - 1}:3", key="sweep_layers", help="e.g. 0-29:3 (every third), 2,5,9 or 0-29"
)
if c2.button("Run the sweep", key="sweep_run"):
    try:
        layers = parse_layers(sweep_layers, lm.num_layers)
        bar = st.progress(0.0, text="layers")
        cancel = cancel_button("sweep_cancel")
        sweep_request = EditRequest(prompt, subject, target)
        checks = editor_prompts(sweep_request, generation_prompts, paraphrases, neighbours)
        state["sweep"] = layer_sweep(
            lm,
            sweep_request,
            layers,
            paraphrases=checks.paraphrases,
            neighbors=checks.neighbours,
            hparams=settings,
            progress=bar_progress(bar, "layers edited"),
            step=session_step(lm, f"a layer sweep of {prompt.replace('{}', subject)!r}"),
        )
        bar.empty()
        cancel.empty()
    except Exception as err:  # the page's error boundary: one message, details in the log
        state.pop("sweep", None)
        show_error(err, "sweeping the layers")
sweep = state.get("sweep")
if sweep is not None:
    measures = {
        "efficacy": "efficacy",
        "paraphrase": "paraphrase",
        "generation_efficacy": "generation efficacy (text)",
        "neighborhood": "neighbourhood kept",
    }
    st.altair_chart(charts.sweep_chart(sweep.rows, measures), width="stretch")
    r = sweep.correlation()
    a, b, c = st.columns(3)
    for col, key, label in (
        (a, "p_new", "p(new)"),
        (b, "generation_efficacy", "generation efficacy"),
        (c, "score", "score"),
    ):
        col.metric(f"r(trace effect, {label})", "-" if r[key] is None else f"{r[key]:+.2f}")
    st.dataframe(pd.DataFrame(sweep.rows).drop(columns=["texts"]), hide_index=True, width="stretch", key="sweep_table")
    st.caption(
        f"Best layer by score: {sweep.best_layer()} · {sweep.seconds:.0f} s · `python -m core sweep` does the same."
    )
