"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many facts in one update, spread over a
range of MLP layers.

1. Targets: for each fact, the change `delta_i` of the hidden state at the last layer L of the range, at the
   subject's key token, that makes the model give the new object: ROME's value optimisation at layer L
   (`core.rome.optimise_values`) on the model as it is, many facts sharing each forward pass (`target_deltas`;
   each delta follows the path it would alone, faster).
2. For each layer l of the range, lowest first, on the model carrying the updates of the layers below:
   keys K (one k* per fact at l), the residual still missing at L, R = delta - (h_L now - h_L before),
   spread over the layers left: R / (layers left), and the least-squares update against the layer's key
   statistics C (core.covariance): Delta_l = R K^T (lambda C + K K^T)^-1 (paper eq. 14; lambda the
   `mom2_weight` of its code, 15,000 for GPT-J).

Delta_l = sum_i r_i (A^-1 k_i)^T with A = lambda C + K K^T (symmetric), so every (fact, layer) pair is an
ordinary rank-one `Edit` (core.edits): the batch applies, undoes, exports and saves like single edits.

With `MemitParams.null_space` the solve is AlphaEdit's (core.alphaedit, the paper's own setting): no C, the
update projected onto the null space P of the layer's key statistics, keeping the keys Kp of the edits the
model already carries: Delta_l = R K^T P (Kp Kp^T P + K K^T P + l2 I)^-1. Batches one after another
(core.many, `memit_one_by_one`) then neither disturb what the model knew nor undo earlier batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from core.alphaedit import AlphaEditParams, null_projector, projected_solve
from core.covariance import key_statistics
from core.edit_site import default_layer, key_offset
from core.edits import Edit, EditRequest, EditStack
from core.errors import UserError
from core.hooks import Hooks, stop_after
from core.models import EMBEDDED_MODEL, LoadedModel
from core.progress import Progress, within
from core.prompts import target_ids
from core.rome import (
    EditRow,
    RomeHyperParams,
    ValueTrace,
    context_texts,
    edit_rows,
    optimise_values,
    record_rows,
    validate_request,
    value_batch,
)

# The embedded model's range: layers 2-5, around ROME's layer 3 (its MLP indirect effect is flat over 0-5 and
# drops after 5, see core.rome.EMBEDDED_LAYER); four layers keep the key statistics (one corpus pass per
# layer, ~140 s each on 2 cores, cached) affordable. GPT-J's paper range is 3-8 around ROME's 5.
EMBEDDED_LAYERS = (2, 3, 4, 5)


# Step 1's values and the keys: the project's ROME settings with two changes for batch scale: stop once the
# target's NLL < 5e-2 (MEMIT's own code stops early too) and 2 context texts instead of 10. With the facts
# sharing each forward pass, the batch of all 94 project cases takes 156 s on the 2-core CPU (step 1: 152 s,
# 397 s one fact at a time; `bench/many.py batch`). No rank-one update is solved in step 1, so ROME's
# preserved subject keys play no part there.
VALUE_SETTINGS = replace(RomeHyperParams(), early_stop="nll", context_lengths=((5, 2),), preserve_weight=0.0)

# Step 1 puts the rows of this many facts' prompts (at least one fact) through each forward pass: the
# embedded model's value steps cost ~0.28 s for one fact's 4 rows and ~0.10 s per fact from 16 facts on
# (2-core CPU), and a pass records the full logits of its rows, so a cap keeps memory bounded.
VALUE_BATCH_ROWS = 128


@dataclass(frozen=True)
class MemitParams:
    layers: tuple[int, ...] | None = None  # None: `default_layers(lm)`
    # lambda: weight of the preserved keys' statistics against the new keys. GPT-J's 15,000 (key size 16,384)
    # barely moves the embedded model (key size 1,536): 20 facts of data/counterfact_project.json in one batch
    # gave ES 0.35 PS 0.45 NS 0.96; 3,000: ES 1.00 PS 0.98 NS 0.93.
    mom2_weight: float = 3_000.0
    # AlphaEdit's solve (core.alphaedit) in place of lambda C: each layer's update projected onto the null
    # space of its key statistics, keeping the earlier edits' keys (the paper's own method, on MEMIT's layers)
    null_space: AlphaEditParams | None = None


def default_layers(lm: LoadedModel) -> tuple[int, ...]:
    """EMBEDDED_LAYERS for the embedded model, else four layers ending one above ROME's default layer."""
    if lm.name == EMBEDDED_MODEL:
        return EMBEDDED_LAYERS
    last = min(lm.num_layers - 1, default_layer(lm) + 1)
    return tuple(range(max(0, last - 3), last + 1))


def at(recorded: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Row j's vector at positions[j] of a recorded (rows, positions, size) tensor."""
    rows = torch.arange(len(positions), device=recorded.device)
    return recorded[rows, torch.tensor(positions, device=recorded.device)]


def site_states(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, last: int, hp: RomeHyperParams, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every request: k* at `layer` (the mean key over its rewrite rows, as `core.rome.compute_key`) and
    the block output at `last` at the key token (the mean over the same rows), float32, on the model as it
    is; (n, key size) and (n, hidden). All requests' rows go through the model together, `batch` rows of one
    length per forward, up to block `last`."""
    contexts = context_texts(lm, hp.context_lengths, hp.seed)
    rows: list[tuple[int, tuple[int, ...], int, int]] = []  # (request, ids, key position, state position)
    for i, request in enumerate(requests):
        key_at, state_at = (key_offset(lm, request, n, hp.key_token) for n in (layer, last))
        at_key = edit_rows(lm, request, contexts, key_at)
        at_state = at_key if state_at == key_at else edit_rows(lm, request, contexts, state_at)
        rows += [(i, a.ids, a.key_position, b.key_position) for a, b in zip(at_key, at_state) if not a.kl]
    groups: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        groups.setdefault(len(row[1]), []).append(j)
    mlp_out = lm.arch.layer_name(lm.model, layer, "mlp_out")
    block = lm.arch.layer_name(lm.model, last, "hidden")
    keys: torch.Tensor | None = None
    states = torch.zeros(len(requests), lm.hidden_size, device=lm.device)
    counts = torch.zeros(len(requests), device=lm.device)
    with torch.no_grad():
        for members in groups.values():
            for chunk in range(0, len(members), batch):
                part = [rows[j] for j in members[chunk : chunk + batch]]
                ids = torch.tensor([r[1] for r in part], device=lm.device)
                with Hooks(lm.model, record=[block], record_inputs=[mlp_out]) as hooks, stop_after(lm.model, block):
                    lm.model(input_ids=ids, use_cache=False)  # blocks 0..last only
                owner = torch.tensor([r[0] for r in part], device=lm.device)
                k = at(hooks.inputs[mlp_out], [r[2] for r in part]).to(lm.device, torch.float32)
                h = at(hooks.outputs[block], [r[3] for r in part]).to(lm.device, torch.float32)
                if keys is None:
                    keys = torch.zeros(len(requests), k.shape[-1], device=lm.device)
                keys.index_add_(0, owner, k)
                states.index_add_(0, owner, h)
                counts.index_add_(0, owner, torch.ones(len(part), device=lm.device))
    assert keys is not None
    return keys / counts[:, None], states / counts[:, None]


def target_deltas(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    hp: RomeHyperParams,
    progress: Progress | None = None,
    batch_rows: int = VALUE_BATCH_ROWS,
) -> tuple[torch.Tensor, list[ValueTrace]]:
    """Step 1 for checked requests (`core.rome.validate_request`): each one's delta at block `layer`'s output,
    ROME's value optimisation (`core.rome.optimise_values`) on the model as it is, float32 (n, hidden), and
    how each optimisation went. The requests go `batch_rows` prompt rows at a time (at least one request)
    through each forward pass. Progress: requests done, a group's share counted as its steps pass."""
    if not requests:
        return torch.zeros(0, lm.hidden_size, device=lm.device), []
    contexts = context_texts(lm, hp.context_lengths, hp.seed)
    per_request = [edit_rows(lm, r, contexts, key_offset(lm, r, layer, hp.key_token)) for r in requests]
    groups: list[list[int]] = [[]]
    filled = 0  # rows in the last group
    for i, rows in enumerate(per_request):
        if groups[-1] and filled + len(rows) > batch_rows:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += len(rows)
    deltas: list[torch.Tensor] = []
    traces: list[ValueTrace] = []
    for group in groups:
        rows: list[EditRow] = []
        owners: list[int] = []
        firsts: list[int] = []  # each request's first row: its plain prompt
        for j, i in enumerate(group):
            firsts.append(len(rows))
            rows += per_request[i]
            owners += [j] * len(per_request[i])
        recording = record_rows(lm, rows, layer)
        targets = [target_ids(lm.tokenizer, requests[i].target_new) for i in group]
        batch = value_batch(lm, rows, recording, targets, owners)
        done = len(deltas)

        def on_step(step: int) -> None:
            if progress:
                progress(done + len(group) * step // hp.steps, len(requests))

        found, paths = optimise_values(lm, batch, layer, recording.outputs[firsts], hp, on_step)
        deltas += list(found)
        traces += paths
        if progress:
            progress(len(deltas), len(requests))
    return torch.stack(deltas), traces


@dataclass
class MemitBatch:
    edits: list[Edit]  # one per (kept request, layer), layer by layer
    kept: list[int]  # indices of the requests in the batch
    requests: list[EditRequest]  # the kept requests, checked (target_true filled in)
    skipped: list[tuple[int, str]]  # (index, why) of requests that cannot be edited


def memit_batch(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    rome: RomeHyperParams | None = None,
    params: MemitParams | None = None,
    progress: Progress | None = None,
    earlier_keys: dict[int, torch.Tensor] | None = None,
) -> MemitBatch:
    """The batch's rank-one edits (see the module docstring); the model is left as it was. `rome`: the
    settings of the values and keys (default VALUE_SETTINGS). `earlier_keys`: per layer, the keys (n, in) of
    the edits the model already carries, kept by the `null_space` solve."""
    rome = rome or VALUE_SETTINGS
    params = params or MemitParams()
    layers = tuple(sorted(params.layers or default_layers(lm)))
    if not layers or not all(0 <= layer < lm.num_layers for layer in layers):
        raise UserError(f"MEMIT layers {layers} must lie within the model's 0..{lm.num_layers - 1}")
    last = layers[-1]
    rome.check(lm)
    total = 2 * len(requests) + len(layers)  # progress: requests checked, their targets found, layers
    tick = progress or (lambda done, total: None)

    # 1. targets at the last layer, on the model as it is
    kept, checked, skipped = [], [], []
    for i, request in enumerate(requests):
        try:
            checked.append(validate_request(lm, request))
        except UserError as err:
            skipped.append((i, str(err)))
        else:
            kept.append(i)
        tick(i + 1, total)
    if not kept:
        return MemitBatch([], [], [], skipped)
    delta, _ = target_deltas(lm, checked, last, rome, within(progress, len(requests) + len(skipped), total))
    requests = checked

    # 2. layer by layer, on the model carrying the layers below
    stack = EditStack(lm)
    edits: list[Edit] = []
    before = None  # the states at `last` before any update: the first layer's pass
    try:
        for index, layer in enumerate(layers):
            keys_, states = site_states(lm, requests, layer, last, rome)  # (n, in), (n, hidden)
            before = states if before is None else before
            tick(total - len(layers) + index + 1, total)
            residual = (delta - (states - before)) / (len(layers) - index)
            if params.null_space is None:
                mom2 = key_statistics(lm, layer, rome.stats_corpus, rome.stats_tokens).mom2.float()
                a = params.mom2_weight * mom2 + keys_.T @ keys_
                us = torch.linalg.solve(a, keys_.T).T  # (n, in): A^-1 k_i
            else:
                projector = null_projector(lm, layer, rome, params.null_space)
                earlier = (earlier_keys or {}).get(layer, keys_.new_zeros(0, keys_.shape[1]))
                us = projected_solve(keys_, projector, earlier.to(keys_), params.null_space.l2)
            weight = lm.arch.mlp_out_weight(lm.model, layer).to(device=lm.device, dtype=torch.float32)
            change = residual.T @ us  # (out, in)
            for request, k, u, r in zip(requests, keys_, us, residual):
                edit = Edit(
                    request=request,
                    layer=layer,
                    u=u.to(lm.dtype),
                    v=r.to(lm.dtype),
                    key=k.to(lm.dtype),
                    value=(weight @ k + change @ k).to(lm.dtype),
                    model=lm.name,
                    info={"method": "memit", "layers": list(layers), "memit": asdict(params)},
                )
                stack.apply(edit)
                edits.append(edit)
    finally:
        stack.undo_all()
    return MemitBatch(edits, kept, requests, skipped)


def keys_by_layer(edits: Sequence[Edit]) -> dict[int, torch.Tensor]:
    """The edits' keys, stacked per layer (float32): what the `null_space` solve keeps (`earlier_keys`)."""
    keys: dict[int, list[torch.Tensor]] = {}
    for edit in edits:
        keys.setdefault(edit.layer, []).append(edit.key.float())
    return {layer: torch.stack(k) for layer, k in keys.items()}


def memit_one_by_one(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    rome: RomeHyperParams | None = None,
    params: MemitParams | None = None,
    progress: Progress | None = None,
    earlier: Sequence[Edit] = (),
) -> MemitBatch:
    """Each request its own MEMIT batch, one after another: each computed on the model carrying the ones before
    it, and, with `params.null_space`, its solve keeping their keys and those of `earlier` (the edits the model
    carries already), as `edit-many --method memit --batch-size 1 --null-space` does. The model is left as it
    was; the result lists every edit in order, like one batch's. progress counts requests."""
    params = params or MemitParams()
    tick = progress or (lambda done, total: None)
    stack = EditStack(lm)
    kept: list[int] = []
    checked: list[EditRequest] = []
    skipped: list[tuple[int, str]] = []
    try:
        for i, request in enumerate(requests):
            keep = keys_by_layer([*earlier, *stack.edits]) if params.null_space else None
            batch = memit_batch(lm, [request], rome, params, earlier_keys=keep)
            for edit in batch.edits:
                stack.apply(edit)
            if batch.kept:
                kept.append(i)
                checked += batch.requests
            skipped += [(i, why) for _, why in batch.skipped]
            tick(i + 1, len(requests))
        return MemitBatch(list(stack.edits), kept, checked, skipped)
    finally:
        stack.undo_all()
