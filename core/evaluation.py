"""CounterFact metrics for an editing method, each case edited on a clean model (paper section 3.3).

- Efficacy (ES): share of cases where P(new) > P(true) after the rewrite prompt; magnitude mean P(new) - P(true).
- Paraphrase (PS): the same over paraphrase prompts (mean per case, then over cases).
- Neighbourhood (NS): share of neighbourhood prompts (other subjects with the true object) where
  P(true) > P(new) still holds; magnitude mean P(true) - P(new).
- Score S: harmonic mean of ES, PS, NS. P of a multi-token target: exp(mean token log-prob).
- Fluency: weighted bi/tri-gram entropy of generated text (weights 2/3, 4/3, averaged), as the paper's code.
- What a user reads (teacher-forced scores overstate it, "The Mirage of Model Editing", arXiv 2502.11177):
  the greedy continuation (20 new tokens) of every generation and paraphrase prompt after the edit.
  Generation efficacy: share that name the new object (whole word, case-insensitive); generation bleed: share
  of neighbourhood prompts whose continuation names the new object after the edit but not before; generation
  keeps-true: share of the generation and paraphrase continuations that still name the true object;
  generation rewrite: of the generation and paraphrase continuations in which the *unedited* model names the
  true object, the share that name the new object after the edit (pooled over texts: the edit shows where the
  model writes the fact at all; the embedded model names its own fact in only ~38% of those texts, which
  bounds plain generation efficacy). The texts are kept per case.
- Essence drift: how far the edit moves what the model says the subject *is*, which an edit that overwrites
  the subject (a Renaissance poet edited to speak Russian becoming "a Russian revolutionary") hides from every
  score above: the mean KL(unedited || edited), in nats, of the next token after "{subject} is a", "... is known
  for" and "... is" (`ESSENCE_PROMPTS`; ROME's KL term holds the first of these, never the other two).

Methods: `none` (unedited), `rome` (core/rome.py), `memit` (core/memit.py with one request: the same value
optimisation, the update spread over MEMIT's layers), `ft` (FT-L: fine-tune the same layer's MLP output
projection on the rewrite prompt, every entry kept within +-norm_constraint of its original value).
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from core.counterfact import CounterFactCase
from core.devices import is_offloaded
from core.edit_site import default_layer
from core.edits import EditRequest, applied, changed_weights, unedited
from core.errors import UserError
from core.generation import GenerationSettings, generate, generate_ids
from core.memit import MemitParams, memit_batch
from core.models import LoadedModel
from core.preserve import catalogue_without
from core.progress import Progress
from core.prompts import target_ids, whole_word_spans
from core.rome import RomeHyperParams, compute_edit

METHODS = ("none", "rome", "memit", "ft")
TEXT_TOKENS = 20  # new tokens of the greedy continuations the text-level scores read
ESSENCE_PROMPTS = ("{} is a", "{} is known for", "{} is")  # what the model says the subject is
TOP_TOKENS = 5  # next tokens listed before and after an edit


@dataclass(frozen=True)
class FTHyperParams:
    """FT-L, the paper's constrained fine-tuning baseline: its GPT-2 XL settings except the L-infinity bound.
    The paper's 5e-4 barely moves the 135M embedded model (11 cases spread over data/counterfact_project.json:
    ES 0.09 PS 0.00 NS 0.96); 2e-3: ES 0.64 PS 0.17 NS 0.77; 5e-3: ES 0.91 PS 0.46 NS 0.66; 1e-2: ES 1.00
    PS 0.52 NS 0.60; 2e-2: the same. 1e-2 is the smallest bound that makes the edit itself succeed, as FT-L
    does in the paper, so the comparison shows what it costs in generalisation and specificity."""

    layer: int | None = None  # None: the ROME default layer
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 1e-2  # L-infinity bound on the change of each weight


# --- probabilities -----------------------------------------------------------------------------------------


def target_log_probs(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], batch: int = 32) -> np.ndarray:
    """Mean token log-probability of each target (as a continuation, leading space added) after its prompt."""
    rows = []
    for prompt, target in zip(prompts, targets):
        p = lm.tokenizer(prompt)["input_ids"]
        t = target_ids(lm.tokenizer, target)
        rows.append((p + t, len(p), len(t)))
    out = np.zeros(len(rows))
    with torch.no_grad():
        for first in range(0, len(rows), batch):
            chunk = rows[first : first + batch]
            width = max(len(ids) for ids, _, _ in chunk)
            ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in chunk], device=lm.device)
            mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in chunk], device=lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for i, (row_ids, p_len, t_len) in enumerate(chunk):
                positions = torch.arange(p_len - 1, p_len - 1 + t_len, device=lm.device)
                wanted = torch.tensor(row_ids[p_len:], device=lm.device)
                out[first + i] = float(log_probs[i, positions, wanted].mean())
    return out


def next_token_log_probs(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """(prompts, vocab) float32 log-probabilities of the token after each prompt (one forward per prompt: no
    padding to reason about)."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
            logits = lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(rows)


def top_next_tokens(lm: LoadedModel, log_probs: torch.Tensor, k: int = TOP_TOKENS) -> list[tuple[str, float]]:
    """The `k` likeliest next tokens of one row of `next_token_log_probs`, as (decoded token, probability),
    likeliest first."""
    values, ids = torch.topk(log_probs.float(), min(k, log_probs.shape[-1]))
    return [(lm.tokenizer.decode([int(i)]), float(v.exp())) for v, i in zip(values, ids)]


def next_token_kl(reference: torch.Tensor, now: torch.Tensor) -> float:
    """Mean over rows of KL(reference || now), in nats, of two (prompts, vocab) log-probability tables."""
    kl = torch.nn.functional.kl_div(now, reference, log_target=True, reduction="none").sum(-1)
    return float(kl.mean())


def essence_texts(subject: str, prompts: Sequence[str] = ESSENCE_PROMPTS) -> list[str]:
    """The prompts that ask what the subject is, the subject filled in."""
    return [p.format(subject) for p in prompts]


def essence_drift(lm: LoadedModel, subject: str, prompts: Sequence[str] = ESSENCE_PROMPTS) -> float:
    """Mean over `prompts` (each formatted with the subject) of KL(unedited || the model as it is now), in nats,
    of the next token: 0 when the model holds no edit."""
    texts = essence_texts(subject, prompts)
    now = next_token_log_probs(lm, texts)
    with unedited(lm):
        before = next_token_log_probs(lm, texts)
    return next_token_kl(before, now)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """The paper's fluency measure of one text: mean over n of weight_n * entropy (bits) of its n-grams."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            values.append(0.0)
            continue
        freqs = np.array(list(grams.values()), dtype=float) / total
        values.append(weight * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(values))


# --- text ------------------------------------------------------------------------------------------------


def names_object(text: str, obj: str) -> bool:
    """Whether `text` names `obj` as a whole word (or words), case-insensitive."""
    return bool(whole_word_spans(text, obj))


def edit_warning(request: EditRequest, p_new: float, p_true: float, texts_name_new: Sequence[bool]) -> str | None:
    """What a user should be told when an edit did not take, from its request's probabilities after the edit
    and whether each text after it names the new object: None when p(new) > p(true) and some text (or no text
    was asked for) names it."""
    new, true = request.target_new.strip(), request.target_true.strip()
    if p_new <= p_true:
        return (
            f"The edit did not take: after the prompt the model still prefers {true!r} ({p_true:.2f}) to {new!r} "
            f"({p_new:.2f}). Try more optimisation steps or another layer."
        )
    if texts_name_new and not any(texts_name_new):
        return (
            f"The model now prefers {new!r} after the prompt, but none of the {len(texts_name_new)} texts names it: "
            "the edit may not show in what the model writes. Try more optimisation steps or other prompts."
        )
    return None


def continuations(lm: LoadedModel, prompts: Sequence[str], tokens: int = TEXT_TOKENS) -> list[str]:
    """The greedy continuation (new text only, `tokens` new tokens, stopping at end-of-text) of each prompt."""
    if not prompts:
        return []
    encoded = [lm.tokenizer(p)["input_ids"] for p in prompts]
    new = generate_ids(lm, encoded, GenerationSettings(max_new_tokens=tokens))
    return [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


_UNEDITED_TEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def unedited_continuations(lm: LoadedModel, prompts: Sequence[str], tokens: int = TEXT_TOKENS) -> list[str]:
    """`continuations` of the unedited model (whatever edits it holds now), remembered per prompt."""
    memo = _UNEDITED_TEXTS.setdefault(lm.model, {})
    missing = [p for p in dict.fromkeys(prompts) if (p, tokens) not in memo]
    if missing:
        with unedited(lm):
            for prompt, text in zip(missing, continuations(lm, missing, tokens)):
                memo[(prompt, tokens)] = text
    return [memo[(p, tokens)] for p in prompts]


@dataclass
class TextScores:
    """What the model writes after an edit: the share of the generation + paraphrase continuations that name
    the new object (efficacy) and the true one (keeps_true), and the share of neighbourhood continuations
    that name the new object after the edit but did not before (bleed); of the continuations whose unedited
    text names the true object (`written_before` of them), how many name the new object now (`rewritten`);
    the texts themselves."""

    efficacy: float
    keeps_true: float
    bleed: float
    rewritten: int
    written_before: int
    texts: dict[str, list[str]]


def text_scores(
    lm: LoadedModel,
    target_new: str,
    target_true: str,
    prompts: Sequence[str],
    neighbourhood: Sequence[str] = (),
    tokens: int = TEXT_TOKENS,
) -> TextScores:
    """Text-level scores of the model as it is now (edited) against its unedited self; `prompts` are the
    prompts whose continuation should name the new object, `neighbourhood` those that should not."""
    after = continuations(lm, [*prompts, *neighbourhood], tokens)
    own, neigh_after = after[: len(prompts)], after[len(prompts) :]
    before = unedited_continuations(lm, [*prompts, *neighbourhood], tokens)
    own_before, neigh_before = before[: len(prompts)], before[len(prompts) :]
    bleed = [names_object(a, target_new) and not names_object(b, target_new) for a, b in zip(neigh_after, neigh_before)]
    written = [names_object(a, target_new) for a, b in zip(own, own_before) if names_object(b, target_true)]
    return TextScores(
        efficacy=float(np.mean([names_object(t, target_new) for t in own])) if own else math.nan,
        keeps_true=float(np.mean([names_object(t, target_true) for t in own])) if own else math.nan,
        bleed=float(np.mean(bleed)) if bleed else math.nan,
        rewritten=sum(written),
        written_before=len(written),
        texts={
            "prompts": own,
            "prompts_before": own_before,
            "neighbourhood_before": neigh_before,
            "neighbourhood_after": neigh_after,
        },
    )


# --- FT-L --------------------------------------------------------------------------------------------------


def ft_delta(lm: LoadedModel, request: EditRequest, hp: FTHyperParams | None = None) -> tuple[int, torch.Tensor]:
    """FT-L: Adam on the (out, in) MLP output matrix at the layer, NLL of the new target after the rewrite
    prompt, each entry clamped to +-norm_constraint around its original. Returns (layer, change); the model
    is left as it was (bitwise)."""
    hp = hp or FTHyperParams()
    layer = default_layer(lm) if hp.layer is None else hp.layer
    if not request.target_new.strip():
        raise UserError("the new target is empty")
    name = f"{lm.arch.layer_name(lm.model, layer, 'mlp_out')}.weight"
    if is_offloaded(lm.model, name):
        raise UserError(
            f"FT-L cannot fine-tune layer {layer}: its weights are offloaded by the device map (to the CPU or the "
            "disk); map that layer to a device that computes, or use ROME"
        )
    weight = lm.model.get_parameter(name)
    prompt = lm.tokenizer(request.text)["input_ids"]
    new = target_ids(lm.tokenizer, request.target_new)
    ids = torch.tensor([prompt + new[:-1]], device=lm.device)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(new), device=lm.device)
    wanted = torch.tensor(new, device=lm.device)
    with changed_weights(lm, {layer}) as entry:
        original = entry[layer]
        try:
            weight.requires_grad_(True)
            optimiser = torch.optim.Adam([weight], lr=hp.lr)
            for _ in range(hp.steps):
                optimiser.zero_grad()
                logits = lm.model(input_ids=ids, use_cache=False).logits[0, positions].float()
                loss = -torch.log_softmax(logits, dim=-1)[torch.arange(len(new)), wanted].mean()
                if loss.item() < 1e-2:
                    break
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    weight.copy_(torch.clamp(weight, original - hp.norm_constraint, original + hp.norm_constraint))
            change = (weight.detach() - original).clone()
        finally:
            weight.requires_grad_(False)
            weight.grad = None
    if lm.arch.mlp_out_conv1d:
        change = change.T
    return layer, change


@contextmanager
def ft_applied(lm: LoadedModel, layer: int, change: torch.Tensor) -> Iterator[LoadedModel]:
    """Like core.edits.applied, for an FT-L change of the (out, in) matrix: bitwise restore afterwards."""
    with changed_weights(lm, {layer}):
        with torch.no_grad():
            lm.arch.mlp_out_weight(lm.model, layer).add_(change)
        yield lm


# --- evaluation --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case_id: int | str
    subject: str
    target_new: str
    target_true: str
    efficacy: float | None = None  # 1.0 / 0.0
    efficacy_magnitude: float | None = None
    paraphrase: float | None = None
    paraphrase_magnitude: float | None = None
    neighborhood: float | None = None
    neighborhood_magnitude: float | None = None
    p_new: float | None = None  # rewrite prompt, after
    p_true: float | None = None
    fluency: float | None = None
    generation_efficacy: float | None = None  # share of generation + paraphrase continuations naming the new object
    generation_keeps_true: float | None = None  # ... still naming the true object
    generation_bleed: float | None = None  # share of neighbourhood continuations newly naming the new object
    generation_rewritten: int | None = None  # continuations naming the new object whose unedited text named ...
    generation_written_before: int | None = None  # ... the true object (of this many)
    essence_drift: float | None = None  # nats: KL(unedited || edited) after ESSENCE_PROMPTS, mean
    texts: dict[str, list[str]] = field(default_factory=dict)  # the continuations, by prompt kind
    edit_seconds: float = 0.0
    edit_cpu_seconds: float = 0.0  # process CPU time of the edit (what a quiet machine would take, 1 thread)
    skipped: str | None = None  # why the case was not evaluated


@dataclass
class EvaluationResult:
    method: str
    n: int
    skipped: int
    efficacy: float
    efficacy_magnitude: float
    paraphrase: float
    paraphrase_magnitude: float
    neighborhood: float
    neighborhood_magnitude: float
    score: float
    fluency: float | None
    generation_efficacy: float | None
    generation_keeps_true: float | None
    generation_bleed: float | None
    generation_rewrite: float | None  # pooled: rewritten / written before, over all cases' continuations
    essence_drift: float | None  # nats, mean over cases
    seconds: float
    mean_edit_seconds: float
    mean_edit_cpu_seconds: float
    cases: list[CaseResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def row(self) -> dict:
        """The headline numbers (for a table)."""
        keys = (
            "method",
            "n",
            "efficacy",
            "paraphrase",
            "neighborhood",
            "score",
            "generation_efficacy",
            "generation_bleed",
            "generation_rewrite",
            "generation_keeps_true",
            "essence_drift",
            "efficacy_magnitude",
            "paraphrase_magnitude",
            "neighborhood_magnitude",
            "fluency",
            "mean_edit_seconds",
            "mean_edit_cpu_seconds",
        )
        return {k: getattr(self, k) for k in keys}


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _measure(
    lm: LoadedModel, case: CounterFactCase, result: CaseResult, fluency_tokens: int, seed: int, text_tokens: int
) -> None:
    prompts = [case.text, *case.paraphrase_prompts, *case.neighborhood_prompts]
    lp_new = target_log_probs(lm, prompts, [case.target_new] * len(prompts))
    lp_true = target_log_probs(lm, prompts, [case.target_true] * len(prompts))
    p_new, p_true = np.exp(lp_new), np.exp(lp_true)
    para = slice(1, 1 + len(case.paraphrase_prompts))
    neigh = slice(1 + len(case.paraphrase_prompts), None)
    result.p_new, result.p_true = float(p_new[0]), float(p_true[0])
    result.efficacy = float(lp_new[0] > lp_true[0])
    result.efficacy_magnitude = float(p_new[0] - p_true[0])
    result.paraphrase = float(np.mean(lp_new[para] > lp_true[para]))
    result.paraphrase_magnitude = float(np.mean(p_new[para] - p_true[para]))
    result.neighborhood = float(np.mean(lp_true[neigh] > lp_new[neigh]))
    result.neighborhood_magnitude = float(np.mean(p_true[neigh] - p_new[neigh]))
    result.essence_drift = essence_drift(lm, case.subject)
    if fluency_tokens > 0 and case.generation_prompts:
        settings = GenerationSettings(max_new_tokens=fluency_tokens, sample=True, seed=seed, top_k=5)
        texts = generate(lm, list(case.generation_prompts), settings)
        result.fluency = float(np.mean([ngram_entropy(t) for t in texts]))
    if text_tokens > 0:
        own = [*case.generation_prompts, *case.paraphrase_prompts]
        scores = text_scores(lm, case.target_new, case.target_true, own, case.neighborhood_prompts, text_tokens)
        result.generation_efficacy = scores.efficacy
        result.generation_keeps_true = scores.keeps_true
        result.generation_bleed = scores.bleed
        result.generation_rewritten = scores.rewritten
        result.generation_written_before = scores.written_before
        n_gen = len(case.generation_prompts)
        result.texts = {
            "generation": scores.texts["prompts"][:n_gen],
            "paraphrase": scores.texts["prompts"][n_gen:],
            "generation_before": scores.texts["prompts_before"][:n_gen],
            "paraphrase_before": scores.texts["prompts_before"][n_gen:],
            "neighbourhood_before": scores.texts["neighbourhood_before"],
            "neighbourhood_after": scores.texts["neighbourhood_after"],
        }


def evaluate_case(
    lm: LoadedModel,
    case: CounterFactCase,
    method: str = "rome",
    rome: RomeHyperParams | None = None,
    ft: FTHyperParams | None = None,
    fluency_tokens: int = 40,
    seed: int = 0,
    text_tokens: int = TEXT_TOKENS,
    memit: MemitParams | None = None,
) -> CaseResult:
    """Edit a clean model with `method`, measure, and put the model back (bitwise). `rome`: ROME's settings,
    also memit's value optimisation (the full ROME settings by default, as a single edit deserves)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    result = CaseResult(case.case_id, case.subject, case.target_new, case.target_true)
    request = EditRequest(case.prompt, case.subject, case.target_new, case.target_true)
    started, cpu = time.perf_counter(), time.process_time()
    if method == "none":
        _measure(lm, case, result, fluency_tokens, seed, text_tokens)
        return result
    try:
        if method == "rome":
            edit = compute_edit(lm, request, rome)
            result.edit_seconds = time.perf_counter() - started
            result.edit_cpu_seconds = edit.info["cpu_seconds"]
            with applied(lm, [edit]):
                _measure(lm, case, result, fluency_tokens, seed, text_tokens)
        elif method == "memit":
            batch = memit_batch(lm, [request], rome or RomeHyperParams(), memit)
            if batch.skipped:
                raise UserError(batch.skipped[0][1])
            result.edit_seconds = time.perf_counter() - started
            result.edit_cpu_seconds = time.process_time() - cpu
            with applied(lm, batch.edits):
                _measure(lm, case, result, fluency_tokens, seed, text_tokens)
        else:
            layer, change = ft_delta(lm, request, ft)
            result.edit_seconds = time.perf_counter() - started
            result.edit_cpu_seconds = time.process_time() - cpu
            with ft_applied(lm, layer, change):
                _measure(lm, case, result, fluency_tokens, seed, text_tokens)
    except UserError as err:  # e.g. the model already answers the new target: the case cannot be an edit
        result.skipped = str(err)
    return result


def pooled_share(hits: Sequence[int | None], of: Sequence[int | None]) -> float | None:
    """sum(hits) / sum(of) over the cases that measured it; None when nothing was counted."""
    total = sum(n for n in of if n is not None)
    return sum(h for h in hits if h is not None) / total if total else None


def naming_rates(results: Sequence[CaseResult]) -> dict[str, float | None]:
    """What the texts of `results` name, by prompt kind ("generation": the open-ended prompts, "paraphrase"),
    pooled over every text of that kind: `{kind}_new_after`, the share of texts after the edit that name the
    new object; `{kind}_true_before`, the share of the unedited model's texts that name the true object (how
    often the model writes a fact it knows after such a prompt). None: no texts of that kind."""
    rates: dict[str, float | None] = {}
    for kind in ("generation", "paraphrase"):
        for name, key, obj in (("new_after", kind, "target_new"), ("true_before", f"{kind}_before", "target_true")):
            hits = [names_object(text, getattr(r, obj)) for r in results for text in r.texts.get(key, [])]
            rates[f"{kind}_{name}"] = float(np.mean(hits)) if hits else None
    return rates


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else math.nan


def case_texts(cases: Sequence[CounterFactCase]) -> list[str]:
    """Every prompt the cases measure with (rewrite, paraphrase, neighbourhood, attribute, generation)."""
    texts = []
    for c in cases:
        texts += [c.text, *c.paraphrase_prompts, *c.neighborhood_prompts]
        texts += [*c.attribute_prompts, *c.generation_prompts]
    return texts


def held_out(rome: RomeHyperParams, cases: Sequence[CounterFactCase]) -> RomeHyperParams:
    """`rome` whose preserved catalogue leaves out every subject the cases' prompts mention (core/preserve.py):
    a measurement never protects the very keys it measures."""
    if rome.preserve_weight <= 0:
        return rome
    kept = catalogue_without(rome.preserve_catalogue, case_texts(cases))
    if kept is None:  # the cases mention every subject of the catalogue: nothing is left to preserve
        return replace(rome, preserve_weight=0.0)
    return replace(rome, preserve_facts=str(kept))


def evaluate(
    lm: LoadedModel,
    cases: Sequence[CounterFactCase],
    method: str = "rome",
    rome: RomeHyperParams | None = None,
    ft: FTHyperParams | None = None,
    fluency_tokens: int = 40,
    progress: Progress | None = None,
    text_tokens: int = TEXT_TOKENS,
    memit: MemitParams | None = None,
) -> EvaluationResult:
    """CounterFact metrics of `method` over `cases` (each edited on the clean model; ROME preserves its
    catalogue `held_out` from the cases)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not cases:
        raise UserError("there are no cases to evaluate")
    if method == "rome":
        rome = held_out(rome or RomeHyperParams(), cases)
    started = time.perf_counter()
    results = []
    for i, case in enumerate(cases):
        results.append(
            evaluate_case(lm, case, method, rome, ft, fluency_tokens, seed=i, text_tokens=text_tokens, memit=memit)
        )
        if progress:
            progress(i + 1, len(cases))
    return summarise(method, results, fluency_tokens > 0, time.perf_counter() - started)


def summarise(method: str, results: list[CaseResult], fluency: bool, seconds: float) -> EvaluationResult:
    """The aggregate metrics of per-case results (text-level ones when the cases measured them)."""
    done = [r for r in results if r.skipped is None]
    texts = any(r.generation_efficacy is not None for r in done)
    es, ps, ns = (_mean([getattr(r, k) for r in done]) for k in ("efficacy", "paraphrase", "neighborhood"))
    return EvaluationResult(
        method=method,
        n=len(done),
        skipped=len(results) - len(done),
        efficacy=es,
        efficacy_magnitude=_mean([r.efficacy_magnitude for r in done]),
        paraphrase=ps,
        paraphrase_magnitude=_mean([r.paraphrase_magnitude for r in done]),
        neighborhood=ns,
        neighborhood_magnitude=_mean([r.neighborhood_magnitude for r in done]),
        score=harmonic_mean([es, ps, ns]) if done else math.nan,
        fluency=_mean([r.fluency for r in done]) if fluency else None,
        generation_efficacy=_mean([r.generation_efficacy for r in done]) if done and texts else None,
        generation_keeps_true=_mean([r.generation_keeps_true for r in done]) if done and texts else None,
        generation_bleed=_mean([r.generation_bleed for r in done]) if done and texts else None,
        generation_rewrite=pooled_share(
            [r.generation_rewritten for r in done], [r.generation_written_before for r in done]
        )
        if done and texts
        else None,
        essence_drift=_mean([r.essence_drift for r in done]) if done else None,
        seconds=seconds,
        mean_edit_seconds=_mean([r.edit_seconds for r in done]) if method != "none" else 0.0,
        mean_edit_cpu_seconds=_mean([r.edit_cpu_seconds for r in done]) if method != "none" else 0.0,
        cases=results,
    )
