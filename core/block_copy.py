"""A private copy of a model's upper blocks whose matrices are bfloat16, for work that runs those blocks many
times with gradients.

ROME's value optimisation (core/rome.py) runs the blocks above the edited layer forward and back 20 times.
On a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX), a bfloat16 matrix product is ~2.4x faster than
a float32 one. Autocast over the model itself casts every weight at every call, which costs more than it
saves; `copy_blocks` casts the weight matrices once, into a copy that nobody else sees: the model is never
touched, so other threads, and the weights an edit is applied to, stay exactly as they were. Norms, biases and
the residual stream stay float32: core.forward.run_blocks runs the copy under autocast, so only the matrix
products are bfloat16. The copy's attention is eager (the CPU's fused attention kernel is slow backwards in
bfloat16).

    upper = copy_blocks(lm, first=4)  # blocks 4.. (~0.1 s for the embedded model)
    states = run_blocks(lm, hidden, first=4, start_position=starts, prefix=prefix, copy=upper)

`native_bfloat16()` says whether this machine's CPU multiplies bfloat16 natively; without it bfloat16 is
slower than float32 and nothing should use a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from core.models import LoadedModel

EAGER = "eager"


@dataclass(frozen=True)
class BlockCopy:
    """Blocks first.. of a model, copied with their weight matrices in `dtype` (the dtype of the products run
    under autocast), attention "eager"."""

    first: int
    blocks: torch.nn.ModuleList  # blocks[i] is the model's block first + i
    dtype: torch.dtype
    attn_implementation: ClassVar[str] = EAGER

    def block(self, layer: int) -> torch.nn.Module:
        return self.blocks[layer - self.first]


def native_bfloat16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bfloat16 products beat
    float32 ones."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def copy_blocks(lm: LoadedModel, first: int, dtype: torch.dtype = torch.bfloat16) -> BlockCopy:
    """Blocks first.. of `lm` as they are now (edits applied included): each weight matrix cast to `dtype`
    straight from the model's (no float32 copy on the way), every other parameter and buffer copied as it is,
    and the attention made eager through a copy of the config. Gradients are off in the copy."""
    blocks = lm.model.get_submodule(lm.arch.blocks)
    upper = torch.nn.ModuleList(list(blocks)[first:])
    config = copy.deepcopy(lm.model.config)  # deep: setting the attention also sets any sub-config's
    config._attn_implementation = EAGER
    # deepcopy takes what `memo` maps an object's id to as that object's copy: the cast parameters and config
    memo: dict = {id(lm.model.config): config}
    for p in upper.parameters():
        cast = p.detach().to(dtype) if p.is_floating_point() and p.dim() >= 2 else p.detach().clone()
        memo[id(p)] = torch.nn.Parameter(cast, requires_grad=False)
    return BlockCopy(first=first, blocks=copy.deepcopy(upper, memo), dtype=dtype)
