"""Files a user gives (facts, CounterFact, edits) and places a command writes to: every field checked, one
clear error, before any work."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from core.__main__ import main
from core.counterfact import parse_cases
from core.edits import FORMAT, Edit, EditRequest, export_edits, import_edits
from core.errors import UserError
from core.facts import load_facts, save_facts

FACT = {"subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in", "attribute": "Paris"}


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ facts


def test_a_facts_file_with_a_bom_loads(tmp_path):
    path = tmp_path / "facts.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([FACT]).encode("utf-8"))
    assert [f.attribute for f in load_facts(path)] == ["Paris"]


def test_a_non_text_relation_is_refused(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{**FACT, "relation": 17}]))
    with pytest.raises(UserError, match="record 0: its relation must be text"):
        load_facts(path)


def test_save_facts_creates_its_folder(tmp_path):
    facts = load_facts_from(tmp_path, [FACT])
    target = tmp_path / "new" / "folder" / "known.json"
    save_facts(target, facts)
    assert load_facts(target) == facts


def load_facts_from(folder, records):
    path = folder / "in.json"
    path.write_text(json.dumps(records))
    return load_facts(path)


# ------------------------------------------------------------------------------------------- CounterFact


def counterfact_record(**change):
    record = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "subject": "The Eiffel Tower",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
            "relation_id": "P131",
        },
        "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"],
        "neighborhood_prompts": ["The Louvre is located in"],
    }
    record.update(change)
    return record


@pytest.mark.parametrize("field", ["paraphrase_prompts", "neighborhood_prompts"])
def test_counterfact_empty_prompt_lists_are_refused(field):
    assert len(parse_cases([counterfact_record()])) == 1
    with pytest.raises(UserError, match=f"record 0 \\(case_id 7\\) has an empty '{field}'"):
        parse_cases([counterfact_record(**{field: []})])


# ------------------------------------------------------------------------------------------------ edits


def an_edit(lm, layer=1, model=None, **tensors) -> Edit:
    out_features, in_features = lm.arch.mlp_out_weight(lm.model, layer).shape
    parts = {
        "u": torch.randn(in_features),
        "v": torch.randn(out_features),
        "key": torch.randn(in_features),
        "value": torch.randn(out_features),
    }
    parts.update(tensors)
    request = EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris")
    return Edit(request, layer, model=lm.name if model is None else model, **parts)


def rewrite(path, change_record=None, change_tensors=None):
    """Re-save an exported edits file with its first record / tensors changed."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    records = json.loads(metadata["edits"])
    if change_record:
        change_record(records[0])
    if change_tensors:
        change_tensors(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata={"format": FORMAT, "edits": json.dumps(records)})
    return path


def test_an_edit_for_another_model_says_so(tiny, tmp_path):
    path = export_edits([an_edit(tiny, model="gpt2-xl")], tmp_path / "e.safetensors")
    assert import_edits(path)[0].model == "gpt2-xl"  # without a model to apply to, it reads
    with pytest.raises(UserError, match=f"made for the model 'gpt2-xl', not for '{tiny.name}'"):
        import_edits(path, tiny)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(layer="1"), "edit 0 has no whole, non-negative layer"),
        (lambda r: r.update(layer=True), "edit 0 has no whole, non-negative layer"),
        (lambda r: r.update(layer=-2), "edit 0 has no whole, non-negative layer"),
        (lambda r: r.update(id=5), "edit 0 has no text id"),
        (lambda r: r.update(model=None), "edit 0 has no model name"),
        (lambda r: r["request"].update(subject=["x"]), "non-text request 'subject'"),
        (lambda r: r["request"].update(target_true=3), "non-text request 'target_true'"),
        (lambda r: r.update(info=[]), "'info' that is not a JSON object"),
        (lambda r: r.pop("request"), "edit 0 has no request"),
    ],
)
def test_every_field_of_an_edits_file_is_checked(tiny, tmp_path, change, message):
    path = rewrite(export_edits([an_edit(tiny)], tmp_path / "e.safetensors"), change_record=change)
    with pytest.raises(UserError, match=message):
        import_edits(path, tiny)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_edit_vectors_are_refused(tiny, tmp_path, bad):
    v = torch.randn(tiny.arch.mlp_out_weight(tiny.model, 1).shape[0])
    v[3] = bad
    path = export_edits([an_edit(tiny, v=v)], tmp_path / "e.safetensors")
    with pytest.raises(UserError, match="non-finite numbers in 'v'"):
        import_edits(path, tiny)


def test_a_missing_or_mis_shaped_vector_is_refused(tiny, tmp_path):
    path = export_edits([an_edit(tiny)], tmp_path / "e.safetensors")
    rewrite(path, change_tensors=lambda t: t.pop("0.key"))
    with pytest.raises(UserError, match="lacks its vector 'key'"):
        import_edits(path, tiny)
    path = export_edits([an_edit(tiny)], tmp_path / "f.safetensors")
    rewrite(path, change_tensors=lambda t: t.update({"0.u": t["0.u"][None]}))
    with pytest.raises(UserError, match="lacks its vector 'u'"):
        import_edits(path, tiny)


def test_a_good_edits_file_still_round_trips(tiny, tmp_path):
    edit = an_edit(tiny)
    back = import_edits(export_edits([edit], tmp_path / "e.safetensors"), tiny)
    assert back[0].record() == edit.record() and torch.equal(back[0].v, edit.v)


# ----------------------------------------------------------------------------------------- output paths


def test_json_into_a_folder_is_refused_before_loading_the_model(tmp_path, capsys):
    args = ["trace", "--prompt", "a b", "--subject", "a", "--model", "no-such/model-xyz", "--json", str(tmp_path)]
    code, err = run_cli(args, capsys)
    assert code == 2 and "is a folder: give a file name" in err and "not found" not in err


def test_keep_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    keep = tmp_path / "afile" / "known.json"
    code, err = run_cli(["facts", "--model", "no-such/model-xyz", "--keep", str(keep)], capsys)
    assert code == 2 and "is a file, not a folder" in err and "not found" not in err


def test_an_output_in_a_missing_folder_is_accepted(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "trace.json"
    args = ["trace", "--prompt", "a b", "--subject", "a", "--model", "no-such/model-xyz", "--json", str(out)]
    code, err = run_cli(args, capsys)
    assert code == 2 and "not found" in err  # the path passed; the (missing) model is what stopped it


def test_counterfact_download_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The public file is fetched once into the cache; a broken download leaves no file behind (and is one
    UserError), so the next call fetches again instead of reading half a file. No network: urlopen is faked."""
    import io
    import urllib.error

    import core.counterfact as counterfact

    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path))
    body = json.dumps([{"case_id": 0}]).encode()

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 4:
                raise urllib.error.URLError("connection reset")
            return super().read(5)

    monkeypatch.setattr(counterfact.urllib.request, "urlopen", lambda url, timeout: Broken(body))
    with pytest.raises(UserError, match="cannot download CounterFact .*connection reset"):
        counterfact.download_public()
    assert not counterfact.public_path().exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    monkeypatch.setattr(counterfact.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))
    assert counterfact.download_public().read_bytes() == body
