"""Preserved subject keys (core/preserve.py): the keys are each subject's, batched == one at a time, never from
edited weights; C' is the stated formula without the edited subject; a ROME edit solved with C' still maps its
key exactly and moves the catalogue's keys less than plain ROME."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.covariance import key_statistics, layer_keys
from core.edits import EditRequest, applied
from core.errors import UserError
from core.preserve import SubjectKeys, preserved_moment, subject_keys, subject_prefixes
from core.rome import RomeHyperParams, compute_edit

TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=5, preserve_weight=0.0)
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
FACTS = [
    {"subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in", "attribute": "Paris"},
    {"subject": "Big Ben", "prompt": "Big Ben is in the city of", "attribute": "London"},
    {"subject": "the Colosseum", "prompt": "Tourists visit the Colosseum in", "attribute": "Rome"},
    {"subject": "Big Ben", "prompt": "The clock Big Ben stands in", "attribute": "London"},
    {"subject": "Mount Fuji", "prompt": "Mount Fuji is a mountain in", "attribute": "Japan"},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


@pytest.fixture
def catalogue(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    return path


def test_subject_keys_are_each_subjects_last_token_key(tiny, catalogue):
    prefixes = subject_prefixes(catalogue)
    assert prefixes == {
        "The Eiffel Tower": "The Eiffel Tower",
        "Big Ben": "Big Ben",  # the first fact's prompt
        "the Colosseum": "Tourists visit the Colosseum",
        "Mount Fuji": "Mount Fuji",
    }
    keys = subject_keys(tiny, 1, catalogue, batch=3)  # two batches, padded to different widths
    assert keys.names == tuple(prefixes) and keys.keys.shape == (4, tiny.arch.mlp_out_weight(tiny.model, 1).shape[1])
    for name, key in zip(keys.names, keys.keys):
        alone = layer_keys(tiny, 1, torch.tensor([tiny.tokenizer(prefixes[name]).input_ids]))[0, -1]
        torch.testing.assert_close(key, alone.float(), atol=1e-5, rtol=1e-5)


def test_subject_keys_come_from_the_unedited_weights(tiny, catalogue):
    edit = compute_edit(tiny, REQUEST, replace(TINY, layer=0))  # an edit below the keys' layer changes them
    clean = subject_keys(tiny, 1, catalogue).keys.clone()
    same = catalogue.with_name("same-facts.json")  # other bytes, same facts: not served from the cache
    same.write_text(json.dumps(FACTS, indent=1))
    with applied(tiny, [edit]):
        during = subject_keys(tiny, 1, same).keys
        moved = layer_keys(tiny, 1, torch.tensor([tiny.tokenizer("The Eiffel Tower").input_ids]))[0, -1]
    assert torch.equal(during, clean)
    assert not torch.allclose(moved.float(), clean[0])  # the edit does change that key in the edited model


def test_preserved_moment_is_the_formula_without_the_edited_subject():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=g, dtype=torch.float64)
    c = a.T @ a / 50
    keys = SubjectKeys(0, ("Paris", "Lyon", "Rome"), torch.randn(3, 4, generator=g, dtype=torch.float64))
    assert preserved_moment(c, keys, "Paris", 0.0) is c
    others = keys.keys[1:]
    e = others.T @ others / 2
    torch.testing.assert_close(preserved_moment(c, keys, " paris ", 2.0), c + 2.0 * c.trace() / e.trace() * e)
    only = SubjectKeys(0, ("Paris",), keys.keys[:1])
    assert torch.equal(preserved_moment(c, only, "Paris", 1.0), c)  # nothing left to preserve


def test_preserving_edit_maps_its_key_and_moves_the_catalogue_less(tiny, catalogue):
    hp = replace(TINY, preserve_weight=1.0, preserve_facts=str(catalogue))
    plain, kept = compute_edit(tiny, REQUEST, TINY), compute_edit(tiny, REQUEST, hp)
    torch.testing.assert_close(kept.key, plain.key)  # same k*, same v*: only u's direction differs
    torch.testing.assert_close(kept.value, plain.value)
    with applied(tiny, [kept]):
        module = tiny.model.get_submodule(tiny.arch.layer_name(tiny.model, kept.layer, "mlp_out"))
        with torch.no_grad():
            after = module(kept.key[None])[0]
    torch.testing.assert_close(after, kept.value, rtol=1e-4, atol=1e-4 * float(kept.value.abs().max()))
    others = subject_keys(tiny, kept.layer, catalogue).keys[1:].double()  # all but the edited subject

    def moved(edit):  # the other subjects' output changes relative to the edited key's
        u = edit.u.double()
        return float((others @ u).norm() / (u @ edit.key.double()).abs())

    assert moved(kept) < moved(plain)
    c = key_statistics(tiny, kept.layer, TINY.stats_corpus, TINY.stats_tokens).mom2
    spread = float(kept.u @ c @ kept.u) / float(kept.u @ kept.key) ** 2
    assert spread < 1.0  # the corpus keys still move by much less than the edited key
    assert kept.info["hparams"]["preserve_weight"] == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"preserve_weight": -1.0}, "preserve weight"),
        ({"preserve_weight": 1.0, "preserve_facts": "/no/file"}, "catalogue"),
    ],
)
def test_bad_preserve_settings_are_refused(tiny, change, message):
    with pytest.raises(UserError, match=message):
        compute_edit(tiny, REQUEST, replace(TINY, **change))


def test_a_measurement_never_preserves_the_subjects_it_measures(catalogue):
    from core.counterfact import CounterFactCase
    from core.evaluation import case_texts, held_out
    from core.preserve import catalogue_without

    assert catalogue_without(catalogue, ["Nothing of the catalogue here."]) == catalogue
    kept = catalogue_without(catalogue, ["Where is BIG BEN?", "Mount Fuji erupted"])
    assert [r["subject"] for r in json.loads(kept.read_text())] == ["The Eiffel Tower", "the Colosseum"]
    assert kept != catalogue and catalogue_without(catalogue, ["big ben", "mount fuji"]) == kept  # by content
    case = CounterFactCase(
        case_id=0,
        prompt="{} is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        relation_id="P276",
        paraphrase_prompts=(),
        neighborhood_prompts=("The Colosseum is in",),
        attribute_prompts=(),
        generation_prompts=(),
    )
    hp = replace(TINY, preserve_weight=1.0, preserve_facts=str(catalogue))
    held = held_out(hp, [case])
    subjects = [r["subject"] for r in json.loads(Path(held.preserve_facts).read_text())]
    assert subjects == ["Big Ben", "Big Ben", "Mount Fuji"]
    assert replace(held, preserve_facts=hp.preserve_facts) == hp  # nothing else changes
    assert held_out(TINY, [case]) is TINY  # nothing preserved, nothing to hold out
    # cases that mention every subject of the catalogue leave nothing to preserve (not an empty catalogue,
    # which every edit would refuse: the known-facts curve edits the whole catalogue)
    every = replace(case, neighborhood_prompts=("The Colosseum, Big Ben and Mount Fuji",))
    assert catalogue_without(catalogue, case_texts([every])) is None
    assert held_out(hp, [every]) == replace(hp, preserve_weight=0.0)
