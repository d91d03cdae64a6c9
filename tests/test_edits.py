"""Edits as data: session isolation with `applied`, export/import, errors; on tiny models of every family."""

from __future__ import annotations

import threading

import pytest
import torch

from core.edits import (
    Edit,
    EditRequest,
    EditStack,
    applied,
    export_edits,
    import_edits,
    is_edited,
    model_lock,
    unedited,
)
from core.errors import UserError
from core.rome import RomeHyperParams, compute_edit

TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=3)
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
OTHER = EditRequest("The capital of {} is", "Germany", "Madrid")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny models' statistics go to a throwaway cache shared by the session (same seed: same model)."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def same(lm, saved):
    return all(torch.equal(p, saved[n]) for n, p in lm.model.named_parameters())


def fake_edit(lm, layer: int, seed: int, scale: float = 1.0) -> Edit:
    """A random rank-one change of `layer` (no optimisation: the weights' bookkeeping is under test)."""
    out_features, in_features = lm.arch.mlp_out_weight(lm.model, layer).shape
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(in_features, generator=g), scale * torch.randn(out_features, generator=g)
    return Edit(REQUEST, layer, u, v, key=u, value=v, model=lm.name)


def test_applied_restores_bitwise_even_on_error(tiny):
    edit = compute_edit(tiny, REQUEST, TINY)
    saved = weights(tiny)
    with applied(tiny, [edit]):
        assert not same(tiny, saved)
    assert same(tiny, saved)
    with pytest.raises(RuntimeError):
        with applied(tiny, [edit]):
            raise RuntimeError("the session's computation failed")
    assert same(tiny, saved)


def test_sessions_never_see_each_others_edits(tiny):
    """Two threads, each with its own edit, read the edited layer's output for their key many times."""
    edits = [compute_edit(tiny, REQUEST, TINY), compute_edit(tiny, OTHER, TINY)]
    module = tiny.model.get_submodule(tiny.arch.layer_name(tiny.model, 1, "mlp_out"))
    probe = torch.stack([e.key for e in edits])
    with torch.no_grad():
        clean = module(probe)
    expected = []
    for e in edits:
        with applied(tiny, [e]), torch.no_grad():
            expected.append(module(probe))
    errors = []

    def session(i):
        for _ in range(20):
            with applied(tiny, [edits[i]]), torch.no_grad():
                if not torch.equal(module(probe), expected[i]):
                    errors.append(i)

    threads = [threading.Thread(target=session, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with torch.no_grad():
        assert torch.equal(module(probe), clean)


def test_lock_is_per_model_and_reentrant(tiny):
    lock = model_lock(tiny)
    assert model_lock(tiny) is lock
    with applied(tiny), applied(tiny):  # nested in one thread: no deadlock
        pass


def test_export_import_round_trip(tiny, tmp_path):
    edits = [compute_edit(tiny, REQUEST, TINY), compute_edit(tiny, OTHER, TINY)]
    path = export_edits(edits, tmp_path / "edits.safetensors")
    back = import_edits(path, tiny)
    assert [e.record() for e in back] == [e.record() for e in edits]
    for a, b in zip(edits, back):
        for name in ("u", "v", "key", "value"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    with applied(tiny, edits):
        direct = weights(tiny)
    with applied(tiny, back):
        assert same(tiny, direct)


def test_bad_edit_files_and_ids(tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        import_edits(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        import_edits(junk)
    stack = EditStack(tiny)
    with pytest.raises(UserError, match="no edit to undo"):
        stack.undo()
    stack.apply(compute_edit(tiny, REQUEST, TINY))
    with pytest.raises(UserError, match="no edit with id"):
        stack.undo("nope")
    stack.undo_all()


def test_an_edit_for_another_shape_is_refused(tiny, tokenizer, tmp_path):
    from core.tiny import tiny_model

    edit = compute_edit(tiny, REQUEST, TINY)
    other = tiny_model("llama" if tiny.arch.family != "llama" else "gpt2", tokenizer)
    if other.arch.mlp_out_weight(other.model, 1).shape == tiny.arch.mlp_out_weight(tiny.model, 1).shape:
        pytest.skip("same layer shape")
    saved = weights(other)
    with pytest.raises(UserError, match="does not fit"):
        with applied(other, [edit]):
            pass
    assert same(other, saved)


def test_unedited_gives_the_weights_from_before_any_edit_and_puts_the_edits_back(tiny):
    """Inside `unedited` the model has its pristine weights, whichever holders (a stack, nested `applied`)
    changed them; afterwards the edited weights are back bitwise."""
    first, second = fake_edit(tiny, 1, seed=1), fake_edit(tiny, 1, seed=2)
    pristine = weights(tiny)
    stack = EditStack(tiny)
    stack.apply(first)
    assert is_edited(tiny)
    with applied(tiny, [second]):
        edited = weights(tiny)
        assert not same(tiny, pristine)
        with unedited(tiny):
            assert same(tiny, pristine)
        assert same(tiny, edited)
    stack.undo_all()
    assert not is_edited(tiny)
    assert same(tiny, pristine)


def test_statistics_never_carry_an_edit(tiny, tmp_path, monkeypatch):
    """Key statistics asked for in a session that holds an edit equal, bitwise, those computed without it."""
    from core.covariance import key_statistics

    edit = fake_edit(tiny, 0, seed=3, scale=10.0)  # layer 0: changes the keys of every later layer
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / "a"))
    clean = key_statistics(tiny, 1, "generated", 256).mom2.clone()
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / "b"))
    with applied(tiny, [edit]):
        during = key_statistics(tiny, 1, "generated", 256).mom2.clone()
    assert torch.equal(clean, during)
