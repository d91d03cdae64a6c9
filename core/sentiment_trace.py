"""Sentiment trace: causal tracing (core.tracing.trace, the same engine as for facts) with the "I am feeling"
proxy's probability of the positive class as the metric.

The prompt is text + " I am feeling"; the text's tokens (or a chosen span of them) get the noise, and each
(token, layer) state is restored as in fact tracing. The tables hold the restored p(positive).

Cost. Tracing a prompt of T tokens whose corrupted part starts at token s, with L layers and `samples` noisy
copies, costs in the fast engine about samples x (T - s)^2 / 2 x L^2 / 2 block-position evaluations per kind:
it grows with the square of the traced length (cells before the span are free). A 12-token prompt on the
embedded model is ~40 k block-positions per kind at 10 samples; 36 tokens ~9 x that. `max_tokens` (default
MAX_TRACE_TOKENS) refuses longer prompts with a clear error; corrupting a span near the end, fewer samples or
fewer kinds make a long text affordable. core.budget.check_trace refuses one beyond the model's context or
over the memory cap; core/trace_cost.py forecasts its seconds.

The estimate engine (core/estimate_tracing.py) costs one forward + backward whatever the length: it has no
such cap, only the model's context and the memory its backward needs (core/trace_cost.check_estimate_fits).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import write_atomically
from core.budget import check_trace
from core.errors import UserError
from core.models import LoadedModel, cache_dir, weights_fingerprint
from core.progress import Progress
from core.prompts import PromptError, subject_span, token_categories
from core.sentiment import (
    DEFAULT_SUFFIX,
    DEFAULT_WORDS,
    FeelingProxy,
    LabelledTexts,
    extract_features,
    load_labelled,
    load_project_texts,
    make_prompt,
    project_texts_path,
    word_ids,
)
from core.trace_cost import check_estimate_fits
from core.trace_setup import TraceSetup, prepare, probability_metric, score_json
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS, TraceResult, get_engine, trace_setup

MAX_TRACE_TOKENS = 48  # prompt tokens (text + suffix) an exact engine accepts by default
CATEGORIES = (
    "first corrupted token",
    "middle corrupted tokens",
    "last corrupted token",
    "first token after",
    "further tokens",
    "last token",
)


@dataclass
class SentimentTrace:
    """A sentiment trace of one text: restored p(positive) per (token, layer) for each kind."""

    text: str
    prompt: str
    tokens: list[str]
    text_range: tuple[int, int]  # [start, end) tokens of the text inside the prompt
    corrupt_range: tuple[int, int]  # [start, end) tokens that got the noise
    clean_score: float  # p(positive) of the proxy on the clean prompt
    corrupted_score: float  # mean p(positive) over the noisy copies
    scores: dict[str, np.ndarray]  # kind -> (tokens, layers)
    samples: int
    window: int
    noise: float
    seconds: float
    proxy: dict = field(default_factory=dict)
    engine: str = "fast"
    exact: dict[str, np.ndarray] = field(default_factory=dict)  # estimate engine: kind -> cells computed exactly

    @property
    def direction(self) -> float:
        """+1 when the clean text reads more positive than the corrupted one, else -1."""
        return 1.0 if self.clean_score >= self.corrupted_score else -1.0

    def effect(self, kind: str) -> np.ndarray:
        """Indirect effect signed so that restoring towards the clean score is positive."""
        return (self.scores[kind] - self.corrupted_score) * self.direction

    def peak(self, kind: str) -> tuple[int, int]:
        """(layer, token) of the strongest restoration towards the clean score."""
        token, layer = np.unravel_index(int(np.argmax(self.effect(kind))), self.scores[kind].shape)
        return int(layer), int(token)

    def categories(self) -> dict[str, list[int]]:
        """Token rows of each category (tokens before the corrupted span belong to none)."""
        return dict(zip(CATEGORIES, token_categories(self.corrupt_range, len(self.tokens))))

    def category_effects(self, kind: str) -> np.ndarray:
        """(6, layers): mean signed effect over each category's rows (NaN for an empty category)."""
        effect = self.effect(kind)
        rows = []
        for name in CATEGORIES:
            index = self.categories()[name]
            rows.append(effect[index].mean(axis=0) if index else np.full(effect.shape[1], np.nan))
        return np.stack(rows)

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "text_range": list(self.text_range),
            "corrupt_range": list(self.corrupt_range),
            **score_json(self.clean_score, self.corrupted_score),
            "samples": self.samples,
            "window": self.window,
            "noise": self.noise,
            "seconds": self.seconds,
            "engine": self.engine,
            "proxy": self.proxy,
            "scores": {kind: table.tolist() for kind, table in self.scores.items()},
        }


def text_token_range(lm: LoadedModel, text: str, suffix: str = DEFAULT_SUFFIX) -> tuple[list[int], tuple[int, int]]:
    """The prompt's token ids (as tracing tokenises it) and the [start, end) tokens that belong to the text:
    not a special token the tokenizer adds (e.g. a BOS), not the suffix."""
    if not text or not text.strip():
        raise UserError("the text is empty")
    try:
        return subject_span(lm.tokenizer, make_prompt(text, suffix), (0, len(text.strip())))
    except PromptError:
        raise UserError("the text has no tokens of its own") from None


def sentiment_setup(
    lm: LoadedModel,
    text: str,
    proxy: FeelingProxy,
    *,
    span: str | tuple[int, int] | None = None,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int = DEFAULT_WINDOW,
    engine: str = "fast",
    max_tokens: int | None = None,
) -> tuple[TraceSetup, tuple[int, int]]:
    """The trace setup of `text` + proxy suffix (the proxy's p(positive) as the metric) and the text's token
    range. The noise goes on the whole text, or on `span` (a substring of the text, or a [start, end) token
    range of the text). Exact engines refuse prompts over `max_tokens` (default MAX_TRACE_TOKENS); the estimate
    only those beyond the model's context or the free memory (or over `max_tokens` when given)."""
    if not text or not text.strip():
        raise UserError("the text is empty")
    if proxy.model_name != lm.name:
        raise UserError(f"the proxy was fitted for {proxy.model_name}, not for {lm.name}")
    exact = get_engine(engine).exact
    ids, text_range = text_token_range(lm, text, proxy.suffix)
    cap = max_tokens if max_tokens is not None else (MAX_TRACE_TOKENS if exact else None)
    if cap is not None and len(ids) > cap:
        hint = " or use the estimate engine" if exact else ""
        raise UserError(
            f"the text is {len(ids)} tokens with the suffix; the sentiment trace is capped at {cap} (an exact "
            f"trace's cost grows with the square of the length): shorten the text, raise the cap{hint}"
        )
    if not exact:
        check_estimate_fits(lm, len(ids), samples)
    prompt = make_prompt(text, proxy.suffix)
    if span is None:
        corrupt = text_range
    elif isinstance(span, str):
        try:
            _, corrupt = subject_span(lm.tokenizer, prompt, span)
        except PromptError:
            raise UserError(f"the span {span.strip()!r} does not occur in the text") from None
        if corrupt[1] > text_range[1]:
            raise UserError(f"the span {span.strip()!r} is not inside the text")
    else:
        corrupt = (int(span[0]), int(span[1]))
        if not text_range[0] <= corrupt[0] < corrupt[1] <= text_range[1]:
            raise UserError(f"the span {tuple(span)} is not a token range inside the text's {text_range[1]} tokens")
    setup = prepare(
        lm,
        prompt,
        None,
        samples=samples,
        noise=noise,
        window=window,
        corrupt_range=corrupt,
        metric=probability_metric(proxy.positive_probability_from_logits),
    )
    return setup, text_range


def as_sentiment_trace(
    result: TraceResult, text: str, text_range: tuple[int, int], proxy: FeelingProxy
) -> SentimentTrace:
    """A trace result of a sentiment setup as a SentimentTrace."""
    return SentimentTrace(
        text=text.strip(),
        prompt=result.prompt,
        tokens=result.tokens,
        text_range=text_range,
        corrupt_range=result.subject_range,
        clean_score=result.clean_score,
        corrupted_score=result.corrupted_score,
        scores=dict(result.scores),
        samples=result.samples,
        window=result.window,
        noise=result.noise,
        seconds=result.seconds,
        proxy=proxy.to_dict(),
        engine=result.engine,
        exact=dict(result.exact),
    )


def trace_sentiment(
    lm: LoadedModel,
    text: str,
    proxy: FeelingProxy,
    *,
    span: str | tuple[int, int] | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int = DEFAULT_WINDOW,
    max_tokens: int | None = None,
    engine: str = "fast",
    engine_options: dict | None = None,
    progress: Progress | None = None,
    on_kind: Callable[[SentimentTrace, str], None] | None = None,
    on_row: Callable[[str, int, np.ndarray], None] | None = None,
) -> SentimentTrace:
    """Trace `text` + proxy suffix with the proxy's p(positive) as the metric (see `sentiment_setup` for the
    span and the length limits). The clean and corrupted runs are recorded once for all kinds; `on_kind(trace,
    kind)` sees each kind as soon as it is done, `on_row(kind, position, row)` each finished row."""
    started = time.perf_counter()
    setup, text_range = sentiment_setup(
        lm, text, proxy, span=span, samples=samples, noise=noise, window=window, engine=engine, max_tokens=max_tokens
    )
    if get_engine(engine).exact:  # exact engines record every state: capped by memory
        check_trace(lm, setup.num_tokens, samples=samples, kinds=len(kinds))

    def convert(result: TraceResult) -> SentimentTrace:
        return as_sentiment_trace(result, text, text_range, proxy)

    result = trace_setup(
        setup,
        kinds=kinds,
        engine_name=engine,
        engine_options=engine_options,
        progress=progress,
        on_kind=(lambda r, kind: on_kind(convert(r), kind)) if on_kind else None,
        on_row=on_row,
        started=started,
    )
    return convert(result)


@dataclass
class AverageSentimentTrace:
    """Signed indirect effect averaged over texts by token category: kind -> (6 categories, layers)."""

    effects: dict[str, np.ndarray]
    n: int  # texts averaged
    skipped: int  # texts whose clean and corrupted scores were closer than `min_gap`
    traces: list[SentimentTrace]

    def peak(self, kind: str) -> tuple[int, str, float]:
        """(layer, category, effect) of the largest average effect."""
        table = np.nan_to_num(self.effects[kind], nan=-np.inf)
        row, layer = np.unravel_index(int(np.argmax(table)), table.shape)
        return int(layer), CATEGORIES[row], float(self.effects[kind][row, layer])

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "skipped": self.skipped,
            "categories": list(CATEGORIES),
            "effects": {k: v.tolist() for k, v in self.effects.items()},
            "peaks": {k: dict(zip(("layer", "category", "effect"), self.peak(k))) for k in self.effects},
        }


def average_traces(traces: Sequence[SentimentTrace], min_gap: float = 0.05) -> AverageSentimentTrace:
    """Average the signed effect by token category over the traces whose clean and corrupted p(positive)
    differ by at least `min_gap` (the others carry no signal to restore)."""
    kept = [t for t in traces if abs(t.clean_score - t.corrupted_score) >= min_gap]
    if not kept:
        raise UserError(f"no text moved the proxy by {min_gap} or more when corrupted; nothing to average")
    effects = {}
    for kind in kept[0].scores:
        tables = np.stack([t.category_effects(kind) for t in kept])  # (texts, categories, layers)
        with warnings.catch_warnings():  # a category no text has (e.g. middle tokens of 2-token texts) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            effects[kind] = np.nanmean(tables, axis=0)
    return AverageSentimentTrace(effects, len(kept), len(traces) - len(kept), list(kept))


def average_sentiment_trace(
    lm: LoadedModel,
    texts: Sequence[str],
    proxy: FeelingProxy,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = MAX_TRACE_TOKENS,
    min_gap: float = 0.05,
    progress: Progress | None = None,
) -> AverageSentimentTrace:
    """Trace each text (the whole text corrupted) and average by token category (see `average_traces`).
    progress(done, total) counts texts."""
    traces = []
    for done, text in enumerate(texts, start=1):
        traces.append(
            trace_sentiment(lm, text, proxy, kinds=kinds, samples=samples, window=window, max_tokens=max_tokens)
        )
        if progress:
            progress(done, len(texts))
    return average_traces(traces, min_gap)


# ------------------------------------------------------------------------------ the default proxy


def _proxy_cache_file(lm: LoadedModel, source: str, data: bytes, words: Sequence[str], suffix: str) -> Path:
    import hashlib

    digest = hashlib.sha256()
    for part in (lm.name, weights_fingerprint(lm), "|".join(words), suffix):
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(data)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name)[-60:]
    return cache_dir() / "sentiment" / "proxies" / f"{safe}-{digest.hexdigest()[:24]}.json"


def default_proxy(
    lm: LoadedModel,
    train: str | Path | None = None,
    words: Sequence[str] = DEFAULT_WORDS,
    suffix: str = DEFAULT_SUFFIX,
    progress: Progress | None = None,
) -> FeelingProxy:
    """The feeling proxy fitted on `train` (default: the project's own labelled set, data/sentiment_texts.tsv),
    kept as JSON in the user cache folder, keyed by model, weights fingerprint, words, suffix and file contents."""
    word_ids(lm, words)  # a bad word pair fails before any work
    path = Path(train) if train is not None else project_texts_path()
    if not path.is_file():
        raise UserError(f"the data file {str(path)!r} does not exist")
    data = path.read_bytes()
    cached = _proxy_cache_file(lm, str(path), data, words, suffix)
    if cached.is_file():
        try:
            return FeelingProxy.from_dict(json.loads(cached.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            cached.unlink(missing_ok=True)
    labelled: LabelledTexts = load_project_texts() if train is None else load_labelled(path)
    features = extract_features(lm, labelled.texts, (), suffix, cache=True, progress=progress)
    proxy = FeelingProxy.fit(lm, features, labelled.labels, words, suffix)
    text = json.dumps(proxy.to_dict(), indent=1)
    write_atomically(cached, lambda partial: partial.write_text(text, encoding="utf-8"))
    return proxy
