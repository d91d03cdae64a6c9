"""The fast causal-tracing engine: the naive engine's numbers, computing only what a restoration changes.

A restoration at (position i, layer l) cannot change any state at positions < i, nor any state below the
first restored layer. So for every cell we reuse the corrupted run's states there, and compute only
  - the `samples` corrupted rows (the clean row is recorded once),
  - positions >= i, attending to the corrupted run's recorded keys/values of positions < i,
  - blocks above the restored one (`hidden`); for mlp/attn the window's first block on position i alone
    (later positions there are still the corrupted run's), then the blocks above it,
  - MLP outputs that are read: not position i's where an `mlp` restoration overwrites it, and in the last
    block only the last position's,
  - the last position's logits.
Cells before the corrupted span see no noise at all: they equal the corrupted score. Windowed cells that start at
the same block (the first window//2 + 1 layers) are one computation until their windows part.

Cells of one position are batched by layer: walking up the blocks, the cells whose computation starts at a
block join the batch there, so every block runs once per position on all the cells that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from core.forward import PrefixCache, final_logits, record_kv, run_blocks, slice_prefix
from core.hooks import Hooks
from core.trace_setup import Progress, TraceSetup, add_noise_hook, window_layers


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
        edits = {lm.arch.embed: add_noise_hook(setup, first_row=0)}
        with Hooks(lm.model, edit=edits, record=blocks, record_inputs=blocks) as corrupted:
            out = lm.model(input_ids=ids.repeat(setup.samples, 1), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    home = lm.device  # where the engine keeps its states (blocks on other devices get theirs moved)
    return RecordedRuns(
        block_inputs=[corrupted.inputs[n].to(home) for n in blocks],
        block_outputs=[corrupted.outputs[n].to(home) for n in blocks],
        clean_outputs={kind: [clean.outputs[n].to(home) for n in names[kind]] for kind in kinds},
        kv=record_kv(cache),
    )


@contextmanager
def mlp_only_where(setup: TraceSetup, block: int, skip_first_rows: int = 0) -> Iterator[None]:
    """While open, block `block`'s MLP computes only the outputs that are read and gives zeros for the rest:
    in the last block only the last position's (nothing else reaches the logits); and not position 0 of the
    first `skip_first_rows` rows (an `mlp` restoration overwrites them)."""
    lm = setup.lm
    last_only = block == lm.num_layers - 1
    if not last_only and not skip_first_rows:
        yield
        return
    mlp = lm.model.get_submodule(lm.arch.layer_name(lm.model, block, "mlp"))
    own = mlp.__dict__.get("forward")
    forward = mlp.forward
    skip = skip_first_rows

    def partial(x: torch.Tensor) -> torch.Tensor:
        rows, positions = x.shape[:2]
        out = torch.zeros_like(x)
        if positions > 1:
            later = x[:, -1:] if last_only else x[:, 1:]
            out[:, -later.shape[1] :] = forward(later.contiguous())
        if (positions == 1 or not last_only) and skip < rows:  # rows whose first position is read
            out[skip:, :1] = forward(x[skip:, :1].contiguous())
        return out

    mlp.forward = partial
    try:
        yield
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own


def _scores_of(setup: TraceSetup, states: torch.Tensor, cells: int) -> np.ndarray:
    """Mean metric per cell from the last-layer states (cells * samples, positions, H)."""
    logits = final_logits(setup.lm, states[:, -1])
    return setup.metric(logits).reshape(cells, setup.samples).mean(dim=1).double().cpu().numpy()


def hidden_row(setup: TraceSetup, runs: RecordedRuns, position: int, layers: Sequence[int] | None = None) -> np.ndarray:
    """Scores of the cells (position, l) for l in `layers` (default all): block l's output restored at
    `position`."""
    lm = setup.lm
    num_layers = lm.num_layers
    chosen = sorted(set(range(num_layers) if layers is None else layers))
    prefix = slice_prefix(runs.kv, position)
    clean = runs.clean_outputs["hidden"]
    states = None
    cells = 0
    wanted = set(chosen)
    for layer in range(chosen[0], num_layers):
        if layer in wanted:
            joining = runs.block_outputs[layer][:, position:].clone()
            joining[:, 0] = clean[layer][0, position]
            states = joining if states is None else torch.cat([states, joining])
            cells += 1
        if layer + 1 < num_layers:
            with mlp_only_where(setup, layer + 1):
                states = run_blocks(
                    lm, states, layer + 1, layer + 2, position, PrefixCache(prefix, repeat=cells) if position else None
                )
    return _scores_of(setup, states, cells)


@dataclass
class _Unit:
    """Cells whose states are still identical (same restored layers so far), computed as one."""

    cells: list[int]
    states: torch.Tensor  # (samples, positions >= i, H)


def _restored_block(
    setup: TraceSetup, runs: RecordedRuns, prefix, position: int, kind: str, block: int, states, restored_rows: int
) -> torch.Tensor:
    """Block `block` on `states` (copies of the `samples` rows, positions from `position` on) with the `kind`
    output of the first `restored_rows` rows set back to its clean value at `position`."""
    lm = setup.lm
    clean = runs.clean_outputs[kind][block][0, position]

    def restore(x: torch.Tensor, name: str) -> None:
        x[:restored_rows, 0] = clean.to(x.device)

    module = lm.arch.layer_name(lm.model, block, kind)
    skip = restored_rows if kind == "mlp" else 0
    copies = len(states) // setup.samples
    cache = PrefixCache(prefix, repeat=copies) if position else None
    with Hooks(lm.model, edit={module: restore}), mlp_only_where(setup, block, skip):
        return run_blocks(lm, states, block, block + 1, position, cache)


def _start_unit(
    setup: TraceSetup, runs: RecordedRuns, prefix, position: int, kind: str, block: int, cells: list[int]
) -> _Unit:
    """States after `block`, the first restored layer of `cells`: below it everything is the corrupted run, so
    at this block only position i changes (its `kind` output restored); later positions keep the corrupted
    outputs. The block runs on position i alone."""
    first = runs.block_inputs[block][:, position : position + 1]
    here = _restored_block(setup, runs, prefix, position, kind, block, first, len(first))
    later = runs.block_outputs[block][:, position + 1 :]
    return _Unit(cells, torch.cat([here, later], dim=1))


def window_row(
    setup: TraceSetup, runs: RecordedRuns, position: int, kind: str, cells_layers: Sequence[int] | None = None
) -> np.ndarray:
    """Scores of the cells (position, l) for l in `cells_layers` (default all, the others are left 0): the `kind`
    module's output restored at `position` in every layer of l's window.

    Cells are computed in units: cells whose windows start at the same layer share their states until the
    first layer where their windows part, and are computed once up to there."""
    lm = setup.lm
    layers = lm.num_layers
    windows = [window_layers(layer, setup.window, layers) for layer in range(layers)]
    chosen = range(layers) if cells_layers is None else sorted(set(cells_layers))
    prefix = slice_prefix(runs.kv, position)
    samples = setup.samples
    units: list[_Unit] = []
    for block in range(layers):
        if units:
            # split units whose cells part here (some still restore this block, some not)
            parted: list[_Unit] = []
            for unit in units:
                inside = [c for c in unit.cells if block in windows[c]]
                outside = [c for c in unit.cells if block not in windows[c]]
                parted += [_Unit(group, unit.states) for group in (inside, outside) if group]
            units = sorted(parted, key=lambda u: block not in windows[u.cells[0]])  # restored units first
            restored = sum(len(u.states) for u in units if block in windows[u.cells[0]])
            states = _restored_block(
                setup, runs, prefix, position, kind, block, torch.cat([u.states for u in units]), restored
            )
            for u, part in zip(units, states.split(samples)):
                u.states = part
        starting = [cell for cell in chosen if windows[cell].start == block]
        if starting:
            units.append(_start_unit(setup, runs, prefix, position, kind, block, starting))
    scores = _scores_of(setup, torch.cat([u.states for u in units]), len(units))
    row = np.zeros(layers)
    for unit, score in zip(units, scores):
        row[unit.cells] = score
    return row


def fast_kind(
    setup: TraceSetup,
    kind: str,
    progress: Progress | None = None,
    runs: RecordedRuns | None = None,
    on_row: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """The (tokens, layers) table for `kind`, equal to the naive engine's to float precision.
    on_row(position, row) is called with each finished row."""
    lm = setup.lm
    tokens, layers = setup.num_tokens, lm.num_layers
    runs = runs or record_runs(setup, (kind,))
    table = np.full((tokens, layers), setup.corrupted_score)
    first = setup.corrupt_range[0]
    with torch.no_grad():
        for position in range(tokens):
            if position >= first:
                if kind == "hidden":
                    table[position] = hidden_row(setup, runs, position)
                else:
                    table[position] = window_row(setup, runs, position, kind)
                if on_row:
                    on_row(position, table[position])
            if progress:
                progress(position + 1, tokens)
    return table


def fast_cells(
    setup: TraceSetup, kind: str, cells: Sequence[tuple[int, int]], runs: RecordedRuns | None = None
) -> dict[tuple[int, int], float]:
    """The exact scores of some cells (position, layer) of `kind`, computing only those cells."""
    runs = runs or record_runs(setup, (kind,))
    by_position: dict[int, list[int]] = {}
    for position, layer in cells:
        by_position.setdefault(int(position), []).append(int(layer))
    first = setup.corrupt_range[0]
    out: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        for position, layers in sorted(by_position.items()):
            layers = sorted(set(layers))
            if position < first:
                out.update({(position, layer): setup.corrupted_score for layer in layers})
                continue
            if kind == "hidden":
                values = hidden_row(setup, runs, position, layers)
                out.update({(position, layer): float(v) for layer, v in zip(layers, values)})
            else:
                row = window_row(setup, runs, position, kind, layers)
                out.update({(position, layer): float(row[layer]) for layer in layers})
    return out


def mlp_effects_at_span_end(setup: TraceSetup, layers: Sequence[int]) -> list[float]:
    """The exact mlp-kind indirect effect (restored minus corrupted score) at the corrupted span's last token,
    for each of `layers`; only those cells are computed (the layer sweeps' trace column)."""
    last = setup.corrupt_range[1] - 1
    cells = fast_cells(setup, "mlp", [(last, layer) for layer in layers])
    return [cells[(last, layer)] - setup.corrupted_score for layer in layers]
