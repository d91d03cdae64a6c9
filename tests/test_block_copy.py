"""The bfloat16 block copy (core/block_copy.py) and the value optimisation that runs on it (core/rome.py):
the copy runs the same function as the model's blocks to bfloat16 precision, never touches the model, follows
the weights as they are (edits included), and "auto" picks it only where it is faster."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from core import rome
from core.block_copy import copy_blocks
from core.edits import EditRequest, applied
from core.errors import UserError
from core.forward import PrefixCache, record_kv, run_blocks, slice_prefix
from core.generation import cache_of
from core.hooks import Hooks
from core.prompts import target_ids

PROMPT = "The Eiffel Tower is located in the city of"
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
# small and quick on tiny models (as tests/test_rome.py): few context texts, a small corpus, few steps
TINY = rome.RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=5, preserve_weight=0.0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny models' statistics go to a throwaway cache shared by the session (same seed: same model)."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_the_copy_runs_the_blocks_to_bfloat16_precision_and_leaves_the_model_alone(tiny):
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    block = tiny.arch.layer_name(tiny.model, 0)
    before, attention = _state(tiny), tiny.model.config._attn_implementation
    with torch.no_grad(), Hooks(tiny.model, record=[block]) as hooks:
        out = tiny.model(input_ids=torch.tensor([ids]), use_cache=True)
    kv, start = record_kv(cache_of(out)), 3
    hidden = hooks.outputs[block][:, start:]
    upper = copy_blocks(tiny, 1)
    with torch.no_grad():
        plain = run_blocks(tiny, hidden, first=1, start_position=start, prefix=PrefixCache(slice_prefix(kv, start)))
        copied = run_blocks(
            tiny, hidden, first=1, start_position=start, prefix=PrefixCache(slice_prefix(kv, start)), copy=upper
        )
    assert copied.dtype == hidden.dtype == torch.float32  # the states stay float32; only the products are not
    assert 0 < _relative_error(copied, plain) < 2e-2  # bfloat16 products: close, and not the float32 run
    assert tiny.model.config._attn_implementation == attention
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)


def test_the_copy_casts_only_weight_matrices_and_shares_no_storage(tiny):
    upper = copy_blocks(tiny, 2)
    model_blocks = tiny.model.get_submodule(tiny.arch.blocks)
    assert len(upper.blocks) == len(model_blocks) - 2 and upper.block(2) is upper.blocks[0]
    model_storage = {p.untyped_storage().data_ptr() for p in tiny.model.parameters()}
    for (name, copied), (_, original) in zip(
        upper.blocks[0].named_parameters(), model_blocks[2].named_parameters(), strict=True
    ):
        assert not copied.requires_grad
        assert copied.untyped_storage().data_ptr() not in model_storage, name
        want = torch.bfloat16 if original.dim() >= 2 else original.dtype
        assert copied.dtype == want, name
        torch.testing.assert_close(copied.float(), original.to(want).float(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not block 1"):
        run_blocks(tiny, torch.zeros(1, 1, tiny.hidden_size), first=1, copy=upper)


def test_the_copy_is_of_the_weights_as_they_are_edits_included(tiny):
    layer = 1
    edit = rome.compute_edit(tiny, REQUEST, TINY)
    name = f"{tiny.arch.layer_name(tiny.model, layer, 'mlp_out')}.weight"
    with applied(tiny, [edit]):
        edited = tiny.model.get_parameter(name).detach().clone()
        upper = copy_blocks(tiny, layer)
    relative = name.removeprefix(f"{tiny.arch.blocks}.{layer}.")
    copied = upper.block(layer).get_parameter(relative)
    assert torch.equal(copied, edited.to(torch.bfloat16))
    assert not torch.equal(copied, tiny.model.get_parameter(name).detach().to(torch.bfloat16))


def _value_batch(lm, layer: int):
    hp = replace(TINY, layer=layer)
    request = rome.validate_request(lm, REQUEST)
    rows = rome.edit_rows(lm, request, rome.context_texts(lm, hp.context_lengths, hp.seed))
    recording = rome.record_rows(lm, rows, layer)
    return rome.value_batch(lm, rows, recording, [target_ids(lm.tokenizer, request.target_new)])


def test_value_losses_and_their_gradient_on_the_copy_match_the_models(tiny):
    layer = 1
    batch = _value_batch(tiny, layer)
    torch.manual_seed(0)
    results = []
    for blocks in (None, copy_blocks(tiny, layer + 1)):
        delta = (torch.randn(1, tiny.hidden_size) * 3).requires_grad_()  # KL ~1e-2, well above rounding
        nll, kl = rome.value_losses(tiny, batch, delta, layer, blocks)
        (nll + kl).sum().backward()
        results.append((nll.detach(), kl.detach(), delta.grad))
        torch.manual_seed(0)
    (nll, kl, grad), (nll16, kl16, grad16) = results
    assert abs(float(nll16[0] - nll[0])) < 2e-2 * float(nll[0])
    assert abs(float(kl16[0] - kl[0])) < 5e-2 * float(kl[0]) + 1e-4
    assert float(torch.nn.functional.cosine_similarity(grad16, grad)) > 0.999


@pytest.mark.parametrize("precision", ["auto", "model", "bfloat16"])
def test_which_blocks_the_value_optimisation_runs_on(tiny, monkeypatch, precision):
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        blocks = rome.value_blocks(tiny, 1, precision)
        copies = precision == "bfloat16" or (precision == "auto" and native)
        assert (blocks is not None) == copies
        if blocks is not None:
            assert blocks.first == 2 and blocks.dtype == torch.bfloat16
    assert rome.value_blocks(tiny, tiny.num_layers - 1, precision) is None  # no block above the last


def test_auto_keeps_a_half_precision_model_as_it_is(tiny, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert rome.value_blocks(tiny, 1, "auto") is not None
    tiny.model.to(torch.float16)
    assert rome.value_blocks(tiny, 1, "auto") is None


def test_an_edit_on_the_copy_maps_the_key_as_the_float32_edit_does(tiny):
    """The update is still solved exactly (W' k = v* in float32); only delta's optimisation ran in bfloat16,
    so the two deltas differ a little, in the same direction."""
    exact = rome.compute_edit(tiny, REQUEST, replace(TINY, value_precision="model"))
    fast = rome.compute_edit(tiny, REQUEST, replace(TINY, value_precision="bfloat16"))
    assert float(torch.nn.functional.cosine_similarity(fast.v.float(), exact.v.float(), dim=0)) > 0.95
    with applied(tiny, [fast]):
        weight = tiny.arch.mlp_out_weight(tiny.model, 1).float()
        bias = tiny.arch.mlp_out_bias(tiny.model, 1)
        out = weight @ fast.key.float() + (bias.float() if bias is not None else 0)
    torch.testing.assert_close(out, fast.value.float(), atol=1e-4, rtol=1e-4)


def test_an_unknown_value_precision_is_refused(tiny):
    before = _state(tiny)
    with pytest.raises(UserError, match="unknown value precision 'half'"):
        rome.compute_edit(tiny, REQUEST, replace(TINY, value_precision="half"))
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
