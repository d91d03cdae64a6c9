"""What a trace will cost before it runs: multiply-adds per engine, seconds from a measured rate, and the
memory the estimate engine's backward needs.

Counts follow DESIGN.md's performance envelope: weight matmuls only (the blocks' 2-D weights per token and
block, the unembedding per token whose logits are computed). The rate comes from the setup's own timed
forward (`TraceSetup.forward_seconds`, the corrupted score's run of 1 + samples rows), so an estimate reflects the
machine and the model at hand. `estimated_seconds` is the one time forecast of a trace (the command line prints
it, the app shows it when a trace starts); core/budget.py only caps what a trace may hold.
"""

from __future__ import annotations

import os

import torch

from core.budget import context_length
from core.models import LoadedModel
from core.trace_setup import TraceSetup, window_layers

EXACT_ENGINE_SLOWDOWN = 1.5  # the exact engines' small batches run below a full forward's rate (bench/estimate.py)


def block_macs(lm: LoadedModel) -> int:
    """Multiply-adds of one block on one token (its 2-D weights)."""
    block = lm.model.get_submodule(lm.arch.layer_name(lm.model, 0))
    return sum(p.numel() for p in block.parameters() if p.dim() == 2)


def logit_macs(lm: LoadedModel) -> int:
    return lm.model.get_submodule(lm.arch.lm_head).weight.numel()


def engine_macs(
    lm: LoadedModel, engine: str, tokens: int, start: int, samples: int, window: int, kinds: tuple[str, ...]
) -> int:
    """Multiply-adds of tracing `kinds` with `engine` for a prompt of `tokens` tokens corrupted from `start`."""
    layers, block, logits = lm.num_layers, block_macs(lm), logit_macs(lm)
    if engine == "estimate":  # clean run + forward and backward (about twice a forward) of the samples
        return (1 + 3 * samples) * tokens * layers * block + (1 + 3 * samples) * logits
    total = 0
    for kind in kinds:
        for position in range(tokens):
            for layer in range(layers):
                if engine == "naive":
                    total += (1 + samples) * tokens * (layers * block + logits)
                    continue
                if position < start:
                    continue
                first = layer + 1 if kind == "hidden" else window_layers(layer, window, layers).start
                total += samples * ((tokens - position) * (layers - first) * block + logits)
    return total


def forward_rate(setup: TraceSetup) -> float:
    """Multiply-adds per second of the setup's timed forward (1 + samples rows, every position's logits)."""
    lm = setup.lm
    macs = (1 + setup.samples) * setup.num_tokens * (lm.num_layers * block_macs(lm) + logit_macs(lm))
    return macs / max(setup.forward_seconds, 1e-4)


def estimated_seconds(setup: TraceSetup, engine: str, kinds: tuple[str, ...]) -> float:
    """About how long tracing `kinds` of `setup` with `engine` takes here."""
    macs = engine_macs(
        setup.lm, engine, setup.num_tokens, setup.corrupt_range[0], setup.samples, setup.window, tuple(kinds)
    )
    slowdown = 1.0 if engine == "estimate" else EXACT_ENGINE_SLOWDOWN
    return macs / forward_rate(setup) * slowdown


def estimate_memory_bytes(lm: LoadedModel, tokens: int, samples: int) -> int:
    """About the memory the estimate engine's forward + backward keeps: per sample, token and layer the
    activations autograd saves (a generous 16 hidden-size and 4 MLP-width vectors) plus the attention
    weights (heads x tokens), in the model's precision, and every recorded state twice more for the terms."""
    config = lm.model.config
    hidden = lm.hidden_size
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    per_token_layer = 16 * hidden + 4 * width + heads * tokens + 3 * 3 * hidden
    element = torch.finfo(lm.dtype).bits // 8
    return samples * tokens * lm.num_layers * per_token_layer * element


def available_memory_bytes(lm: LoadedModel) -> int | None:
    """Free memory where the model runs (the GPU's, or the machine's available RAM); None if unknown."""
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_estimate_fits(lm: LoadedModel, tokens: int, samples: int) -> None:
    """Refuse, in one sentence, a prompt beyond the model's context or the memory the estimate needs."""
    from core.errors import UserError

    context = context_length(lm)
    if context is not None and tokens > context:
        raise UserError(f"the prompt is {tokens} tokens; {lm.name} reads at most {context}: shorten the text")
    need, free = estimate_memory_bytes(lm, tokens, samples), available_memory_bytes(lm)
    if free is not None and need > 0.8 * free:
        raise UserError(
            f"the estimate of a {tokens}-token prompt with {samples} samples needs about {need / 2**30:.1f} GiB and "
            f"{free / 2**30:.1f} GiB is free: shorten the text or use fewer samples"
        )
