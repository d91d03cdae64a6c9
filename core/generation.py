"""Text from the model for a list of prompts: greedy, or seeded sampling; the number of new tokens is bounded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import UserError
from core.models import LoadedModel

MAX_NEW_TOKENS = 200


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 30
    sample: bool = False  # False: greedy
    seed: int = 0
    top_k: int | None = None  # sampling only: keep the k likeliest tokens (None: all)
    temperature: float = 1.0

    def check(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_new_tokens})")
        if self.sample and not self.temperature > 0:
            raise UserError(f"the temperature must be above 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be at least 1 (got {self.top_k})")


def cache_of(output):
    """The key/value cache a forward with use_cache=True returned (named `cache` in recent transformers)."""
    return getattr(output, "cache", None) or output.past_key_values


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs` (rows, vocab), by inverse CDF from torch's seeded generator
    (much faster than torch.multinomial over a large vocabulary on the CPU)."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp(max=probs.shape[-1] - 1)


def generate_ids(
    lm: LoadedModel, prompts: list[list[int]], settings: GenerationSettings, exact_length: bool = False
) -> list[list[int]]:
    """New token ids for each prompt (a batch, left-padded); `exact_length` never stops at end-of-text."""
    settings.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=lm.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = lm.tokenizer.eos_token_id
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=lm.device)
    out: list[torch.Tensor] = []
    past = None
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        current, current_pos = ids, positions
        for _ in range(settings.max_new_tokens):
            result = lm.model(
                input_ids=current,
                attention_mask=mask,
                position_ids=current_pos,
                cache=past,
                use_cache=True,
            )
            past = cache_of(result)
            logits = result.logits[:, -1].float()
            if settings.sample:
                logits = logits / settings.temperature
                if settings.top_k is not None and settings.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = sample_from(torch.softmax(logits, dim=-1))
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            if not exact_length and eos is not None:
                token = token.masked_fill(finished[:, None], eos)
                finished |= token[:, 0] == eos
            out.append(token)
            if finished.all():
                break
            current = token
            current_pos = current_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    new = torch.cat(out, dim=1).tolist()
    if exact_length or eos is None:
        return new
    return [row[: row.index(eos)] if eos in row else row for row in new]


def generate(lm: LoadedModel, prompts: list[str], settings: GenerationSettings | None = None) -> list[str]:
    """The prompt followed by the model's continuation, for each prompt."""
    settings = settings or GenerationSettings()
    if not prompts:
        return []
    for prompt in prompts:
        if not prompt or not prompt.strip():
            raise UserError("a generation prompt is empty")
    encoded = [lm.tokenizer(p)["input_ids"] for p in prompts]
    new = generate_ids(lm, encoded, settings)
    return [p + lm.tokenizer.decode(ids, skip_special_tokens=True) for p, ids in zip(prompts, new)]
