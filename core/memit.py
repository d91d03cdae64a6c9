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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from core.covariance import key_statistics
from core.edits import Edit, EditRequest, EditStack
from core.errors import UserError
from core.hooks import Hooks
from core.models import EMBEDDED_MODEL, LoadedModel
from core.prompts import tokenize
from core.rome import RomeHyperParams, compute_edit, context_texts, default_layer

Progress = Callable[[int, int], None]

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


def key_and_state(
    lm: LoadedModel, request: EditRequest, layer: int, last: int, hp: RomeHyperParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """k* at `layer` and the block output at `last` at the same token, each averaged over the plain prompt and
    the context-prefixed ones (float32), on the model as it is."""
    mlp_out = lm.arch.layer_name(lm.model, layer, "mlp_out")
    block = lm.arch.layer_name(lm.model, last, "hidden")
    keys, states = [], []
    text = request.prompt.replace("{}", request.subject, 1)
    for context in context_texts(lm, hp.context_lengths, hp.seed).texts:
        prompt = tokenize(lm.tokenizer, f"{context} {text}" if context else text, request.subject)
        with torch.no_grad(), Hooks(lm.model, record=[block], record_inputs=[mlp_out]) as hooks:
            lm.model(input_ids=torch.tensor([prompt.input_ids], device=lm.device), use_cache=False)
        keys.append(hooks.inputs[mlp_out][0, prompt.subject_last].float())
        states.append(hooks.outputs[block][0, prompt.subject_last].float())
    return torch.stack(keys).mean(0), torch.stack(states).mean(0)


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
    before = torch.stack([key_and_state(lm, r, last, last, rome)[1] for r in requests])

    # 2. layer by layer, on the model carrying the layers below
    stack = EditStack(lm)
    edits: list[Edit] = []
    done = len(kept) + len(skipped)
    try:
        for index, layer in enumerate(layers):
            keys, states = [], []
            for request in requests:
                k, h = key_and_state(lm, request, layer, last, rome)
                keys.append(k)
                states.append(h)
                done += 1
                tick(done, total)
            keys_ = torch.stack(keys)  # (n, in)
            residual = (delta - (torch.stack(states) - before)) / (len(layers) - index)
            mom2 = key_statistics(lm, layer, rome.stats_corpus, rome.stats_tokens).mom2.float()
            a = params.mom2_weight * mom2 + keys_.T @ keys_
            us = torch.linalg.solve(a, keys_.T).T  # (n, in): A^-1 k_i
            weight = lm.arch.mlp_out_weight(lm.model, layer).float()
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
