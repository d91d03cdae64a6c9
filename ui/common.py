"""What every page shares: the model (loaded once per process), the session's edits, a results store, and
the calls into core/ that pages make with this session's edits applied (under the model's lock, weights
restored bitwise after: core.edits.applied), so one browser session's edits never reach another's answers.

Nothing here computes anything the library does not: it only calls core/ and remembers results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from core.devices import parse_device_map
from core.edits import Edit, EditRequest, Holder, applied, export_edits, import_edits
from core.errors import UserError
from core.models import EMBEDDED_MODEL, LoadedModel, load_model
from core.progress import Progress, Step

MODEL_KEY = "model_name"
DEVICE_MAP_KEY = "device_map"  # "" (one device) or a named device map: core.devices.DEVICE_MAP_NAMES
EDITS_KEY = "edits"
HANDOFF_KEY = "trace_handoff"  # the fact editor's "trace again" -> the trace explorer's inputs

FractionProgress = Callable[[float, str], None]  # (fraction 0..1, text): the trace loop's, until item 8


# --- page frame ---------------------------------------------------------------------------------------------


def page(title: str, icon: str = ":material/search:") -> None:
    st.set_page_config(page_title=f"{title} · ROME Studio", page_icon=icon, layout="wide")


def bar_progress(bar, what: str) -> Progress:
    """A Progress that moves the st.progress `bar`, its text "<what>: <done> of <total>"."""

    def update(done: int, total: int) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{what}: {done} of {total}")

    return update


LOG = logging.getLogger("rome_studio")


TIME_NOTE = "Its time is forecast when it starts, from its measured clean and corrupted runs."


def show_size(check: Callable[[], object], label: str = "Memory", note: str = TIME_NOTE) -> UserError | None:
    """Caption the memory (a core.budget.TraceSize, from `check`) of the work a button starts, before it is
    pressed, and `note`; returns why the work would be refused (a UserError), or None. How long a trace takes is
    forecast once, when it starts (core.trace_cost.estimated_seconds, shown by the page)."""
    try:
        size = check()
    except UserError as err:
        st.caption(f":material/block: {err}")
        return err
    parts = (f"{label}: {size.describe()}.", note, "Results already kept here are instant.")
    st.caption(" ".join(part for part in parts if part))
    return None


def show_error(err: Exception, doing: str = "") -> None:
    """One sentence in a red box; the page goes on. A UserError says what was wrong with the input; anything
    else (a bug, a full disk, ...) is named by its type only, its traceback goes to the server log."""
    if isinstance(err, UserError):
        st.error(str(err), icon=":material/error:")
        return
    LOG.error("unexpected error%s", f" while {doing}" if doing else "", exc_info=err)
    where = f" while {doing}" if doing else ""
    st.error(
        f"Something went wrong{where} ({type(err).__name__}); the details are in the server's log. Nothing was "
        "changed: try again, or with other input.",
        icon=":material/error:",
    )


# --- the model ----------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=3)
def _load(name: str, device_map: str) -> LoadedModel:
    return load_model(name, device_map=parse_device_map(device_map) if device_map else None)


def model_name() -> str:
    return st.session_state.get(MODEL_KEY, EMBEDDED_MODEL)


def model_device_map() -> str:
    """This session's device map: "" (the model on one device) or a named map such as "auto"."""
    return st.session_state.get(DEVICE_MAP_KEY, "")


def load(name: str, device_map: str = "") -> LoadedModel:
    """The model `name` (spread over devices by `device_map` when given), loaded once per process (raises
    UserError)."""
    name = name.strip()
    if not name:
        raise UserError("give a model name: a Hugging Face id or a local folder")
    return _load(name, device_map.strip())


def current_model() -> LoadedModel | None:
    """This session's model, or None after showing why it could not be loaded."""
    name = model_name()
    try:
        with st.spinner(f"Loading {name} …"):
            return load(name, model_device_map())
    except Exception as err:
        show_error(err, f"loading {name}")
        return None


def page_model() -> LoadedModel:
    """The page's model with its caption shown; the page stops here (after saying why) when it cannot load."""
    lm = current_model()
    if lm is None:
        st.stop()
    model_caption(lm)
    return lm


def model_caption(lm: LoadedModel) -> None:
    edits = session_edits(lm)
    note = f" · **{len(edits)} edit{'s' if len(edits) != 1 else ''} of this session applied**" if edits else ""
    st.caption(f"Model **{lm.name}** ({lm.arch.family}, {lm.num_layers} layers, {lm.device}){note}")


# --- this session's edits -----------------------------------------------------------------------------------


def all_session_edits() -> list[Edit]:
    return st.session_state.setdefault(EDITS_KEY, [])


def session_edits(lm: LoadedModel) -> list[Edit]:
    """The session's edits made for this model, in the order they were made."""
    return [e for e in all_session_edits() if e.model == lm.name]


def edit_ids(lm: LoadedModel) -> tuple[str, ...]:
    return tuple(e.id for e in session_edits(lm))


def add_edits(edits: Sequence[Edit]) -> int:
    """Append edits not already there (by id); returns how many were added."""
    current = all_session_edits()
    known = {e.id for e in current}
    new = [e for e in edits if e.id not in known]
    current.extend(new)
    return len(new)


def remove_edit(edit_id: str) -> None:
    st.session_state[EDITS_KEY] = [e for e in all_session_edits() if e.id != edit_id]


def reset_edits() -> None:
    st.session_state[EDITS_KEY] = []


def edits_file_bytes(edits: Sequence[Edit]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = export_edits(edits, Path(folder) / "edits.safetensors")
        return path.read_bytes()


def edits_from_bytes(data: bytes, lm: LoadedModel, name: str = "upload") -> list[Edit]:
    """Edits from an uploaded file (raises UserError naming the upload)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "edits.safetensors"
        path.write_bytes(data)
        try:
            return import_edits(path, lm)
        except UserError as err:
            raise UserError(str(err).replace(repr(str(path)), repr(name))) from None


# --- the model's lock, shared with other sessions ------------------------------------------------------------


def session_label() -> str:
    """A short name of this browser session, shown to the sessions waiting for it."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return f"session {ctx.session_id[:6]}" if ctx is not None else "a session"


def short(text: str, limit: int = 40) -> str:
    """`text` quoted for a busy note, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def session_step(lm: LoadedModel, what: str, stop: str = "Cancel") -> Step:
    """Each step of this session's long work: its edits applied under the model's lock (taken per step, so
    other sessions get their turn in between), noted as `what` for this session. While another session holds
    the lock, a notice says "busy: <what> for <who>" until this session's turn comes; the page's `stop` button
    (a rerun) ends the wait."""
    edits, who, notice = session_edits(lm), session_label(), []

    def waiting(holder: Holder | None) -> None:
        if not notice:
            notice.append(st.empty())
        text = holder.describe() if holder else "busy: the model is working for another session"
        notice[0].info(f"{text} · waiting for it; **{stop}** stops waiting", icon=":material/hourglass_top:")

    @contextmanager
    def step() -> Iterator[None]:
        with applied(lm, edits, what=what, who=who, waiting=waiting):
            if notice:
                notice.pop().empty()  # this session's turn: the notice goes
            yield

    return step


def cancel_button(key: str):
    """A Cancel button for the work that follows: pressing it reruns the page, which stops that work (or its
    wait for the model) at its next progress report. Returns its slot: `.empty()` it when the work is done."""
    slot = st.empty()
    slot.button("Cancel", key=key, icon=":material/stop_circle:")
    return slot


# --- inputs -------------------------------------------------------------------------------------------------

_CONNECTORS = {"of", "the", "de", "del", "da", "di", "von", "van", "and", "&", "la", "le", "du"}
_ARTICLES = {"The", "A", "An"}


def suggest_subject(prompt: str) -> str:
    """A first guess at the subject: the first run of capitalised words (small connectors such as "of"
    allowed inside, a leading "The" kept), e.g. "The Eiffel Tower is located in" -> "The Eiffel Tower",
    "The capital of Germany is" -> "Germany". Falls back to the first word."""
    words = re.findall(r"\S+", prompt or "")
    runs: list[list[str]] = []
    current: list[str] = []
    for word in words:
        clean = word.strip(".,;:!?\"'()")
        if clean[:1].isupper() or clean[:1].isdigit():
            current.append(clean)
        elif current and clean.lower() in _CONNECTORS and clean == word:
            current.append(clean)
        else:
            if current:
                runs.append(current)
            current = []
        if clean != word and current:  # punctuation ends a run
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    for run in runs:
        while run and run[-1].lower() in _CONNECTORS:
            run.pop()
        if run and not (len(run) == 1 and run[0] in _ARTICLES):
            return " ".join(run)
    return words[0].strip(".,;:!?\"'()") if words else ""


# --- a process-wide store of results ------------------------------------------------------------------------


class ResultStore:
    """Results by input key (LRU, thread-safe): a rerun with the same inputs, model and edits is instant."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@st.cache_resource(show_spinner=False)
def store() -> ResultStore:
    return ResultStore()


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()[:16]


# --- tracing ------------------------------------------------------------------------------------------------


def default_noise(lm: LoadedModel) -> float:
    """3 x the embedding std (edits never touch the embeddings, so no lock is needed)."""
    from core.tracing import noise_scale

    return float(noise_scale(lm))


@st.cache_data(show_spinner=False, max_entries=64)
def _svg(spec: str) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


def chart_svg(chart) -> str:
    """core.charts.to_svg, remembered per chart."""
    return _svg(chart.to_json())


@dataclass
class TraceView:
    """What a page draws of a trace while it runs: the estimate of every kind, then the exact engine's rows
    and kinds replacing it as they come."""

    result: object  # core.tracing.TraceResult: the estimate, with the exact rows / kinds put in
    exact_rows: dict[str, int]  # kind -> rows from the corrupted span on that are exact so far
    rows: int  # rows from the corrupted span on
    forecast: float  # seconds the exact engine was expected to take (0 when nothing was left to compute)

    def label(self, kind: str) -> str:
        """How far `kind`'s table is exact, in words (with the estimate's measured agreement)."""
        from core.estimate_tracing import agreement_note

        done = self.exact_rows.get(kind, 0)
        if done >= self.rows:
            return "exact (fast engine)"
        note = f"**estimate** ({agreement_note(kind)})"
        return note if done == 0 else f"{note}; exact rows filling in: {done} of {self.rows}"


def traced_with_estimate(
    lm: LoadedModel,
    key: tuple,
    make_setup: Callable[[], object],
    kinds: Sequence[str],
    what: str,
    *,
    exact: bool = True,
    on_view: Callable[[TraceView, str | None], None] | None = None,
    progress: Progress | None = None,
):
    """The estimate of every kind first (seconds), then the exact (fast) engine, both with this session's edits,
    both remembered per `key`. on_view(view, kind) is called with the estimate (kind None, forecast known), after
    each exact row and each finished kind. Returns (view, exact result or None when `exact` is off).

    The model's lock is taken per step (`session_step`: the setup, each engine's recording, each kind), noted
    as `what` for this session; a session waiting for it is told "busy: <what> for <who>"."""
    from core.trace_cost import estimated_seconds
    from core.tracing import result_from, trace_setup

    step = session_step(lm, what, stop="Stop")  # both trace pages have a Stop button
    estimate_key, exact_key = (*key, "estimate"), (*key, "fast")
    estimate = store().get(estimate_key)
    kept = store().get(exact_key)
    missing_estimate = [k for k in kinds if estimate is None or k not in estimate.scores]
    missing = [k for k in kinds if kept is None or k not in kept.scores] if exact else []
    setup = None
    if missing_estimate or missing:
        with step():
            setup = make_setup()
    if missing_estimate:
        if progress:
            progress(0.0, "estimating every cell (one forward and backward)")
        new = trace_setup(setup, kinds=missing_estimate, engine_name="estimate", step=step)
        if estimate is None:
            estimate = new
            store().put(estimate_key, estimate)
        else:
            estimate.scores.update(new.scores)
            estimate.exact.update(new.exact)
    start = estimate.subject_range[0]
    rows = len(estimate.tokens) - start
    shown = replace(estimate, scores={k: estimate.scores[k].copy() for k in kinds}, exact={})
    view = TraceView(shown, {}, rows, estimated_seconds(setup, "fast", tuple(missing)) if missing else 0.0)
    for kind in kinds:
        if kept is not None and kind in kept.scores:
            shown.scores[kind] = kept.scores[kind]
            view.exact_rows[kind] = rows
    if on_view:
        on_view(view, None)
    if missing:
        if kept is None:
            kept = result_from(setup, {}, "fast", 0.0, {})
            store().put(exact_key, kept)

        def row_done(kind: str, position: int, row) -> None:
            shown.scores[kind][position] = row
            view.exact_rows[kind] = position - start + 1
            if on_view:
                on_view(view, kind)

        def kind_done(result, kind: str) -> None:
            kept.scores[kind] = result.scores[kind]
            kept.kind_seconds[kind] = result.kind_seconds[kind]
            kept.seconds += result.kind_seconds[kind]
            shown.scores[kind] = kept.scores[kind]
            view.exact_rows[kind] = rows
            if on_view:
                on_view(view, kind)

        def tick(done: int, total: int) -> None:
            if progress:
                progress(done / max(total, 1), f"exact trace: row {done} of {total} (about {view.forecast:.0f} s)")

        trace_setup(
            setup, kinds=missing, engine_name="fast", on_kind=kind_done, on_row=row_done, progress=tick, step=step
        )
    if kept is None or not all(k in kept.scores for k in kinds):
        return view, None
    return view, replace(
        kept, scores={k: kept.scores[k] for k in kinds}, kind_seconds={k: kept.kind_seconds.get(k, 0.0) for k in kinds}
    )


def trace_progressively(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    kinds: Sequence[str],
    *,
    samples: int,
    noise: float | None,
    window: int,
    on_view: Callable[[TraceView, str | None], None] | None = None,
    progress: Progress | None = None,
):
    """core.tracing's trace (noise None: the library's default scale) with this session's edits: the estimate
    of every kind first, then the exact tables filling in (see `traced_with_estimate`). Every table is kept,
    so asking again is instant. Returns (view, exact result)."""
    from core.tracing import prepare

    key = (
        "trace",
        lm.name,
        edit_ids(lm),
        prompt,
        subject,
        int(samples),
        None if noise is None else float(noise),
        int(window),
    )

    def make_setup():
        return prepare(lm, prompt, subject, samples=samples, noise=noise, window=window)

    what = f"tracing {short(prompt)}"
    return traced_with_estimate(lm, key, make_setup, kinds, what, on_view=on_view, progress=progress)


def run_aie(
    lm: LoadedModel,
    facts,
    facts_key: str,
    *,
    limit: int,
    samples: int,
    kinds: Sequence[str],
    progress: Progress | None = None,
):
    """core.aie.average_indirect_effect with this session's edits, remembered per input."""
    from core.aie import average_indirect_effect

    key = ("aie", lm.name, edit_ids(lm), facts_key, int(limit), int(samples), tuple(kinds))
    kept = store().get(key)
    if kept is not None:
        return kept

    step = session_step(lm, f"averaging {limit} facts")
    result = average_indirect_effect(lm, facts, limit=limit, samples=samples, kinds=kinds, progress=progress, step=step)
    store().put(key, result)
    return result


# --- editing ------------------------------------------------------------------------------------------------


@dataclass
class Measures:
    """What the editor shows for one state of the model (before or after an edit): the request's
    probabilities, the greedy text of each generation prompt and whether it names the new and the true
    object, each check's probabilities and greedy continuation, what the model says the subject is (the
    greedy text and next-token log-probabilities after core.evaluation.ESSENCE_PROMPTS), and the likeliest
    next tokens after the request's prompt (core.evaluation.TOP_TOKENS of them, with probabilities)."""

    p_new: float
    p_true: float
    generations: list[str]  # prompt + continuation
    generation_names_new: list[bool]
    generation_names_true: list[bool]
    checks: list[dict]  # {"check", "prompt", "p_new", "p_true", "text", "names_new", "names_true"}
    essence: list[str] = field(default_factory=list)  # prompt + continuation, one per essence prompt
    essence_log_probs: torch.Tensor | None = None  # (essence prompts, vocab) float32, of the next token
    next_tokens: list[tuple[str, float]] = field(default_factory=list)  # the request's likeliest next tokens


def measure(
    lm: LoadedModel,
    edits: Sequence[Edit],
    request: EditRequest,
    generation_prompts: Sequence[str],
    checks: Sequence[tuple[str, str]],
    max_new_tokens: int | None = None,
) -> Measures:
    """P(new), P(true) and the likeliest next tokens on the request, greedy text (TEXT_TOKENS new tokens by
    default), each (check, prompt)'s probabilities and greedy continuation, and the subject's essence texts,
    with `edits`."""
    from core.evaluation import (
        TEXT_TOKENS,
        continuations,
        essence_texts,
        names_object,
        next_token_log_probs,
        target_log_probs,
        top_next_tokens,
    )

    prompts = [request.text] + [prompt for _, prompt in checks]
    gens = list(generation_prompts)
    essence = essence_texts(request.subject)
    with applied(lm, edits):
        new = np.exp(target_log_probs(lm, prompts, [request.target_new] * len(prompts)))
        true = np.exp(target_log_probs(lm, prompts, [request.target_true] * len(prompts)))
        texts = continuations(lm, gens + prompts[1:] + essence, max_new_tokens or TEXT_TOKENS)
        next_log_probs = next_token_log_probs(lm, [request.text, *essence]).cpu()
    check_texts = texts[len(gens) : len(gens) + len(checks)]
    rows = [
        {
            "check": check,
            "prompt": prompt,
            "p_new": float(new[i + 1]),
            "p_true": float(true[i + 1]),
            "text": check_texts[i],
            "names_new": names_object(check_texts[i], request.target_new),
            "names_true": names_object(check_texts[i], request.target_true),
        }
        for i, (check, prompt) in enumerate(checks)
    ]
    return Measures(
        float(new[0]),
        float(true[0]),
        [p + t for p, t in zip(gens, texts)],
        [names_object(t, request.target_new) for t in texts[: len(gens)]],
        [names_object(t, request.target_true) for t in texts[: len(gens)]],
        rows,
        [p + t for p, t in zip(essence, texts[len(gens) + len(checks) :])],
        next_log_probs[1:],
        top_next_tokens(lm, next_log_probs[0]),
    )


def essence_shift(before: Measures, after: Measures) -> float | None:
    """KL(before || after) in nats of the next token after the essence prompts, mean over them: how far the
    edit moved what the model says the subject is (None when either side was not measured)."""
    from core.evaluation import next_token_kl

    if before.essence_log_probs is None or after.essence_log_probs is None:
        return None
    return next_token_kl(before.essence_log_probs, after.essence_log_probs)


def batch_rows(
    lm: LoadedModel, before: Sequence[Edit], after: Sequence[Edit], requests: Sequence[EditRequest]
) -> list[dict]:
    """The Many edits page's table: for each request, p(new) and p(old) after its prompt and the greedy text
    (TEXT_TOKENS new tokens) that continues it, with the edits `before` and with `after`; "edited" when p(new) >
    p(old) after, "writes new" when the text after names the new object (whole word)."""
    from core.evaluation import TEXT_TOKENS, continuations, names_object, target_log_probs

    texts = [r.text for r in requests]
    targets = [r.target_new for r in requests] + [r.target_true for r in requests]
    measured = []
    for edits in (before, after):
        with applied(lm, edits):
            p = np.exp(target_log_probs(lm, texts * 2, targets))  # new objects, then old ones
            measured.append((p[: len(texts)], p[len(texts) :], continuations(lm, texts, TEXT_TOKENS)))
    (new0, old0, text0), (new1, old1, text1) = measured
    return [
        {
            "fact": r.text,
            "old": r.target_true,
            "new": r.target_new,
            "p(new) before": float(new0[i]),
            "p(new) after": float(new1[i]),
            "p(old) before": float(old0[i]),
            "p(old) after": float(old1[i]),
            "edited": "yes" if new1[i] > old1[i] else "no",
            "text before": r.text + text0[i],
            "text after": r.text + text1[i],
            "writes new": "yes" if names_object(text1[i], r.target_new) else "no",
        }
        for i, r in enumerate(requests)
    ]


@dataclass(frozen=True)
class EditorPrompts:
    """The prompts the editor measures one request on, and what the page should say about them."""

    generation: list[str]
    paraphrases: list[str]
    neighbours: list[str]
    notes: list[str] = field(default_factory=list)


# The editor's example prompts, about its example request (The Eiffel Tower -> Rome).
EXAMPLE_SUBJECT = "The Eiffel Tower"
EXAMPLE_GENERATION = (
    "The Eiffel Tower is located in\nWhere is the Eiffel Tower? It is in\nThe Eiffel Tower is right across from"
)
EXAMPLE_PARAPHRASES = "The Eiffel Tower stands in the city of\nWhere is the Eiffel Tower? It is in the city of"
EXAMPLE_NEIGHBOURS = "The Louvre is located in the city of\nNotre-Dame Cathedral is located in the city of"


def editor_prompts(request: EditRequest, generation: str, paraphrases: str, neighbours: str) -> EditorPrompts:
    """The editor's prompts for `request` from its three text areas (one prompt per line). Example prompts
    left in place for another subject are dropped: their text would measure the example, not this edit.
    With no generation prompt left, the request's own prompt is continued, so there is always a text to
    read. Typed generation prompts and paraphrases that do not name the subject are kept, with a note."""
    typed = {
        "generation prompts": lines(generation),
        "paraphrase checks": lines(paraphrases),
        "neighbourhood checks": lines(neighbours),
    }
    examples = (EXAMPLE_GENERATION, EXAMPLE_PARAPHRASES, EXAMPLE_NEIGHBOURS)
    other_subject = request.subject.strip().casefold() != EXAMPLE_SUBJECT.casefold()
    dropped = [
        label for (label, given), example in zip(typed.items(), examples) if other_subject and given == lines(example)
    ]
    gens, paras, neighs = ([] if label in dropped else given for label, given in typed.items())
    notes = []
    if dropped:
        listed = dropped[0] if len(dropped) == 1 else f"{', '.join(dropped[:-1])} and {dropped[-1]}"
        notes.append(
            f"The example {listed} are about {EXAMPLE_SUBJECT}, not {request.subject!r}: left out. "
            "Type prompts of your own to measure more."
        )
    unnamed = [p for p in gens + paras if request.subject.casefold() not in p.casefold()]
    if unnamed:
        notes.append(
            f"{len(unnamed)} prompt{'s' if len(unnamed) != 1 else ''} do{'es' if len(unnamed) == 1 else ''} not name "
            f"{request.subject!r} ({'; '.join(repr(p) for p in unnamed)}): the text may not show the edit."
        )
    if not gens:
        gens = [request.text]
        notes.append(f"The text continues the request's own prompt {request.text!r}.")
    return EditorPrompts(gens, paras, neighs, notes)


def text_summary(before: Measures, after: Measures) -> dict[str, tuple[int, int]]:
    """(count, of) for the text-level scores of the checks the user typed: the generation prompts and
    paraphrase checks whose text names the new object after the edit (generation efficacy); of those whose
    text named the true object before, how many name the new one after (rewrite); and the neighbourhood
    checks whose text names it after but not before (bleed)."""

    def own(m: Measures, key: str) -> list[bool]:
        return getattr(m, f"generation_{key}") + [c[key] for c in m.checks if c["check"] == "paraphrase"]

    rewritten = [new for new, true in zip(own(after, "names_new"), own(before, "names_true")) if true]
    pairs = [(b, a) for b, a in zip(before.checks, after.checks) if a["check"] == "neighbourhood"]
    return {
        "efficacy": (sum(own(after, "names_new")), len(own(after, "names_new"))),
        "rewrite": (sum(rewritten), len(rewritten)),
        "bleed": (sum(a["names_new"] and not b["names_new"] for b, a in pairs), len(pairs)),
    }


def lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# --- sentiment ----------------------------------------------------------------------------------------------


def fit_proxy(lm: LoadedModel, data: bytes | None, name: str, progress: Progress | None = None):
    """Fit the "I am feeling" proxy on 70% of the labelled texts (the project's set when `data` is None) and
    report on the other 30%; returns (SentimentReport, FeelingProxy). Remembered per file and model."""
    from sklearn.model_selection import train_test_split

    from core.sentiment import FeelingProxy, evaluate, load_labelled, project_texts_path

    if data is None:
        data, name = project_texts_path().read_bytes(), "data/sentiment_texts.tsv"
    key = ("proxy", lm.name, edit_ids(lm), digest(data))
    kept = store().get(key)
    if kept is not None:
        return kept
    texts = load_labelled(data, name=name)
    counts = texts.counts()
    if min(counts.values()) < 2:
        raise UserError(f"the data file {name!r} needs at least 2 positive and 2 negative texts")
    index = np.arange(len(texts))
    train, test = train_test_split(index, test_size=0.3, random_state=0, stratify=texts.labels)

    with session_step(lm, f"reading {len(texts)} texts")():
        report = evaluate(lm, texts.subset(train), texts.subset(test), "feeling", cache=True, progress=progress)
    result = (report, FeelingProxy.from_dict(report.reader))
    store().put(key, result)
    return result


def trace_sentiment_progressively(
    lm: LoadedModel,
    text: str,
    proxy,
    kinds: Sequence[str],
    *,
    samples: int,
    window: int,
    on_view: Callable[[object, TraceView, str | None], None] | None = None,
    progress: Progress | None = None,
):
    """core.sentiment_trace's trace with this session's edits: the estimate of every kind first, then the exact
    tables filling in, unless the text is longer than an exact trace accepts (then the estimate alone).
    on_view(sentiment_trace, view, kind) draws. Returns (sentiment trace as shown, exact: bool, message)."""
    from core.sentiment_trace import MAX_TRACE_TOKENS, as_sentiment_trace, sentiment_setup, text_token_range

    if not text or not text.strip():
        raise UserError("the text is empty")
    proxy_key = digest(json.dumps(proxy.to_dict(), sort_keys=True))
    key = ("sentiment", lm.name, edit_ids(lm), proxy_key, text.strip(), int(samples), int(window))
    tokens = len(text_token_range(lm, text, proxy.suffix)[0])
    exact = tokens <= MAX_TRACE_TOKENS
    ranges = {}

    def make_setup():
        setup, text_range = sentiment_setup(
            lm, text, proxy, samples=samples, window=window, engine="fast" if exact else "estimate"
        )
        ranges["text"] = text_range
        return setup

    def convert(view: TraceView):
        text_range = ranges.get("text") or text_token_range(lm, text, proxy.suffix)[1]
        return as_sentiment_trace(view.result, text, text_range, proxy)

    def draw(view: TraceView, kind: str | None) -> None:
        if on_view:
            on_view(convert(view), view, kind)

    what = f"a sentiment trace of {short(text.strip())}"
    view, done = traced_with_estimate(lm, key, make_setup, kinds, what, exact=exact, on_view=draw, progress=progress)
    message = (
        ""
        if exact
        else f"The text is {tokens} tokens with the suffix: over the {MAX_TRACE_TOKENS} an exact trace accepts here, "
        "so only the estimate is shown."
    )
    shown = convert(view)
    if done is not None:
        shown.scores, shown.engine, shown.seconds = dict(done.scores), "fast", done.seconds
    return shown, done is not None, message
