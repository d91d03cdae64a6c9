"""Average indirect effect (AIE) of restored states over many known facts, by token category (paper Fig. 2).

For each fact the model predicts, trace all kinds and average the indirect effect (restored score minus
the fact's corrupted score) over six token categories, as the paper's notebook groups them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from core.budget import TraceSize, check_trace
from core.errors import UserError
from core.facts import Fact, predict
from core.models import LoadedModel
from core.progress import Progress, Step
from core.prompts import token_categories, tokenize
from core.trace_setup import score_json
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS, TraceResult, trace

CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass
class _Mean:
    total: np.ndarray | None = None
    count: int = 0

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        summed = rows.sum(axis=0)
        self.total = summed if self.total is None else self.total + summed
        self.count += len(rows)

    def mean(self, width: int) -> list[float]:
        if self.total is None:
            return [float("nan")] * width
        return (self.total / self.count).tolist()


@dataclass
class AIEResult:
    model: str
    n: int
    skipped: int
    seconds: float
    tables: dict[str, list[list[float]]]  # kind -> 6 x layers average indirect effect
    counts: dict[str, list[int]]  # kind -> token rows averaged per category
    mean_clean_score: float
    mean_corrupted_score: float
    traces: list[TraceResult] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "n": self.n,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "categories": list(CATEGORIES),
            **score_json(self.mean_clean_score, self.mean_corrupted_score, prefix="mean_"),
            **{kind: {"scores": table, "rows": self.counts[kind]} for kind, table in self.tables.items()},
        }

    def peak(self, kind: str) -> tuple[str, int, float]:
        """(category, layer, effect) of the largest average indirect effect."""
        table = np.array(self.tables[kind])
        c, layer = np.unravel_index(np.nanargmax(table), table.shape)
        return CATEGORIES[c], int(layer), float(table[c, layer])


def fact_size(lm: LoadedModel, fact: Fact, samples: int, kinds: int) -> TraceSize:
    """The memory of tracing `fact` (core.budget), or a UserError naming it when it is over a cap."""
    prompt = tokenize(lm.tokenizer, fact.prompt, fact.subject)
    try:
        return check_trace(lm, len(prompt.input_ids), samples=samples, kinds=kinds)
    except UserError as err:
        raise UserError(f"the fact {fact.prompt!r}: {err}") from None


def aie_size(lm: LoadedModel, facts: Sequence[Fact], limit: int | None, samples: int, kinds: int) -> TraceSize:
    """The largest memory of tracing the first `limit` facts (one at a time), or a UserError naming a fact over
    a cap."""
    chosen = facts[: len(facts) if limit is None else limit]
    return max((fact_size(lm, fact, samples, kinds) for fact in chosen), key=lambda size: size.memory_bytes)


def average_indirect_effect(
    lm: LoadedModel,
    facts: Sequence[Fact],
    *,
    limit: int | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int = DEFAULT_WINDOW,
    progress: Progress | None = None,
    keep_traces: bool = False,
    step: Step = nullcontext,
) -> AIEResult:
    """Trace up to `limit` facts that the model predicts (the others are counted as skipped).

    Each fact's work (its prediction and its trace) runs inside `step()`: the app passes its session's edits
    applied under the model's lock (core.edits.applied), so the lock is taken per fact, not for the whole run."""
    started = time.perf_counter()
    means = {kind: [_Mean() for _ in CATEGORIES] for kind in kinds}
    target = len(facts) if limit is None else min(limit, len(facts))
    used, skipped, clean, corrupted, traces = 0, 0, [], [], []
    for fact in facts:
        if used >= target:
            break
        with step():
            known = predict(lm, fact).known
            if known:
                fact_size(lm, fact, samples, len(kinds))  # over a cap: one clear error, before its trace
                result = trace(lm, fact.prompt, fact.subject, kinds=kinds, samples=samples, noise=noise, window=window)
        if not known:
            skipped += 1
            continue
        for kind in kinds:
            effect = result.indirect_effect(kind)
            for mean, rows in zip(means[kind], token_categories(result.subject_range, len(result.tokens))):
                mean.add(effect[rows])
        clean.append(result.clean_score)
        corrupted.append(result.corrupted_score)
        if keep_traces:
            traces.append(result)
        used += 1
        if progress:
            progress(used, target)
    layers = lm.num_layers
    return AIEResult(
        model=lm.name,
        n=used,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        tables={kind: [m.mean(layers) for m in means[kind]] for kind in kinds},
        counts={kind: [m.count for m in means[kind]] for kind in kinds},
        mean_clean_score=float(np.mean(clean)) if clean else float("nan"),
        mean_corrupted_score=float(np.mean(corrupted)) if corrupted else float("nan"),
        traces=traces,
    )
