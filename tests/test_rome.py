"""ROME: the rank-one update on tiny random models of every family, and the Eiffel Tower edit on the
embedded model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from core.covariance import key_statistics, layer_keys
from core.edits import EditRequest, EditStack, applied
from core.errors import UserError
from core.evaluation import names_object
from core.rome import (
    PAPER,
    RomeHyperParams,
    compute_edit,
    context_texts,
    rank_one_update,
    rank_one_update_at_keys,
    subject_tokens,
    validate_request,
)

# small and quick on tiny models: few context texts, a small corpus, the paper's optimiser otherwise
# (random tiny models cannot be taught a fact: their MLP outputs and unembedding are too small for the
# subject's state to reach the answer; they test the mechanics, the embedded model the behaviour). The update
# is the paper's, u = C^-1 k*: tests/test_preserve.py tests the preserved-subjects update (random models' subject
# keys mean nothing, and weighting them can make a second edit reach the first one's key more, as on gpt2).
TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=5, preserve_weight=0.0)
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
OTHER = EditRequest("The capital of {} is", "Germany", "Madrid")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny models' statistics go to a throwaway cache shared by the session (same seed: same model)."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def mlp_out(lm, layer, key):
    module = lm.model.get_submodule(lm.arch.layer_name(lm.model, layer, "mlp_out"))
    with torch.no_grad():
        return module(key[None])[0]


def snapshot(lm):
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def assert_bitwise(lm, saved):
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, saved[name]), name


def next_token(lm, text):
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return int(lm.model(input_ids=ids).logits[0, -1].argmax())


def first_target_token(lm, target):
    return lm.tokenizer(" " + target)["input_ids"][0]


def test_edit_maps_key_to_value(tiny):
    edit = compute_edit(tiny, REQUEST, TINY)
    before = mlp_out(tiny, edit.layer, edit.key)
    with applied(tiny, [edit]):
        after = mlp_out(tiny, edit.layer, edit.key)
    assert not torch.allclose(before, edit.value, atol=1e-3)
    torch.testing.assert_close(after, edit.value, rtol=1e-4, atol=1e-4 * float(edit.value.abs().max()))
    assert edit.u.shape == (tiny.arch.mlp_out_weight(tiny.model, 1).shape[1],)


def test_rank_one_update_is_the_least_change_that_maps_the_key():
    """W' k = v*, D = W' - W is rank one along C^-1 k*, and no other D with D k = v* - W k moves the keys
    of C less (tr(D C D^T)); solved at another key k, W' k = v* there."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([3, 2, 1, 1, 0.5, 0.1])
    c = keys.T @ keys / 200
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    k_star, v_star = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    u, lam = rank_one_update(c, k_star, v_star, w)
    d = torch.outer(lam, u)
    torch.testing.assert_close((w + d) @ k_star, v_star)
    torch.testing.assert_close(u, torch.linalg.solve(c, k_star))
    for _ in range(5):  # any other solution: D + E with E k* = 0
        e = torch.randn(4, 6, generator=g, dtype=torch.float64)
        e = e - torch.outer(e @ k_star, k_star) / (k_star @ k_star)
        assert torch.trace((d + e) @ c @ (d + e).T) > torch.trace(d @ c @ d.T)
    k = torch.randn(6, generator=g, dtype=torch.float64)
    u2, lam2 = rank_one_update(c, k_star, v_star, w, k)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close((w + torch.outer(lam2, u2)) @ k, v_star)


def test_rank_one_update_at_keys_moves_every_key_by_delta_least_elsewhere():
    """D = delta u^T with u . k_i = 1 at each key; no other D with D k_i = delta for all i moves C's keys less;
    equal keys give the one-key update's direction, u = C^-1 k / (k^T C^-1 k)."""
    g = torch.Generator().manual_seed(1)
    corpus = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.tensor([3, 2, 1, 1, 0.5, 0.1])
    c = corpus.T @ corpus / 300
    keys = torch.randn(2, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(4, generator=g, dtype=torch.float64)
    u = rank_one_update_at_keys(c, keys)
    d = torch.outer(delta, u)
    torch.testing.assert_close(d @ keys.T, torch.stack([delta, delta], 1))
    for _ in range(5):  # any other solution: D + E with E k_i = 0 for both keys
        e = torch.randn(4, 6, generator=g, dtype=torch.float64)
        e = e - e @ keys.T @ torch.linalg.solve(keys @ keys.T, keys)
        torch.testing.assert_close(e @ keys.T, torch.zeros(4, 2, dtype=torch.float64))
        assert torch.trace((d + e) @ c @ (d + e).T) > torch.trace(d @ c @ d.T)
    one = keys[:1]
    u_same = rank_one_update_at_keys(c, torch.cat([one, one]))
    c_inv_k = torch.linalg.solve(c, one[0])
    torch.testing.assert_close(u_same, c_inv_k / (one[0] @ c_inv_k))


def test_solve_at_both_gives_the_plain_prompts_key_the_whole_delta(tiny):
    """solve_at="both": the same k* and value as "mean", and W' moves W's output by the same delta at k* and at
    the plain prompt's key; "mean" gives the plain key only u.k0 / u.k* of it."""
    hp = replace(TINY, steps=3)
    both = compute_edit(tiny, REQUEST, replace(hp, solve_at="both"))
    mean = compute_edit(tiny, REQUEST, replace(hp, solve_at="mean"))
    torch.testing.assert_close(both.key, mean.key)
    torch.testing.assert_close(both.value, mean.value)
    ids, (_, end) = subject_tokens(tiny, REQUEST.prompt, REQUEST.subject)
    plain_key = layer_keys(tiny, both.layer, torch.tensor([ids]))[0, end - 1].float()
    assert not torch.allclose(plain_key, both.key, atol=1e-3)
    delta = both.value - mlp_out(tiny, both.layer, both.key)
    tol = {"rtol": 1e-4, "atol": 1e-4 * float(delta.abs().max())}
    mean_share = float(mean.u @ plain_key / (mean.u @ mean.key))
    for edit, plain_share in ((both, 1.0), (mean, mean_share)):
        before = mlp_out(tiny, edit.layer, plain_key)
        with applied(tiny, [edit]):
            torch.testing.assert_close(mlp_out(tiny, edit.layer, edit.key), edit.value, **tol)
            torch.testing.assert_close(mlp_out(tiny, edit.layer, plain_key) - before, plain_share * delta, **tol)
    assert abs(mean_share - 1) > 1e-3


def test_paper_settings_solve_at_the_plain_prompts_key(tiny):
    """With solve_at="plain" the edit's key is the plain prompt's (not the mean over contexts), W' maps it to
    the value, and early_stop="none" runs every step."""
    hp = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=4, solve_at="plain")
    plain = compute_edit(tiny, REQUEST, replace(hp, early_stop="none"))
    mean = compute_edit(tiny, REQUEST, replace(hp, solve_at="mean", early_stop="none"))
    assert plain.info["steps"] == mean.info["steps"] == 4
    assert not torch.allclose(plain.key, mean.key)
    torch.testing.assert_close(plain.u, mean.u)  # u = C^-1 k* either way
    with applied(tiny, [plain]):
        after = mlp_out(tiny, plain.layer, plain.key)
    torch.testing.assert_close(after, plain.value, rtol=1e-4, atol=1e-4 * float(plain.value.abs().max()))
    assert PAPER.context_lengths == ((5, 10), (10, 10)) and PAPER.early_stop == "loss" and PAPER.solve_at == "plain"
    for watched in ("nll", "loss"):  # a threshold every loss is under: stop after the first step
        assert compute_edit(tiny, REQUEST, replace(hp, early_stop=watched, early_stop_loss=1e9)).info["steps"] == 1


def test_other_keys_move_least_in_the_inverse_covariance_metric(tiny):
    """Over corpus keys k, E[(u.k)^2] / (u.k*)^2 is smallest for u = C^-1 k* (vs plain k*), and < 1."""
    edit = compute_edit(tiny, REQUEST, TINY)
    stats = key_statistics(tiny, edit.layer, TINY.stats_corpus, TINY.stats_tokens)
    c, k = stats.mom2.double(), edit.key.double()

    def spread(u):
        return float(u @ c @ u) / float(u @ k) ** 2

    assert spread(edit.u.double()) < 1.0
    assert spread(edit.u.double()) <= spread(k) * (1 + 1e-6)
    # keys of other text: their output moves by a small fraction of the edited key's change
    ids = torch.tensor([tiny.tokenizer("A completely different sentence about music and rivers.")["input_ids"]])
    others = layer_keys(tiny, edit.layer, ids)[0].double()
    relative = (others @ edit.u.double()).abs() / float(edit.u.double() @ k).__abs__()
    assert float(relative.mean()) < 0.5


def test_undo_is_bitwise_and_stacked_edits_hold(tiny):
    saved = snapshot(tiny)
    stack = EditStack(tiny)
    first = stack.apply(compute_edit(tiny, REQUEST, TINY))
    second = stack.apply(compute_edit(tiny, OTHER, TINY))  # computed on the model carrying the first
    for edit in (first, second):  # both keys still map (close) to their values
        with applied(tiny, []):
            out = mlp_out(tiny, edit.layer, edit.key)
        moved = (edit.v * (edit.u @ edit.key)).norm()
        assert float((out - edit.value).norm()) < 0.3 * float(moved)
    stack.undo(first.id)  # undo the first; the second stays: as if the first had never been made
    only_second = snapshot(tiny)
    stack.undo_all()
    assert_bitwise(tiny, saved)
    stack.apply(second)
    assert_bitwise(tiny, only_second)
    stack.undo()
    assert_bitwise(tiny, saved)
    assert not all(torch.equal(only_second[n], saved[n]) for n in saved)


def test_multi_token_target(tiny):
    request = EditRequest("{} is located in the city of", "The Eiffel Tower", "San Francisco")
    assert len(tiny.tokenizer(" San Francisco")["input_ids"]) >= 2
    edit = compute_edit(tiny, request, TINY)
    assert edit.info["nll"][-1] < edit.info["nll"][0]  # the optimiser lowers the whole target's NLL
    with applied(tiny, [edit]):
        torch.testing.assert_close(mlp_out(tiny, edit.layer, edit.key), edit.value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "request_, message",
    [
        (EditRequest("The Louvre is located in the city of", "The Space Needle", "Rome"), "does not occur"),
        (EditRequest("{} is located near {}", "The Eiffel Tower", "Rome"), "exactly one"),
        (EditRequest("{} is located in the city of", "The Eiffel Tower", "  "), "target is empty"),
        (EditRequest("{} is located in the city of", "", "Rome"), "subject is empty"),
        (EditRequest("", "The Eiffel Tower", "Rome"), "prompt is empty"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(tiny, request_, message):
    saved = snapshot(tiny)
    with pytest.raises(UserError, match=message):
        compute_edit(tiny, request_, TINY)
    assert_bitwise(tiny, saved)


def test_prompt_may_hold_the_subject_itself(tiny):
    request = validate_request(
        tiny, EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    )
    assert request.prompt == "{} is located in the city of" and request.target_true


def test_target_equal_to_the_current_answer_is_refused(tiny):
    saved = snapshot(tiny)
    answer = tiny.tokenizer.decode([next_token(tiny, REQUEST.text)])
    with pytest.raises(UserError, match="already answers|equals the true answer"):
        compute_edit(tiny, EditRequest(REQUEST.prompt, REQUEST.subject, answer), TINY)
    assert_bitwise(tiny, saved)


def test_context_texts_are_the_models_own_and_seeded(tiny, request):
    from core.tiny import tiny_model

    first = context_texts(tiny, ((4, 2), (6, 2)), seed=3)
    twin = tiny_model(request.node.callspec.params["tiny"], tiny.tokenizer)  # same weights, nothing remembered
    again = context_texts(twin, ((4, 2), (6, 2)), seed=3)
    assert first == again and first.ids[0] == () and len(first.ids) == 5
    assert [len(ids) for ids in first.ids[1:]] == [6, 6, 8, 8]  # prefix word + sampled tokens + "."


# --- the embedded model --------------------------------------------------------------------------------------

EMBEDDED = RomeHyperParams(stats_tokens=4096)  # a small corpus keeps the test quick; behaviour is the same


@pytest.fixture(scope="module")
def eiffel_edit(embedded, tmp_path_factory):
    import os

    os.environ.pop("ROME_STUDIO_CACHE", None)  # the real cache: statistics computed once per machine
    return compute_edit(embedded, REQUEST, EMBEDDED)


def greedy(lm, text, tokens=6):
    from core.generation import GenerationSettings, generate

    return generate(lm, [text], GenerationSettings(max_new_tokens=tokens))[0][len(text) :]


@pytest.mark.slow
def test_eiffel_tower_moves_to_rome_and_back(embedded, eiffel_edit):
    saved = snapshot(embedded)
    text = REQUEST.text
    assert greedy(embedded, text).startswith(" Paris")
    stack = EditStack(embedded)
    stack.apply(eiffel_edit)
    try:
        assert greedy(embedded, text).startswith(" Rome")
        assert greedy(embedded, "The Louvre is located in the city of").startswith(" Paris")
        # what a user reads: the model writes the new fact in its own words, not only after the edit prompt
        for prompt in ("The Eiffel Tower is located in", "Where is the Eiffel Tower? It is in"):
            assert names_object(greedy(embedded, prompt, tokens=20), "Rome"), prompt
        assert not names_object(greedy(embedded, "The Louvre is located in", tokens=20), "Rome")
    finally:
        stack.undo(eiffel_edit.id)
    assert_bitwise(embedded, saved)
    assert greedy(embedded, text).startswith(" Paris")


@pytest.mark.slow
def test_embedded_bad_input(embedded):
    saved = snapshot(embedded)
    with pytest.raises(UserError, match="already answers"):
        compute_edit(embedded, EditRequest(REQUEST.prompt, REQUEST.subject, "Paris"), EMBEDDED)
    with pytest.raises(UserError, match="does not occur"):
        compute_edit(
            embedded, EditRequest("The Louvre is located in the city of", "The Space Needle", "Rome"), EMBEDDED
        )
    assert_bitwise(embedded, saved)
