"""Causal tracing (Meng et al. 2022, section 2): which hidden states carry a fact to the model's answer.

1. Clean run: the answer is the clean top-1 next token, `clean_score` its probability.
2. Corrupted run: Gaussian noise on the input embeddings of the subject tokens, `samples` noisy copies,
   drawn exactly as the paper's code draws it (`numpy.random.RandomState(1).randn(samples, tokens, hidden)`
   times the scale); `corrupted_score` = mean probability of the answer over the copies.
   (The JSON names them `high_score` / `low_score`, as the paper's code does: core.trace_setup.score_json.)
3. Corrupted-with-restoration: for each (token i, layer l) one state is set back to its clean value and the
   answer's mean probability recorded. Kinds: `hidden` (block outputs), `mlp` and `attn` (module outputs,
   restored at every layer of a window around l, as the paper's code).

What the engines share lives in core/trace_setup.py; the engines, chosen from `ENGINES` by name:
  - `naive`: the paper's algorithm, one full forward of 1 + samples rows per cell (the oracle),
  - `fast`: the same numbers, computing only what a restoration can change (core/fast_tracing.py),
  - `estimate`: a first-order estimate of every cell from one forward + backward (core/estimate_tracing.py);
    not exact: see its docstring for how well it agrees.

    result = trace(lm, "The Space Needle is located in the city of", "The Space Needle")
    result.scores["mlp"]   # tokens x layers, restored probability of the answer
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import UserError
from core.estimate_tracing import estimate_kind, record_gradients
from core.fast_tracing import fast_kind, record_runs
from core.models import LoadedModel
from core.naive_tracing import naive_kind  # noqa: F401  (re-exported)
from core.progress import Step

# Re-exported: the shared names have always been importable from here.
from core.trace_setup import (  # noqa: F401
    DEFAULT_SAMPLES,
    DEFAULT_WINDOW,
    KINDS,
    NOISE_MULTIPLIER,
    REFERENCE_FACTS,
    Metric,
    Progress,
    TraceSetup,
    add_noise_hook,
    answer_probability,
    check_kinds,
    embedding_std,
    is_probability,
    make_noise,
    naive_scores,
    noise_scale,
    prepare,
    probability_metric,
    score_json,
    window_layers,
)

OnRow = Callable[[int, np.ndarray], None]  # (position, finished row of restored scores)


@dataclass(frozen=True)
class Engine:
    """One way to fill the table: `record(setup, kinds)` does the work every kind shares once (or returns None);
    `kind(setup, kind, progress, recorded, on_row)` gives one kind's (tokens, layers) table."""

    name: str
    exact: bool
    record: Callable[[TraceSetup, tuple[str, ...]], Any]
    kind: Callable[..., np.ndarray]
    summary: str


def _records_nothing(setup: TraceSetup, kinds: tuple[str, ...], **options) -> None:
    return None


ENGINES: dict[str, Engine] = {
    "fast": Engine("fast", True, record_runs, fast_kind, "exact: computes only what a restoration can change"),
    "naive": Engine("naive", True, _records_nothing, naive_kind, "exact: the paper's algorithm (slow)"),
    "estimate": Engine(
        "estimate", False, record_gradients, estimate_kind, "first-order estimate (attribution patching), seconds"
    ),
}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    return ENGINES[name]


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
    clean_score: float
    corrupted_score: float
    scores: dict[str, np.ndarray]  # kind -> (tokens, layers) restored score
    noise: float
    samples: int
    window: int
    engine: str
    seconds: float
    kind_seconds: dict[str, float] = field(default_factory=dict)
    exact: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (tokens, layers) bool, estimate engine only

    def indirect_effect(self, kind: str) -> np.ndarray:
        return self.scores[kind] - self.corrupted_score

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            **score_json(self.clean_score, self.corrupted_score),
            "noise": self.noise,
            "samples": self.samples,
            "window": self.window,
            "engine": self.engine,
            "seconds": self.seconds,
            **{
                kind: {
                    "scores": table.tolist(),
                    "seconds": self.kind_seconds.get(kind),
                    **({"exact_cells": np.argwhere(self.exact[kind]).tolist()} if kind in self.exact else {}),
                }
                for kind, table in self.scores.items()
            },
        }


def trace_kind(
    setup: TraceSetup,
    kind: str,
    engine: str = "fast",
    progress: Progress | None = None,
    runs=None,
    on_row: OnRow | None = None,
) -> np.ndarray:
    """The (tokens, layers) table of restored scores for one kind (`runs`: the engine's shared recording of
    the clean and corrupted runs, when the caller already has it)."""
    check_kinds([kind])
    chosen = get_engine(engine)
    if runs is None:
        runs = chosen.record(setup, (kind,))
    return chosen.kind(setup, kind, progress, runs, on_row)


def trace_setup(
    setup: TraceSetup,
    *,
    kinds: Sequence[str] = KINDS,
    engine_name: str = "fast",
    engine_options: dict | None = None,
    progress: Progress | None = None,
    on_kind: Callable[[TraceResult, str], None] | None = None,
    on_row: Callable[[str, int, np.ndarray], None] | None = None,
    started: float | None = None,
    step: Step = nullcontext,
) -> TraceResult:
    """Trace a prepared setup: the engine's shared recording once, then each kind in turn; `on_kind(result,
    kind)` sees the result as soon as a kind is done (its table in result.scores), `on_row(kind, position, row)`
    each finished row. progress(done, total) counts rows over all kinds. `engine_options` go to the engine's
    recording (the estimate's `verify=K`: its K strongest cells per kind computed exactly).

    The recording and each kind run inside a `step()` of their own: the app passes its session's edits applied
    under the model's lock (core.edits.applied), so the lock is taken per kind, not for the whole trace (the
    recorded runs stay valid in between: each step applies the same edits)."""
    kinds = check_kinds(kinds)
    chosen = get_engine(engine_name)
    started = time.perf_counter() if started is None else started
    result = result_from(setup, {}, chosen.name, 0.0, {})
    with step():
        recorded = chosen.record(setup, tuple(kinds), **(engine_options or {}))
    rows = setup.num_tokens
    for k, kind in enumerate(kinds):
        kind_start = time.perf_counter()
        kind_progress = (lambda done, total, k=k: progress(k * rows + done, len(kinds) * rows)) if progress else None
        kind_row = (lambda position, row, kind=kind: on_row(kind, position, row)) if on_row else None
        with step():
            result.scores[kind] = chosen.kind(setup, kind, kind_progress, recorded, kind_row)
        result.kind_seconds[kind] = time.perf_counter() - kind_start
        exact = getattr(recorded, "exact", None)
        if exact and kind in exact:
            result.exact[kind] = exact[kind]
        result.seconds = time.perf_counter() - started
        if on_kind:
            on_kind(result, kind)
    result.seconds = time.perf_counter() - started
    return result


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
    engine_options: dict | None = None,
    corrupt_range: tuple[int, int] | None = None,
    metric: Metric | None = None,
    progress: Progress | None = None,
    on_kind: Callable[[TraceResult, str], None] | None = None,
    on_row: Callable[[str, int, np.ndarray], None] | None = None,
) -> TraceResult:
    """Causal trace of `prompt` for each of `kinds` with the named engine; see the module docstring and
    `trace_setup` for the callbacks."""
    check_kinds(kinds)
    get_engine(engine)  # an unknown engine fails before any work
    started = time.perf_counter()
    setup = prepare(
        lm, prompt, subject, samples=samples, noise=noise, window=window, corrupt_range=corrupt_range, metric=metric
    )
    return trace_setup(
        setup,
        kinds=kinds,
        engine_name=engine,
        engine_options=engine_options,
        progress=progress,
        on_kind=on_kind,
        on_row=on_row,
        started=started,
    )


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
        clean_score=setup.clean_score,
        corrupted_score=setup.corrupted_score,
        scores=scores,
        noise=setup.noise_level,
        samples=setup.samples,
        window=setup.window,
        engine=engine,
        seconds=seconds,
        kind_seconds=kind_seconds,
    )
