"""Architecture adapter: where each model family keeps the modules that tracing and ROME touch.

One row per family. Paths are dotted attribute paths: `embed`, `blocks`, `final_norm` and `lm_head` from the
model root; `attn`, `mlp` and `mlp_out` from one block. `mlp_out` is the MLP output projection W that ROME
rewrites; `mlp_out_conv1d` says its weight is stored transposed (GPT-2's Conv1D: out = x @ W + b). Its
values are read and written through core/devices.py, so an edit reaches a weight that accelerate offloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.devices import read_parameter, writable_parameter
from core.errors import UserError


class UnsupportedModelError(UserError):
    """The model's architecture is not in the adapter table, or lacks a module the table names."""


@dataclass(frozen=True)
class Architecture:
    family: str
    embed: str
    blocks: str
    attn: str
    mlp: str
    mlp_out: str
    mlp_out_conv1d: bool
    final_norm: str
    lm_head: str
    rotary: str | None  # model-level rotary embedding module (called with (hidden, position_ids)), if any
    cache_kwarg: str  # the keyword a block takes its key/value cache under

    def layer_name(self, model: nn.Module, layer: int, kind: str = "hidden") -> str:
        """Dotted name of the module whose output is the `kind` state of `layer` (hidden = the block)."""
        base = f"{self.blocks}.{layer}"
        if kind == "hidden":
            return base
        if kind == "mlp":
            return f"{base}.{self.mlp}"
        if kind == "attn":
            return f"{base}.{self.attn}"
        if kind == "mlp_out":
            return f"{base}.{self.mlp_out}"
        raise ValueError(f"unknown state kind {kind!r}: use hidden, mlp or attn")

    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))

    def mlp_out_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The rewritten matrix as (out_features, in_features), a view of the tensor the model computes with
        (for an offloaded weight: the one its hook loads, see core.devices.writable_parameter)."""
        w = writable_parameter(model, f"{self.layer_name(model, layer, 'mlp_out')}.weight")
        return w.T if self.mlp_out_conv1d else w

    def mlp_out_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        """The rewritten projection's bias (its values, also where offloaded), or None."""
        name = self.layer_name(model, layer, "mlp_out")
        return None if model.get_submodule(name).bias is None else read_parameter(model, f"{name}.bias")

    def mlp_out_shape(self, model: nn.Module, layer: int) -> tuple[int, int]:
        """(out_features, in_features) of the rewritten matrix, without reading it."""
        rows, columns = model.get_submodule(self.layer_name(model, layer, "mlp_out")).weight.shape
        return (columns, rows) if self.mlp_out_conv1d else (rows, columns)


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    mlp_out_conv1d=False,
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    cache_kwarg="cache",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        family="gpt2",
        embed="transformer.wte",
        blocks="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_out_conv1d=True,
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        rotary=None,
        cache_kwarg="cache",
    ),
    "gptj": Architecture(
        family="gptj",
        embed="transformer.wte",
        blocks="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        mlp_out_conv1d=False,
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        rotary="transformer.rotary_emb",
        cache_kwarg="cache",
    ),
    "gpt_neox": Architecture(
        family="gpt_neox",
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        mlp_out_conv1d=False,
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        rotary="gpt_neox.rotary_emb",
        cache_kwarg="layer_past",
    ),
    **{name: Architecture(family=name, **_LLAMA_LIKE) for name in ("llama", "qwen2", "qwen3", "mistral")},
}


def architecture_for(model: nn.Module) -> Architecture:
    """The adapter row for `model`, checked: every module it names must exist."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}; supported: {known}")
    arch = ARCHITECTURES[model_type]
    paths = [arch.embed, arch.blocks, arch.final_norm, arch.lm_head] + ([arch.rotary] if arch.rotary else [])
    block0 = f"{arch.blocks}.0"
    paths += [f"{block0}.{p}" for p in (arch.attn, arch.mlp, arch.mlp_out)]
    missing = [p for p in paths if not _has_submodule(model, p)]
    if missing:
        raise UnsupportedModelError(f"{model_type} model lacks module(s) {', '.join(missing)}")
    return arch


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
