"""Caps that keep one request from taking a shared server: each refuses over-large work in one line, before it.

- A causal trace with an exact engine records the clean and corrupted runs, about 2 x L x (S + 1) x T x hidden
  numbers per kind (T prompt tokens, L layers, S noisy copies): refused when the prompt is longer than the
  model's context or that memory is over the cap (`ROME_STUDIO_MAX_TRACE_MB`).
- Reading texts for the sentiment fit keeps every layer's last state of every text (so switching probes costs
  no forward pass): capped the same way (`ROME_STUDIO_MAX_FEATURES_MB`).
- Key statistics are capped in tokens (MAX_STATS_TOKENS, core.covariance).

How long a trace takes is core/trace_cost.py's one forecast (multiply-adds at a measured rate), not this
module's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.errors import UserError
from core.models import LoadedModel

DEFAULT_TRACE_MB = 2048  # the recorded runs of one trace (the embedded model: ~1.5 MB a token and kind)
DEFAULT_FEATURES_MB = 1024  # what one sentiment read keeps (the embedded model: ~71 KB a text)


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
class TraceSize:
    """What one trace (all its kinds) keeps in memory, against the cap."""

    tokens: int
    kinds: int
    memory_bytes: int  # the recorded clean and corrupted runs
    cap_bytes: int

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens, {self.kinds} kind{'s' if self.kinds != 1 else ''}: "
            f"{self.memory_bytes / 2**20:,.0f} MB of recorded states (cap {self.cap_bytes / 2**20:,.0f} MB)"
        )


def trace_size(lm: LoadedModel, num_tokens: int, *, samples: int = 10, kinds: int = 3) -> TraceSize:
    """The memory of a trace's recorded runs (see the module docstring)."""
    memory = 2 * lm.num_layers * (samples + 1) * num_tokens * lm.hidden_size * lm.dtype.itemsize * kinds
    cap = _cap_mb("ROME_STUDIO_MAX_TRACE_MB", DEFAULT_TRACE_MB) * 2**20
    return TraceSize(num_tokens, kinds, memory, cap)


def check_trace(lm: LoadedModel, num_tokens: int, *, samples: int = 10, kinds: int = 3) -> TraceSize:
    """The trace's size, or a UserError saying in one line why it is refused (longer than the model's
    context, or its recorded runs over the memory cap)."""
    context = context_length(lm)
    if context is not None and num_tokens > context:
        raise UserError(f"the prompt is {num_tokens} tokens; {lm.name} reads at most {context}: shorten it")
    size = trace_size(lm, num_tokens, samples=samples, kinds=kinds)
    if size.memory_bytes > size.cap_bytes:
        raise UserError(
            f"this trace would hold {size.memory_bytes / 2**20:,.0f} MB of recorded states ({num_tokens} tokens x "
            f"{samples} samples x {kinds} kinds x {lm.num_layers} layers), over the {size.cap_bytes // 2**20:,} MB "
            "cap: shorten the prompt, or use fewer samples or kinds"
        )
    return size


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
