"""What every causal-tracing engine shares (a leaf: it imports no engine): the inputs of one trace (tokens,
corrupted span, the paper's noise, the answer and the metric), the window of layers a windowed cell restores,
and the paper's patched run (`naive_scores`, its `trace_with_patch`), which also measures the corrupted score.
`score_json` names the clean and corrupted scores in every trace's JSON (facts and sentiment alike).

The engines live beside it: core/naive_tracing.py (the paper's algorithm, the oracle), core/fast_tracing.py
(the same numbers, only what a restoration can change) and core/estimate_tracing.py (a first-order estimate
of the whole table); core/tracing.py picks one from a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.devices import read_parameter
from core.errors import UserError
from core.hooks import Hooks
from core.models import LoadedModel
from core.progress import Progress  # noqa: F401  (re-exported)
from core.prompts import TokenizedPrompt, tokenize

KINDS = ("hidden", "mlp", "attn")
DEFAULT_SAMPLES = 10
DEFAULT_WINDOW = 10
NOISE_MULTIPLIER = 3.0
REFERENCE_FACTS = Path(__file__).resolve().parent.parent / "data" / "known_facts.json"

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits (rows, vocab) -> score per row


def probability_metric(metric: Metric) -> Metric:
    """Mark `metric` as giving probabilities in (0, 1): the estimate engine then linearises it in log-odds."""

    def wrapped(logits: torch.Tensor) -> torch.Tensor:
        return metric(logits)

    wrapped.is_probability = True  # type: ignore[attr-defined]
    wrapped.__doc__ = metric.__doc__
    return wrapped


def is_probability(metric: Metric) -> bool:
    return bool(getattr(metric, "is_probability", False))


def answer_probability(answer_id: int) -> Metric:
    """The paper's metric: softmax probability of the answer token."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)[:, answer_id]

    return probability_metric(metric)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    kinds = list(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    return kinds


def make_noise(samples: int, tokens: int, hidden: int, scale: float) -> torch.Tensor:
    """The paper's noise: RandomState(1).randn(samples, tokens, hidden) * scale, kept in float64 as it is."""
    return torch.from_numpy(np.random.RandomState(1).randn(samples, tokens, hidden)) * scale


@lru_cache(maxsize=8)
def _reference_subjects() -> tuple[str, ...]:
    if not REFERENCE_FACTS.exists():
        return ()
    records = json.loads(REFERENCE_FACTS.read_text(encoding="utf-8"))
    return tuple(dict.fromkeys(r["subject"] for r in records))


def embedding_std(lm: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation of the embedding-layer outputs over the tokens of `subjects` (as the paper's
    `collect_embedding_std`); the reference set defaults to the subjects of data/known_facts.json."""
    subjects = list(subjects) if subjects is not None else list(_reference_subjects())
    embed = lm.model.get_submodule(lm.arch.embed)
    if not subjects:
        return float(read_parameter(lm.model, f"{lm.arch.embed}.weight").float().std())
    with torch.no_grad():
        ids = [torch.tensor(lm.tokenizer(s)["input_ids"], device=lm.device) for s in subjects]
        return float(torch.cat([embed(i) for i in ids]).float().std())


_NOISE_CACHE: dict[tuple[int, str], float] = {}


def noise_scale(lm: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """The default noise scale: 3 x the embedding std over the reference subjects (cached per model)."""
    if subjects is not None:
        return NOISE_MULTIPLIER * embedding_std(lm, subjects)
    key = (id(lm.model), lm.name)
    if key not in _NOISE_CACHE:
        _NOISE_CACHE[key] = NOISE_MULTIPLIER * embedding_std(lm)
    return _NOISE_CACHE[key]


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """Layers restored together for a windowed (mlp/attn) cell, exactly as the paper's code."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


@dataclass
class TraceSetup:
    """Everything the engines share for one prompt: tokens, corrupted span, noise, answer, metric."""

    lm: LoadedModel
    prompt: TokenizedPrompt
    subject: str | None
    corrupt_range: tuple[int, int]
    noise: torch.Tensor  # (samples, span, hidden), float64
    noise_level: float
    samples: int
    window: int
    answer_id: int
    answer: str
    clean_score: float
    corrupted_score: float
    metric: Metric
    forward_seconds: float = 0.0  # one full forward of the 1 + samples rows (the corrupted score's), for time estimates

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.prompt.input_ids], device=self.lm.device)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt.input_ids)


CLEAN_KEY, CORRUPTED_KEY = "high_score", "low_score"  # the JSON names, as the paper's code names them


def score_json(clean_score: float, corrupted_score: float, prefix: str = "") -> dict[str, float]:
    """The two scores of a trace as every trace's JSON names them (DESIGN.md's contract): high_score = the clean
    run's score, low_score = the corrupted runs' mean, as the paper's code names them (`prefix`: e.g. "mean_"
    for an average over facts). In Python they are `clean_score` and `corrupted_score` everywhere."""
    return {prefix + CLEAN_KEY: clean_score, prefix + CORRUPTED_KEY: corrupted_score}


def add_noise_hook(setup: TraceSetup, first_row: int):
    """Embedding-output edit: add the noise to rows first_row.. at the corrupted positions (in place, as
    the paper's code does, so float32 + float64 rounds the same way)."""
    start, end = setup.corrupt_range

    def edit(x: torch.Tensor, name: str) -> None:
        x[first_row:, start:end] += setup.noise.to(x.device)

    return edit


def naive_scores(lm: LoadedModel, setup: TraceSetup, states: list[tuple[int, str]]) -> float:
    """The paper's `trace_with_patch`: one forward of 1 + samples rows; row 0 is clean, rows 1.. are
    corrupted, and the listed (position, module) states of rows 1.. are set to row 0's. Returns the mean
    metric over the corrupted rows."""
    by_module: dict[str, list[int]] = {}
    for position, name in states:
        by_module.setdefault(name, []).append(position)

    def restore(x: torch.Tensor, name: str) -> None:
        for position in by_module[name]:
            x[1:, position] = x[0, position]

    edits = {lm.arch.embed: add_noise_hook(setup, first_row=1)}
    edits.update({name: restore for name in by_module})
    batch = setup.input_ids.repeat(1 + setup.samples, 1)
    with torch.no_grad(), Hooks(lm.model, edit=edits):
        logits = lm.model(input_ids=batch, use_cache=False).logits
    return float(setup.metric(logits[1:, -1]).mean())


def prepare(
    lm: LoadedModel,
    prompt: str,
    subject: str | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int = DEFAULT_WINDOW,
    corrupt_range: tuple[int, int] | None = None,
    metric: Metric | None = None,
) -> TraceSetup:
    """Validate the inputs, find the answer and the corrupted span, draw the noise, measure the clean and corrupted
    scores."""
    if samples < 1:
        raise UserError(f"samples must be at least 1 (got {samples})")
    if window < 1:
        raise UserError(f"window must be at least 1 (got {window})")
    if noise is not None and (not np.isfinite(noise) or noise < 0):
        raise UserError(f"noise must be a finite number >= 0 (got {noise})")
    tokenized = tokenize(lm.tokenizer, prompt, subject)
    if corrupt_range is None:
        if tokenized.subject_range is None:
            raise UserError("give a subject (or a token range) to corrupt")
        corrupt_range = tokenized.subject_range
    start, end = corrupt_range
    if not 0 <= start < end <= len(tokenized.input_ids):
        raise UserError(
            f"the corrupted range {corrupt_range} is outside the prompt's {len(tokenized.input_ids)} tokens"
        )
    noise_level = noise_scale(lm) if noise is None else float(noise)
    ids = torch.tensor([tokenized.input_ids], device=lm.device)
    with torch.no_grad():
        clean_logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1]
    probs = torch.softmax(clean_logits.float(), dim=-1)[0]
    answer_id = int(probs.argmax())
    metric = metric or answer_probability(answer_id)
    setup = TraceSetup(
        lm=lm,
        prompt=tokenized,
        subject=subject,
        corrupt_range=(start, end),
        noise=make_noise(samples, end - start, lm.hidden_size, noise_level),
        noise_level=noise_level,
        samples=samples,
        window=window,
        answer_id=answer_id,
        answer=lm.tokenizer.decode([answer_id]),
        clean_score=float(metric(clean_logits)[0]),
        corrupted_score=0.0,
        metric=metric,
    )
    started = time.perf_counter()
    setup.corrupted_score = naive_scores(lm, setup, [])
    setup.forward_seconds = time.perf_counter() - started
    return setup
