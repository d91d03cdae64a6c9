"""Sentiment: labelled texts, the "I am feeling" proxy, a linear probe on hidden states, and their reports.

The proxy (the reference experiment): append " I am feeling" to a text, read log p(" good") and log p(" bad")
at the last position, and let a logistic regression on those two numbers say positive or negative. Its
probability of the positive class, computed from last-position logits, is the metric a sentiment trace
restores (core.sentiment_trace). The probe: a logistic regression on the hidden state (a block's output) at
the same last position; `probe_layer_sweep` picks the layer by cross-validation on the training texts.

Both are fitted with scikit-learn (standardised features, balanced class weights, since tweet sets differ in
their share of positives) and kept as plain numbers (`to_dict`/`from_dict`, JSON), never pickled.
Forward passes are batched: texts sorted by length, padded on the right (so no real token ever attends to a
pad and positions stay as in a single-text run), and each row read at its own last real token.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import safetensors.numpy
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.budget import check_features
from core.errors import UserError
from core.hooks import Hooks
from core.models import LoadedModel, cache_dir, weights_fingerprint
from core.progress import Progress, within

CLASSES = ("negative", "positive")  # binary class index 0 and 1
DEFAULT_SUFFIX = " I am feeling"
DEFAULT_WORDS = (" good", " bad")  # (positive word, negative word)
DEFAULT_PROBE_C = 0.05  # inverse regularisation of the probe (576 standardised features, ~1k texts)
MAX_PROMPT_TOKENS = 256  # longer prompts keep their last tokens (the suffix always survives)


class SentimentDataError(UserError):
    """A labelled-text file is missing, unreadable or malformed; the message names the problem."""


# ----------------------------------------------------------------------------------------------- data


@dataclass
class LabelledTexts:
    """Texts with binary labels (0 negative, 1 positive); neutral rows were dropped and counted."""

    texts: list[str]
    labels: np.ndarray  # int64, 0 = negative, 1 = positive
    source: str = ""
    neutral_dropped: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASSES)}

    def subset(self, index: Sequence[int] | np.ndarray) -> "LabelledTexts":
        index = np.asarray(index, dtype=np.int64)
        return LabelledTexts([self.texts[i] for i in index], self.labels[index], self.source, 0)


_LABEL_WORDS = {"negative": 0, "neg": 0, "0": 0, "positive": 1, "pos": 1, "1": 1, "neutral": None}


def _read_frame(source: str | Path | bytes | io.IOBase, name: str) -> pd.DataFrame:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise SentimentDataError(f"the data file {name!r} does not exist")
        raw = path.read_bytes()
    elif isinstance(source, bytes):
        raw = source
    else:
        raw = source.read()
        raw = raw.encode("utf-8") if isinstance(raw, str) else raw
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SentimentDataError(f"the data file {name!r} is not UTF-8 text") from None
    if not text.strip():
        raise SentimentDataError(f"the data file {name!r} is empty")
    header = text.splitlines()[0]
    sep = "\t" if "\t" in header or name.lower().endswith(".tsv") else ","
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, csv.Error) as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        kind = "TSV" if sep == "\t" else "CSV"
        raise SentimentDataError(f"the data file {name!r} cannot be parsed as {kind} ({detail})") from None


def load_labelled(source: str | Path | bytes | io.IOBase, name: str | None = None) -> LabelledTexts:
    """Read a TSV or CSV file (a path, bytes or an uploaded file object) with a header row naming `text` and
    `label` columns; labels are negative / neutral / positive (any case) or 0 / 1. Neutral rows are dropped
    (the proxy and probe are binary). The separator is a tab when the header has one, else a comma.

    Raises SentimentDataError (a UserError) naming the file and the first problem found."""
    name = name or (str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "upload"))
    frame = _read_frame(source, name)
    columns = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        found = ", ".join(repr(str(c)) for c in frame.columns) or "none"
        raise SentimentDataError(
            f"the data file {name!r} needs a header row with columns 'text' and 'label' (found {found})"
        )
    texts_col, labels_col = frame[columns["text"]], frame[columns["label"]]
    texts: list[str] = []
    labels: list[int] = []
    neutral = 0
    for row, (text, label) in enumerate(zip(texts_col, labels_col), start=2):  # row 1 is the header
        key = str(label).strip().lower()
        if key not in _LABEL_WORDS:
            raise SentimentDataError(
                f"row {row} of {name!r} has the label {str(label)!r}; use negative, neutral, positive, 0 or 1"
            )
        if not str(text).strip():
            raise SentimentDataError(f"row {row} of {name!r} has an empty text")
        value = _LABEL_WORDS[key]
        if value is None:
            neutral += 1
            continue
        texts.append(str(text).strip())
        labels.append(value)
    if not texts:
        raise SentimentDataError(f"the data file {name!r} has no positive or negative rows")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64), name, neutral)


def project_texts_path() -> Path:
    """The labelled set written for this project (offline default for fitting the proxy, and for tests)."""
    return Path(__file__).resolve().parent.parent / "data" / "sentiment_texts.tsv"


def load_project_texts() -> LabelledTexts:
    return load_labelled(project_texts_path(), name="data/sentiment_texts.tsv")


# ----------------------------------------------------------------------------------------- features


def word_ids(lm: LoadedModel, words: Sequence[str] = DEFAULT_WORDS) -> tuple[int, int]:
    """The token ids of the (positive, negative) word pair; each word must be exactly one token."""
    if len(words) != 2:
        raise UserError(f"the proxy needs exactly two words (positive, negative), got {len(words)}")
    ids = []
    for word in words:
        if not word or not word.strip():
            raise UserError("a proxy word is empty")
        encoded = lm.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = [lm.tokenizer.decode([i]) for i in encoded]
            raise UserError(
                f"the proxy word {word!r} is {len(encoded)} tokens for {lm.name} ({pieces}); pick a single-token "
                f"word (usually with a leading space, e.g. ' good')"
            )
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise UserError(f"the proxy words {words[0]!r} and {words[1]!r} are the same token")
    return ids[0], ids[1]


def make_prompt(text: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """The text the model reads: the text (surrounding white space removed) followed by the suffix."""
    return text.strip() + suffix


@dataclass
class Features:
    """What one pass over the texts read at each prompt's last real token."""

    final: np.ndarray  # (n, hidden size): the last state after the final norm (what the unembedding reads)
    hidden: dict[int, np.ndarray]  # layer -> (n, hidden size): the block's output
    tokens: int  # real (unpadded) tokens read
    seconds: float  # forward time spent now (0 when everything came from the disk cache)
    cached: bool = False

    def __len__(self) -> int:
        return len(self.final)

    def feeling(self, lm: LoadedModel, words: Sequence[str] = DEFAULT_WORDS) -> np.ndarray:
        """(n, 2): log p(positive word), log p(negative word) at the last token."""
        ids = list(word_ids(lm, words))
        head = lm.model.get_submodule(lm.arch.lm_head)
        out = []
        with torch.no_grad():
            for chunk in np.array_split(np.arange(len(self)), max(1, len(self) // 256)):
                state = torch.from_numpy(self.final[chunk]).to(device=lm.device, dtype=lm.dtype)
                out.append(torch.log_softmax(head(state).double(), dim=-1)[:, ids].cpu().numpy())
        return np.concatenate(out)

    @property
    def texts_per_second(self) -> float | None:
        return len(self) / self.seconds if self.seconds > 0 and not self.cached else None


def _batches(lengths: Sequence[int], batch_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length whose padded size stays within `batch_tokens`."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, widest = [], [], 0
    for i in order:
        wider = max(widest, lengths[i])
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * wider > batch_tokens):
            batches.append(np.asarray(current))
            current, wider = [], lengths[i]
        current.append(i)
        widest = wider
    if current:
        batches.append(np.asarray(current))
    return batches


def tokenize_prompts(lm: LoadedModel, texts: Sequence[str], suffix: str = DEFAULT_SUFFIX) -> list[list[int]]:
    """Each text + suffix tokenised as the tokenizer does by default (as tracing does), keeping the last
    MAX_PROMPT_TOKENS tokens of very long texts."""
    encoded = lm.tokenizer([make_prompt(t, suffix) for t in texts])["input_ids"]
    return [list(ids[-MAX_PROMPT_TOKENS:]) for ids in encoded]


def _check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    layers = sorted(set(int(l) for l in layers))
    for layer in layers:
        if not 0 <= layer < lm.num_layers:
            raise UserError(f"layer {layer} does not exist: {lm.name} has layers 0 to {lm.num_layers - 1}")
    return layers


@torch.no_grad()
def read_texts(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int] = (),
    suffix: str = DEFAULT_SUFFIX,
    batch_tokens: int = 4096,
    max_rows: int = 64,
    progress: Progress | None = None,
) -> Features:
    """Batched forward passes over text + suffix: the final state and, for each layer in `layers`, the
    block's output, all at each prompt's last real token."""
    if not texts:
        raise UserError("there are no texts to read")
    layers = _check_layers(lm, layers)
    check_features(lm, len(texts), len(layers))
    prompts = tokenize_prompts(lm, texts, suffix)
    lengths = [len(p) for p in prompts]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    model, device = lm.model, lm.device
    final = np.zeros((len(texts), lm.hidden_size), dtype=np.float32)
    hidden = {layer: np.zeros((len(texts), lm.hidden_size), dtype=np.float32) for layer in layers}
    names = {lm.arch.layer_name(model, layer, "hidden"): layer for layer in layers}
    start = time.perf_counter()
    done = 0
    if progress:
        progress(0, len(texts))
    for batch in _batches(lengths, batch_tokens, max_rows):
        width = max(lengths[i] for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: real tokens never attend to a pad
            input_ids[row, : lengths[i]] = torch.tensor(prompts[i])
            mask[row, : lengths[i]] = 1
        rows = torch.arange(len(batch), device=device)
        last = torch.tensor([lengths[i] - 1 for i in batch], device=device)
        picked: dict[int, torch.Tensor] = {}

        def at_last(tensor: torch.Tensor) -> torch.Tensor:  # each row's last real token, on the CPU
            return tensor[rows.to(tensor.device), last.to(tensor.device)].float().cpu()

        def keep_last(tensor: torch.Tensor, name: str) -> None:
            picked[names[name]] = at_last(tensor)

        with Hooks(model, edit={name: keep_last for name in names}):
            out = model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
        final[batch] = at_last(out.last_hidden_state).numpy()
        for layer in layers:
            hidden[layer][batch] = picked[layer].numpy()
        done += len(batch)
        if progress:
            progress(done, len(texts))
    return Features(final, hidden, int(sum(lengths)), time.perf_counter() - start)


def _features_cache_file(lm: LoadedModel, texts: Sequence[str], suffix: str) -> Path:
    digest = hashlib.sha256()
    for part in (lm.name, weights_fingerprint(lm), suffix, str(MAX_PROMPT_TOKENS), str(lm.num_layers), *texts):
        digest.update(part.encode("utf-8") + b"\0")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name)[-60:]
    return cache_dir() / "sentiment" / "features" / f"{safe}-{digest.hexdigest()[:24]}.safetensors"


def extract_features(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int] = (),
    suffix: str = DEFAULT_SUFFIX,
    cache: bool = False,
    progress: Progress | None = None,
    **batching,
) -> Features:
    """`read_texts`, optionally through a disk cache (safetensors in the user cache folder, keyed by model,
    suffix, texts and a fingerprint of the weights edits change): a cached read holds every layer, so
    switching between proxy, probe and layers costs no forward pass."""
    layers = _check_layers(lm, layers)
    if not cache:
        return read_texts(lm, texts, layers, suffix, progress=progress, **batching)
    path = _features_cache_file(lm, texts, suffix)
    if path.is_file():
        try:
            stored = safetensors.numpy.load_file(str(path))
            hidden = {layer: stored["hidden"][layer] for layer in layers}
            if progress:
                progress(len(texts), len(texts))
            return Features(stored["final"], hidden, int(stored["tokens"][0]), 0.0, cached=True)
        except Exception:  # a damaged cache file is recomputed
            path.unlink(missing_ok=True)
    features = read_texts(lm, texts, range(lm.num_layers), suffix, progress=progress, **batching)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.partial")  # written whole, then renamed: never half a file
    safetensors.numpy.save_file(
        {
            "final": features.final,
            "hidden": np.stack([features.hidden[l] for l in range(lm.num_layers)]),
            "tokens": np.asarray([features.tokens], dtype=np.int64),
        },
        str(tmp),
    )
    tmp.replace(path)
    features.hidden = {layer: features.hidden[layer] for layer in layers}
    return features


# ------------------------------------------------------------------------------------ linear readers


@dataclass
class LinearReader:
    """A fitted logistic regression on standardised features, kept as plain numbers:
    p(positive) = sigmoid(((x - mean) / scale) . coef + intercept)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float = 1.0) -> "LinearReader":
        y = np.asarray(y)
        if len(set(y.tolist())) < 2:
            raise UserError("the training texts need both positive and negative examples")
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        pipe.fit(x, y)
        scaler, logistic = pipe[0], pipe[1]
        return cls(
            mean=scaler.mean_.astype(np.float64),
            scale=scaler.scale_.astype(np.float64),
            coef=logistic.coef_[0].astype(np.float64),
            intercept=float(logistic.intercept_[0]),
        )

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def positive_probability(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(x)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision(x) > 0).astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LinearReader":
        return cls(
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
            np.asarray(data["coef"], dtype=np.float64),
            float(data["intercept"]),
        )


@dataclass
class FeelingProxy:
    """The "I am feeling" proxy: a logistic regression on log p(positive word), log p(negative word)."""

    model_name: str
    words: tuple[str, str]
    word_ids: tuple[int, int]
    suffix: str
    reader: LinearReader

    @classmethod
    def fit(
        cls,
        lm: LoadedModel,
        features: Features,
        labels: np.ndarray,
        words: Sequence[str] = DEFAULT_WORDS,
        suffix: str = DEFAULT_SUFFIX,
    ) -> "FeelingProxy":
        """Fit on features read with the same `words` and `suffix`."""
        reader = LinearReader.fit(features.feeling(lm, words), labels)
        return cls(lm.name, (words[0], words[1]), word_ids(lm, words), suffix, reader)

    def predict(self, lm: LoadedModel, features: Features) -> np.ndarray:
        return self.reader.predict(features.feeling(lm, self.words))

    def positive_probability_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The trace metric: (rows, vocab) last-position logits -> (rows,) probability of the positive class."""
        logp = torch.log_softmax(logits.double(), dim=-1)[:, list(self.word_ids)]
        r = self.reader
        mean = torch.as_tensor(r.mean, device=logits.device)
        scale = torch.as_tensor(r.scale, device=logits.device)
        coef = torch.as_tensor(r.coef, device=logits.device)
        return torch.sigmoid(((logp - mean) / scale) @ coef + r.intercept).to(logits.dtype)

    def to_dict(self) -> dict:
        return {
            "kind": "feeling",
            "model": self.model_name,
            "words": list(self.words),
            "word_ids": list(self.word_ids),
            "suffix": self.suffix,
            "reader": self.reader.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FeelingProxy":
        return cls(
            data["model"],
            tuple(data["words"]),
            tuple(data["word_ids"]),
            data["suffix"],
            LinearReader.from_dict(data["reader"]),
        )


@dataclass
class HiddenProbe:
    """A linear probe: logistic regression on the block-`layer` output at the prompt's last token."""

    model_name: str
    layer: int
    suffix: str
    reader: LinearReader
    c: float = DEFAULT_PROBE_C

    @classmethod
    def fit(
        cls,
        lm: LoadedModel,
        features: Features,
        labels: np.ndarray,
        layer: int,
        suffix: str = DEFAULT_SUFFIX,
        c: float = DEFAULT_PROBE_C,
    ) -> "HiddenProbe":
        if layer not in features.hidden:
            raise ValueError(f"the features hold no hidden states of layer {layer}")
        return cls(lm.name, layer, suffix, LinearReader.fit(features.hidden[layer], labels, c=c), c)

    def predict(self, lm: LoadedModel, features: Features) -> np.ndarray:
        return self.reader.predict(features.hidden[self.layer])

    def to_dict(self) -> dict:
        return {
            "kind": "probe",
            "model": self.model_name,
            "layer": self.layer,
            "suffix": self.suffix,
            "c": self.c,
            "reader": self.reader.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HiddenProbe":
        return cls(
            data["model"],
            int(data["layer"]),
            data["suffix"],
            LinearReader.from_dict(data["reader"]),
            float(data.get("c", DEFAULT_PROBE_C)),
        )


def probe_layer_sweep(
    features: Features, labels: np.ndarray, folds: int = 5, c: float = DEFAULT_PROBE_C, progress: Progress | None = None
) -> dict[int, float]:
    """Cross-validated accuracy (on the training texts only) of a probe at each layer in `features.hidden`."""
    labels = np.asarray(labels)
    smallest = int(min(np.bincount(labels, minlength=2)))
    if smallest < 2:
        raise UserError("the layer sweep needs at least two positive and two negative training texts")
    splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=0)
    result: dict[int, float] = {}
    layers = sorted(features.hidden)
    for done, layer in enumerate(layers, start=1):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        result[layer] = float(cross_val_score(pipe, features.hidden[layer], labels, cv=splitter).mean())
        if progress:
            progress(done, len(layers))
    return result


# ------------------------------------------------------------------------------------------ reports


@dataclass
class SentimentReport:
    """How a proxy or probe did on labelled test texts."""

    proxy: str  # "feeling" or "probe"
    accuracy: float
    n: int
    counts: dict[str, int]  # true class -> texts
    confusion: list[list[int]]  # rows: true negative/positive; columns: predicted negative/positive
    seconds: float  # everything: reading the texts with the model, fitting, predicting
    forward_seconds: float  # the model's forward passes over training and test texts
    texts_per_second: float | None  # texts read by the model now (not from the cache) per forward second
    n_train: int
    train_accuracy: float
    layer: int | None = None
    layer_sweep: dict[int, float] = field(default_factory=dict)  # probe: layer -> cross-validated train accuracy
    reader: dict = field(default_factory=dict)  # the fitted proxy/probe (to_dict)
    cached: bool = False  # some texts' features came from the disk cache (no forward time for them)

    def as_dict(self) -> dict:
        return {
            "proxy": self.proxy,
            "accuracy": self.accuracy,
            "n": self.n,
            "counts": self.counts,
            "confusion": self.confusion,
            "confusion_labels": list(CLASSES),
            "seconds": self.seconds,
            "forward_seconds": self.forward_seconds,
            "texts_per_second": self.texts_per_second,
            "n_train": self.n_train,
            "train_accuracy": self.train_accuracy,
            "layer": self.layer,
            "layer_sweep": self.layer_sweep,
            "cached": self.cached,
            "reader": self.reader,
        }


def confusion(labels: np.ndarray, predicted: np.ndarray) -> list[list[int]]:
    table = np.zeros((2, 2), dtype=np.int64)
    np.add.at(table, (np.asarray(labels), np.asarray(predicted)), 1)
    return table.tolist()


def evaluate(
    lm: LoadedModel,
    train: LabelledTexts,
    test: LabelledTexts,
    proxy: str = "feeling",
    layer: int | None = None,
    words: Sequence[str] = DEFAULT_WORDS,
    suffix: str = DEFAULT_SUFFIX,
    cache: bool = False,
    progress: Progress | None = None,
) -> SentimentReport:
    """Fit the proxy ("feeling") or the probe ("probe"; `layer=None` sweeps every layer by cross-validation on
    `train` and keeps the best) on `train`, then report on `test`. progress(done, total) counts texts read;
    `cache` keeps what the model read on disk (see extract_features)."""
    if proxy not in ("feeling", "probe"):
        raise UserError(f"unknown proxy {proxy!r}: use feeling or probe")
    if proxy == "feeling" and layer is not None:
        raise UserError("--layer applies to the probe only")
    if layer is not None and not 0 <= layer < lm.num_layers:
        raise UserError(f"layer {layer} does not exist: {lm.name} has layers 0 to {lm.num_layers - 1}")
    word_ids(lm, words)  # fail before any work on a bad word pair
    if len(set(train.labels.tolist())) < 2:
        raise UserError("the training texts need both positive and negative examples")
    start = time.perf_counter()
    total = len(train) + len(test)
    if proxy == "feeling":
        train_layers: Sequence[int] = ()
    else:
        train_layers = range(lm.num_layers) if layer is None else (layer,)
    train_features = extract_features(lm, train.texts, train_layers, suffix, cache, within(progress, 0, total))
    sweep: dict[int, float] = {}
    if proxy == "feeling":
        reader = FeelingProxy.fit(lm, train_features, train.labels, words, suffix)
        test_layers: Sequence[int] = ()
    else:
        if layer is None:
            sweep = probe_layer_sweep(train_features, train.labels)
            layer = max(sweep, key=lambda l: (sweep[l], -l))
        reader = HiddenProbe.fit(lm, train_features, train.labels, layer, suffix)
        test_layers = (layer,)
    test_features = extract_features(lm, test.texts, test_layers, suffix, cache, within(progress, len(train), total))
    predicted = reader.predict(lm, test_features)
    train_accuracy = float((reader.predict(lm, train_features) == train.labels).mean())
    forward = train_features.seconds + test_features.seconds
    computed = sum(len(f) for f in (train_features, test_features) if not f.cached)
    return SentimentReport(
        proxy=proxy,
        accuracy=float((predicted == test.labels).mean()),
        n=len(test),
        counts=test.counts(),
        confusion=confusion(test.labels, predicted),
        seconds=time.perf_counter() - start,
        forward_seconds=forward,
        texts_per_second=computed / forward if computed and forward > 0 else None,
        cached=computed < total,
        n_train=len(train),
        train_accuracy=train_accuracy,
        layer=layer if proxy == "probe" else None,
        layer_sweep=sweep,
        reader=reader.to_dict(),
    )
