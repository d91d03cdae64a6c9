"""The estimate engine (attribution patching): its first-order terms equal a finite-difference derivative of
the paper's patched run on tiny models of every family, its result has the exact engines' shape, its
verified cells are exact, and on the embedded model its peak agrees with the exact table's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.estimate_tracing import estimate_table, record_gradients, strongest_cells, windowed_terms
from core.fast_tracing import fast_kind
from core.hooks import Hooks
from core.trace_setup import KINDS, add_noise_hook, prepare, window_layers
from core.tracing import trace

PROMPT = "Paris is the capital of the Eiffel Tower country named"
SUBJECT = "the Eiffel Tower"


def logit_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 1000] * 10


def partly_restored(setup, position: int, names: list[str], eps: float) -> float:
    """The paper's patched run (row 0 clean, rows 1.. corrupted) with the states moved a fraction `eps` of
    the way from corrupted to clean, at `position` in the modules `names`."""
    lm = setup.lm

    def move(x: torch.Tensor, name: str) -> None:
        x[1:, position] += eps * (x[0, position] - x[1:, position])

    edits = {lm.arch.embed: add_noise_hook(setup, first_row=1), **{n: move for n in names}}
    with torch.no_grad(), Hooks(lm.model, edit=edits):
        logits = lm.model(input_ids=setup.input_ids.repeat(1 + setup.samples, 1), use_cache=False).logits
    return float(setup.metric(logits[1:, -1]).mean())


def test_first_order_terms_equal_finite_differences(tiny):
    tiny.model.double()  # float64 so that a central difference is precise
    setup = prepare(tiny, PROMPT, SUBJECT, samples=3, window=3, noise=0.5, metric=logit_metric)
    gradients = record_gradients(setup, KINDS, space="linear")
    start, end = setup.corrupt_range
    last = setup.num_tokens - 1
    for kind in KINDS:
        table = estimate_table(setup, gradients, kind)
        assert table.shape == (setup.num_tokens, tiny.num_layers)
        for position, layer in [(start, 0), (end - 1, 1), (last, tiny.num_layers - 2)]:
            layers = [layer] if kind == "hidden" else list(window_layers(layer, setup.window, tiny.num_layers))
            names = [tiny.arch.layer_name(tiny.model, l, kind) for l in layers]
            eps = 1e-2  # rotary tables stay float32: a wider step keeps their rounding out of the difference
            derivative = partly_restored(setup, position, names, eps) - partly_restored(setup, position, names, -eps)
            derivative /= 2 * eps
            assert table[position, layer] - setup.corrupted_score == pytest.approx(derivative, rel=1e-2, abs=1e-3), (
                kind,
                position,
                layer,
            )
        np.testing.assert_array_equal(table[:start], setup.corrupted_score)


def test_hidden_estimate_is_exact_for_the_last_layer_in_linear_space(tiny):
    """Restoring the last block's output at the last token changes only the logits' input; with the final
    norm and a logit metric the first-order term is exact only when the norm is linear, so compare with the
    exact cell loosely but require the right sign and the same order of magnitude."""
    setup = prepare(tiny, PROMPT, SUBJECT, samples=2, window=2, noise=0.5, metric=logit_metric)
    table = estimate_table(setup, record_gradients(setup, ("hidden",), space="linear"), "hidden")
    exact = fast_kind(setup, "hidden")
    last, top = setup.num_tokens - 1, tiny.num_layers - 1
    est, ex = table[last, top] - setup.corrupted_score, exact[last, top] - setup.corrupted_score
    assert np.sign(est) == np.sign(ex)


def test_windowed_terms_sum_the_window():
    terms = torch.arange(2 * 3 * 6, dtype=torch.float64).reshape(2, 3, 6)
    summed = windowed_terms(terms, 3, "mlp")
    for layer in range(6):
        expected = terms[..., list(window_layers(layer, 3, 6))].sum(-1)
        torch.testing.assert_close(summed[..., layer], expected)
    assert windowed_terms(terms, 3, "hidden") is terms


def test_estimate_result_has_the_exact_engines_shape_and_keys(tiny):
    fast = trace(tiny, PROMPT, SUBJECT, samples=2, window=2, noise=0.5)
    kinds_seen = []
    estimate = trace(
        tiny,
        PROMPT,
        SUBJECT,
        samples=2,
        window=2,
        noise=0.5,
        engine="estimate",
        on_kind=lambda r, k: kinds_seen.append(k),
    )
    assert kinds_seen == list(KINDS)
    assert estimate.engine == "estimate"
    a, b = fast.to_json(), estimate.to_json()
    assert set(b) == set(a)
    for key in ("tokens", "subject_range", "answer", "high_score", "low_score", "samples", "window"):
        assert a[key] == b[key]
    for kind in KINDS:
        assert estimate.scores[kind].shape == fast.scores[kind].shape
        assert set(b[kind]) >= {"scores", "seconds"}
        # a probability metric: the log-odds estimate stays a probability
        assert ((estimate.scores[kind] > 0) & (estimate.scores[kind] < 1)).all()


def test_verified_cells_are_exact(tiny):
    setup = prepare(tiny, PROMPT, SUBJECT, samples=2, window=2, noise=0.5, metric=logit_metric)
    gradients = record_gradients(setup, KINDS, verify=4)
    from core.estimate_tracing import estimate_kind

    for kind in KINDS:
        table = estimate_kind(setup, kind, gradients=gradients)
        exact = fast_kind(setup, kind)
        marked = gradients.exact[kind]
        assert 4 <= marked[setup.corrupt_range[0] :].sum() <= 12
        np.testing.assert_allclose(table[marked], exact[marked], atol=1e-4)
        plain = estimate_table(setup, gradients, kind)
        verified = {tuple(c) for c in np.argwhere(marked[setup.corrupt_range[0] :]) + [setup.corrupt_range[0], 0]}
        assert set(strongest_cells(setup, plain, 4)) <= verified
        if marked[setup.corrupt_range[0] :].sum() < 12:  # budget left: the table's top 4 are all exact
            assert set(strongest_cells(setup, table, 4)) <= verified


# ---- the embedded model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_estimate_finds_the_exact_peak_region(embedded):
    prompt, subject = "The Space Needle is located in the city of", "The Space Needle"
    setup = prepare(embedded, prompt, subject)
    gradients = record_gradients(setup, ("hidden",))
    estimate = estimate_table(setup, gradients, "hidden")
    exact = fast_kind(setup, "hidden")
    start = setup.corrupt_range[0]
    e, x = estimate[start:] - setup.corrupted_score, exact[start:] - setup.corrupted_score
    # the strongest row (token) agrees, and the estimate's peak cell is a strong cell of the exact table
    assert np.argmax(e.max(axis=1)) == np.argmax(x.max(axis=1))
    peak = np.unravel_index(np.argmax(e), e.shape)
    assert x[peak] > 0.5 * x.max()


def test_cost_forecast_and_memory_limit(tokenizer):
    from core.errors import UserError
    from core.tiny import tiny_model
    from core.trace_cost import check_estimate_fits, engine_macs, estimate_memory_bytes, estimated_seconds, logit_macs

    lm = tiny_model("gpt2", tokenizer)
    fast = engine_macs(lm, "fast", 12, 0, 10, 10, ("hidden",))
    assert engine_macs(lm, "naive", 12, 0, 10, 10, ("hidden",)) > fast > engine_macs(lm, "estimate", 12, 0, 10, 10, ())
    # cells before the span are free: 12 tokens corrupted from token 6 cost what 6 tokens corrupted from 0 do
    assert engine_macs(lm, "fast", 12, 6, 10, 10, ("hidden",)) == engine_macs(lm, "fast", 6, 0, 10, 10, ("hidden",))
    # the blocks' work grows with the square of the traced length (the logits' only with the length)
    blocks = {
        t: engine_macs(lm, "fast", t, 0, 10, 10, ("hidden",)) - 10 * t * lm.num_layers * logit_macs(lm)
        for t in (10, 20)
    }
    assert blocks[20] == pytest.approx(4 * blocks[10], rel=0.15)
    setup = prepare(lm, PROMPT, SUBJECT, samples=2)
    assert setup.forward_seconds > 0
    assert estimated_seconds(setup, "naive", KINDS) > estimated_seconds(setup, "fast", KINDS) > 0
    assert estimate_memory_bytes(lm, 40, 10) > estimate_memory_bytes(lm, 20, 10)
    check_estimate_fits(lm, 100, 10)
    with pytest.raises(UserError, match="reads at most 128"):
        check_estimate_fits(lm, 129, 10)
    with pytest.raises(UserError, match="GiB"):
        check_estimate_fits(lm, 128, 10**9)
