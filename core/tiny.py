"""Tiny randomly initialised models of every supported family, built from configs (no weights needed).

Used by the fast tests and by anyone who wants to try the mechanics in a second. They share the embedded
model's tokenizer, so prompts tokenise exactly as with the real model.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from core.models import LoadedModel, wrap_model

TINY_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral")


def tiny_config(family: str, vocab_size: int, layers: int = 4, hidden: int = 32):
    """A small config; weights drawn wider than the usual 0.02 so that restoring one state visibly moves the
    output of a 4-layer random model."""
    config = _family_config(family, vocab_size, layers, hidden)
    config.initializer_range = 0.15
    return config


def _family_config(family: str, vocab_size: int, layers: int, hidden: int):
    heads = 4
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "gptj":
        return GPTJConfig(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            rotary_dim=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=128,
            rotary_pct=0.5,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common)
    raise ValueError(f"no tiny config for {family!r}")


def tiny_model(family: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, layers: int = 4) -> LoadedModel:
    """A tiny random `family` model over `tokenizer`'s vocabulary, in float32 on the CPU."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=len(tokenizer), layers=layers)
    model = AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tokenizer, name=f"tiny-{family}", device="cpu", source="random")
