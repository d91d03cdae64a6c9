"""Causal tracing (Meng et al. 2022, section 2): which hidden states carry a fact to the model's answer.

1. Clean run: the answer is the clean top-1 next token, `high_score` its probability.
2. Corrupted run: Gaussian noise on the input embeddings of the subject tokens, `samples` noisy copies,
   drawn exactly as the paper's code draws it (`numpy.random.RandomState(1).randn(samples, tokens, hidden)`
   times the scale); `low_score` = mean probability of the answer over the copies.
3. Corrupted-with-restoration: for each (token i, layer l) one state is set back to its clean value and the
   answer's mean probability recorded. Kinds: `hidden` (block outputs), `mlp` and `attn` (module outputs,
   restored at every layer of a window around l, as the paper's code).

Two engines give the same numbers: `naive` runs the paper's algorithm (one full forward of 1 + samples rows
per cell; the oracle), `fast` computes only what a restoration can change (core/fast_tracing.py).

    result = trace(lm, "The Space Needle is located in the city of", "The Space Needle")
    result.scores["mlp"]   # tokens x layers, restored probability of the answer
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.hooks import Hooks
from core.models import LoadedModel
from core.prompts import TokenizedPrompt, tokenize

KINDS = ("hidden", "mlp", "attn")
ENGINES = ("fast", "naive")
DEFAULT_SAMPLES = 10
DEFAULT_WINDOW = 10
NOISE_MULTIPLIER = 3.0
REFERENCE_FACTS = Path(__file__).resolve().parent.parent / "data" / "known_facts.json"

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits (rows, vocab) -> score per row
Progress = Callable[[int, int], None]  # (done, total)


def answer_probability(answer_id: int) -> Metric:
    """The paper's metric: softmax probability of the answer token."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)[:, answer_id]

    return metric


@dataclass
class TraceResult:
    model: str
    prompt: str
    subject: str | None
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]  # the corrupted token span [start, end)
    answer: str
    answer_id: int
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]  # kind -> (tokens, layers) restored score
    noise: float
    samples: int
    window: int
    engine: str
    seconds: float
    kind_seconds: dict[str, float] = field(default_factory=dict)

    def indirect_effect(self, kind: str) -> np.ndarray:
        return self.scores[kind] - self.low_score

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            "high_score": self.high_score,
            "low_score": self.low_score,
            "noise": self.noise,
            "samples": self.samples,
            "window": self.window,
            "engine": self.engine,
            "seconds": self.seconds,
            **{
                kind: {"scores": table.tolist(), "seconds": self.kind_seconds.get(kind)}
                for kind, table in self.scores.items()
            },
        }


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
        return float(embed.weight.float().std())
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
    high_score: float
    low_score: float
    metric: Metric

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.prompt.input_ids], device=self.lm.device)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt.input_ids)


def _add_noise_hook(setup: TraceSetup, first_row: int):
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

    edits = {lm.arch.embed: _add_noise_hook(setup, first_row=1)}
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
    """Validate the inputs, find the answer and the corrupted span, draw the noise, measure high/low scores."""
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
        high_score=float(metric(clean_logits)[0]),
        low_score=0.0,
        metric=metric,
    )
    setup.low_score = naive_scores(lm, setup, [])
    return setup


def naive_kind(setup: TraceSetup, kind: str, progress: Progress | None = None) -> np.ndarray:
    """The paper's `trace_important_states` / `trace_important_window`: one forward per cell."""
    lm = setup.lm
    layers = lm.num_layers
    table = np.zeros((setup.num_tokens, layers))
    for position in range(setup.num_tokens):
        for layer in range(layers):
            if kind == "hidden":
                states = [(position, lm.arch.layer_name(lm.model, layer))]
            else:
                states = [
                    (position, lm.arch.layer_name(lm.model, restored, kind))
                    for restored in window_layers(layer, setup.window, layers)
                ]
            table[position, layer] = naive_scores(lm, setup, states)
        if progress:
            progress(position + 1, setup.num_tokens)
    return table


def trace_kind(
    setup: TraceSetup, kind: str, engine: str = "fast", progress: Progress | None = None, runs=None
) -> np.ndarray:
    """The (tokens, layers) table of restored scores for one kind (`runs`: the fast engine's recording of the
    clean and corrupted runs, when the caller already has it)."""
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if engine == "naive":
        return naive_kind(setup, kind, progress)
    if engine == "fast":
        from core.fast_tracing import fast_kind

        return fast_kind(setup, kind, progress, runs)
    raise UserError(f"unknown engine {engine!r}: use fast or naive")


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int = DEFAULT_WINDOW,
    engine: str = "fast",
    corrupt_range: tuple[int, int] | None = None,
    metric: Metric | None = None,
    progress: Progress | None = None,
) -> TraceResult:
    """Causal trace of `prompt` for each of `kinds`; see the module docstring."""
    kinds = list(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: use fast or naive")
    started = time.perf_counter()
    setup = prepare(
        lm, prompt, subject, samples=samples, noise=noise, window=window, corrupt_range=corrupt_range, metric=metric
    )
    scores, kind_seconds = {}, {}
    rows = setup.num_tokens
    runs = None
    if engine == "fast":  # the clean and corrupted runs, recorded once for every kind
        from core.fast_tracing import record_runs

        runs = record_runs(setup, tuple(kinds))
    for k, kind in enumerate(kinds):
        kind_start = time.perf_counter()
        kind_progress = (lambda done, total, k=k: progress(k * rows + done, len(kinds) * rows)) if progress else None
        scores[kind] = trace_kind(setup, kind, engine, kind_progress, runs)
        kind_seconds[kind] = time.perf_counter() - kind_start
    return result_from(setup, scores, engine, time.perf_counter() - started, kind_seconds)


def result_from(
    setup: TraceSetup, scores: dict[str, np.ndarray], engine: str, seconds: float, kind_seconds: dict[str, float]
) -> TraceResult:
    return TraceResult(
        model=setup.lm.name,
        prompt=setup.prompt.text,
        subject=setup.subject,
        tokens=setup.prompt.tokens,
        input_ids=setup.prompt.input_ids,
        subject_range=setup.corrupt_range,
        answer=setup.answer,
        answer_id=setup.answer_id,
        high_score=setup.high_score,
        low_score=setup.low_score,
        scores=scores,
        noise=setup.noise_level,
        samples=setup.samples,
        window=setup.window,
        engine=engine,
        seconds=seconds,
        kind_seconds=kind_seconds,
    )
