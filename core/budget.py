"""What long work costs, and the caps that keep one request from taking a shared server.

A causal trace of T prompt tokens, corrupted from token s, on a model of L layers with S noisy copies:
- memory: the recorded clean and corrupted runs, about 2 x L x (S + 1) x T x hidden numbers per kind;
- time: the fast engine evaluates about S x (T - s)^2 / 2 x L^2 / 2 block-positions per kind (cells before
  the corrupted span are free), plus one position's logits per restored cell and copy.
A trace is refused when its prompt is longer than the model's context or its memory estimate is over the cap
(`ROME_STUDIO_MAX_TRACE_MB`); the time estimate is shown before it runs. Reading texts for the sentiment fit
keeps every layer's last state of every text (so switching probes costs no forward pass): capped the same
way (`ROME_STUDIO_MAX_FEATURES_MB`). Key statistics are capped in tokens (MAX_STATS_TOKENS, core.covariance);
`statistics_seconds` estimates them (sampling the corpus, then a forward pass over it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.errors import UserError
from core.models import LoadedModel

DEFAULT_TRACE_MB = 2048  # the recorded runs of one trace (the embedded model: ~1.5 MB a token and kind)
DEFAULT_FEATURES_MB = 1024  # what one sentiment read keeps (the embedded model: ~71 KB a text)
ROUGH_FLOPS = {"cpu": 50e9, "cuda": 20e12, "mps": 2e12}  # sustained rates for the time estimate (rough)
CELL_OVERHEAD = {"cpu": 0.03, "cuda": 0.005, "mps": 0.01}  # seconds of fixed work per restored (token, layer) cell


def _cap_mb(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else default


def context_length(lm: LoadedModel) -> int | None:
    """The most tokens the model reads at once (its position table), or None when it does not say."""
    config = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class TraceCost:
    """The estimate of one trace (all its kinds)."""

    tokens: int
    kinds: int
    block_positions: int  # block evaluations at one position of one copy
    memory_bytes: int  # the recorded clean and corrupted runs
    seconds: float  # at ROUGH_FLOPS for the model's device: a rough guide, not a promise

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens, {self.kinds} kind{'s' if self.kinds != 1 else ''}: about "
            f"{_duration(self.seconds)} and {self.memory_bytes / 2**20:,.0f} MB"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def trace_cost(
    lm: LoadedModel, num_tokens: int, corrupt_start: int = 0, samples: int = 10, kinds: int = 3
) -> TraceCost:
    """The memory and time estimate of a trace (see the module docstring)."""
    layers, hidden = lm.num_layers, lm.hidden_size
    traced = max(num_tokens - corrupt_start, 0)
    block_positions = samples * traced * (traced + 1) // 2 * layers * (layers + 1) // 2 * kinds
    embedding = lm.model.get_submodule(lm.arch.embed).weight
    per_block = max((lm.num_parameters - 2 * embedding.numel()) / layers, 1)  # multiply-adds per position
    logits = samples * traced * layers * kinds * embedding.numel()
    flops = 2 * (block_positions * per_block + logits)
    device = lm.device.type if lm.device.type in ROUGH_FLOPS else "cpu"
    seconds = flops / ROUGH_FLOPS[device] + traced * layers * kinds * CELL_OVERHEAD[device]
    memory = 2 * layers * (samples + 1) * num_tokens * hidden * lm.dtype.itemsize * kinds
    return TraceCost(num_tokens, kinds, block_positions, memory, seconds)


def check_trace(
    lm: LoadedModel, num_tokens: int, corrupt_start: int = 0, samples: int = 10, kinds: int = 3
) -> TraceCost:
    """The trace's cost, or a UserError saying in one line why it is refused (longer than the model's
    context, or its recorded runs over the memory cap)."""
    context = context_length(lm)
    if context is not None and num_tokens > context:
        raise UserError(f"the prompt is {num_tokens} tokens; {lm.name} reads at most {context}: shorten it")
    cost = trace_cost(lm, num_tokens, corrupt_start, samples, kinds)
    cap = _cap_mb("ROME_STUDIO_MAX_TRACE_MB", DEFAULT_TRACE_MB)
    if cost.memory_bytes > cap * 2**20:
        raise UserError(
            f"this trace would hold {cost.memory_bytes / 2**20:,.0f} MB of recorded states ({num_tokens} tokens x "
            f"{samples} samples x {kinds} kinds x {lm.num_layers} layers), over the {cap:,} MB cap: shorten the "
            "prompt, or use fewer samples or kinds"
        )
    return cost


def statistics_seconds(lm: LoadedModel, tokens: int) -> float:
    """A rough estimate of computing key statistics over `tokens` generated tokens: sampling them one at a time
    (every layer and the logits), then reading the keys (the layers up to the key's, counted as all)."""
    device = lm.device.type if lm.device.type in ROUGH_FLOPS else "cpu"
    return 2 * 2 * tokens * lm.num_parameters / ROUGH_FLOPS[device]


def check_features(lm: LoadedModel, num_texts: int, layers: int) -> int:
    """Bytes that reading `num_texts` texts keeps (the final state and `layers` layers' states per text), or a
    UserError when that is over the cap."""
    size = num_texts * (layers + 1) * lm.hidden_size * 4
    cap = _cap_mb("ROME_STUDIO_MAX_FEATURES_MB", DEFAULT_FEATURES_MB)
    if size > cap * 2**20:
        per_text = (layers + 1) * lm.hidden_size * 4 / 1024
        raise UserError(
            f"{num_texts:,} texts would keep {size / 2**20:,.0f} MB of states ({per_text:,.0f} KB a text), over the "
            f"{cap:,} MB cap: use at most {cap * 2**20 // int(per_text * 1024):,} texts"
        )
    return size
