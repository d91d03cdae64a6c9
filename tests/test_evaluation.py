"""CounterFact loading, the metrics, FT-L, evaluation of none / rome / ft, and the editor's before/after measures."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import evaluation
from core.counterfact import PROJECT_FILE, load_counterfact, parse_cases
from core.edits import EditRequest, applied
from core.errors import UserError
from core.evaluation import (
    ESSENCE_PROMPTS,
    TOP_TOKENS,
    CaseResult,
    FTHyperParams,
    continuations,
    edit_warning,
    essence_drift,
    evaluate,
    ft_applied,
    ft_delta,
    harmonic_mean,
    names_object,
    naming_rates,
    next_token_kl,
    next_token_log_probs,
    ngram_entropy,
    top_next_tokens,
)
from core.memit import MemitParams
from core.rome import RomeHyperParams, compute_edit

SMALL = Path(__file__).parent / "data" / "counterfact_small.json"
TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=3)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny models' statistics go to a throwaway cache shared by the session (same seed: same model)."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def test_loads_the_public_format():
    cases = load_counterfact(SMALL)
    assert len(cases) == 3
    first = cases[0]
    assert first.text == "The Eiffel Tower is located in the city of"
    assert (first.target_new, first.target_true, first.relation_id) == ("Rome", "Paris", "P131")
    assert len(first.paraphrase_prompts) == 2 and len(first.neighborhood_prompts) == 2
    assert cases[1].attribute_prompts == ()
    assert len(load_counterfact(SMALL, limit=2)) == 2


def test_project_file_loads():
    if not PROJECT_FILE.exists():
        pytest.skip("the project's CounterFact file is not written yet")
    assert len(load_counterfact(PROJECT_FILE)) >= 60


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["requested_rewrite"].pop("subject"),
            "record 1 \\(case_id 1\\) lacks the field 'requested_rewrite.subject'",
        ),
        (lambda r: r["requested_rewrite"].update(prompt="no slot"), "record 1 .* exactly one"),
        (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "record 1 .* empty"),
        (lambda r: r.update(paraphrase_prompts="one text"), "record 1 .*paraphrase_prompts"),
        (lambda r: r.pop("neighborhood_prompts"), "record 1 .*neighborhood_prompts"),
        (lambda r: r["requested_rewrite"]["target_new"].update(str="Berlin"), "record 1 .* same new and true"),
    ],
)
def test_malformed_record_names_the_record(change, message):
    data = json.loads(SMALL.read_text())
    change(data[1])
    with pytest.raises(UserError, match=message):
        parse_cases(data)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_counterfact(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_counterfact(bad)
    bad.write_text("{}")
    with pytest.raises(UserError, match="not a JSON list"):
        load_counterfact(bad)


def test_ngram_entropy_and_harmonic_mean():
    assert ngram_entropy("a a a a a a") == 0.0  # one repeated bigram and trigram
    distinct = ngram_entropy("one two three four five")  # 4 bigrams, 3 trigrams, all distinct
    assert distinct == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0


def test_names_object_is_a_whole_word_case_insensitive_match():
    assert names_object(" Rome, Italy.", "Rome")
    assert names_object("the city of rome", " Rome ")
    assert names_object("It is in New York.", "New York")
    assert not names_object(" Romeo and Juliet", "Rome")
    assert not names_object(" a Roman name", "Rome")
    assert not names_object("Paris", "")
    assert names_object("C++ is fast", "C++")


def test_text_scores_read_the_continuations(tiny):
    """Per case: the continuations are kept, generation efficacy is the share of generation + paraphrase
    texts naming the new object, bleed the share of neighbourhood texts naming it after but not before (the
    'before' texts are the unedited model's); the summary is the mean over cases."""
    cases = load_counterfact(SMALL, limit=2)
    result = evaluate(tiny, cases, "rome", rome=TINY, fluency_tokens=0, text_tokens=4)
    for case, r in zip(cases, result.cases):
        own = r.texts["generation"] + r.texts["paraphrase"]
        assert len(r.texts["generation"]) == len(case.generation_prompts)
        assert len(r.texts["paraphrase"]) == len(case.paraphrase_prompts)
        assert r.texts["neighbourhood_before"] == continuations(tiny, case.neighborhood_prompts, 4)
        assert r.generation_efficacy == pytest.approx(sum(names_object(t, case.target_new) for t in own) / len(own))
        after, before = r.texts["neighbourhood_after"], r.texts["neighbourhood_before"]
        newly = [
            names_object(a, case.target_new) and not names_object(b, case.target_new) for a, b in zip(after, before)
        ]
        assert r.generation_bleed == pytest.approx(sum(newly) / len(newly))
        own_before = r.texts["generation_before"] + r.texts["paraphrase_before"]
        assert own_before == continuations(tiny, [*case.generation_prompts, *case.paraphrase_prompts], 4)
        wrote = [names_object(a, case.target_new) for a, b in zip(own, own_before) if names_object(b, case.target_true)]
        assert (r.generation_rewritten, r.generation_written_before) == (sum(wrote), len(wrote))
    assert result.generation_efficacy == pytest.approx(sum(r.generation_efficacy for r in result.cases) / 2)
    assert result.generation_bleed == pytest.approx(sum(r.generation_bleed for r in result.cases) / 2)
    none = evaluate(tiny, cases, "none", fluency_tokens=0, text_tokens=4)
    assert none.generation_bleed == 0.0  # the unedited model's texts are its own 'before'


def test_text_scores_count_rewrites_only_where_the_unedited_text_named_the_fact(monkeypatch):
    """Hand-made texts: efficacy, keeps-true, bleed and the rewrite count (of the own prompts whose unedited
    text names the true object, those naming the new one after), and the pooled share over cases."""
    after = {"a": " in Rome.", "b": " in Paris, France", "c": " in Rome", "n": " Rome and Paris"}
    before = {"a": " in Paris.", "b": " Paris!", "c": " in London", "n": " Paris"}
    monkeypatch.setattr(evaluation, "continuations", lambda lm, prompts, tokens=20: [after[p] for p in prompts])
    monkeypatch.setattr(
        evaluation, "unedited_continuations", lambda lm, prompts, tokens=20: [before[p] for p in prompts]
    )
    scores = evaluation.text_scores(None, "Rome", "Paris", ["a", "b", "c"], ["n"])
    assert scores.efficacy == pytest.approx(2 / 3) and scores.keeps_true == pytest.approx(1 / 3)
    assert scores.bleed == 1.0
    assert (scores.rewritten, scores.written_before) == (1, 2)  # "a" rewritten, "b" not, "c" never named Paris
    assert scores.texts["prompts_before"] == [before[p] for p in "abc"]
    assert evaluation.pooled_share([1, 0, None, 3], [2, 0, None, 3]) == pytest.approx(4 / 5)
    assert evaluation.pooled_share([0, None], [0, None]) is None


def last_log_probs(lm, text):
    """The oracle: a full forward of `text` (every position's logits), log-softmax of the last."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), dim=-1)


def test_naming_rates_pool_each_prompt_kind_s_texts():
    """Texts after the edit are read for the new object, the unedited texts for the true one, each prompt kind
    pooled over every case's texts (3 + 1 open-ended texts below, not a mean of the two cases' shares)."""
    one = CaseResult(0, "A", "Rome", "Paris")
    one.texts = {
        "generation": ["in Rome, Italy", "a tower", "romeo"],  # romeo is not Rome
        "generation_before": ["in Paris", "paris!", "a tower"],
        "paraphrase": ["Rome."],
        "paraphrase_before": ["Paris."],
    }
    two = CaseResult(1, "B", "Oslo", "Bern")
    two.texts = {"generation": ["Oslo"], "generation_before": ["Zurich"], "paraphrase": [], "paraphrase_before": []}
    rates = naming_rates([one, two])
    assert rates == {
        "generation_new_after": 2 / 4,
        "generation_true_before": 2 / 4,
        "paraphrase_new_after": 1.0,
        "paraphrase_true_before": 1.0,
    }
    assert naming_rates([CaseResult(2, "C", "x", "y")]) == dict.fromkeys(rates)  # no texts: None


def test_essence_drift_is_the_kl_from_the_unedited_next_token_distribution(tiny):
    """0 exactly on the unedited model; with an edit applied, the mean over the essence prompts of
    sum p_before (log p_before - log p_after), recomputed here from full forwards before and inside the edit;
    the edit's weights come back bitwise after the measurement reads the unedited model."""
    subject = "The Eiffel Tower"
    assert essence_drift(tiny, subject) == 0.0
    edit = compute_edit(tiny, EditRequest("{} is located in the city of", subject, "Rome"), TINY)
    texts = [p.format(subject) for p in ESSENCE_PROMPTS]
    before = [last_log_probs(tiny, t) for t in texts]
    with applied(tiny, [edit]):
        edited = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
        after = [last_log_probs(tiny, t) for t in texts]
        drift = essence_drift(tiny, subject)
        assert all(torch.equal(p, edited[n]) for n, p in tiny.model.named_parameters())
    expected = sum(float((b.exp() * (b - a)).sum()) for b, a in zip(before, after)) / len(texts)
    assert expected > 0
    assert drift == pytest.approx(expected, rel=1e-3, abs=1e-6)  # float32 logits; the KL is a small difference


def test_next_token_kl_is_the_mean_over_rows_of_kl_reference_to_now():
    reference = torch.tensor([[0.5, 0.5], [0.2, 0.8]]).log()
    now = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
    first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # the second row is unchanged: 0
    assert next_token_kl(reference, now) == pytest.approx(first / 2, rel=1e-6)
    backwards = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert next_token_kl(now, reference) == pytest.approx(backwards / 2, rel=1e-6)  # not symmetric
    assert next_token_kl(reference, reference) == 0.0


def test_editor_measures_what_the_model_says_the_subject_is(tiny):
    """The editor's before/after measures carry the essence prompts' greedy texts and next-token log-probs;
    their shift is essence_drift's KL when 'before' is the unedited model, and 0 between equal states."""
    from ui.common import essence_shift, measure

    request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit = compute_edit(tiny, request, TINY)
    before = measure(tiny, [], request, ["The Eiffel Tower is in"], [("neighbourhood", "The Louvre is in")], 4)
    again = measure(tiny, [], request, ["The Eiffel Tower is in"], [("neighbourhood", "The Louvre is in")], 4)
    after = measure(tiny, [edit], request, ["The Eiffel Tower is in"], [("neighbourhood", "The Louvre is in")], 4)
    vocab = tiny.model.get_output_embeddings().weight.shape[0]
    for m in (before, after):
        assert [t[: len(p.format(request.subject))] for t, p in zip(m.essence, ESSENCE_PROMPTS)] == [
            p.format(request.subject) for p in ESSENCE_PROMPTS
        ]
        assert m.essence_log_probs.shape == (len(ESSENCE_PROMPTS), vocab)
        assert len(m.generations) == 1 and len(m.checks) == 1  # the essence texts do not shift the others
    assert before.checks[0]["text"] == again.checks[0]["text"] and before.essence == again.essence
    alone = continuations(tiny, ["The Eiffel Tower is in", "The Louvre is in"], 4)  # without the essence prompts
    assert [before.generations[0], before.checks[0]["text"]] == ["The Eiffel Tower is in" + alone[0], alone[1]]
    assert essence_shift(before, again) == 0.0
    with applied(tiny, [edit]):
        drift = essence_drift(tiny, request.subject)
    assert drift > 0 and essence_shift(before, after) == pytest.approx(drift, rel=1e-5, abs=1e-7)
    assert essence_shift(replace(before, essence_log_probs=None), after) is None
    for m, edits in ((before, []), (after, [edit])):  # the request's likeliest next tokens, computed apart
        with applied(tiny, edits):
            probs, ids = next_token_log_probs(tiny, [request.text])[0].exp().sort(descending=True)
        assert [t for t, _ in m.next_tokens] == [tiny.tokenizer.decode([int(i)]) for i in ids[:TOP_TOKENS]]
        assert [p for _, p in m.next_tokens] == pytest.approx(probs[:TOP_TOKENS].tolist(), rel=1e-5)
    assert before.next_tokens != after.next_tokens


def test_edit_warning_says_when_an_edit_did_not_take():
    request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome", "Paris")
    failed = edit_warning(request, 0.2, 0.6, [True])
    assert failed.startswith("The edit did not take:") and "'Paris' (0.60) to 'Rome' (0.20)" in failed
    assert edit_warning(request, 0.3, 0.3, []).startswith("The edit did not take:")  # a tie is no edit
    silent = edit_warning(request, 0.9, 0.01, [False, False])
    assert silent.startswith("The model now prefers 'Rome'") and "none of the 2 texts names it" in silent
    assert edit_warning(request, 0.9, 0.01, [False, True]) is None
    assert edit_warning(request, 0.9, 0.01, []) is None  # no text asked for: the probabilities decide


def test_top_next_tokens_lists_the_likeliest_first(tokenizer):
    lm = SimpleNamespace(tokenizer=tokenizer)  # only the tokenizer is read
    ids = tokenizer(" Rome Paris London")["input_ids"]
    assert len(ids) == 3
    log_probs = torch.full((tokenizer.vocab_size,), -30.0)
    log_probs[ids] = torch.tensor([0.5, 0.3, 0.2]).log()
    top = top_next_tokens(lm, log_probs, 2)
    assert [t for t, _ in top] == [" Rome", " Paris"] and [p for _, p in top] == pytest.approx([0.5, 0.3])


def test_ft_respects_the_norm_constraint_and_restores(tiny):
    saved = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    hp = FTHyperParams(layer=1, steps=5, norm_constraint=1e-3, lr=1e-2)
    layer, change = ft_delta(tiny, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"), hp)
    assert layer == 1
    assert change.shape == tiny.arch.mlp_out_weight(tiny.model, 1).shape
    assert 0 < float(change.abs().max()) <= 1e-3 * (1 + 1e-5)
    with ft_applied(tiny, layer, change):
        torch.testing.assert_close(tiny.arch.mlp_out_weight(tiny.model, 1), saved_view(tiny, saved, 1) + change)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())


def saved_view(lm, saved, layer):
    w = saved[lm.arch.layer_name(lm.model, layer, "mlp_out") + ".weight"]
    return w.T if lm.arch.mlp_out_conv1d else w


@pytest.mark.parametrize("method", ["none", "rome", "memit", "ft"])
def test_evaluate_methods_on_a_tiny_model(tiny, method):
    saved = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    cases = load_counterfact(SMALL, limit=2)
    memit = MemitParams(layers=(1, 2), mom2_weight=10.0)
    result = evaluate(tiny, cases, method, rome=TINY, ft=FTHyperParams(layer=1, steps=3), fluency_tokens=5, memit=memit)
    assert result.n + result.skipped == 2
    done = [c for c in result.cases if c.skipped is None]
    for name in ("efficacy", "paraphrase", "neighborhood"):  # each score is the mean of the cases' scores
        assert getattr(result, name) == pytest.approx(sum(getattr(c, name) for c in done) / len(done))
    assert all(c.efficacy == float(c.p_new > c.p_true) for c in done)  # ES: P(new) > P(true) after the edit
    assert result.score == pytest.approx(harmonic_mean([result.efficacy, result.paraphrase, result.neighborhood]))
    assert result.fluency is not None and result.fluency >= 0
    assert len(result.cases) == 2 and result.cases[0].p_new is not None
    drifts = [c.essence_drift for c in done]
    assert result.essence_drift == pytest.approx(sum(drifts) / len(drifts))
    assert all(d == 0.0 for d in drifts) if method == "none" else all(d > 0 for d in drifts)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())  # each case on a clean model


def test_unknown_method(tiny):
    with pytest.raises(UserError, match="unknown method"):
        evaluate(tiny, load_counterfact(SMALL, limit=1), "mend")


@pytest.mark.slow
def test_rome_beats_none_on_the_embedded_model(embedded, monkeypatch):
    monkeypatch.delenv("ROME_STUDIO_CACHE", raising=False)  # the real cache (statistics once per machine)
    cases = load_counterfact(SMALL, limit=1)
    hp = RomeHyperParams(stats_tokens=4096)
    none = evaluate(embedded, cases, "none", fluency_tokens=0)
    rome = evaluate(embedded, cases, "rome", rome=hp, fluency_tokens=0)
    assert none.efficacy == 0.0 and rome.efficacy == 1.0
    assert rome.paraphrase >= 0.5
    assert rome.neighborhood == none.neighborhood == 1.0
