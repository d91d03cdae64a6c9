"""The fast causal-tracing engine: the naive engine's numbers, computing only what a restoration changes.

A restoration at (position i, layer l) cannot change any state at positions < i, nor any state below the
first restored layer. So for every cell we reuse the corrupted run's states there, and compute only
  - the `samples` corrupted rows (the clean row is recorded once),
  - positions >= i, attending to the corrupted run's recorded keys/values of positions < i,
  - blocks from the first restored layer up (l + 1 for `hidden`; the window's first layer for mlp/attn),
  - the last position's logits.
Cells before the corrupted span see no noise at all: they equal the low score.

Cells of one position are batched by layer: walking up the blocks, the cells whose computation starts at a
block join the batch there, so every block runs once per position on all the cells that need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.forward import PrefixCache, final_logits, record_kv, run_blocks, slice_prefix
from core.hooks import Hooks
from core.tracing import Progress, TraceSetup, _add_noise_hook, window_layers


@dataclass
class RecordedRuns:
    """States of the clean run (1 row) and of the corrupted run (`samples` rows)."""

    block_inputs: list[torch.Tensor]  # corrupted input of each block, (samples, T, H)
    block_outputs: list[torch.Tensor]  # corrupted output of each block
    clean_outputs: dict[str, list[torch.Tensor]]  # kind -> per layer clean module output (1, T, H)
    kv: dict  # corrupted run's keys/values per layer


def record_runs(setup: TraceSetup, kinds: tuple[str, ...] = ("hidden", "mlp", "attn")) -> RecordedRuns:
    lm = setup.lm
    layers = lm.num_layers
    names = {kind: [lm.arch.layer_name(lm.model, l, kind) for l in range(layers)] for kind in kinds}
    blocks = [lm.arch.layer_name(lm.model, l) for l in range(layers)]
    ids = setup.input_ids
    with torch.no_grad():
        with Hooks(lm.model, record=[n for kind in kinds for n in names[kind]]) as clean:
            lm.model(input_ids=ids, use_cache=False)
        edits = {lm.arch.embed: _add_noise_hook(setup, first_row=0)}
        with Hooks(lm.model, edit=edits, record=blocks, record_inputs=blocks) as corrupted:
            out = lm.model(input_ids=ids.repeat(setup.samples, 1), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return RecordedRuns(
        block_inputs=[corrupted.inputs[n] for n in blocks],
        block_outputs=[corrupted.outputs[n] for n in blocks],
        clean_outputs={kind: [clean.outputs[n] for n in names[kind]] for kind in kinds},
        kv=record_kv(cache),
    )


def _scores_of(setup: TraceSetup, states: torch.Tensor, cells: int) -> np.ndarray:
    """Mean metric per cell from the last-layer states (cells * samples, positions, H)."""
    logits = final_logits(setup.lm, states[:, -1])
    return setup.metric(logits).reshape(cells, setup.samples).mean(dim=1).double().cpu().numpy()


def hidden_row(setup: TraceSetup, runs: RecordedRuns, position: int) -> np.ndarray:
    """Scores of all cells (position, l): block l's output restored at `position`."""
    lm = setup.lm
    layers = lm.num_layers
    prefix = slice_prefix(runs.kv, position)
    clean = runs.clean_outputs["hidden"]
    states = None
    for layer in range(layers):
        joining = runs.block_outputs[layer][:, position:].clone()
        joining[:, 0] = clean[layer][0, position]
        states = joining if states is None else torch.cat([states, joining])
        if layer + 1 < layers:
            cells = layer + 1
            states = run_blocks(
                lm, states, layer + 1, layer + 2, position, PrefixCache(prefix, repeat=cells) if position else None
            )
    return _scores_of(setup, states, layers)


def window_row(setup: TraceSetup, runs: RecordedRuns, position: int, kind: str) -> np.ndarray:
    """Scores of all cells (position, l): the `kind` module's output restored at `position` in every layer of
    l's window."""
    lm = setup.lm
    layers = lm.num_layers
    windows = [window_layers(layer, setup.window, layers) for layer in range(layers)]
    prefix = slice_prefix(runs.kv, position)
    clean = runs.clean_outputs[kind]
    samples = setup.samples
    states = None
    cells = 0
    for block in range(layers):
        joining = [cell for cell in range(layers) if windows[cell].start == block]
        if joining:
            new = runs.block_inputs[block][:, position:].repeat(len(joining), 1, 1)
            states = new if states is None else torch.cat([states, new])
            cells += len(joining)
        if states is None:
            continue
        restore_rows = torch.tensor(
            [block in windows[cell] for cell in range(cells) for _ in range(samples)], device=states.device
        )

        def restore(x: torch.Tensor, name: str, block=block, rows=restore_rows) -> None:
            x[rows, 0] = clean[block][0, position]

        module = lm.arch.layer_name(lm.model, block, kind)
        with Hooks(lm.model, edit={module: restore}):
            states = run_blocks(
                lm, states, block, block + 1, position, PrefixCache(prefix, repeat=cells) if position else None
            )
    return _scores_of(setup, states, layers)


def fast_kind(
    setup: TraceSetup, kind: str, progress: Progress | None = None, runs: RecordedRuns | None = None
) -> np.ndarray:
    """The (tokens, layers) table for `kind`, equal to the naive engine's to float precision."""
    lm = setup.lm
    tokens, layers = setup.num_tokens, lm.num_layers
    runs = runs or record_runs(setup, (kind,))
    table = np.full((tokens, layers), setup.low_score)
    first = setup.corrupt_range[0]
    with torch.no_grad():
        for position in range(tokens):
            if position >= first:
                if kind == "hidden":
                    table[position] = hidden_row(setup, runs, position)
                else:
                    table[position] = window_row(setup, runs, position, kind)
            if progress:
                progress(position + 1, tokens)
    return table
