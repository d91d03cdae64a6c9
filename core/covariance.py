"""Key statistics for ROME: C = E[k k^T] of the keys (inputs of the MLP output projection) at one layer.

Computed once per (model, weights, layer, corpus, size) and cached as safetensors under
`core.models.cache_dir() / "stats" / <model>-<weights fingerprint>` (`stats_folder`); the corpus is cached
there too, and so are ROME's context texts and a catalogue's subject keys. Every cache file carries a hash of
its tensors (core/tensor_cache.py): a damaged one (truncated, wrong shape, bit rot) is deleted on load and
computed again. Always computed on the model's unedited weights (`core.edits.unedited`, taken per batch),
and keyed by their fingerprint: statistics asked for in a session that holds an edit equal, bitwise, those
computed without it, so the cache never carries an edit.

Corpora:
- `generated` (default, offline): text the model samples itself from its start-of-text token, seeded.
  No download, no data file, works for any model on a fresh machine, and the keys come from the model's
  own distribution of text (what its MLPs see most), which is what C is meant to summarise.
- `wikitext`: WikiText-103 through the optional `datasets` package when the user has it (the paper used
  Wikipedia); a clear error when the package or its data is missing.
- `identity`: no corpus, C = I (plain least squares; measured against `generated` in bench/edit.py).

The tokens are at least the model's key size (fewer make C singular: `check_statistics`) and capped
(MAX_STATS_TOKENS); `statistics_seconds` gives a rough time before an uncached run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from core.edits import unedited
from core.errors import UserError
from core.generation import cache_of
from core.hooks import Hooks, stop_after
from core.models import LoadedModel, cache_dir, weights_fingerprint
from core.progress import Progress, Step, within
from core.tensor_cache import load_tensors, save_tensors

CORPORA = ("generated", "wikitext", "identity")
DEFAULT_CORPUS = "generated"
DEFAULT_TOKENS = 16_384  # keys per statistic: >10x the embedded model's key size (1536); measured 142 s CPU (1 thread)
MAX_STATS_TOKENS = 8 * DEFAULT_TOKENS  # a shared server's cap: ~20 min of CPU for the embedded model
SEQUENCE_LENGTH = 128
GENERATION_SEED = 1234
ROUGH_FLOPS = {"cpu": 50e9, "cuda": 20e12, "mps": 2e12}  # sustained rates for `statistics_seconds` (rough)


@dataclass
class KeyStatistics:
    """Second moment of the keys at one layer; `count` keys went into it."""

    layer: int
    corpus: str
    tokens: int
    mom2: torch.Tensor  # (in_features, in_features), float32
    count: int
    seconds: float  # time spent computing it now (0 when read from the cache)
    cached: bool


def _model_slug(lm: LoadedModel) -> str:
    """The model's name and its weights' fingerprint: statistics of other weights are never served."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", lm.name).strip("_") or "model"
    with unedited(lm):  # the weights before any edit: an edited session shares the unedited statistics
        return f"{slug}-{weights_fingerprint(lm)[:12]}"


def stats_folder(lm: LoadedModel) -> Path:
    return cache_dir() / "stats" / _model_slug(lm)


def stats_path(lm: LoadedModel, layer: int, corpus: str, tokens: int) -> Path:
    return stats_folder(lm) / f"mom2_layer{layer}_{corpus}_{tokens}.safetensors"


def min_statistics_tokens(lm: LoadedModel) -> int:
    """The fewest corpus tokens whose key statistics can be inverted: the model's key size (E[k k^T] over n keys
    has rank n at most, so fewer make C singular and the update solved against it moves nothing asked for)."""
    return lm.arch.mlp_out_shape(lm.model, 0)[1]


def check_statistics(lm: LoadedModel, corpus: str, tokens: int) -> None:
    """Refuse statistics that cannot be made or used: an unknown corpus, more tokens than the cap, or fewer
    than `min_statistics_tokens` (the identity "corpus" reads no tokens)."""
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}: use one of {', '.join(CORPORA)}")
    size = min_statistics_tokens(lm)
    if corpus != "identity" and tokens < size:
        raise UserError(
            f"key statistics over {tokens:,} tokens cannot be inverted: this model's keys have {size:,} dimensions, "
            f"so use at least {size:,} tokens (default {DEFAULT_TOKENS:,})"
        )
    if tokens > MAX_STATS_TOKENS:
        raise UserError(
            f"{tokens:,} tokens of statistics is over the cap of {MAX_STATS_TOKENS:,} (time grows with the tokens; "
            f"the default {DEFAULT_TOKENS:,} is enough for a key size of a few thousand)"
        )


# --- corpora -----------------------------------------------------------------------------------------------


def _start_token(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    for candidate in (tok.bos_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def generated_corpus(
    lm: LoadedModel, tokens: int, progress: Progress | None = None, step: Step = nullcontext
) -> torch.Tensor:
    """(sequences, SEQUENCE_LENGTH) token ids the model samples itself (seeded, plain sampling at T=1),
    cached on disk so every layer's statistics see the same text. Each batch runs inside `step()`."""
    length = min(SEQUENCE_LENGTH, tokens)
    sequences = -(-tokens // length)
    path = stats_folder(lm) / f"corpus_generated_{sequences}x{length}_seed{GENERATION_SEED}.safetensors"
    stored = load_tensors(path, {"input_ids": (sequences, length)})
    if stored is not None:
        return stored["input_ids"]
    batch = 64
    start = _start_token(lm)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(GENERATION_SEED)
        for first in range(0, sequences, batch):
            rows = min(batch, sequences - first)
            ids = torch.full((rows, 1), start, dtype=torch.long, device=lm.device)
            with step():
                out.append(_sample(lm, ids, length, progress, done_before=first * length, total=sequences * length))
    corpus = torch.cat(out)[:, :length].contiguous().cpu()
    save_tensors(path, {"input_ids": corpus}, {"corpus": "generated", "seed": str(GENERATION_SEED)})
    return corpus


def _sample(lm: LoadedModel, ids: torch.Tensor, length: int, progress, done_before: int, total: int) -> torch.Tensor:
    """Plain ancestral sampling with a key/value cache; returns `length` tokens per row after the start."""
    rows = ids.shape[0]
    generated = []
    past = None
    current = ids
    with torch.no_grad():
        for step in range(length):
            out = lm.model(input_ids=current, cache=past, use_cache=True)
            past = cache_of(out)
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
            current = torch.multinomial(probs, 1)
            generated.append(current)
            if progress and (step % 8 == 7 or step == length - 1):
                progress(min(total, done_before + rows * (step + 1)), total)
    return torch.cat(generated, dim=1)


def wikitext_corpus(lm: LoadedModel, tokens: int) -> torch.Tensor:
    try:
        import datasets  # optional: only when the user has it
    except ImportError:
        raise UserError("the wikitext corpus needs the `datasets` package: pip install datasets") from None
    try:
        data = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    except Exception as err:  # no data offline, or a broken install
        raise UserError(f"cannot load WikiText through `datasets` ({str(err).splitlines()[0]})") from None
    length = min(SEQUENCE_LENGTH, tokens)
    rows, need = [], -(-tokens // length)
    for record in data:
        text = record["text"].strip()
        if len(text) < 200:
            continue
        ids = lm.tokenizer(text)["input_ids"][:length]
        if len(ids) == length:
            rows.append(ids)
        if len(rows) >= need:
            break
    if not rows:
        raise UserError("WikiText gave no text long enough for the statistics")
    return torch.tensor(rows)


# --- statistics --------------------------------------------------------------------------------------------


def layer_keys(lm: LoadedModel, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The keys (inputs of the MLP output projection) at `layer` for every position: (batch, positions, in),
    running the model only up to that layer."""
    name = lm.arch.layer_name(lm.model, layer, "mlp_out")
    with torch.no_grad(), Hooks(lm.model, record_inputs=[name], detach=False) as hooks, stop_after(lm.model, name):
        lm.model(input_ids=input_ids.to(lm.device), use_cache=False)
    return hooks.inputs[name]


def _key_second_moment(
    lm: LoadedModel, layer: int, corpus: torch.Tensor, tokens: int, progress, step: Step = nullcontext
) -> tuple[torch.Tensor, int]:
    """Mean of k k^T over the first `tokens` positions of the corpus (accumulated in float64)."""
    size = lm.arch.mlp_out_shape(lm.model, layer)[1]
    mom2 = torch.zeros(size, size, dtype=torch.float64, device=lm.device)
    count, batch = 0, 16
    rows_needed = corpus[: -(-tokens // corpus.shape[1])]
    for first in range(0, rows_needed.shape[0], batch):
        with step():
            keys = layer_keys(lm, layer, rows_needed[first : first + batch]).reshape(-1, size)
        keys = keys.to(device=mom2.device, dtype=torch.float64)  # the layer may compute on another device
        keys = keys[: tokens - count]
        mom2 += keys.T @ keys
        count += keys.shape[0]
        if progress:
            progress(count, tokens)
    return (mom2 / max(count, 1)).float(), count


def key_statistics(
    lm: LoadedModel,
    layer: int,
    corpus: str = DEFAULT_CORPUS,
    tokens: int = DEFAULT_TOKENS,
    progress: Progress | None = None,
    step: Step = nullcontext,
) -> KeyStatistics:
    """E[k k^T] at `layer` over `tokens` corpus positions, from the disk cache when present. Each batch of
    model work runs inside `step()` (the app: the model's lock, taken per batch, not for the whole run)."""
    check_statistics(lm, corpus, tokens)
    if not 0 <= layer < lm.num_layers:
        raise UserError(f"layer {layer} is outside the model's {lm.num_layers} layers")
    size = lm.arch.mlp_out_shape(lm.model, layer)[1]
    if corpus == "identity":
        eye = torch.eye(size, device=lm.device)
        return KeyStatistics(layer, corpus, 0, eye, 0, 0.0, cached=True)
    path = stats_path(lm, layer, corpus, tokens)
    loaded = load_tensors(path, {"mom2": (size, size), "count": ()})
    if loaded is not None:
        mom2 = loaded["mom2"].to(lm.device)
        return KeyStatistics(layer, corpus, tokens, mom2, int(loaded["count"]), 0.0, cached=True)
    start = time.perf_counter()
    # progress: the first half is making the corpus (when not cached), the second the keys
    half = (lambda done, total: progress(done, 2 * total)) if progress else None
    second = within(progress, tokens, 2 * tokens)

    @contextmanager
    def clean_step() -> Iterator[None]:  # each batch: the caller's step (the lock), on the unedited weights
        with step(), unedited(lm):
            yield

    text = generated_corpus(lm, tokens, half, clean_step) if corpus == "generated" else wikitext_corpus(lm, tokens)
    mom2, count = _key_second_moment(lm, layer, text, tokens, second, clean_step)
    save_tensors(
        path,
        {"mom2": mom2.cpu().contiguous(), "count": torch.tensor(count)},
        {"model": lm.name, "layer": str(layer), "corpus": corpus, "tokens": str(tokens)},
    )
    return KeyStatistics(layer, corpus, tokens, mom2, count, time.perf_counter() - start, cached=False)


def statistics_cached(lm: LoadedModel, layer: int, corpus: str = DEFAULT_CORPUS, tokens: int = DEFAULT_TOKENS) -> bool:
    """Whether `key_statistics` would return at once (no corpus pass)."""
    return corpus == "identity" or stats_path(lm, layer, corpus, tokens).exists()


def statistics_seconds(lm: LoadedModel, tokens: int) -> float:
    """A rough estimate of computing key statistics over `tokens` generated tokens: sampling them one at a time
    (every layer and the logits), then reading the keys (the layers up to the key's, counted as all)."""
    device = lm.device.type if lm.device.type in ROUGH_FLOPS else "cpu"
    return 2 * 2 * tokens * lm.num_parameters / ROUGH_FLOPS[device]
