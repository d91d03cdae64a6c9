"""Damaged caches are found on load and rebuilt; killed writes' partial files are swept; every cache key holds
the weights' fingerprint; what is cached per weights comes back from disk in a fresh process. Tiny models, a
throwaway cache folder."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch

from core import preserve, rome
from core.covariance import key_statistics, stats_folder, stats_path
from core.edits import EditRequest, applied
from core.models import read_model_folder, save_model_folder, sweep_partials, weights_fingerprint
from core.preserve import subject_keys
from core.rome import RomeHyperParams, compute_edit, context_texts
from core.tiny import tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    from core import covariance

    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(covariance, "SEQUENCE_LENGTH", 8)  # short sampled rows: the same code, quickly
    return tmp_path / "cache"


def test_stale_partials_are_swept_fresh_ones_kept(private_cache):
    stats = private_cache / "stats" / "m"
    stats.mkdir(parents=True)
    old_file = stats / "mom2_layer1.partial-123"
    old_dir = private_cache / "models" / ".partial-abc"
    fresh = stats / "corpus.4242.partial"
    whole = stats / "mom2_layer1.safetensors"
    old_dir.mkdir(parents=True)
    (old_dir / "model.safetensors").write_bytes(b"half")
    for path in (old_file, fresh, whole):
        path.write_bytes(b"x")
    hour_ago = time.time() - 2 * 3600
    for path in (old_file, old_dir, whole):
        os.utime(path, (hour_ago, hour_ago))
    assert sweep_partials() == 2
    assert not old_file.exists() and not old_dir.exists()
    assert fresh.exists() and whole.exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied embeddings
def test_a_damaged_model_cache_is_found_and_removed(tokenizer, tmp_path, family):
    lm = tiny_model(family, tokenizer)
    folder = tmp_path / "models" / "tiny"
    save_model_folder(lm.model, tokenizer, folder)
    model, _ = read_model_folder(folder)
    for name, p in lm.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a killed copy
    assert read_model_folder(folder) is None
    assert not folder.exists()  # so the next load rebuilds it


def test_a_model_cache_with_corrupt_bytes_is_removed(tokenizer, tmp_path):
    lm = tiny_model("llama", tokenizer)
    folder = tmp_path / "m"
    save_model_folder(lm.model, tokenizer, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: garbage
    weights.write_bytes(bytes(data))
    assert read_model_folder(folder) is None and not folder.exists()


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped byte in the numbers: the file still opens, the hash tells
        flipped = bytearray(data)
        flipped[-5] ^= 0xFF
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_statistics_are_recomputed(tokenizer, how):
    lm = tiny_model("gpt2", tokenizer)
    first = key_statistics(lm, 1, tokens=256)
    assert not first.cached and key_statistics(lm, 1, tokens=256).cached
    path = stats_path(lm, 1, "generated", 256)
    damage(path, how)
    again = key_statistics(lm, 1, tokens=256)
    assert not again.cached  # recomputed, not a crash and not the damaged numbers
    torch.testing.assert_close(again.mom2, first.mom2)
    assert key_statistics(lm, 1, tokens=256).cached


def test_a_damaged_corpus_is_regenerated(tokenizer):
    lm = tiny_model("llama", tokenizer)
    first = key_statistics(lm, 0, tokens=128)
    corpus = next(stats_folder(lm).glob("corpus_generated_*.safetensors"))
    damage(corpus, "flipped")
    stats_path(lm, 0, "generated", 128).unlink()
    again = key_statistics(lm, 0, tokens=128)
    torch.testing.assert_close(again.mom2, first.mom2)  # the same seeded corpus, generated again


def test_every_models_cache_key_holds_its_weights(tokenizer):
    a = replace(tiny_model("gpt2", tokenizer, seed=0), name="gpt2", source="hub/local")
    b = replace(tiny_model("gpt2", tokenizer, seed=1), name="gpt2", source="hub/local")
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert stats_folder(a) != stats_folder(b)  # same name, other weights: other statistics
    before = weights_fingerprint(a)
    with torch.no_grad():
        a.arch.mlp_out_weight(a.model, 2)[0, 0] += 1.0  # an edit
    assert weights_fingerprint(a) != before


def test_context_texts_and_subject_keys_come_back_from_disk(tokenizer, monkeypatch):
    """A second process (here: a second copy of the same weights, its in-memory caches empty) reads ROME's
    context texts and a catalogue's subject keys from disk, bitwise, without running the model, though the
    first copy held an edit when it computed them: they are filed under the unedited weights."""
    lengths = ((3, 2), (5, 3))
    first = tiny_model("llama", tokenizer)
    edit = compute_edit(
        first,
        EditRequest("{} is in", "Paris", "Rome"),
        RomeHyperParams(layer=1, steps=2, stats_tokens=128, preserve_weight=0.0),
    )
    with applied(first, [edit]):
        contexts = context_texts(first, lengths, seed=3)
        keys = subject_keys(first, 1)
    assert len(contexts.ids) == 1 + 2 + 3 and list(stats_folder(first).glob("contexts_3x2_5x3_seed3_*"))
    assert list(stats_folder(first).glob("subject_keys_layer1_*"))

    def no_model_work(*args, **kwargs):
        raise AssertionError("computed again instead of read from disk")

    monkeypatch.setattr(rome, "generate_ids", no_model_work)
    monkeypatch.setattr(preserve, "layer_keys", no_model_work)
    second = tiny_model("llama", tokenizer)
    again = context_texts(second, lengths, seed=3)
    assert again == contexts
    read = subject_keys(second, 1)
    assert read.names == keys.names and torch.equal(read.keys, keys.keys)
    with pytest.raises(AssertionError, match="computed again"):
        context_texts(second, lengths, seed=4)  # another seed: not on disk


def test_damaged_context_texts_are_sampled_again(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    contexts = context_texts(lm, ((4, 3),), seed=0)
    path = next(stats_folder(lm).glob("contexts_4x3_seed0_*"))
    damage(path, "flipped")
    assert context_texts(tiny_model("gpt2", tokenizer), ((4, 3),), seed=0) == contexts  # seeded: the same again
    assert path.exists()  # written again, whole
