"""The Sentiment editor page on the embedded model: the before column is the library's proxy reading, the edit
moves its own texts toward the target, other sessions' model is untouched, Undo drops it, bad input is one
error and no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.sentiment_edit import TextGroup, positive_probabilities, sentiment_edit_warning
from core.sentiment_trace import default_proxy
from ui import common

PAGE = "pages/6_Sentiment_editor.py"

pytestmark = pytest.mark.slow


def test_edit_reads_before_and_after_and_undo(open_page):
    lm = common.load(common.EMBEDDED_MODEL)
    weights = {n: p.clone() for n, p in lm.model.named_parameters()}
    at = open_page(PAGE)
    assert not at.error and at.title[0].value == "Sentiment editor"
    at.number_input(key="sedit_steps").set_value(8).run()
    at.button(key="sedit_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    texts = at.text_area(key="sedit_texts").value.splitlines()
    assert list(table["text"][: len(texts)]) == texts
    assert list(table["group"]) == ["the edit's"] * len(texts) + ["about the subject"] * 2 + ["other"] * 2
    expected = positive_probabilities(lm, default_proxy(lm), list(table["text"]))
    np.testing.assert_allclose(table["p(positive) before"], expected, atol=1e-6)
    own = table[table["group"] == "the edit's"]
    assert (own["after"] > own["p(positive) before"]).all()
    for name, p in lm.model.named_parameters():  # the edit is applied only while this session reads
        assert torch.equal(p, weights[name]), name
    assert any(m.label.startswith("the edit's texts read positive") for m in at.metric)

    def group(name):
        rows = table[table["group"] == name]
        return TextGroup(list(rows["text"]), rows["p(positive) before"].to_numpy(), rows["after"].to_numpy())

    flipped = [group(name).flipped("positive") for name in ("the edit's", "about the subject")]
    expected = sentiment_edit_warning("Mondays", "positive", *flipped)
    assert [w.value for w in at.warning] == ([expected] if expected else [])
    at.button(key="sedit_undo").click().run()
    assert not at.dataframe


def test_a_text_without_the_subject_is_one_error(open_page):
    at = open_page(PAGE)
    at.text_area(key="sedit_texts").set_value("I love Tuesdays.").run()
    at.button(key="sedit_go").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "does not mention 'Mondays'" in at.error[0].value
    assert not at.dataframe


def test_an_edit_that_does_not_take_says_so(open_page):
    """At the last layer the subject's state cannot reach the proxy's word at the text's end: nothing moves,
    and the page says the edit did not take above the (unchanged) readings."""
    lm = common.load(common.EMBEDDED_MODEL)
    at = open_page(PAGE)
    at.number_input(key="sedit_layer").set_value(lm.num_layers - 1).run()
    at.number_input(key="sedit_steps").set_value(1).run()
    at.button(key="sedit_go").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[-1].value
    own = table[table["group"] == "the edit's"]
    negative = own[own["p(positive) before"] <= 0.5]
    assert len(negative) and (negative["after"] <= 0.5).all()  # none of those reads positive after it
    assert len(at.warning) == 1
    assert at.warning[0].value.startswith("The edit did not take: none of the texts it was made on that read")
