"""Model loading and the architecture adapter."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core.architecture import ARCHITECTURES, UnsupportedModelError, architecture_for
from core.models import ModelLoadError, load_model
from core.tiny import tiny_model


def test_adapter_finds_every_module(tiny):
    arch, model = tiny.arch, tiny.model
    assert arch.family == model.config.model_type
    assert tiny.num_layers == 4
    assert isinstance(model.get_submodule(arch.embed), nn.Embedding)
    for layer in range(tiny.num_layers):
        for kind in ("hidden", "mlp", "attn", "mlp_out"):
            model.get_submodule(arch.layer_name(model, layer, kind))
    weight = arch.mlp_out_weight(model, 0)
    mlp_out = model.get_submodule(arch.layer_name(model, 0, "mlp_out"))
    # (out, in) orientation: applying it to a key gives the module's output
    key = torch.randn(weight.shape[1])
    bias = mlp_out.bias if getattr(mlp_out, "bias", None) is not None else torch.zeros(weight.shape[0])
    torch.testing.assert_close(mlp_out(key[None])[0], weight @ key + bias, atol=1e-5, rtol=1e-5)
    assert weight.shape[0] == tiny.hidden_size


def test_unknown_architecture_is_named():
    class Fake(nn.Module):
        def __init__(self, model_type):
            super().__init__()
            self.config = type("C", (), {"model_type": model_type})()

    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bert'.*gpt2"):
        architecture_for(Fake("bert"))
    with pytest.raises(UnsupportedModelError, match="lacks module"):
        architecture_for(Fake("gpt2"))


def test_every_family_has_an_adapter_row():
    assert {"gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral"} <= set(ARCHITECTURES)
    assert ARCHITECTURES["gpt2"].mlp_out_conv1d and not ARCHITECTURES["llama"].mlp_out_conv1d


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing-folder"))


def test_remote_code_and_unsupported_local_models_are_refused(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "x.Cfg"}}))
    with pytest.raises(ModelLoadError, match="remote code|cannot load|unsupported"):
        load_model(str(remote))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'"):
        load_model(str(bert))


def test_local_folder_loads(tmp_path, tokenizer):
    source = tiny_model("gpt2", tokenizer)
    source.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.arch.family == "gpt2" and loaded.source == "hub/local"
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, source.model(input_ids=ids).logits)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_wrap_model_card(tokenizer):
    lm = tiny_model("llama", tokenizer)
    card = lm.card()
    assert card["family"] == "llama" and card["layers"] == 4 and card["hidden size"] == 32
    assert card["device"] == "cpu" and card["dtype"] == "float32"
    assert card["parameters"] == sum(p.numel() for p in lm.model.parameters())


@pytest.mark.slow
def test_embedded_model_knows_the_eiffel_tower(embedded):
    assert embedded.arch.family == "llama" and embedded.num_layers == 30 and embedded.hidden_size == 576
    ids = torch.tensor([embedded.tokenizer("The Eiffel Tower is located in the city of")["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(embedded.model(input_ids=ids).logits[0, -1], -1)
    assert embedded.tokenizer.decode([int(probs.argmax())]) == " Paris"
    assert 0.6 < float(probs.max()) < 0.8


@pytest.mark.slow
def test_embedded_cache_reload_is_identical(embedded):
    again = load_model(device="cpu")
    assert again.source == "cache"
    for (name, a), (_, b) in zip(embedded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
