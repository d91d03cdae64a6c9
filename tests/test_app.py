"""The Streamlit pages, driven with streamlit.testing.v1.AppTest on the embedded model: inputs filled, buttons
pressed, shown values checked against the library, bad input answered with one st.error and nothing changed.

Kept small (few samples, one kind) so the whole file runs in a few minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.edits import EditRequest
from core.models import EMBEDDED_MODEL
from ui import common

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "pages/1_Trace_explorer.py",
    "pages/2_Averages.py",
    "pages/3_Fact_editor.py",
    "pages/4_Sentiment_trace.py",
    "pages/6_Sentiment_editor.py",
]
EIFFEL = "The Eiffel Tower is located in the city of"

pytestmark = pytest.mark.slow


def open_app(page: str | None = None, timeout: float = 600) -> AppTest:
    """A new browser session on the home page (or `page`)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def chart_specs(at: AppTest) -> list[str]:
    return [c.proto.spec for c in at.get("vega_lite_chart")]


@pytest.fixture(scope="module")
def lm():
    return common.load(EMBEDDED_MODEL)  # the process-wide model the pages share


# --- pure helpers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, subject",
    [
        (EIFFEL, "The Eiffel Tower"),
        ("Big Ben stands in the city of", "Big Ben"),
        ("The capital of Germany is", "Germany"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("The Statue of Liberty is located in", "The Statue of Liberty"),
        ("iPhone is made by", "iPhone"),
        ("", ""),
    ],
)
def test_suggest_subject(prompt, subject):
    assert common.suggest_subject(prompt) == subject


def test_result_store_forgets_the_oldest():
    s = common.ResultStore(size=2)
    s.put("a", 1), s.put("b", 2), s.get("a"), s.put("c", 3)
    assert (s.get("a"), s.get("b"), s.get("c")) == (1, None, 3)


# --- every page -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [None, *PAGES])
def test_every_page_renders_without_error(page):
    at = open_app(page)
    assert not errors(at)
    assert at.title[0].value


def test_home_shows_the_model_card_and_survives_an_unknown_model(lm):
    at = open_app()
    shown = metrics(at)
    assert shown["Family"] == "llama" and shown["Layers"] == str(lm.num_layers) and shown["Hidden size"] == "576"
    assert shown["Device"] == str(lm.device) and shown["Dtype"] == "float32"
    at.text_input[0].set_value("no-such-org/no-such-model")
    at.button[0].click().run()
    assert not at.exception
    assert len(errors(at)) == 1 and "no-such-org/no-such-model" in errors(at)[0]
    assert metrics(at)["Layers"] == str(lm.num_layers)  # still on the embedded model
    at.switch_page("pages/1_Trace_explorer.py").run()
    assert not errors(at) and not at.exception


def test_home_loads_the_model_with_a_device_map(lm):
    at = open_app()
    at.selectbox[0].set_value("auto")
    at.button[0].click().run()
    assert not at.exception and not errors(at)
    assert at.session_state[common.DEVICE_MAP_KEY] == "auto"
    assert any("Device map" in c.value for c in at.caption)  # the map's modules per device
    assert metrics(at)["Layers"] == str(lm.num_layers) and metrics(at)["Device"] == "cpu"


# --- trace explorer -------------------------------------------------------------------------------------------


def test_trace_explorer_suggests_the_subject_and_fills_examples():
    at = open_app(PAGES[0])
    at.text_input(key="trace_prompt").set_value("The capital of Germany is").run()
    assert at.text_input(key="trace_subject").value == "Germany"
    at.selectbox(key="trace_example").set_value("Big Ben stands in the city of").run()
    assert at.text_input(key="trace_prompt").value == "Big Ben stands in the city of"
    assert at.text_input(key="trace_subject").value == "Big Ben"


def test_trace_explorer_traces_and_shows_the_library_numbers(lm):
    from core.tracing import trace

    at = open_app(PAGES[0])
    at.text_input(key="trace_prompt").set_value(EIFFEL).run()
    at.multiselect(key="trace_kinds").set_value(["hidden"])
    at.number_input(key="trace_samples").set_value(1)
    at.button(key="trace_run").click().run()
    assert not at.exception and not errors(at)
    expected = trace(lm, EIFFEL, "The Eiffel Tower", kinds=[], samples=1)  # answer, clean and corrupted scores only
    shown = metrics(at)
    assert shown["Answer"] == repr(expected.answer) == repr(" Paris")
    assert shown["p(answer), clean"] == f"{expected.clean_score:.4f}"
    assert shown["p(answer), subject corrupted"] == f"{expected.corrupted_score:.4f}"
    result = at.session_state["trace_result"]
    assert result.scores["hidden"].shape == (len(expected.tokens), lm.num_layers)
    # restoring the last token's state at the last layer gives back the clean answer
    assert result.scores["hidden"][-1, -1] == pytest.approx(expected.clean_score, abs=1e-4)
    specs = chart_specs(at)
    assert len(specs) == 1 and "Paris" in specs[0] and f"{expected.clean_score:.3f}" in specs[0]
    # the estimate came first and was replaced, kind by kind, by the exact table
    assert "exact (fast engine)" in [c.value for c in at.caption]
    assert at.button(key="trace_stop") is not None
    # the same inputs again: nothing is recomputed
    at.button(key="trace_run").click().run()
    assert at.session_state["trace_result"].scores["hidden"] is result.scores["hidden"]


@pytest.mark.parametrize(
    "prompt, subject, message",
    [
        ("", "x", "the prompt is empty"),
        (EIFFEL, "Louvre", "does not occur in the prompt"),
    ],
)
def test_trace_explorer_bad_input(prompt, subject, message):
    at = open_app(PAGES[0])
    at.text_input(key="trace_prompt").set_value(prompt).run()
    at.text_input(key="trace_subject").set_value(subject)
    at.button(key="trace_run").click().run()
    assert not at.exception
    assert len(errors(at)) == 1 and message in errors(at)[0]
    assert "trace_result" not in at.session_state
    at.multiselect(key="trace_kinds").set_value([])
    at.text_input(key="trace_prompt").set_value(EIFFEL).run()
    at.button(key="trace_run").click().run()
    assert errors(at) == ["choose at least one kind to trace"]


# --- averages -------------------------------------------------------------------------------------------------


def test_averages_on_one_fact(lm):
    at = open_app(PAGES[1])
    at.number_input(key="aie_limit").set_value(1)
    at.number_input(key="aie_samples").set_value(1)
    at.multiselect(key="aie_kinds").set_value(["hidden"])
    at.button(key="aie_run").click().run()
    assert not at.exception and not errors(at)
    result = at.session_state["aie_result"]
    shown = metrics(at)
    assert shown["Facts averaged"] == "1" == str(result.n)
    assert shown["Skipped (not known)"] == str(result.skipped)
    assert np.array(result.tables["hidden"]).shape == (6, lm.num_layers)
    assert len(chart_specs(at)) == 1
    category, layer, effect = result.peak("hidden")
    assert any(f"layer **{layer}**" in c.value for c in at.caption)


def test_averages_bad_files():
    at = open_app(PAGES[1])
    at.radio(key="aie_source").set_value("Upload a facts file (JSON)").run()
    at.button(key="aie_run").click().run()
    assert errors(at) == ["upload a facts file first"]
    at.file_uploader(key="aie_upload").set_value(("facts.json", b"{not json", "application/json")).run()
    at.button(key="aie_run").click().run()
    assert len(errors(at)) == 1 and "'facts.json' is not valid JSON" in errors(at)[0]
    unknown = b'[{"subject": "Zorblax", "prompt": "Zorblax was born in the city of", "attribute": "Qwertyville"}]'
    at.file_uploader(key="aie_upload").set_value(("facts.json", unknown, "application/json")).run()
    at.button(key="aie_run").click().run()
    assert len(errors(at)) == 1 and "predicts none" in errors(at)[0]
    assert not at.exception


# --- fact editor ----------------------------------------------------------------------------------------------


def try_text(at: AppTest) -> str:
    at.text_input(key="try_prompt").set_value(EIFFEL)
    at.button(key="try_run").click().run()
    return at.code[-1].value


@pytest.mark.parametrize(
    "prompt, subject, target, message",
    [
        ("{} is located in the city of", "The Eiffel Tower", "Paris", "already answers"),
        ("{} is located in the city of", "", "Rome", "the subject is empty"),
        ("The Louvre is located in the city of", "The Eiffel Tower", "Rome", "does not occur"),
        ("{} is located in the city of", "The Eiffel Tower", " ", "the new target is empty"),
    ],
)
def test_fact_editor_bad_input_changes_nothing(prompt, subject, target, message):
    at = open_app(PAGES[2])
    at.text_input(key="edit_prompt").set_value(prompt)
    at.text_input(key="edit_subject").set_value(subject)
    at.text_input(key="edit_target").set_value(target)
    at.button(key="edit_apply").click().run()
    assert not at.exception
    assert len(errors(at)) == 1 and message in errors(at)[0]
    assert at.session_state["edits"] == []


def test_fact_editor_edit_undo_isolation_export_import_and_trace_again(lm):
    from core.edit_site import default_layer
    from core.edits import applied
    from core.evaluation import ESSENCE_PROMPTS, essence_drift, names_object

    def weight(layer):
        return lm.arch.mlp_out_weight(lm.model, layer)

    original = weight(default_layer(lm)).detach().clone()
    a = open_app(PAGES[2])
    b = open_app(PAGES[2])  # a second browser session
    a.number_input(key="edit_stats_tokens").set_value(4096)  # small statistics keep the test short
    a.button(key="edit_apply").click().run()
    assert not a.exception and not errors(a)
    (edit,) = a.session_state["edits"]
    assert edit.request.target_true == "Paris" and edit.layer == a.number_input(key="edit_layer").value
    shown = [(m.label, m.value) for m in a.metric]
    (_, p_new_before), (_, p_true_before), (_, p_new_after), (_, p_true_after) = shown[:4]
    assert shown[0][0] == "p(Rome)" and shown[1][0] == "p(Paris)"
    assert not a.warning  # the edit took: p(Rome) > p(Paris) and the texts name Rome
    text_scores = dict(shown[4:])
    named, of = map(int, text_scores["Generation efficacy (text)"].split("/"))
    assert of == 3 + 2 and named >= 3  # generation prompts + paraphrase checks whose text names Rome
    bled, neighbours = map(int, text_scores["Bleed (text)"].split("/"))
    assert neighbours == 2 and bled == 0
    rewritten, wrote = map(int, text_scores["Rewritten (text)"].split("/"))
    assert wrote >= 1 and 1 <= rewritten <= wrote  # "...is located in" wrote Paris before the edit, Rome after
    assert float(p_new_after) > 0.5 > float(p_true_after) and float(p_true_before) > float(p_new_before)
    with applied(lm, [edit]):  # the session held no edit before this one: its 'before' is the unedited model
        drift = essence_drift(lm, "The Eiffel Tower")
    assert text_scores["Essence drift"] == f"{drift:.2f} nats" and drift > 0
    essence = a.table[0].value  # what the model says the subject is, before and after
    assert list(essence.columns) == ["before", "after"] and len(essence) == len(ESSENCE_PROMPTS)
    assert [t.split(" is")[0] for t in essence["after"]] == ["The Eiffel Tower"] * len(ESSENCE_PROMPTS)
    texts = [c.value for c in a.code]
    assert texts[0].startswith("The Eiffel Tower is located in") and "Paris" in texts[0]  # before
    assert "Rome" in texts[len(texts) // 2]  # after, first generation prompt: the model writes the new fact
    gens = common.lines(common.EXAMPLE_GENERATION)
    named = [c.value for c in a.caption if c.value.startswith("names ")]  # under each text: before Paris, after Rome
    assert named == [
        f"names {obj!r}: {'yes' if names_object(text[len(prompt) :], obj) else 'no'}"
        for obj, side in (("Paris", texts[:3]), ("Rome", texts[3:6]))
        for prompt, text in zip(gens, side)
    ]
    next_before, next_after, table = (d.value for d in a.dataframe[:3])  # likeliest next tokens, then the checks
    assert list(next_before.columns) == ["next token", "p"] and len(next_before) == len(next_after) == 5
    assert next_before["p"].is_monotonic_decreasing and next_after["p"].is_monotonic_decreasing
    assert next_before["next token"][0] == "' Paris'" and f"{next_before['p'][0]:.4f}" == p_true_before
    assert next_after["next token"][0] == "' Rome'" and f"{next_after['p'][0]:.4f}" == p_new_after
    assert torch.equal(weight(edit.layer), original)  # the shared weights carry no edit between runs
    assert list(table["check"]) == ["paraphrase", "paraphrase", "neighbourhood", "neighbourhood"]
    assert list(table["text names Rome"]) == ["yes" if "Rome" in t else "no" for t in table["text after"]]

    # the other session does not see the edit; this one does
    assert "Paris" in try_text(b) and "Rome" not in try_text(b)
    assert "Rome" in try_text(a)
    assert b.session_state["edits"] == []

    # export from A, import into B; a wrong file is refused
    data = common.edits_file_bytes(a.session_state["edits"])
    b.file_uploader(key="edit_upload").set_value(
        ("bad.safetensors", b"not a safetensors file", "application/octet-stream")
    ).run()
    b.button(key="edit_import").click().run()
    assert len(errors(b)) == 1 and "'bad.safetensors'" in errors(b)[0] and b.session_state["edits"] == []
    b.file_uploader(key="edit_upload").set_value(("rome_edits.safetensors", data, "application/octet-stream")).run()
    b.button(key="edit_import").click().run()
    assert [e.id for e in b.session_state["edits"]] == [edit.id]
    assert "Rome" in try_text(b)
    b.button(key="edit_reset").click().run()
    assert b.session_state["edits"] == [] and "Paris" in try_text(b)

    # trace the edited model again: the trace explorer now answers Rome
    a.session_state["trace_kinds"] = ["hidden"]
    a.session_state["trace_samples"] = 1
    a.button(key="edit_trace_again").click().run()
    assert not a.exception and not errors(a)
    assert metrics(a)["Answer"] == repr(" Rome")
    assert a.session_state["trace_result"].subject == "The Eiffel Tower"

    # undo on the editor page: the model is back to Paris
    a.switch_page(PAGES[2]).run()
    a.button(key=f"undo_{edit.id}").click().run()
    assert a.session_state["edits"] == [] and "Paris" in try_text(a)
    assert torch.equal(weight(edit.layer), original)


def test_fact_editor_measures_another_subject_on_its_own_prompt(lm):
    """A request about another subject, the example prompts left in the form: the page says they were left out
    and reads the text of the request's own prompt; no example check is measured."""
    at = open_app(PAGES[2])
    at.text_input(key="edit_prompt").set_value("{} is the capital of")
    at.text_input(key="edit_subject").set_value("Madrid")
    at.text_input(key="edit_target").set_value("Italy")
    at.number_input(key="edit_stats_tokens").set_value(4096)
    at.button(key="edit_apply").click().run()
    assert not at.exception and not errors(at)
    (edit,) = at.session_state["edits"]
    notes = [i.value for i in at.info]
    assert any("are about The Eiffel Tower, not 'Madrid'" in n for n in notes)
    assert any("'Madrid is the capital of'" in n for n in notes)
    texts = [c.value for c in at.code]
    assert len(texts) == 2 and all(t.startswith("Madrid is the capital of") for t in texts)  # before, after
    assert len(at.dataframe) == 2  # the likeliest next tokens before and after; no checks table
    shown = metrics(at)
    assert shown["Generation efficacy (text)"] == f"{int('Italy' in texts[1].split(' of', 1)[1])}/1"
    assert shown["Bleed (text)"] == "-"
    at.button(key="edit_reset").click().run()
    assert at.session_state["edits"] == []


# --- sentiment trace ------------------------------------------------------------------------------------------


def test_sentiment_fit_and_trace(lm):
    from core.sentiment_trace import trace_sentiment

    at = open_app(PAGES[3])
    assert at.button(key="sent_run").disabled
    at.button(key="sent_fit").click().run()
    assert not at.exception and not errors(at)
    _, report, proxy, _ = at.session_state["sent_proxy"]
    shown = metrics(at)
    assert shown["Test accuracy"] == f"{report.accuracy:.1%}" and report.accuracy > 0.6
    assert shown["Test texts"] == str(report.n) == str(sum(map(sum, report.confusion)))
    assert len(chart_specs(at)) == 1  # the confusion matrix

    text = "I love this song."
    at.text_input(key="sent_text").set_value(text)
    at.multiselect(key="sent_kinds").set_value(["hidden"])
    at.number_input(key="sent_samples").set_value(1)
    at.button(key="sent_run").click().run()
    assert not at.exception and not errors(at)
    expected = trace_sentiment(lm, text, proxy, kinds=[], samples=1)  # clean and corrupted scores only
    shown = metrics(at)
    assert shown["p(positive), clean"] == f"{expected.clean_score:.4f}"
    assert shown["p(positive), text corrupted"] == f"{expected.corrupted_score:.4f}"
    trace = at.session_state["sent_trace"]
    assert trace.scores["hidden"].shape == (len(expected.tokens), lm.num_layers)
    assert len(chart_specs(at)) == 2 and any("p(positive) after restoring" in s for s in chart_specs(at))
    assert "exact (fast engine)" in [c.value for c in at.caption]

    # longer than an exact trace accepts: the estimate alone, labelled as such
    at.text_input(key="sent_text").set_value(" ".join([text] * 14))
    at.button(key="sent_run").click().run()
    assert not at.exception and not errors(at)
    assert any("only the estimate is shown" in i.value for i in at.info)
    assert any(c.value.startswith("**estimate**") for c in at.caption)
    assert at.session_state["sent_trace"].engine == "estimate"

    at.text_input(key="sent_text").set_value("   ")
    at.button(key="sent_run").click().run()
    assert errors(at) == ["the text is empty"] and not at.exception


def test_sentiment_bad_files():
    at = open_app(PAGES[3])
    at.radio(key="sent_source").set_value("Upload a CSV/TSV file").run()
    at.button(key="sent_fit").click().run()
    assert errors(at) == ["upload a CSV or TSV file first"]
    at.file_uploader(key="sent_upload").set_value(("tweets.csv", b"words,mood\nhello,1\n", "text/csv")).run()
    at.button(key="sent_fit").click().run()
    assert len(errors(at)) == 1 and "'text' and 'label'" in errors(at)[0]
    assert "sent_proxy" not in at.session_state and not at.exception


def test_fact_editor_layer_sweep_draws_the_layers_and_leaves_the_model(lm):
    weights = {n: p.clone() for n, p in lm.model.named_parameters()}
    at = open_app("pages/3_Fact_editor.py")
    at.number_input(key="edit_steps").set_value(10).run()
    at.text_input(key="sweep_layers").set_value("2-4").run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not errors(at), errors(at)
    sweep = at.session_state["sweep"]
    table = next(d.value for d in at.dataframe if "trace_effect" in d.value)
    assert list(table["layer"]) == [2, 3, 4] and list(table["layer"]) == sweep.layers
    assert (table["p_new"] > sweep.before["p_new"]).all()  # every layer's edit raised p(Rome)
    assert table["generation_efficacy"].between(0, 1).all() and table["trace_effect"].notna().all()
    shown = metrics(at)
    r = sweep.correlation()["p_new"]
    assert shown["r(trace effect, p(new))"] == ("-" if r is None else f"{r:+.2f}")
    assert any("MLP effect at the subject's last token" in spec for spec in chart_specs(at))
    for name, p in lm.model.named_parameters():  # the sweep's edits were all undone
        assert torch.equal(p, weights[name]), name


def test_text_summary_counts_rewrites_where_the_text_named_the_old_fact():
    """The editor's text metrics from hand-made measures: efficacy over generation prompts + paraphrase
    checks, rewrite over those whose 'before' text named the true object, bleed over neighbourhood checks."""

    def check(kind, new, true):
        return {"check": kind, "prompt": "", "p_new": 0.0, "p_true": 0.0, "text": "", "names_new": new,
                "names_true": true}  # fmt: skip

    before = common.Measures(
        0.0, 1.0, ["", ""], [False, False], [True, False],
        [check("paraphrase", False, True), check("neighbourhood", False, True), check("neighbourhood", True, False)],
    )  # fmt: skip
    after = common.Measures(
        1.0, 0.0, ["", ""], [True, True], [False, False],
        [check("paraphrase", False, False), check("neighbourhood", True, False), check("neighbourhood", True, False)],
    )  # fmt: skip
    summary = common.text_summary(before, after)
    assert summary["efficacy"] == (2, 3)  # both generations, not the paraphrase
    assert summary["rewrite"] == (1, 2)  # generation 1 (Paris -> Rome) yes; the paraphrase named Paris, not Rome now
    assert summary["bleed"] == (1, 2)  # the second neighbour named the new object before already


def test_editor_prompts_drop_the_examples_for_another_subject():
    """The example prompts measure the example request only: for another subject they are left out (the
    request's own prompt is continued instead); typed prompts stay, with a note when they miss the subject."""
    examples = (common.EXAMPLE_GENERATION, common.EXAMPLE_PARAPHRASES, common.EXAMPLE_NEIGHBOURS)
    eiffel = EditRequest("{} is located in the city of", "the eiffel tower", "Rome")
    kept = common.editor_prompts(eiffel, *examples)  # the example subject, in any case: everything kept
    assert kept.generation == common.lines(common.EXAMPLE_GENERATION) and len(kept.paraphrases) == 2
    assert len(kept.neighbours) == 2 and kept.notes == []

    obama = EditRequest("{} was born in", "Barack Obama", "London")
    left = common.editor_prompts(obama, *examples)
    assert (left.generation, left.paraphrases, left.neighbours) == (["Barack Obama was born in"], [], [])
    assert "generation prompts, paraphrase checks and neighbourhood checks are about The Eiffel Tower" in left.notes[0]
    assert "'Barack Obama was born in'" in left.notes[-1]

    typed = common.editor_prompts(
        obama, "Barack Obama grew up in\nHe was born in", "Obama's birthplace is", common.EXAMPLE_NEIGHBOURS
    )
    assert typed.generation == ["Barack Obama grew up in", "He was born in"]
    assert typed.paraphrases == ["Obama's birthplace is"] and typed.neighbours == []
    assert typed.notes[0].startswith("The example neighbourhood checks are about The Eiffel Tower, not 'Barack Obama'")
    assert typed.notes[1].startswith("2 prompts do not name 'Barack Obama' ('He was born in'; \"Obama's birthplace")
