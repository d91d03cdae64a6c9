"""The Many edits page on the embedded model: a MEMIT batch from the table, each fact's before/after as the
library computes it, undo of the batch, and saving the session's edits as a folder plain transformers loads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.alphaedit import AlphaEditParams
from core.edits import EditRequest
from core.evaluation import names_object
from core.memit import MemitParams, default_layers, memit_one_by_one
from ui import common

PAGE = "pages/5_Many_edits.py"

pytestmark = pytest.mark.slow


def test_batch_undo_and_save(tmp_path, open_page):
    at = open_page(PAGE)
    assert not at.error and at.title[0].value == "Many edits"
    at.button(key="memit_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    rows = at.dataframe[-1].value  # the batch's before/after table (after the requests table)
    assert len(rows) == 3 and list(rows["new"]) == ["Rome", "Madrid", "London"]
    assert (rows["p(new) after"] > rows["p(new) before"]).all()
    assert (rows["edited"] == "yes").sum() >= 2
    assert all(t.startswith(f) for t, f in zip(rows["text after"], rows["fact"]))  # what the model writes
    assert all(t.startswith(f) for t, f in zip(rows["text before"], rows["fact"]))
    writes = [names_object(t[len(f) :], n) for t, f, n in zip(rows["text after"], rows["fact"], rows["new"])]
    assert list(rows["writes new"]) == ["yes" if w else "no" for w in writes] and sum(writes) >= 2
    shown = {m.label: m.value for m in at.metric}
    assert shown["Writes the new object (text)"] == f"{sum(writes)}/3"
    assert shown["Edited (probability)"] == f"{(rows['edited'] == 'yes').sum()}/3"
    edits = at.session_state[common.EDITS_KEY]
    assert len(edits) == 3 * 4 and {e.layer for e in edits} == {2, 3, 4, 5}  # 3 facts x layers 2-5
    folder = tmp_path / "edited"
    at.text_input(key="save_folder").set_value(str(folder)).run()
    at.button(key="save_run").click().run()
    assert not at.error and "Saved 12 edit(s)" in at.success[0].value
    assert (folder / "README.md").read_text().count("| memit |") == 12
    assert AutoModelForCausalLM.from_pretrained(folder) is not None
    at.button(key="memit_undo").click().run()
    assert at.session_state[common.EDITS_KEY] == []
    assert all("p(new) after" not in d.value.columns for d in at.dataframe)  # the batch's table is gone


def test_one_after_another_keeps_out_of_the_earlier_edits_way(open_page):
    """ "One after another": the session's edits are those `memit_one_by_one` gives for the same facts (each on
    the model carrying the ones before it, with the null-space solve), every fact's row is read, undo drops
    them all."""
    at = open_page(PAGE)
    at.radio(key="memit_mode").set_value("One after another").run()
    at.button(key="memit_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    rows = at.dataframe[-1].value
    assert list(rows["new"]) == ["Rome", "Madrid", "London"] and (rows["edited"] == "yes").sum() >= 2
    edits = at.session_state[common.EDITS_KEY]
    lm = common.load(common.EMBEDDED_MODEL)
    requests = [  # the page's example table
        EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
        EditRequest("The capital of {} is", "Germany", "Madrid"),
        EditRequest("{} can be found in the city of", "The Colosseum", "London"),
    ]
    params = MemitParams(layers=default_layers(lm), null_space=AlphaEditParams())
    expected = memit_one_by_one(lm, requests, params=params).edits
    assert len(edits) == len(expected) == 3 * 4
    for shown, alone in zip(edits, expected):
        assert (shown.layer, shown.request.subject) == (alone.layer, alone.request.subject)
        assert torch.equal(shown.u, alone.u) and torch.equal(shown.v, alone.v)
    at.button(key="memit_undo").click().run()
    assert at.session_state[common.EDITS_KEY] == []
