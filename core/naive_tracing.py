"""The naive causal-tracing engine: the paper's algorithm (`trace_important_states` /
`trace_important_window`), one full forward of 1 + samples rows per cell. Slow; kept as the oracle that the
other engines are measured against."""

from __future__ import annotations

import numpy as np

from core.trace_setup import Progress, TraceSetup, naive_scores, window_layers


def naive_kind(setup: TraceSetup, kind: str, progress: Progress | None = None, runs=None, on_row=None) -> np.ndarray:
    """The (tokens, layers) table of `kind`, one forward per cell (`runs` is unused: this engine records
    nothing ahead). on_row(position, row) is called with each finished row."""
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
        if on_row:
            on_row(position, table[position])
        if progress:
            progress(position + 1, setup.num_tokens)
    return table
