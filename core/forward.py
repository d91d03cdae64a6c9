"""Running part of a model: blocks [first, stop) on a stretch of positions, with the keys/values of the
positions before it supplied from an earlier run.

This is what lets tracing and ROME skip work a change cannot reach: a change at layer l and position i
leaves every state at earlier layers and earlier positions as it was, so only blocks > l at positions >= i
are computed, attending to the recorded keys/values of positions < i.

    out = lm.model(input_ids=ids, use_cache=True, output_hidden_states=True)  # the earlier run, recorded
    recorded = record_kv(cache_of(out))  # core.generation.cache_of
    hidden = out.hidden_states[5][:, 4:]  # block 5's input at positions 4..
    states = run_blocks(lm, hidden, first=5, start_position=4, prefix=PrefixCache(slice_prefix(recorded, 4)))
    logits = final_logits(lm, states[:, -1])  # equals out.logits[:, -1]

On a model spread over devices by a device map (core/devices.py), each block gets its inputs (the states, the
mask, the rotary embeddings, the prefix keys/values) on its own device, and the results come back on the
device the states came in on. With a `copy` (core/block_copy.py) the copy's blocks run in place of the model's,
under autocast: matrix products in the copy's dtype, the states in the dtype they came in.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from core.block_copy import BlockCopy
from core.devices import execution_device, move_to
from core.models import LoadedModel


@dataclass
class LayerKV:
    keys: torch.Tensor  # (batch, kv_heads, positions, head_dim), as the attention module caches them
    values: torch.Tensor


class PrefixCache:
    """Duck-typed transformers cache: per layer, fixed keys/values of earlier positions that the new
    positions attend to. Nothing is stored back: each call sees the same prefix."""

    def __init__(self, layers: dict[int, LayerKV], repeat: int = 1) -> None:
        self.layers = layers
        self.repeat = repeat  # the batch is `repeat` copies of the prefix's batch, copy-major

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        kv = self.layers.get(layer_idx)
        if kv is None or kv.keys.shape[2] == 0:
            return key, value
        pk, pv = kv.keys.to(key.device), kv.values.to(value.device)  # a no-op unless the layer moved devices
        if self.repeat > 1:
            pk = pk.repeat(self.repeat, 1, 1, 1)
            pv = pv.repeat(self.repeat, 1, 1, 1)
        return torch.cat([pk.to(key.dtype), key], dim=2), torch.cat([pv.to(value.dtype), value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv = self.layers.get(layer_idx)
        return 0 if kv is None else kv.keys.shape[2]


def record_kv(cache) -> dict[int, LayerKV]:
    """The keys/values a full forward with `use_cache=True` returned, as {layer: LayerKV}."""
    return {i: LayerKV(layer.keys, layer.values) for i, layer in enumerate(cache.layers)}


def slice_prefix(kv: dict[int, LayerKV], end: int, rows: slice | None = None) -> dict[int, LayerKV]:
    """Positions [0, end) of recorded keys/values (optionally only some batch rows)."""
    rows = rows or slice(None)
    return {i: LayerKV(v.keys[rows, :, :end], v.values[rows, :, :end]) for i, v in kv.items()}


def _attention_mask(
    starts: torch.Tensor, width: int, length: int, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """Mask (rows, 1, length, width + length): row r's queries stand at positions starts[r] + [0, length);
    they see the first starts[r] of the `width` prefix slots and the new positions causally."""
    device = starts.device
    prefix = torch.arange(width, device=device)[None, :] < starts[:, None]  # (rows, width)
    new = torch.arange(length, device=device)
    causal = new[None, :] <= new[:, None]  # (length, length)
    allowed = torch.cat(
        [prefix[:, None, None, :].expand(-1, 1, length, -1), causal[None, None].expand(len(starts), 1, -1, -1)], dim=-1
    )
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


BlockHook = Callable[[int, torch.Tensor], torch.Tensor | None]


def run_blocks(
    lm: LoadedModel,
    hidden: torch.Tensor,
    first: int,
    stop: int | None = None,
    start_position: int | torch.Tensor = 0,
    prefix: PrefixCache | None = None,
    after_block: BlockHook | None = None,
    copy: BlockCopy | None = None,
) -> torch.Tensor:
    """Apply blocks first..stop-1 to `hidden` (batch, positions, hidden) standing at absolute positions
    start_position..; `prefix` holds the keys/values of positions < start_position for each layer.
    `start_position` may be one start per row (a tensor): rows of different prefix lengths in one batch, each
    prefix right-padded to the longest (the padding is masked out).
    `after_block(layer, h)` may return a replacement for a block's output (h is on the block's device).
    `copy`: run its blocks (from copy.first on) instead of the model's, their matrix products in copy.dtype;
    the result then comes back in `hidden`'s dtype. The result is on `hidden`'s device."""
    arch, model = lm.arch, lm.model
    home, home_dtype = hidden.device, hidden.dtype
    blocks = model.get_submodule(arch.blocks)
    stop = len(blocks) if stop is None else stop
    attn_implementation = model.config._attn_implementation
    if copy is not None:
        if first < copy.first:
            raise ValueError(f"the copy holds blocks {copy.first}.., not block {first}")
        blocks = {layer: copy.block(layer) for layer in range(first, stop)}
        attn_implementation = copy.attn_implementation
    length = hidden.shape[1]
    new = torch.arange(length, device=hidden.device)
    if isinstance(start_position, torch.Tensor):
        starts = start_position.to(hidden.device)
        width = prefix.get_seq_length() if prefix is not None else 0
        positions = starts[:, None] + new[None, :]
    else:
        starts = torch.tensor([start_position], device=hidden.device)
        width = start_position
        positions = (start_position + new)[None]  # broadcasts over rows
    if bool(starts.any()) and prefix is None:
        raise ValueError("positions after 0 need the keys/values of the earlier positions")
    kwargs: dict = {"attention_mask": _attention_mask(starts, width, length, attn_implementation, lm.dtype)}
    if arch.rotary is not None:
        kwargs["position_ids"] = positions
        rotary = model.get_submodule(arch.rotary)
        where = execution_device(rotary)
        kwargs["position_embeddings"] = move_to(rotary(hidden.to(where), positions.to(where)), home)
    if prefix is not None:
        kwargs[arch.cache_kwarg] = prefix
    on_device = {home: kwargs}  # the keyword arguments on each device a block computes on
    products = torch.autocast(home.type, dtype=copy.dtype) if copy is not None else nullcontext()
    for layer in range(first, stop):
        device = execution_device(blocks[layer])
        if device not in on_device:
            on_device[device] = {k: v if k == arch.cache_kwarg else move_to(v, device) for k, v in kwargs.items()}
        with products:
            hidden = blocks[layer](hidden.to(device), **on_device[device])
        if after_block is not None:
            replaced = after_block(layer, hidden)
            hidden = hidden if replaced is None else replaced
    return hidden.to(home) if copy is None else hidden.to(home, home_dtype)


def final_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last-layer states: final norm, then the unembedding (on `hidden`'s device)."""
    model, arch = lm.model, lm.arch
    norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
    normed = norm(hidden.to(execution_device(norm)))
    return head(normed.to(execution_device(head))).to(hidden.device)
