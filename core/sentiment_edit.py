"""Editing sentiment: the seed experiment's test of a located site. A rank-one edit of one MLP (ROME's key and
value machinery, `core.rome.solve_rows`) changes how the model reads a subject's sentiment, e.g. texts about
"Monday" now lead to " good" after " I am feeling".

The rows: each text that mentions the subject, followed by the proxy's suffix and the target word, keyed at
the subject's last token (its last mention, whole word, any case); then the KL row "{subject} is a", which keeps
what the subject is. k* is the mean key over the texts, v* the output that makes them end in the target word.

Measured with the "I am feeling" proxy (core.sentiment.FeelingProxy), before and after:
- `flipped`: of the texts that mention the subject and were not read as the target class before, the share
  read as the target class after, on the held-in texts (the edit's rows) and on held-out ones;
- `unchanged`: of texts that do not mention the subject, the share whose reading is the same after.
`sentiment_edit_warning` says when an edit did not take (none of its own texts flipped) or took only on its own
texts (none of the held-out ones flipped): the Sentiment editor shows it, `sentiment edit` prints it per layer.
`sentiment_edit_sweep` makes the same edit at each layer, beside the sentiment trace's MLP effect at the
subject's last token (`subject_mlp_effect`), as the fact sweep does (core/sweep.py).

    edit = compute_sentiment_edit(lm, "Monday", texts_about_monday, target="positive", layer=3)
    with applied(lm, [edit]):
        ...  # "I hate Monday. I am feeling" now continues with " good"
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from core.covariance import key_statistics
from core.edit_site import default_layer
from core.edits import Edit, EditRequest, applied
from core.errors import UserError
from core.fast_tracing import mlp_effects_at_span_end
from core.models import LoadedModel
from core.progress import Progress, Step
from core.prompts import subject_span, target_ids, whole_word_spans
from core.rome import EditRow, RomeHyperParams, solve_rows, subject_tokens
from core.sentiment import CLASSES, FeelingProxy, make_prompt, read_texts
from core.sentiment_trace import sentiment_setup
from core.sweep import correlation

TARGETS = CLASSES  # "negative", "positive": the class the subject's texts should be read as


def mention(text: str, subject: str) -> tuple[int, int] | None:
    """[start, end) characters of the subject's last whole-word mention in `text` (any case), or None."""
    if not subject.strip():
        raise UserError("the subject is empty")
    found = whole_word_spans(text, subject)
    return found[-1] if found else None


def split_by_mention(texts: Sequence[str], subject: str) -> tuple[list[str], list[str]]:
    """(texts that mention the subject, texts that do not)."""
    hits: list[str] = []
    rest: list[str] = []
    for text in texts:
        (hits if mention(text, subject) else rest).append(text)
    return hits, rest


def target_word(proxy_words: Sequence[str], target: str) -> str:
    """The proxy word of the target class: words are (positive, negative)."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: use {' or '.join(TARGETS)}")
    return proxy_words[0] if target == "positive" else proxy_words[1]


def sentiment_rows(lm: LoadedModel, subject: str, texts: Sequence[str], word: str, suffix: str) -> list[EditRow]:
    """One rewrite row per text (text + suffix + the word's tokens but the last, keyed at the subject's last
    token of its last mention), then the KL row "{subject} is a". Texts are read stripped, as the proxy reads
    them (core.sentiment.make_prompt)."""
    new = target_ids(lm.tokenizer, word)
    rows = []
    for text in texts:
        text = text.strip()
        found = mention(text, subject)
        if found is None:
            raise UserError(f"the text {text[:60]!r} does not mention {subject.strip()!r}")
        ids, (_, end) = subject_span(lm.tokenizer, make_prompt(text, suffix), found)
        n = len(ids)
        rows.append(EditRow(tuple(ids + new[:-1]), end - 1, tuple(range(n - 1, n - 1 + len(new)))))
    if not rows:
        raise UserError(f"no text mentions {subject.strip()!r}: the edit needs texts about the subject")
    kl_ids, (_, kl_end) = subject_tokens(lm, "{} is a", subject.strip())
    rows.append(EditRow(tuple(kl_ids), kl_end - 1, (), kl=True))
    return rows


def compute_sentiment_edit(
    lm: LoadedModel,
    subject: str,
    texts: Sequence[str],
    proxy: FeelingProxy,
    target: str = "positive",
    layer: int | None = None,
    hparams: RomeHyperParams | None = None,
    progress: Progress | None = None,
    step: Step = nullcontext,
) -> Edit:
    """The rank-one edit at `layer` (default: the model's fact-editing layer) after which texts that mention
    `subject` end in the proxy's `target` word (see the module docstring). Statistics as for ROME (cached,
    unedited weights); the model work runs inside `step()`."""
    started = time.perf_counter()
    hp = replace(hparams or RomeHyperParams(), layer=default_layer(lm) if layer is None else layer)
    hp.check(lm)
    layer = hp.layer
    word = target_word(proxy.words, target)
    rows = sentiment_rows(lm, subject, texts, word, proxy.suffix)
    stats = key_statistics(lm, layer, hp.stats_corpus, hp.stats_tokens, step=step)
    with step():
        solved = solve_rows(
            lm,
            rows,
            target_ids(lm.tokenizer, word),
            layer,
            stats,
            hp,
            (lambda done: progress(done, hp.steps)) if progress else None,
        )
    request = EditRequest("{}" + proxy.suffix, subject.strip(), word.strip())
    info = {
        "kind": "sentiment",
        "target": target,
        "texts": len(rows) - 1,
        "hparams": json.loads(json.dumps(asdict(hp))),
        "layer": layer,
        "steps": solved.trace.steps,
        "nll": solved.trace.nll,
        "delta_norm": solved.delta_norm,
        "seconds": time.perf_counter() - started,
    }
    return solved.as_edit(lm, request, layer, info)


# --- measuring -----------------------------------------------------------------------------------------------


def positive_probabilities(lm: LoadedModel, proxy: FeelingProxy, texts: Sequence[str]) -> np.ndarray:
    """The proxy's p(positive) of each text, on the model as it is now."""
    if not texts:
        return np.zeros(0)
    features = read_texts(lm, texts, suffix=proxy.suffix)
    return proxy.reader.positive_probability(features.feeling(lm, proxy.words))


def reads_as(probabilities: np.ndarray, target: str) -> np.ndarray:
    """Which p(positive) the proxy reads as `target` (positive: p > 0.5, as FeelingProxy.predict)."""
    positive = np.asarray(probabilities) > 0.5
    return positive if target == "positive" else ~positive


@dataclass
class TextGroup:
    """One group of texts read before and after an edit."""

    texts: list[str]
    before: np.ndarray  # p(positive) per text
    after: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def flipped(self, target: str) -> float | None:
        """Of the texts not read as `target` before, the share read as `target` after (None: there were none)."""
        was = reads_as(self.before, target)
        if was.all():
            return None
        return float(reads_as(self.after, target)[~was].mean())

    def unchanged(self) -> float | None:
        if not len(self.texts):
            return None
        return float((reads_as(self.before, "positive") == reads_as(self.after, "positive")).mean())


def sentiment_edit_warning(
    subject: str, target: str, flipped_own: float | None, flipped_about: float | None
) -> str | None:
    """What a user should be told when a sentiment edit did not take (None when it did), from `TextGroup.flipped`
    of its own texts (the rows it was made on) and of other texts about the subject: none of its own texts that
    read otherwise before reads as `target` after it; or some do, but none of the other texts about the subject
    that read otherwise before does (the edit learnt its texts, not the subject). None: no such texts."""
    subject = subject.strip()
    if flipped_own == 0.0:
        return (
            f"The edit did not take: none of the texts it was made on that read otherwise before reads {target} "
            "after it. Try more optimisation steps or another layer."
        )
    if flipped_about == 0.0:
        return (
            f"The edit's own texts read {target} now, but none of the other texts about {subject!r} that read "
            f"otherwise before does: it may have learnt those texts rather than {subject!r}. "
            "Try more texts about it or another layer."
        )
    return None


@dataclass
class SentimentEditScores:
    """What one sentiment edit did (module docstring); p_* are mean p(positive) before -> after."""

    layer: int
    target: str
    flipped_held_in: float | None
    flipped_held_out: float | None
    unchanged_others: float | None
    p_held_in: tuple[float, float]
    p_held_out: tuple[float, float]
    p_others: tuple[float, float]
    n_held_in: int
    n_held_out: int
    n_others: int
    edit_seconds: float

    def row(self) -> dict:
        return asdict(self)


def read_groups(
    lm: LoadedModel, proxy: FeelingProxy, held_in: Sequence[str], held_out: Sequence[str], others: Sequence[str]
) -> dict[str, TextGroup]:
    """The three groups with their p(positive) on the model as it is (the "before")."""
    return {
        name: TextGroup(list(texts), positive_probabilities(lm, proxy, texts))
        for name, texts in (("held_in", held_in), ("held_out", held_out), ("others", others))
    }


def measure_sentiment_edit(
    lm: LoadedModel, edit: Edit, proxy: FeelingProxy, groups: dict[str, TextGroup], target: str
) -> SentimentEditScores:
    """Read every group with the edit applied and score it against its "before" (see `read_groups`)."""
    with applied(lm, [edit]):
        for group in groups.values():
            group.after = positive_probabilities(lm, proxy, group.texts)

    def means(group: TextGroup) -> tuple[float, float]:
        if not len(group.texts):
            return (float("nan"), float("nan"))
        return (float(group.before.mean()), float(group.after.mean()))

    held_in, held_out, others = groups["held_in"], groups["held_out"], groups["others"]
    return SentimentEditScores(
        layer=edit.layer,
        target=target,
        flipped_held_in=held_in.flipped(target),
        flipped_held_out=held_out.flipped(target),
        unchanged_others=others.unchanged(),
        p_held_in=means(held_in),
        p_held_out=means(held_out),
        p_others=means(others),
        n_held_in=len(held_in.texts),
        n_held_out=len(held_out.texts),
        n_others=len(others.texts),
        edit_seconds=float(edit.info.get("seconds", 0.0)),
    )


def subject_mlp_effect(
    lm: LoadedModel,
    proxy: FeelingProxy,
    texts: Sequence[str],
    subject: str,
    layers: Sequence[int],
    samples: int = 10,
    progress: Progress | None = None,
) -> list[float]:
    """Per layer in `layers`: the mean signed MLP indirect effect at the subject's last token (the subject's
    tokens corrupted, the proxy's p(positive) the metric, signed toward the clean reading) over `texts`. Only
    those cells are computed (exactly, core.fast_tracing.fast_cells), so it costs a few restorations a text."""
    effects = []
    for done, text in enumerate(texts, start=1):
        found = mention(text.strip(), subject)
        if found is None:
            raise UserError(f"the text {text.strip()[:60]!r} does not mention {subject.strip()!r}")
        setup, _ = sentiment_setup(lm, text, proxy, span=text.strip()[found[0] : found[1]], samples=samples)
        sign = 1.0 if setup.clean_score >= setup.corrupted_score else -1.0
        effects.append([effect * sign for effect in mlp_effects_at_span_end(setup, layers)])
        if progress:
            progress(done, len(texts))
    return [float(v) for v in np.mean(effects, axis=0)]


@dataclass
class SentimentSweep:
    """The sentiment edit at each layer beside the subject's MLP effect (None: not traced)."""

    subject: str
    target: str
    layers: list[int]
    scores: list[SentimentEditScores]
    mlp_effect: list[float] | None
    seconds: float

    def correlation(self) -> dict[str, float | None]:
        """Pearson r over the layers between the MLP effect and each flip share / mean p(positive) after."""
        if self.mlp_effect is None:
            return {}
        measures = {
            "flipped_held_in": [s.flipped_held_in for s in self.scores],
            "flipped_held_out": [s.flipped_held_out for s in self.scores],
            "p_held_out_after": [s.p_held_out[1] for s in self.scores],
            "unchanged_others": [s.unchanged_others for s in self.scores],
        }
        return {name: correlation(self.mlp_effect, values) for name, values in measures.items()}

    def to_json(self) -> dict:
        rows = [
            {
                **s.row(),
                "mlp_effect": None if self.mlp_effect is None else self.mlp_effect[i],
                "warning": sentiment_edit_warning(self.subject, self.target, s.flipped_held_in, s.flipped_held_out),
            }
            for i, s in enumerate(self.scores)
        ]
        return {
            "subject": self.subject,
            "target": self.target,
            "layers": self.layers,
            "rows": rows,
            "correlation": self.correlation(),
            "seconds": self.seconds,
        }


def sentiment_edit_sweep(
    lm: LoadedModel,
    subject: str,
    proxy: FeelingProxy,
    held_in: Sequence[str],
    held_out: Sequence[str],
    others: Sequence[str],
    layers: Sequence[int],
    target: str = "positive",
    hparams: RomeHyperParams | None = None,
    trace_texts: int | None = 5,
    trace_samples: int = 10,
    progress: Progress | None = None,
) -> SentimentSweep:
    """The same sentiment edit made at each of `layers` (each on the unedited model), measured alike, beside
    the subject's MLP effect over the first `trace_texts` held-in texts (None: no trace). progress counts
    layers."""
    started = time.perf_counter()
    groups = read_groups(lm, proxy, held_in, held_out, others)
    scores = []
    for done, layer in enumerate(layers, start=1):
        edit = compute_sentiment_edit(lm, subject, held_in, proxy, target, layer, hparams)
        scores.append(measure_sentiment_edit(lm, edit, proxy, groups, target))
        if progress:
            progress(done, len(layers))
    effect = None
    if trace_texts:
        effect = subject_mlp_effect(lm, proxy, list(held_in)[:trace_texts], subject, layers, trace_samples)
    return SentimentSweep(subject.strip(), target, list(layers), scores, effect, time.perf_counter() - started)
