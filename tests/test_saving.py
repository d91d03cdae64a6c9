"""Saving the edited model: the folder reloads in plain transformers with the same logits as the session's
edited model (tiny models of every family; the embedded model once), through the library and `python -m core apply`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.__main__ import main
from core.edits import EditRequest, applied, export_edits
from core.errors import UserError
from core.models import load_model
from core.rome import RomeHyperParams, compute_edit
from core.saving import README, save_edited_model

TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=3)
REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Germany", "Madrid"),
]
PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Germany is"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def logits(model, tokenizer, prompts):
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out.append(model(input_ids=ids).logits[0].float())
    return out


def weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_saved_model_reloads_with_the_session_logits(tiny, tmp_path):
    edits = [compute_edit(tiny, r, TINY) for r in REQUESTS]
    before = weights(tiny)
    with applied(tiny, edits):
        expected = logits(tiny.model, tiny.tokenizer, PROMPTS)
    plain = logits(tiny.model, tiny.tokenizer, PROMPTS)
    folder = save_edited_model(tiny, edits, tmp_path / "edited")
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # the session model is back
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    readme = (folder / README).read_text()
    assert "The Eiffel Tower" in readme and "Madrid" in readme and readme.count("| rome |") == 2
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    got = logits(reloaded, tiny.tokenizer, PROMPTS)
    for g, e, p in zip(got, expected, plain):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        assert (g - p).abs().max() > 1e-4  # the edits are in the saved weights


def test_save_refuses_a_folder_in_use(tiny, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        save_edited_model(tiny, [], tmp_path / "busy")


def test_apply_command_saves_exported_edits(tiny, tmp_path, capsys):
    """`apply --edits FILE --model PLAIN_FOLDER --save DIR`: the reloaded folder equals the edited session model."""
    base = save_edited_model(tiny, [], tmp_path / "base")
    tiny = load_model(str(base), device="cpu")  # edits are made for (and checked against) the model by name
    edits = [compute_edit(tiny, r, TINY) for r in REQUESTS]
    export_edits(edits, tmp_path / "edits.safetensors")
    out = tmp_path / "applied"
    code = main(
        [
            "apply",
            "--edits",
            str(tmp_path / "edits.safetensors"),
            "--model",
            str(base),
            "--save",
            str(out),
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "apply.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "apply.json").read_text())
    assert result["saved"] == str(out) and [e["id"] for e in result["edits"]] == [e.id for e in edits]
    with applied(tiny, edits):
        expected = logits(tiny.model, tiny.tokenizer, PROMPTS)
    got = logits(AutoModelForCausalLM.from_pretrained(out).eval(), tiny.tokenizer, PROMPTS)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    code = main(["apply", "--edits", str(tmp_path / "edits.safetensors"), "--model", str(base), "--save", str(out)])
    assert code != 0 and "not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_saved_model_answers_the_edit(embedded, tmp_path, monkeypatch):
    monkeypatch.delenv("ROME_STUDIO_CACHE")  # the embedded model's statistics: the user cache
    edit = compute_edit(embedded, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"))
    prompt = ["The Eiffel Tower is located in the city of"]
    with applied(embedded, [edit]):
        expected = logits(embedded.model, embedded.tokenizer, prompt)[0]
    folder = save_edited_model(embedded, [edit], tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    got = logits(reloaded, embedded.tokenizer, prompt)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    rome = embedded.tokenizer(" Rome")["input_ids"][0]
    assert int(got[-1].argmax()) == rome
