"""Causal tracing: the fast engine equals the naive (paper) engine, the naive engine equals a hand-written
restoration, and the embedded model's traces behave as the paper describes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.fast_tracing import fast_kind, record_runs
from core.tiny import tiny_model
from core.tracing import KINDS, make_noise, naive_kind, naive_scores, prepare, trace, trace_kind, window_layers

PROMPT = "Paris is the capital of the Eiffel Tower country named"
SUBJECT = "the Eiffel Tower"


def logit_metric(logits: torch.Tensor) -> torch.Tensor:
    """A metric with a wide range on random models (their probabilities are all ~1/vocab)."""
    return logits[:, 1000] * 10


@pytest.mark.parametrize("kind", KINDS)
def test_fast_equals_naive_on_every_cell(tiny, kind):
    setup = prepare(tiny, PROMPT, SUBJECT, samples=3, window=3, noise=0.5, metric=logit_metric)
    naive = naive_kind(setup, kind)
    fast = fast_kind(setup, kind)
    assert naive.shape == fast.shape == (len(setup.prompt.input_ids), tiny.num_layers)
    assert naive.max() - naive.min() > 0.5  # the restorations really move the metric
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [1, 2, 6, 9])
def test_fast_equals_naive_for_any_window(tiny, window):
    """Windows of one layer, of shared starts, wider than the model (every cell restores every layer)."""
    tiny6 = tiny_model(tiny.name.removeprefix("tiny-"), tiny.tokenizer, layers=6)
    setup = prepare(tiny6, PROMPT, SUBJECT, samples=2, window=window, noise=0.5, metric=logit_metric)
    for kind in ("mlp", "attn"):
        np.testing.assert_allclose(fast_kind(setup, kind), naive_kind(setup, kind), atol=1e-4, rtol=0)


def test_fast_equals_naive_with_probability_metric(tiny):
    setup = prepare(tiny, PROMPT, SUBJECT, samples=2, window=2, noise=1.0)
    for kind in KINDS:
        np.testing.assert_allclose(fast_kind(setup, kind), naive_kind(setup, kind), atol=1e-7, rtol=1e-3)


def test_naive_equals_hand_written_restoration(tiny):
    """Restore one hidden state / one windowed MLP by hand and compare with the naive engine's cells."""
    samples, noise, window = 3, 0.5, 3
    setup = prepare(tiny, PROMPT, SUBJECT, samples=samples, window=window, noise=noise, metric=logit_metric)
    model, arch = tiny.model, tiny.arch
    ids = torch.tensor([setup.prompt.input_ids])
    start, end = setup.corrupt_range
    draw = torch.from_numpy(np.random.RandomState(1).randn(samples, end - start, tiny.hidden_size)) * noise

    def corrupted_score(position: int, restore: dict[str, torch.Tensor]) -> float:
        handles = []

        def add_noise(module, inputs, output):
            output[1:, start:end] += draw
            return output

        handles.append(model.get_submodule(arch.embed).register_forward_hook(add_noise))
        for name, clean in restore.items():

            def put_back(module, inputs, output, clean=clean):
                tensor = output[0] if isinstance(output, tuple) else output
                tensor[1:, position] = clean
                return output

            handles.append(model.get_submodule(name).register_forward_hook(put_back))
        try:
            with torch.no_grad():
                logits = model(input_ids=ids.repeat(samples + 1, 1)).logits
        finally:
            for h in handles:
                h.remove()
        return float(logit_metric(logits[1:, -1]).mean())

    clean_states = {}
    hooks = []
    for name, _ in model.named_modules():
        if name.startswith(arch.blocks + ".") and name.count(".") <= arch.blocks.count(".") + 2:
            module = model.get_submodule(name)
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: clean_states.__setitem__(
                        name, (o[0] if isinstance(o, tuple) else o).clone()
                    )
                )
            )
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()

    hidden = naive_kind(setup, "hidden")
    mlp = naive_kind(setup, "mlp")
    for position, layer in [(start, 0), (end - 1, 1), (len(ids[0]) - 1, tiny.num_layers - 1)]:
        block = arch.layer_name(model, layer)
        expected = corrupted_score(position, {block: clean_states[block][0, position]})
        assert hidden[position, layer] == pytest.approx(expected, abs=1e-4)
        names = [arch.layer_name(model, l, "mlp") for l in window_layers(layer, window, tiny.num_layers)]
        expected = corrupted_score(position, {n: clean_states[n][0, position] for n in names})
        assert mlp[position, layer] == pytest.approx(expected, abs=1e-4)


def test_noise_is_the_papers_draw():
    noise = make_noise(4, 3, 8, 0.25)
    assert noise.dtype == torch.float64
    np.testing.assert_array_equal(noise.numpy(), np.random.RandomState(1).randn(4, 3, 8) * 0.25)


def test_window_layers_match_the_papers_range():
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(12, 10, 30) == range(7, 17)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(3, 3, 30) == range(2, 5)  # odd window: -(-3 // 2) = 2 above
    assert window_layers(5, 1, 30) == range(5, 6)


def test_cells_before_the_subject_equal_the_corrupted_score(tiny):
    setup = prepare(tiny, PROMPT, SUBJECT, samples=2, window=2, noise=0.5, metric=logit_metric)
    start = setup.corrupt_range[0]
    assert start > 0
    for kind in KINDS:
        table = fast_kind(setup, kind)
        np.testing.assert_allclose(table[:start], setup.corrupted_score)
        naive = naive_kind(setup, kind)
        np.testing.assert_allclose(naive[:start], setup.corrupted_score, atol=1e-4)


def test_trace_result_and_progress(tiny):
    calls = []
    result = trace(tiny, PROMPT, SUBJECT, samples=2, window=2, progress=lambda d, t: calls.append((d, t)))
    tokens = len(result.tokens)
    assert set(result.scores) == set(KINDS)
    assert all(table.shape == (tokens, tiny.num_layers) for table in result.scores.values())
    assert calls[-1] == (3 * tokens, 3 * tokens)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    data = result.to_json()
    assert data["subject_range"] == list(result.subject_range)
    assert len(data["mlp"]["scores"]) == tokens
    np.testing.assert_allclose(result.indirect_effect("hidden"), result.scores["hidden"] - result.corrupted_score)


def test_trace_calls_on_kind_and_on_row_and_records_once(tiny, monkeypatch):
    import core.fast_tracing as fast_tracing
    import core.tracing as tracing

    recordings = []
    real = fast_tracing.record_runs

    def counting(setup, kinds=KINDS, **options):
        recordings.append(kinds)
        return real(setup, kinds)

    monkeypatch.setitem(
        tracing.ENGINES, "fast", tracing.ENGINES["fast"].__class__("fast", True, counting, fast_kind, "")
    )
    kinds_seen, rows = [], []
    result = trace(
        tiny,
        PROMPT,
        SUBJECT,
        samples=2,
        window=2,
        on_kind=lambda r, kind: kinds_seen.append((kind, set(r.scores))),
        on_row=lambda kind, position, row: rows.append((kind, position)),
    )
    assert recordings == [KINDS]
    assert [k for k, _ in kinds_seen] == list(KINDS) and kinds_seen[-1][1] == set(KINDS)
    start = result.subject_range[0]
    assert rows == [(kind, p) for kind in KINDS for p in range(start, len(result.tokens))]


def test_trace_setup_runs_the_recording_and_each_kind_in_a_step_of_its_own(tokenizer):
    from contextlib import contextmanager

    from core.tracing import trace_setup

    setup = prepare(tiny_model("gpt2", tokenizer), PROMPT, SUBJECT, samples=2, window=2)
    events, inside = [], []

    @contextmanager
    def step():
        inside.append(True)
        events.append("step")
        yield
        inside.pop()

    def on_kind(result, kind):
        assert not inside  # drawing a finished kind needs no lock
        events.append(kind)

    def on_row(kind, position, row):
        assert inside  # the rows are computed under the step
        events.append("row")

    result = trace_setup(setup, kinds=KINDS, on_kind=on_kind, on_row=on_row, step=step)
    assert set(result.scores) == set(KINDS) and "row" in events
    steps = [e for e in events if e != "row"]
    assert steps == ["step", *(x for kind in KINDS for x in ("step", kind))]  # the recording, then one per kind


def test_bad_trace_input_is_refused(tiny):
    from core.errors import UserError

    with pytest.raises(UserError, match="does not occur"):
        trace(tiny, PROMPT, "the Colosseum")
    with pytest.raises(UserError, match="empty"):
        trace(tiny, "   ", "x")
    with pytest.raises(UserError, match="samples"):
        trace(tiny, PROMPT, SUBJECT, samples=0)
    with pytest.raises(UserError, match="kind"):
        trace(tiny, PROMPT, SUBJECT, kinds=["residual"])
    with pytest.raises(UserError, match="noise"):
        trace(tiny, PROMPT, SUBJECT, noise=-1.0)
    with pytest.raises(UserError, match="engine"):
        trace(tiny, PROMPT, SUBJECT, engine="guess")


# ---- the embedded model ------------------------------------------------------------------------------

EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.mark.slow
def test_embedded_trace_behaves_as_the_paper(embedded):
    setup = prepare(embedded, EIFFEL, "The Eiffel Tower")
    assert setup.answer == " Paris"
    assert setup.clean_score > 0.5
    assert setup.clean_score > setup.corrupted_score + 0.2
    runs = record_runs(setup)
    hidden = fast_kind(setup, "hidden", runs=runs)
    last_token, last_layer = setup.num_tokens - 1, embedded.num_layers - 1
    # restoring the last token's final state gives back the clean prediction
    assert hidden[last_token, last_layer] == pytest.approx(setup.clean_score, abs=1e-4)
    # the early site: restoring a subject token in the early/middle layers brings the answer back (on this
    # model it sits at "iffel", not at the last subject token)
    start, end = setup.corrupt_range
    subject_last = end - 1
    assert hidden[start:end, :15].max() > setup.corrupted_score + 0.2
    # the late site: the last token in the late layers
    assert hidden[last_token, 20:].max() > setup.corrupted_score + 0.3
    # spot-check fast cells against the paper's algorithm
    for position, layer in [(subject_last, 5), (last_token, 20)]:
        name = embedded.arch.layer_name(embedded.model, layer)
        assert hidden[position, layer] == pytest.approx(naive_scores(embedded, setup, [(position, name)]), abs=1e-4)
    mlp = fast_kind(setup, "mlp", runs=runs)
    names = [embedded.arch.layer_name(embedded.model, l, "mlp") for l in window_layers(8, 10, embedded.num_layers)]
    expected = naive_scores(embedded, setup, [(subject_last, n) for n in names])
    assert mlp[subject_last, 8] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_embedded_cells_before_subject_equal_the_corrupted_score(embedded):
    setup = prepare(embedded, "Tourists know that the Colosseum is located in the city of", "the Colosseum", samples=4)
    start = setup.corrupt_range[0]
    assert start >= 3
    table = trace_kind(setup, "attn")
    np.testing.assert_allclose(table[:start], setup.corrupted_score)
    name = embedded.arch.layer_name(embedded.model, 10, "attn")
    assert naive_scores(embedded, setup, [(1, name)]) == pytest.approx(setup.corrupted_score, abs=1e-5)
