"""Many edits on one model, measured: sequential (ROME, AlphaEdit) or batched (MEMIT: one batch, or batches of
`batch_size` one after another; 1 = sequential edits each spread over MEMIT's layers).

Sequential: each edit (or batch) is computed on the model that already carries the earlier ones, as a user
does in the app. After every `curve_every` edits, the scores over *all* edits so far (efficacy, paraphrase,
neighbourhood; core.evaluation's definitions), fluency on a fixed sample of generation prompts and the norm
of the accumulated update make one point of the `curve`. At the end every score is measured over all
edits, fluency over every case's generation prompts, next to the unedited model's fluency on the same
prompts and seeds. A case that edits again a subject in a prompt an earlier case edited supersedes it: the
scores count each fact's latest edit (`current_facts`). With a `time_budget`, no edit (or batch) starts after
that many seconds of this process's work: the result covers the cases seen by then (`cases`), with a last
curve point there, fluency on their prompts only; with a checkpoint folder (core.checkpoint) the next process
goes on from there. ROME's preserved-subjects catalogue (core/preserve.py) is held out from every case given
(core.evaluation.held_out). A run whose first `SKIPS_BEFORE_GIVING_UP` cases are all skipped stops with a
UserError naming the first reason: a systematic refusal, not hundreds of skips.

The model is left as it was (bitwise); the edits come back in the result, ready for core.saving or export.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from core.alphaedit import AlphaEditor, AlphaEditParams
from core.checkpoint import RunState, read_checkpoint, run_id, write_checkpoint
from core.counterfact import CounterFactCase
from core.edits import Edit, EditRequest, EditStack
from core.errors import UserError
from core.evaluation import continuations, held_out, names_object, ngram_entropy, target_log_probs
from core.generation import GenerationSettings, generate
from core.memit import VALUE_SETTINGS, MemitParams, keys_by_layer, memit_batch
from core.models import LoadedModel
from core.progress import Progress
from core.rome import RomeHyperParams, compute_edit, validate_request, value_products

METHODS = ("rome", "alphaedit", "memit")
SEQUENTIAL = ("rome", "alphaedit")
SKIPS_BEFORE_GIVING_UP = 20


@dataclass(frozen=True)
class ManyParams:
    method: str = "rome"
    rome: RomeHyperParams | None = None  # None: the method's default (core.memit.VALUE_SETTINGS for memit)
    alphaedit: AlphaEditParams = field(default_factory=AlphaEditParams)
    memit: MemitParams = field(default_factory=MemitParams)
    curve_every: int = 10  # a curve point after every this many edits (and after the last)
    batch_size: int | None = None  # memit: facts per batch, batches one after another (None: all in one)
    curve_fluency_cases: int = 10  # fluency at curve points: the generation prompts of the first N cases
    fluency_tokens: int = 40  # tokens sampled per generation prompt (0: no fluency)
    text_scores: bool = True  # generation efficacy (greedy continuations) at every curve point and at the end
    seed: int = 0
    time_budget: float | None = None  # seconds of this process: start no edit (or batch) after; the rest wait

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.curve_every < 1:
            raise UserError(f"curve points need at least 1 edit between them (got {self.curve_every})")
        if self.batch_size is not None and (self.batch_size < 1 or self.method != "memit"):
            raise UserError(f"a batch size needs --method memit and at least 1 fact (got {self.batch_size})")
        if self.time_budget is not None and self.time_budget < 0:
            raise UserError(f"a time budget is a number of seconds, 0 or more (got {self.time_budget})")


@dataclass
class Scores:
    """Scores over a set of cases with the model as it is; per-case lists in case order."""

    efficacy: list[float]
    paraphrase: list[float]
    neighborhood: list[float]

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) if v else math.nan for k, v in asdict(self).items()}


@dataclass
class CurvePoint:
    edits: int  # edits applied so far (skipped cases not counted)
    cases: int  # cases seen so far
    efficacy: float
    paraphrase: float
    neighborhood: float
    generation_efficacy: float | None
    fluency: float | None
    update_norm: float  # Frobenius norm of the accumulated change of all edited matrices
    seconds: float  # since the start


@dataclass
class ManyResult:
    method: str
    n: int  # edits applied
    skipped: int
    cases: int  # cases seen: all of them, unless the time budget ran out first
    efficacy: float
    paraphrase: float
    neighborhood: float
    generation_efficacy: float | None
    fluency: float | None
    fluency_unedited: float | None
    update_norm: float
    seconds: float  # the whole run, measurements included
    edit_seconds: float  # computing and applying the edits only
    curve: list[CurvePoint] = field(default_factory=list)
    skipped_cases: list[dict] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def request_of(case: CounterFactCase) -> EditRequest:
    return EditRequest(case.prompt, case.subject, case.target_new, case.target_true)


def cases_from_requests(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[CounterFactCase]:
    """Cases of plain requests (a CSV/JSON table): no paraphrase, neighbourhood or generation prompts, so only
    efficacy is scored; a missing old object is the model's answer (core.rome.validate_request)."""
    cases = []
    for i, request in enumerate(requests):
        if not request.target_true:
            request = validate_request(lm, request)
        cases.append(
            CounterFactCase(
                i, request.prompt, request.subject, request.target_new, request.target_true, "", (), (), (), ()
            )
        )
    return cases


def score_cases(lm: LoadedModel, cases: Sequence[CounterFactCase]) -> Scores:
    """ES / PS / NS of each case (core.evaluation's definitions) with the model as it is, every prompt of
    every case in one batched pass per target."""
    prompts, new, true, spans = [], [], [], []
    for case in cases:
        start = len(prompts)
        case_prompts = [case.text, *case.paraphrase_prompts, *case.neighborhood_prompts]
        prompts += case_prompts
        new += [case.target_new] * len(case_prompts)
        true += [case.target_true] * len(case_prompts)
        spans.append((start, 1 + len(case.paraphrase_prompts), len(case_prompts)))
    if not prompts:
        return Scores([], [], [])
    lp = target_log_probs(lm, prompts * 2, new + true)
    lp_new, lp_true = lp[: len(prompts)], lp[len(prompts) :]
    es, ps, ns = [], [], []
    for start, para_end, size in spans:
        n, t = lp_new[start : start + size], lp_true[start : start + size]
        es.append(float(n[0] > t[0]))
        ps.append(float(np.mean(n[1:para_end] > t[1:para_end])) if para_end > 1 else math.nan)
        ns.append(float(np.mean(t[para_end:] > n[para_end:])) if size > para_end else math.nan)
    return Scores(es, [p for p in ps if not math.isnan(p)], [x for x in ns if not math.isnan(x)])


def fluency(lm: LoadedModel, cases: Sequence[CounterFactCase], tokens: int, seed: int = 0, batch: int = 32) -> float:
    """Mean n-gram entropy (core.evaluation.ngram_entropy) of text sampled (top-k 5, seeded per chunk) after
    every generation prompt of `cases`; the same prompts and seeds give the same text on the same model."""
    prompts = [p for case in cases for p in case.generation_prompts]
    if not prompts or tokens <= 0:
        return math.nan
    texts = []
    for i, first in enumerate(range(0, len(prompts), batch)):
        settings = GenerationSettings(max_new_tokens=tokens, sample=True, seed=seed + i, top_k=5)
        texts += generate(lm, prompts[first : first + batch], settings)
    return float(np.mean([ngram_entropy(t) for t in texts]))


def generation_efficacy(lm: LoadedModel, cases: Sequence[CounterFactCase]) -> float:
    """Share of greedy continuations of every case's generation and paraphrase prompts that name its new
    object (core.evaluation's text-level score), mean per case then over cases; one batched generation."""
    prompts, owners = [], []
    for i, case in enumerate(cases):
        for prompt in (*case.generation_prompts, *case.paraphrase_prompts):
            prompts.append(prompt)
            owners.append(i)
    if not prompts:
        return math.nan
    texts = [t for first in range(0, len(prompts), 64) for t in continuations(lm, prompts[first : first + 64])]
    per_case: dict[int, list[bool]] = {}
    for i, text in zip(owners, texts):
        per_case.setdefault(i, []).append(names_object(text, cases[i].target_new))
    return float(np.mean([np.mean(v) for v in per_case.values()]))


def update_norm(edits: Sequence[Edit]) -> float:
    """Frobenius norm of the summed change of every edited matrix."""
    total: dict[int, torch.Tensor] = {}
    for edit in edits:
        delta = edit.delta().float()
        total[edit.layer] = total[edit.layer] + delta if edit.layer in total else delta
    return float(math.sqrt(sum(float(d.norm()) ** 2 for d in total.values())))


class _Curve:
    """Measures curve points and the final scores; knows which cases were applied."""

    def __init__(self, lm: LoadedModel, cases: Sequence[CounterFactCase], params: ManyParams, started: float, report):
        self.lm, self.cases, self.params, self.started, self.report = lm, cases, params, started, report
        self.sample = list(cases[: params.curve_fluency_cases])
        self.points: list[CurvePoint] = []

    def point(self, applied_cases: Sequence[CounterFactCase], seen: int, edits: Sequence[Edit]) -> CurvePoint:
        means = score_cases(self.lm, applied_cases).means()
        gen = generation_efficacy(self.lm, applied_cases) if self.params.text_scores else math.nan
        flu = fluency(self.lm, self.sample, self.params.fluency_tokens, self.params.seed)
        point = CurvePoint(
            edits=len(edits),
            cases=seen,
            efficacy=means["efficacy"],
            paraphrase=means["paraphrase"],
            neighborhood=means["neighborhood"],
            generation_efficacy=None if math.isnan(gen) else gen,
            fluency=None if math.isnan(flu) else flu,
            update_norm=update_norm(edits),
            seconds=time.perf_counter() - self.started,
        )
        self.points.append(point)
        if self.report:
            self.report(point)
        return point

    def last_point(self, applied_cases: Sequence[CounterFactCase], seen: int, edits: Sequence[Edit]) -> None:
        """A point at `seen` cases unless the curve already ends there (the run stops early)."""
        if not self.points or self.points[-1].cases != seen:
            self.point(applied_cases, seen, edits)


def current_facts(cases: Sequence[CounterFactCase]) -> list[CounterFactCase]:
    """The cases in order, less each one a later case supersedes: an edit of the same subject in the same
    prompt replaces the earlier edit's fact, so only the latest counts in the scores."""
    latest = {(c.subject, c.prompt): i for i, c in enumerate(cases)}
    return [c for i, c in enumerate(cases) if latest[(c.subject, c.prompt)] == i]


def default_rome(method: str) -> RomeHyperParams:
    """A method's ROME settings when none are given: MEMIT's values' (core.memit.VALUE_SETTINGS), or ROME's."""
    return VALUE_SETTINGS if method == "memit" else RomeHyperParams()


def method_rome(params: ManyParams) -> RomeHyperParams:
    """The ROME settings the method computes with: `params.rome`, or the method's default."""
    return params.rome or default_rome(params.method)


def run_settings(params: ManyParams, lm: LoadedModel) -> dict:
    """What makes two runs the same run (a checkpoint's identity, core.checkpoint): every setting the method
    uses, ROME's value precision as what it resolves to on `lm` here (core.rome.value_products: a run begun in
    bfloat16 products on a CPU does not go on in float32 on a GPU, nor the other way). Not the time budget,
    which only says when a process stops, nor another method's settings."""
    rome = method_rome(params)
    rome = replace(rome, value_precision=value_products(lm, rome.value_precision))
    settings = asdict(replace(params, rome=rome, time_budget=None))
    unused = {"rome": ("memit",), "alphaedit": ("memit",), "memit": ("alphaedit",)}[params.method]
    return {k: v for k, v in settings.items() if k not in unused}


def refuse_if_nothing_edits(applied: int, skipped: list[dict]) -> None:
    """Stop a run that has skipped its first SKIPS_BEFORE_GIVING_UP cases without applying one edit."""
    if not applied and len(skipped) >= SKIPS_BEFORE_GIVING_UP:
        first = skipped[0]
        raise UserError(
            f"the run skipped its first {len(skipped)} cases and edited none, so it stopped; "
            f"case {first['case_id']}: {first['reason']}"
        )


def edit_many(
    lm: LoadedModel,
    cases: Sequence[CounterFactCase],
    params: ManyParams | None = None,
    progress: Progress | None = None,
    on_point: Callable[[CurvePoint], None] | None = None,
    checkpoint: str | Path | None = None,
) -> tuple[ManyResult, list[Edit]]:
    """Apply every case's edit with `params.method` (see the module docstring), measure, put the model back.
    Cases the model cannot be edited for (e.g. it already answers the new object) are skipped and listed.
    `on_point` is called with each curve point as soon as it is measured. With a `checkpoint` folder the run
    is written there after every curve point (core.checkpoint), and a run given a folder that holds its
    own earlier, stopped self goes on from there: its edits are applied again, its curve and timings kept."""
    params = params or ManyParams()
    params.check()
    if not cases:
        raise UserError("there are no cases to edit")
    identity = run_id(run_settings(params, lm), [(c.case_id, c.prompt, c.subject, c.target_new) for c in cases])
    saved, saved_edits = (read_checkpoint(checkpoint, identity, lm) if checkpoint is not None else None) or (None, [])
    params = replace(params, rome=method_rome(params))
    if params.method == "rome":  # its catalogue held out from what is measured (core.evaluation.held_out)
        params = replace(params, rome=held_out(params.rome, cases))
    run_started = time.perf_counter()
    earlier_seconds = saved.seconds if saved else 0.0
    started = run_started - earlier_seconds  # curve and result times count every process's
    flu_unedited = saved.fluency_unedited if saved else fluency(lm, cases, params.fluency_tokens, params.seed)
    flu_unedited = math.nan if flu_unedited is None else flu_unedited
    curve = _Curve(lm, cases, params, started, on_point)
    stack = EditStack(lm)
    applied_cases: list[CounterFactCase] = []
    skipped: list[dict] = []
    edit_seconds = 0.0
    tick = progress or (lambda done, total: None)
    seen = 0
    editor = AlphaEditor(lm, params.rome, params.alphaedit) if params.method == "alphaedit" else None

    def out_of_time() -> bool:
        return params.time_budget is not None and time.perf_counter() - run_started > params.time_budget

    def save() -> None:
        if checkpoint is None:
            return
        state = RunState(
            run=identity,
            model=lm.name,
            seen=seen,
            edits=len(stack.edits),
            applied=[c.case_id for c in applied_cases],
            skipped=skipped,
            curve=[asdict(p) for p in curve.points],
            edit_seconds=edit_seconds,
            seconds=time.perf_counter() - started,
            fluency_unedited=None if math.isnan(flu_unedited) else flu_unedited,
        )
        write_checkpoint(checkpoint, state, stack.edits)

    def measure(last: bool = False) -> None:
        (curve.last_point if last else curve.point)(current_facts(applied_cases), seen, stack.edits)
        save()

    try:
        if saved:
            by_id = {c.case_id: c for c in cases}
            for edit in saved_edits:
                stack.apply(edit)
                if editor:
                    editor.remember(edit)
            applied_cases = [by_id[i] for i in saved.applied]
            skipped, seen, edit_seconds = saved.skipped, saved.seen, saved.edit_seconds
            curve.points = [CurvePoint(**p) for p in saved.curve]
            tick(seen, len(cases))
        first = seen  # this process's first case
        if params.method in SEQUENTIAL:
            for i in range(first, len(cases)):
                case = cases[i]
                if i > first and out_of_time():
                    measure(last=True)
                    break
                t0 = time.perf_counter()
                try:
                    edit = (
                        editor.compute(request_of(case)) if editor else compute_edit(lm, request_of(case), params.rome)
                    )
                except UserError as err:  # e.g. the model (as edited so far) already answers the new object
                    skipped.append({"case_id": case.case_id, "reason": str(err)})
                    refuse_if_nothing_edits(len(applied_cases), skipped)
                else:
                    edit.info.setdefault("method", params.method)
                    stack.apply(edit)
                    if editor:
                        editor.remember(edit)
                    applied_cases.append(case)
                edit_seconds += time.perf_counter() - t0
                seen = i + 1
                if seen % params.curve_every == 0 or seen == len(cases):
                    measure()
                tick(seen, len(cases))
        else:
            size = params.batch_size or len(cases)
            for start in range(first, len(cases), size):
                if start > first and out_of_time():
                    measure(last=True)
                    break
                chunk = cases[start : start + size]
                t0 = time.perf_counter()
                batch = memit_batch(
                    lm,
                    [request_of(c) for c in chunk],
                    params.rome,
                    params.memit,
                    progress=None if size < len(cases) else tick,
                    earlier_keys=keys_by_layer(stack.edits) if params.memit.null_space else None,
                )
                for edit in batch.edits:
                    stack.apply(edit)
                applied_cases += [chunk[i] for i in batch.kept]
                skipped += [{"case_id": chunk[i].case_id, "reason": why} for i, why in batch.skipped]
                refuse_if_nothing_edits(len(applied_cases), skipped)
                edit_seconds += time.perf_counter() - t0
                seen = start + len(chunk)
                if seen // params.curve_every > start // params.curve_every or seen == len(cases):
                    measure()
                if size < len(cases):
                    tick(seen, len(cases))
        facts = current_facts(applied_cases)
        final = score_cases(lm, facts).means()
        gen = generation_efficacy(lm, facts) if params.text_scores else math.nan
        flu = fluency(lm, cases[:seen], params.fluency_tokens, params.seed)
        edits = list(stack.edits)
    finally:
        stack.undo_all()
    if seen < len(cases):  # the unedited model's fluency on the same prompts as the edited one's
        flu_unedited = fluency(lm, cases[:seen], params.fluency_tokens, params.seed)
    result = ManyResult(
        method=params.method,
        n=len(applied_cases),
        skipped=len(skipped),
        cases=seen,
        efficacy=final["efficacy"],
        paraphrase=final["paraphrase"],
        neighborhood=final["neighborhood"],
        generation_efficacy=None if math.isnan(gen) else gen,
        fluency=None if math.isnan(flu) else flu,
        fluency_unedited=None if math.isnan(flu_unedited) else flu_unedited,
        update_norm=update_norm(edits),
        seconds=time.perf_counter() - started,
        edit_seconds=edit_seconds,
        curve=curve.points,
        skipped_cases=skipped,
        layers=sorted({e.layer for e in edits}),
    )
    return result, edits
