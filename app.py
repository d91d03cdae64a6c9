"""ROME Studio: locate and edit factual associations in a language model (Meng et al. 2022).

Run:  streamlit run app.py   (or `make run`). This page picks the model and says how to use each page.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Home · ROME Studio", page_icon=":material/home:", layout="wide")

st.title("ROME Studio")
st.markdown(
    "Find **where** a language model keeps a fact, then **rewrite** it — the causal tracing and Rank-One Model "
    "Editing of *Locating and Editing Factual Associations in GPT* (Meng, Bau, Andonian, Belinkov, 2022)."
)

left, right = st.columns([3, 2], gap="large")

with right:
    st.subheader("How to use it")
    st.page_link(
        "pages/1_Trace_explorer.py", label="**Trace explorer** — where is a fact stored?", icon=":material/search:"
    )
    st.markdown(
        "Type a prompt that the model completes with a fact and mark its subject (suggested for you). The subject's "
        "token embeddings are corrupted with noise; then each hidden state, MLP output and attention output is "
        "restored in turn. The heat maps show how much of the answer's probability each restored state brings back."
    )
    st.page_link("pages/2_Averages.py", label="**Averages** — the paper's Figure 2", icon=":material/show_chart:")
    st.markdown(
        "The average indirect effect over many known facts, by token category and layer: the early site "
        "(last subject token, middle layers, MLP) and the late site (last token, attention)."
    )
    st.page_link("pages/3_Fact_editor.py", label="**Fact editor** — rewrite a fact with ROME", icon=":material/edit:")
    st.markdown(
        "Give a prompt with `{}` for the subject and a new object. See the probabilities and the model's text "
        "before and after, check paraphrases and neighbouring facts, undo any edit, export or import edits, and "
        "trace the edited model again."
    )
    st.page_link(
        "pages/4_Sentiment_trace.py",
        label="**Sentiment trace** — where is sentiment read?",
        icon=":material/sentiment_satisfied:",
    )
    st.markdown(
        'Fit the "I am feeling" proxy (p(good) vs p(bad) after the text) on labelled texts, then trace any text '
        "with the proxy's probability of *positive* as the restored quantity."
    )
    st.page_link(
        "pages/5_Many_edits.py", label="**Many edits** — a batch of facts, and saving", icon=":material/library_add:"
    )
    st.markdown(
        "Upload a table of facts and edit them all in one MEMIT update, see each one's before/after, undo the "
        "batch; save the model with this session's edits as a Hugging Face folder."
    )
    st.page_link(
        "pages/6_Sentiment_editor.py",
        label="**Sentiment editor** — edit how a subject reads",
        icon=":material/edit_note:",
    )
    st.markdown(
        'Test a located site by editing it: make texts about a subject end in " good" (or " bad") with a '
        "rank-one edit of one MLP, and read held-out and unrelated texts before and after."
    )
    st.caption("Everything shown here can be reproduced with the command line: `python -m core --help`.")

with left:
    # torch and transformers load here, after the static text above is already on the screen
    from core.devices import DEVICE_MAP_NAMES
    from core.models import EMBEDDED_MODEL
    from ui.common import DEVICE_MAP_KEY, MODEL_KEY, load, model_device_map, model_name, show_error

    st.subheader("Model")
    with st.form("model_form", border=False):
        name = st.text_input(
            "Model to load",
            value=model_name(),
            help=f"`{EMBEDDED_MODEL}` is the embedded default (works offline). Otherwise a Hugging Face id "
            "available offline (e.g. gpt2) or a local folder with a causal language model.",
        )
        maps = ["", *DEVICE_MAP_NAMES]
        device_map = st.selectbox(
            "Device map",
            maps,
            index=maps.index(model_device_map()) if model_device_map() in maps else 0,
            format_func=lambda m: m or "one device (the GPU when present)",
            help="For a model bigger than one GPU: accelerate spreads its blocks over the GPUs, the CPU and, "
            "beyond memory, the disk (`auto`); tables and edits are the same, only slower.",
        )
        submitted = st.form_submit_button("Load model", type="primary")
    if submitted:
        try:
            with st.spinner(f"Loading {name.strip()} …"):
                load(name, device_map)
            st.session_state[MODEL_KEY] = name.strip()
            st.session_state[DEVICE_MAP_KEY] = device_map
        except Exception as err:  # the page's error boundary: one message, details in the log
            show_error(err, "loading the model")
    try:
        lm = load(model_name(), model_device_map())
    except Exception as err:
        lm = None
        show_error(err, "loading the model")
    if lm is not None:
        card = lm.card()
        st.markdown(f"#### `{card['name']}`")
        cols = st.columns(4)
        cols[0].metric("Family", card["family"])
        cols[1].metric("Layers", card["layers"])
        cols[2].metric("Hidden size", card["hidden size"])
        cols[3].metric("Parameters", f"{card['parameters'] / 1e6:.0f} M")
        cols = st.columns(4)
        cols[0].metric("Device", card["device"])
        cols[1].metric("Dtype", card["dtype"])
        cols[2].metric("Load time", f"{card['load seconds']:.1f} s")
        cols[3].metric("Source", card["source"])
        if card["device map"]:
            st.caption(f"Device map: modules per device — {card['device map']}")
        st.caption(
            "The model is loaded once per server process and shared by every browser session; each session's "
            "edits are applied only while its own computation runs, so sessions never see each other's edits."
        )
