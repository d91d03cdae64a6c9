"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many facts in one update, spread over a
range of MLP layers.

1. Targets: for each fact, the change `delta_i` of the hidden state at the last layer L of the range, at the
   subject's key token, that makes the model give the new object (ROME's value optimisation at layer L,
   `core.rome.compute_edit`, on the unedited model: delta_i = v (u . k*)).
2. For each layer l of the range, lowest first, on the model carrying the updates of the layers below:
   keys K (one k* per fact at l), the residual still missing at L, R = delta - (h_L now - h_L before),
   spread over the layers left: R / (layers left), and the least-squares update against the layer's key
   statistics C (core.covariance): Delta_l = R K^T (lambda C + K K^T)^-1 (paper eq. 14; lambda the
   `mom2_weight` of its code, 15,000 for GPT-J).

Delta_l = sum_i r_i (A^-1 k_i)^T with A = lambda C + K K^T (symmetric), so every (fact, layer) pair is an
ordinary rank-one `Edit` (core.edits): the batch applies, undoes, exports and saves like single edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from core.covariance import key_statistics
from core.edit_site import default_layer, key_offset
from core.edits import Edit, EditRequest, EditStack
from core.errors import UserError
from core.models import EMBEDDED_MODEL, LoadedModel
from core.progress import Progress
from core.rome import RomeHyperParams, compute_edit, compute_key, context_texts, edit_rows, record_rows

# The embedded model's range: layers 2-5, around ROME's layer 3 (its MLP indirect effect is flat over 0-5 and
# drops after 5, see core.rome.EMBEDDED_LAYER); four layers keep the key statistics (one corpus pass per
# layer, ~140 s each on 2 cores, cached) affordable. GPT-J's paper range is 3-8 around ROME's 5.
EMBEDDED_LAYERS = (2, 3, 4, 5)


@dataclass(frozen=True)
class MemitParams:
    layers: tuple[int, ...] | None = None  # None: `default_layers(lm)`
    mom2_weight: float = 15_000.0  # lambda: weight of the preserved keys' statistics against the new keys


def default_layers(lm: LoadedModel) -> tuple[int, ...]:
    """EMBEDDED_LAYERS for the embedded model, else four layers ending one above ROME's default layer."""
    if lm.name == EMBEDDED_MODEL:
        return EMBEDDED_LAYERS
    last = min(lm.num_layers - 1, default_layer(lm) + 1)
    return tuple(range(max(0, last - 3), last + 1))


def final_state(lm: LoadedModel, request: EditRequest, last: int, hp: RomeHyperParams) -> torch.Tensor:
    """The block output at `last` at the key token, averaged over the rewrite rows (the plain prompt and the
    context-prefixed ones, as `compute_key` averages keys), float32, on the model as it is."""
    contexts = context_texts(lm, hp.context_lengths, hp.seed)
    rows = edit_rows(lm, request, contexts, key_offset(lm, request, last, hp.key_token))
    recording = record_rows(lm, rows, last)
    return torch.stack([recording.hidden[i][0] for i, row in enumerate(rows) if not row.kl]).mean(0)


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
) -> MemitBatch:
    """The batch's rank-one edits (see the module docstring); the model is left as it was."""
    rome = rome or RomeHyperParams()
    params = params or MemitParams()
    layers = tuple(sorted(params.layers or default_layers(lm)))
    if not layers or not all(0 <= layer < lm.num_layers for layer in layers):
        raise UserError(f"MEMIT layers {layers} must lie within the model's 0..{lm.num_layers - 1}")
    last = layers[-1]
    total = len(requests) + len(layers) * len(requests)
    tick = progress or (lambda done, total: None)

    # 1. targets at the last layer, on the unedited model
    kept, checked, deltas, skipped = [], [], [], []
    for i, request in enumerate(requests):
        try:
            edit = compute_edit(lm, request, replace(rome, layer=last))
        except UserError as err:
            skipped.append((i, str(err)))
        else:
            kept.append(i)
            checked.append(edit.request)
            deltas.append(edit.v.float() * (edit.u.float() @ edit.key.float()))
        tick(i + 1, total)
    if not kept:
        return MemitBatch([], [], [], skipped)
    requests = checked
    delta = torch.stack(deltas)  # (n, hidden)
    before = torch.stack([final_state(lm, r, last, rome) for r in requests])

    # 2. layer by layer, on the model carrying the layers below
    stack = EditStack(lm)
    edits: list[Edit] = []
    done = len(kept) + len(skipped)
    try:
        for index, layer in enumerate(layers):
            keys, states = [], []
            for request in requests:
                keys.append(compute_key(lm, request, layer, rome))
                states.append(final_state(lm, request, last, rome))
                done += 1
                tick(done, total)
            keys_ = torch.stack(keys)  # (n, in)
            residual = (delta - (torch.stack(states) - before)) / (len(layers) - index)
            mom2 = key_statistics(lm, layer, rome.stats_corpus, rome.stats_tokens).mom2.float()
            a = params.mom2_weight * mom2 + keys_.T @ keys_
            us = torch.linalg.solve(a, keys_.T).T  # (n, in): A^-1 k_i
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
