"""Many edits: the AlphaEdit and MEMIT solves against their naive matrix formulas, sequential and batch editing
on tiny models of every family (scores, curve, bitwise restore), and the `edit-many` command's JSON contract."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from core.__main__ import main
from core.alphaedit import AlphaEditParams, null_projector, projected_solve
from core.counterfact import PROJECT_FILE, load_counterfact
from core.covariance import key_statistics
from core.edits import EditRequest, applied, export_edits, import_edits
from core.errors import UserError
from core.evaluation import held_out
from core.many import SKIPS_BEFORE_GIVING_UP, ManyParams, current_facts, edit_many, request_of, score_cases, update_norm
from core.memit import MemitParams, keys_by_layer, memit_batch, memit_one_by_one, site_states, target_deltas
from core.requests import read_requests
from core.rome import (
    RomeHyperParams,
    compute_edit,
    compute_key,
    context_texts,
    edit_rows,
    record_rows,
    validate_request,
)
from core.saving import save_edited_model

TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=3)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


@pytest.fixture(scope="module")
def cases():
    return load_counterfact(PROJECT_FILE, 4)


def weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_projected_solve_is_the_papers_formula():
    """Delta = r k^T P (Kp Kp^T P + k k^T P + I)^-1 (AlphaEdit eq. 14), written out with a matrix inverse."""
    torch.manual_seed(0)
    d, out = 12, 5
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    projector = basis[:, :4] @ basis[:, :4].T
    k, r, kp = (
        torch.randn(d, dtype=torch.float64),
        torch.randn(out, dtype=torch.float64),
        3 * torch.randn(3, d).double(),
    )
    naive = (
        torch.outer(r, k)
        @ projector
        @ torch.linalg.inv(kp.T @ kp @ projector + torch.outer(k, k) @ projector + torch.eye(d, dtype=torch.float64))
    )
    u = projected_solve(k[None].float(), projector.float(), kp.float(), l2=1.0)[0]
    torch.testing.assert_close(torch.outer(r.float(), u), naive.float(), atol=1e-4, rtol=1e-4)
    # the update only moves keys through the null space: a key orthogonal to it is left alone
    preserved = basis[:, 6].float()
    assert abs(float(u @ preserved)) < 1e-5
    # earlier keys in the constraint keep their outputs far better than without them
    u_free = projected_solve(k[None].float(), projector.float(), kp[:0].float(), l2=1.0)[0]
    assert (u @ kp.T.float()).norm() < 0.5 * (u_free @ kp.T.float()).norm()
    # several new keys solved together (MEMIT's layers): Delta = R^T K P (Kp^T Kp P + K^T K P + l2 I)^-1
    keys, residuals = torch.randn(3, d, dtype=torch.float64), torch.randn(3, out, dtype=torch.float64)
    inner = kp.T @ kp @ projector + keys.T @ keys @ projector + 0.1 * torch.eye(d, dtype=torch.float64)
    naive = residuals.T @ keys @ projector @ torch.linalg.inv(inner)
    us = projected_solve(keys.float(), projector.float(), kp.float(), l2=0.1)
    torch.testing.assert_close(residuals.float().T @ us, naive.float(), atol=1e-4, rtol=1e-4)


def test_null_projector_is_a_projector_onto_the_weak_keys(tiny):
    params = AlphaEditParams()
    p = null_projector(tiny, 1, TINY, params).double()
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p, p.T)
    mom2 = key_statistics(tiny, 1, TINY.stats_corpus, TINY.stats_tokens).mom2.double()
    values = torch.linalg.eigvalsh(mom2)
    dimension = int((values < params.null_threshold * values.mean()).sum())
    assert 0 < dimension < mom2.shape[0] and round(float(p.trace())) == dimension
    # the keys' energy inside the null space is at most dimension x threshold x mean eigenvalue
    assert float((p @ mom2).trace()) <= dimension * params.null_threshold * float(values.mean()) + 1e-9


@pytest.mark.parametrize("method", ["rome", "alphaedit", "memit"])
def test_edit_many_on_tiny_models(tiny, cases, method):
    before = weights(tiny)
    params = ManyParams(
        method=method, rome=TINY, curve_every=2, fluency_tokens=5, memit=MemitParams(layers=(1, 2), mom2_weight=10.0)
    )
    points = []
    result, edits = edit_many(tiny, cases, params, on_point=points.append)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # put back bitwise
    assert result.method == method and result.n + result.skipped == len(cases) and result.n > 0
    if method == "memit":
        assert len(edits) == 2 * result.n and result.layers == [1, 2] and len(result.curve) == 1
    else:
        assert len(edits) == result.n and result.layers == [1]
        assert [p.cases for p in result.curve] == [2, 4] and points == result.curve
        assert result.curve[0].update_norm <= result.curve[-1].update_norm + 1e-6
    assert result.update_norm == pytest.approx(update_norm(edits)) and result.update_norm > 0
    with applied(tiny, edits):  # the returned edits are the measured state
        means = score_cases(tiny, cases[: result.n] if not result.skipped else cases).means()
    if not result.skipped:
        assert means["efficacy"] == pytest.approx(result.efficacy)
        assert means["neighborhood"] == pytest.approx(result.neighborhood)
    for value in (result.efficacy, result.paraphrase, result.neighborhood):
        assert 0.0 <= value <= 1.0
    assert result.fluency is not None and result.fluency_unedited is not None
    assert 0.0 <= result.generation_efficacy <= 1.0
    assert all(p.generation_efficacy is not None for p in result.curve)


@pytest.mark.parametrize("method,batch", [("rome", None), ("memit", None), ("memit", 1)])
def test_a_run_that_skips_its_first_cases_stops(tiny, cases, method, batch):
    """Cases that all fail the same way (here: the new target is the true one) stop the run at the
    SKIPS_BEFORE_GIVING_UP-th with the first reason, the model put back; fewer such cases just come back skipped."""
    refused = [
        replace(cases[0], case_id=f"same-{i}", target_new=cases[0].target_true)
        for i in range(SKIPS_BEFORE_GIVING_UP + 3)
    ]
    params = ManyParams(
        method=method,
        rome=TINY,
        batch_size=batch,
        fluency_tokens=0,
        text_scores=False,
        memit=MemitParams(layers=(1, 2), mom2_weight=10.0),
    )
    before = weights(tiny)
    with pytest.raises(UserError, match=r"skipped its first (\d+) cases and edited none.*case same-0: ") as err:
        edit_many(tiny, refused, params)
    stopped_at = int(re.search(r"first (\d+) cases", str(err.value)).group(1))  # one batch: all checked first
    assert stopped_at == (len(refused) if method == "memit" and batch is None else SKIPS_BEFORE_GIVING_UP)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    result, edits = edit_many(tiny, refused[:3] + cases[:1], params)
    assert result.skipped == 3 and result.n == 1 and edits


def test_memit_in_batches_one_after_another(tiny, cases):
    """Batches of 1: each fact's MEMIT update is computed on the model carrying the earlier ones (curve points
    every 2 facts); a batch as large as the set is the one-batch run. A batch size needs memit."""
    memit = MemitParams(layers=(1, 2), mom2_weight=10.0)
    one = ManyParams(method="memit", rome=TINY, fluency_tokens=0, text_scores=False, memit=memit, curve_every=2)
    result, edits = edit_many(tiny, cases, replace(one, batch_size=1))
    assert result.skipped == 0 and [p.cases for p in result.curve] == [2, 4] and len(edits) == 2 * len(cases)

    def same(a, b):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.layer == y.layer
            torch.testing.assert_close(x.delta(), y.delta(), atol=1e-6, rtol=1e-5)

    same(edits[:2], memit_batch(tiny, [request_of(cases[0])], TINY, memit).edits)  # on the clean model
    with applied(tiny, edits[:2]):  # the second on the model carrying the first
        same(edits[2:4], memit_batch(tiny, [request_of(cases[1])], TINY, memit).edits)
    _, whole = edit_many(tiny, cases, one)
    _, all_in_one = edit_many(tiny, cases, replace(one, batch_size=len(cases)))
    same(all_in_one, whole)
    with pytest.raises(UserError, match="batch size"):
        edit_many(tiny, cases, ManyParams(method="rome", rome=TINY, batch_size=2))


@pytest.mark.parametrize("method, batch", [("rome", None), ("alphaedit", None), ("memit", 2)])
def test_time_budget_stops_after_the_edits_started_in_time(tiny, cases, method, batch):
    """With no time to spare, the first edit (or batch) still runs; the result then equals a run over just the
    cases seen (with the same preserved catalogue): same scores, fluency on their prompts (edited and unedited),
    last curve point at them."""
    memit = MemitParams(layers=(1, 2), mom2_weight=10.0)
    params = ManyParams(method=method, rome=TINY, fluency_tokens=5, memit=memit, curve_every=3, batch_size=batch)
    before = weights(tiny)
    stopped, edits = edit_many(tiny, cases, replace(params, time_budget=0.0))
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    seen = batch or 1
    assert stopped.cases == seen and stopped.n + stopped.skipped == seen < len(cases)
    assert [p.cases for p in stopped.curve] == [seen]
    # ROME's preserved catalogue is held out from every case given, seen or not: the same catalogue here
    whole, whole_edits = edit_many(tiny, cases[:seen], replace(params, rome=held_out(TINY, cases)))
    assert whole.cases == seen and len(edits) == len(whole_edits)
    for key in ("n", "efficacy", "paraphrase", "neighborhood", "generation_efficacy", "fluency", "fluency_unedited"):
        assert getattr(stopped, key) == pytest.approx(getattr(whole, key), abs=1e-6), key
    with pytest.raises(UserError, match="time budget"):
        edit_many(tiny, cases, replace(params, time_budget=-1.0))


def same_edits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.request == y.request and x.layer == y.layer
        assert torch.equal(x.u, y.u) and torch.equal(x.v, y.v) and torch.equal(x.key, y.key)


@pytest.mark.parametrize("method, batch", [("rome", None), ("alphaedit", None), ("memit", 1)])
def test_a_stopped_run_resumes_from_its_checkpoint(tiny, cases, tmp_path, method, batch):
    """A run stopped by its time budget after one edit, then given its checkpoint folder again, ends with the
    same edits (bitwise), scores and curve points as a run that never stopped; the stopped process's extra
    last point stays in the curve. The model is put back bitwise each time."""
    memit = MemitParams(layers=(1, 2), mom2_weight=10.0)
    params = ManyParams(method=method, rome=TINY, fluency_tokens=5, memit=memit, curve_every=2, batch_size=batch)
    before = weights(tiny)
    whole, whole_edits = edit_many(tiny, cases, params)
    folder = tmp_path / "run"
    stopped, _ = edit_many(tiny, cases, replace(params, time_budget=0.0), checkpoint=folder)
    assert stopped.cases == 1 and [p.cases for p in stopped.curve] == [1]
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    ticks = []
    resumed, edits = edit_many(tiny, cases, params, progress=lambda done, total: ticks.append(done), checkpoint=folder)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    assert ticks[0] == 1 and ticks[-1] == len(cases)  # the progress starts where the stopped run ended
    same_edits(edits, whole_edits)
    assert [p.cases for p in resumed.curve] == [1, 2, 4]
    for mine, theirs in zip(resumed.curve[1:], whole.curve):
        for key in ("edits", "efficacy", "neighborhood", "generation_efficacy", "fluency", "update_norm"):
            assert getattr(mine, key) == pytest.approx(getattr(theirs, key), abs=1e-6), key
    for key in ("n", "skipped", "efficacy", "paraphrase", "neighborhood", "generation_efficacy", "fluency"):
        assert getattr(resumed, key) == pytest.approx(getattr(whole, key), abs=1e-6, nan_ok=True), key
    assert resumed.fluency_unedited == pytest.approx(whole.fluency_unedited)
    assert resumed.seconds >= stopped.seconds and resumed.edit_seconds >= stopped.edit_seconds
    # a finished run's folder gives the finished result again, without editing anything
    again, again_edits = edit_many(tiny, cases, params, checkpoint=folder)
    same_edits(again_edits, whole_edits)
    assert [p.cases for p in again.curve] == [1, 2, 4] and again.edit_seconds == resumed.edit_seconds
    assert again.efficacy == pytest.approx(whole.efficacy) and again.neighborhood == pytest.approx(whole.neighborhood)


def test_a_checkpoint_of_another_run_is_refused(tiny, cases, tmp_path):
    """Other settings, other cases or a damaged state: one clear message, the model unchanged; a crash
    between the edits file and the state (edits written, state not) resumes from the state's edits."""
    params = ManyParams(method="rome", rome=TINY, fluency_tokens=0, text_scores=False, curve_every=1)
    folder = tmp_path / "run"
    edit_many(tiny, cases[:2], replace(params, time_budget=0.0), checkpoint=folder)
    before = weights(tiny)
    with pytest.raises(UserError, match="another run"):
        edit_many(tiny, cases[:2], replace(params, method="alphaedit"), checkpoint=folder)
    with pytest.raises(UserError, match="another run"):
        edit_many(tiny, cases[1:3], params, checkpoint=folder)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    state = json.loads((folder / "state.json").read_text())
    # edits written by a later point whose state never got written: the state's first edit is what counts
    _, two = edit_many(tiny, cases[:2], params)
    export_edits(two, folder / "edits.safetensors")
    result, edits = edit_many(tiny, cases[:2], params, checkpoint=folder)
    same_edits(edits, two)
    assert result.n == 2
    (folder / "state.json").write_text(json.dumps({**state, "seen": "many"})[:-5])
    with pytest.raises(UserError, match="damaged"):
        edit_many(tiny, cases[:2], params, checkpoint=folder)


def test_a_run_goes_on_only_in_the_value_products_it_began_with(tiny, cases, tmp_path, monkeypatch):
    """A checkpoint's identity holds the value precision as it resolved where the run began (core.rome.
    value_products): "auto" begun in bfloat16 products (a CPU that multiplies them natively) is refused where
    "auto" means float32 (a GPU, another CPU), and goes on there when asked for bfloat16 by name."""
    params = ManyParams(method="rome", rome=TINY, fluency_tokens=0, text_scores=False, curve_every=1)
    folder = tmp_path / "run"

    def native(yes: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: yes)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)

    native(True)
    assert TINY.value_precision == "auto"
    edit_many(tiny, cases[:2], replace(params, time_budget=0.0), checkpoint=folder)
    native(False)
    before = weights(tiny)
    with pytest.raises(UserError, match="another run"):
        edit_many(tiny, cases[:2], params, checkpoint=folder)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    bfloat16 = replace(params, rome=replace(TINY, value_precision="bfloat16"))
    result, edits = edit_many(tiny, cases[:2], bfloat16, checkpoint=folder)
    assert result.cases == 2 and len(edits) == result.n
    # "model" is the same run as "auto" wherever auto resolves to the model's own products
    other = tmp_path / "float32"
    float32 = replace(params, rome=replace(TINY, value_precision="model"), time_budget=0.0)
    edit_many(tiny, cases[:2], float32, checkpoint=other)
    assert edit_many(tiny, cases[:2], params, checkpoint=other)[0].cases == 2


def test_a_later_edit_of_the_same_fact_supersedes_the_earlier(tiny, cases):
    """Editing a fact again (same subject and prompt, another object): the scores count the latest edit only,
    as if the earlier case were not in the set (with both edits applied)."""
    params = ManyParams(method="rome", rome=TINY, fluency_tokens=0, text_scores=False, curve_every=10)
    again = replace(cases[0], case_id="again", target_new=cases[1].target_new)
    if again.target_new == cases[0].target_new:
        again = replace(again, target_new=cases[2].target_new)
    result, edits = edit_many(tiny, [*cases[:3], again], params)
    assert result.skipped == 0 and len(edits) == 4
    with applied(tiny, edits):
        expected = score_cases(tiny, [*cases[1:3], again]).means()
    assert result.efficacy == pytest.approx(expected["efficacy"])
    assert result.neighborhood == pytest.approx(expected["neighborhood"])
    assert current_facts([*cases[:3], again]) == [*cases[1:3], again]


def test_a_run_over_its_whole_catalogue_preserves_nothing(tiny, cases, tmp_path):
    """ROME's catalogue is held out from the measured cases: when they mention every subject in it (the
    known-facts curve edits the whole catalogue), the edits are those of ROME without preserved subjects,
    not refused one by one."""
    catalogue = tmp_path / "facts.json"
    facts = [{"subject": c.subject, "prompt": c.text, "attribute": c.target_true, "relation": "r"} for c in cases[:2]]
    catalogue.write_text(json.dumps(facts))
    params = ManyParams(method="rome", fluency_tokens=0, text_scores=False)
    result, edits = edit_many(tiny, cases[:2], replace(params, rome=replace(TINY, preserve_facts=str(catalogue))))
    plain, plain_edits = edit_many(tiny, cases[:2], replace(params, rome=replace(TINY, preserve_weight=0.0)))
    assert result.skipped == plain.skipped == 0
    same_edits(edits, plain_edits)


def test_memit_update_is_the_least_squares_solution(tiny, cases):
    """Each layer's summed edits equal R K^T (lambda C + K K^T)^-1 with the batch's own keys and residuals."""
    params = ManyParams(method="memit", rome=TINY, fluency_tokens=0, memit=MemitParams(layers=(1, 2), mom2_weight=10.0))
    _, edits = edit_many(tiny, cases, params)
    for layer in (1, 2):
        mine = [e for e in edits if e.layer == layer]
        keys = torch.stack([e.key for e in mine]).double()
        residual = torch.stack([e.v for e in mine]).double()
        c = key_statistics(tiny, layer, TINY.stats_corpus, TINY.stats_tokens).mom2.double()
        naive = residual.T @ keys @ torch.linalg.inv(10.0 * c + keys.T @ keys)
        summed = sum(e.delta().double() for e in mine)
        torch.testing.assert_close(summed, naive, atol=1e-4, rtol=1e-3)


def test_memit_null_space_batches_are_alphaedits_formula(tiny, cases):
    """MEMIT with AlphaEdit's solve, batches of 1 one after another: each fact's update at each layer is
    r k^T P (Kp Kp^T P + k k^T P + l2 I)^-1 with Kp the keys of the facts edited before it at that layer, and
    it leaves every key outside the null space alone: Delta (I - P) = 0."""
    null_space = AlphaEditParams(l2=0.1)
    memit = MemitParams(layers=(1, 2), null_space=null_space)
    params = ManyParams(method="memit", rome=TINY, fluency_tokens=0, text_scores=False, memit=memit, batch_size=1)
    result, edits = edit_many(tiny, cases[:3], params)
    assert result.skipped == 0 and len(edits) == 6
    for layer in (1, 2):
        mine = [e for e in edits if e.layer == layer]
        projector = null_projector(tiny, layer, TINY, null_space).double()
        eye = torch.eye(projector.shape[0], dtype=torch.float64)
        for j, edit in enumerate(mine):
            k, r = edit.key.double()[None], edit.v.double()[None]
            kp = torch.stack([e.key.double() for e in mine[:j]]) if j else k[:0]
            inner = kp.T @ kp @ projector + k.T @ k @ projector + 0.1 * eye
            naive = r.T @ k @ projector @ torch.linalg.inv(inner)
            torch.testing.assert_close(edit.delta().double(), naive, atol=1e-5, rtol=1e-3)
            outside = edit.delta().double() @ (eye - projector)
            assert float(outside.norm()) < 1e-4 * float(edit.delta().norm())


def test_memit_one_by_one_is_edit_manys_sequential_run(tiny, cases):
    """The app's "one after another": the same edits as `edit_many` in batches of 1 with the null-space solve;
    on top of edits the model carries (`earlier`), each solve also keeps their keys. A request that cannot be
    edited is listed with its index; the model is left bitwise as it was."""
    memit = MemitParams(layers=(1, 2), null_space=AlphaEditParams(l2=0.1))
    params = ManyParams(method="memit", rome=TINY, fluency_tokens=0, text_scores=False, memit=memit, batch_size=1)
    _, expected = edit_many(tiny, cases[:3], params)
    before = weights(tiny)
    requests = [request_of(c) for c in cases[:3]]
    done = []
    batch = memit_one_by_one(tiny, requests, TINY, memit, progress=lambda i, n: done.append((i, n)))
    assert [(e.layer, e.request.subject) for e in batch.edits] == [(e.layer, e.request.subject) for e in expected]
    for mine, theirs in zip(batch.edits, expected):
        assert torch.equal(mine.u, theirs.u) and torch.equal(mine.v, theirs.v) and torch.equal(mine.key, theirs.key)
    assert batch.kept == [0, 1, 2] and batch.skipped == [] and done == [(1, 3), (2, 3), (3, 3)]
    assert [r.target_true for r in batch.requests] == [validate_request(tiny, r).target_true for r in requests]
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())

    # on top of the first fact's edits: the same as computing the second on that model, keeping their keys
    earlier = batch.edits[:2]
    with applied(tiny, earlier):
        alone = memit_batch(tiny, requests[1:2], TINY, memit, earlier_keys=keys_by_layer(earlier))
        # a request that cannot be edited (its new object is its true one) is skipped with its index
        unchanged = replace(requests[0], target_new=requests[0].target_true)
        later = memit_one_by_one(tiny, [unchanged, requests[1]], TINY, memit, earlier=earlier)
    assert len(later.edits) == len(alone.edits) == 2
    assert all(torch.equal(a.u, b.u) and torch.equal(a.v, b.v) for a, b in zip(later.edits, alone.edits))
    assert later.kept == [1] and [i for i, _ in later.skipped] == [0] and "equals the true" in later.skipped[0][1]
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


def test_site_states_equal_the_per_request_keys_and_states(tiny, cases):
    """MEMIT's one batched pass gives, per request, ROME's k* at the layer and the mean block output at the
    last layer at the key token, as a pass over that request's rows alone does."""
    requests = [validate_request(tiny, request_of(c)) for c in cases[:3]]
    keys, states = site_states(tiny, requests, 1, 2, TINY, batch=2)  # batch=2: groups split over forwards
    contexts = context_texts(tiny, TINY.context_lengths, TINY.seed)
    for request, key, state in zip(requests, keys, states):
        torch.testing.assert_close(key, compute_key(tiny, request, 1, TINY), atol=1e-5, rtol=1e-5)
        rows = edit_rows(tiny, request, contexts)
        recording = record_rows(tiny, rows, 2)
        expected = torch.stack([recording.hidden[i][0] for i, row in enumerate(rows) if not row.kl]).mean(0)
        torch.testing.assert_close(state, expected, atol=1e-5, rtol=1e-5)


def test_memit_targets_found_together_equal_each_fact_alone(tiny, cases):
    """MEMIT's step 1 puts many facts' rows through each forward pass (core.rome.optimise_values): each delta
    equals the one its fact gets alone (and ROME's own edit at that layer: delta = v (u . k)), though the
    facts stop early at different steps, their targets differ in length and the rows go in groups."""
    requests = [validate_request(tiny, request_of(c)) for c in cases]
    requests.append(validate_request(tiny, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")))
    requests.append(replace(requests[-1], target_new="New York City Hall"))  # a longer target
    # float32 values: batches of other shapes round differently, and bfloat16 products (value_precision "auto"
    # on a CPU with native bfloat16) round far more; tests/test_block_copy.py checks those against float32
    hp = replace(TINY, steps=6, early_stop="none", preserve_weight=0.0, value_precision="model")
    _, paths = target_deltas(tiny, requests, 2, hp, batch_rows=1)

    def stops(threshold):  # the step each fact's run stops at when its NLL must fall below threshold
        return [next((s + 1 for s, nll in enumerate(p.nll) if nll < threshold), hp.steps) for p in paths]

    candidates = sorted({nll * (1 + 1e-3) for p in paths for nll in p.nll})
    threshold = next(t for t in candidates if len(set(stops(t))) > 1)
    stopping = replace(hp, early_stop="nll", early_stop_loss=threshold)
    alone = [target_deltas(tiny, [r], 2, stopping) for r in requests]
    together, traces = target_deltas(tiny, requests, 2, stopping)
    assert [t.steps for t in traces] == [a[1][0].steps for a in alone] == stops(threshold)
    for (delta, _), found in zip(alone, together):
        assert float(delta[0].norm()) > 0
        torch.testing.assert_close(found, delta[0], atol=1e-4, rtol=1e-3)  # float rounding of other batch shapes
    grouped, _ = target_deltas(
        tiny,
        requests,
        2,
        stopping,
        batch_rows=2 * len(edit_rows(tiny, requests[0], context_texts(tiny, TINY.context_lengths))),
    )
    torch.testing.assert_close(grouped, together, atol=1e-4, rtol=1e-3)
    none, no_traces = target_deltas(tiny, [], 2, stopping)
    assert none.shape == (0, tiny.hidden_size) and no_traces == []
    edit = compute_edit(tiny, requests[-1], replace(stopping, layer=2))
    torch.testing.assert_close(edit.v.float() * (edit.u.float() @ edit.key.float()), together[-1], atol=1e-4, rtol=1e-3)


def test_edit_many_command(tiny, tmp_path, capsys):
    folder = save_edited_model(tiny, [], tmp_path / "base")
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(json.loads(PROJECT_FILE.read_text())[:2]))
    out, saved = tmp_path / "many.json", tmp_path / "edited"
    args = ["edit-many", "--data", str(data), "--method", "alphaedit", "--model", str(folder), "--layer", "1"]
    code = main([*args, "--curve-every", "1", "--fluency-tokens", "4", "--save", str(saved), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    for key in ("n", "method", "efficacy", "paraphrase", "neighborhood", "generation_efficacy", "fluency", "seconds"):
        assert key in result
    assert result["method"] == "alphaedit" and len(result["curve"]) == 2
    assert {"efficacy", "neighborhood", "fluency", "update_norm"} <= set(result["curve"][0])
    assert AutoModelForCausalLM.from_pretrained(saved) is not None and (saved / "README.md").is_file()
    table = tmp_path / "facts.csv"
    table.write_text("prompt,subject,target_new\n{} is located in the city of,The Eiffel Tower,Rome\n")
    out = tmp_path / "memit.json"
    code = main(["edit-many", "--data", str(table), "--method", "memit", "--model", str(folder), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["method"] == "memit" and result["n"] + result["skipped"] == 1 and result["layers"] in ([], [0, 1])
    assert result["null_space"] is False
    # --value-stop: every fact's value optimisation stops once its target's NLL is below it (here: at once)
    edits_file = tmp_path / "stopped.safetensors"
    code = main([*args, "--fluency-tokens", "0", "--value-stop", "1e9", "--export", str(edits_file)])
    assert code == 0, capsys.readouterr().err
    assert [e.info["steps"] for e in import_edits(edits_file)] == [1, 1]
    assert [len(e.info["nll"]) for e in import_edits(edits_file)] == [1, 1]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--value-stop", "-1"])
    assert exit_.value.code == 2 and ">= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: one line, exit 2
        main(["edit-many", "--data", str(data), "--method", "nope"])
    assert exit_.value.code == 2
    code = main([*args, "--save", str(saved)])  # the folder is taken: refused before any work
    assert code != 0 and "not an empty folder" in capsys.readouterr().err
    # --checkpoint: a run stopped by its time budget goes on from its folder; another run's folder is refused
    run, part = tmp_path / "run", tmp_path / "part.json"
    kept = [*args, "--curve-every", "1", "--fluency-tokens", "0", "--checkpoint", str(run), "--json", str(part)]
    assert main([*kept, "--time-budget", "0"]) == 0
    assert json.loads(part.read_text())["cases"] == 1 and (run / "state.json").is_file()
    assert main(kept) == 0
    resumed = json.loads(part.read_text())
    assert resumed["cases"] == 2 and resumed["n"] + resumed["skipped"] == 2
    assert [p["cases"] for p in resumed["curve"]] == [1, 2]
    capsys.readouterr()
    assert main([*kept, "--l2", "0.5"]) != 0 and "another run" in capsys.readouterr().err
    assert main([*args, "--null-space"]) != 0 and "--method memit" in capsys.readouterr().err


def test_read_requests_csv_json_and_counterfact():
    csv = b"prompt,subject,target_new,target_true\n{} is located in the city of,The Eiffel Tower,Rome,Paris\n"
    csv += b"The capital of {} is,Germany,Madrid,\n"
    assert read_requests(csv, "facts.csv") == [
        EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
        EditRequest("The capital of {} is", "Germany", "Madrid", None),
    ]
    plain = b'[{"prompt": "The capital of {} is", "subject": "Germany", "target": "Madrid"}]'
    assert read_requests(plain, "facts.json") == [EditRequest("The capital of {} is", "Germany", "Madrid")]
    cf = read_requests(PROJECT_FILE.read_bytes(), "cf.json")
    assert len(cf) == 94 and cf[0] == EditRequest("{} is located in the city of", "The Eiffel Tower", "London", "Paris")
    with pytest.raises(UserError, match="row 2 lacks a text 'subject'"):
        read_requests(b"prompt,subject,target_new\n{} is in,A,B\n{} is in,,C\n", "t.csv")
    with pytest.raises(UserError, match="not valid JSON"):
        read_requests(b"[{", "t.json")
    with pytest.raises(UserError, match="no requests"):
        read_requests(b"[]", "t.json")


def test_batch_rows_read_each_fact_before_and_after_the_batch(tiny, cases):
    """The Many edits page's table: each fact's probabilities and greedy text with the edits before and after
    the batch, as the library computes them apart; the model is left as it was."""
    from core.evaluation import TEXT_TOKENS, continuations, names_object, target_log_probs
    from ui.common import batch_rows

    batch = memit_batch(tiny, [request_of(c) for c in cases[:2]], TINY, MemitParams(layers=(1, 2), mom2_weight=10.0))
    saved = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    rows = batch_rows(tiny, [], batch.edits, batch.requests)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())
    texts = [r.text for r in batch.requests]
    assert [row["fact"] for row in rows] == texts and [row["new"] for row in rows] == [c.target_new for c in cases[:2]]
    for side, edits in (("before", []), ("after", batch.edits)):
        with applied(tiny, edits):
            said = continuations(tiny, texts, TEXT_TOKENS)
            new = target_log_probs(tiny, texts, [r.target_new for r in batch.requests])
            old = target_log_probs(tiny, texts, [r.target_true for r in batch.requests])
        assert [row[f"text {side}"] for row in rows] == [t + s for t, s in zip(texts, said)]
        assert [row[f"p(new) {side}"] for row in rows] == pytest.approx(np.exp(new).tolist(), rel=1e-5)
        assert [row[f"p(old) {side}"] for row in rows] == pytest.approx(np.exp(old).tolist(), rel=1e-5)
    assert [row["edited"] for row in rows] == ["yes" if r["p(new) after"] > r["p(old) after"] else "no" for r in rows]
    assert [row["writes new"] for row in rows] == [
        "yes" if names_object(row["text after"][len(row["fact"]) :], row["new"]) else "no" for row in rows
    ]
