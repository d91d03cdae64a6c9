"""Device maps (core/devices.py): a tiny model with some blocks on the CPU and others offloaded to disk by
accelerate gives the plain model's trace tables, ROME edits and edited logits; `--device-map` on the command
line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.__main__ import main
from core.covariance import key_statistics
from core.devices import is_offloaded, parse_device_map, read_parameter
from core.edits import Edit, EditRequest, EditStack, applied, unedited
from core.errors import UserError
from core.evaluation import FTHyperParams, ft_delta
from core.models import LoadedModel, load_model, weights_fingerprint, wrap_model
from core.rome import RomeHyperParams, compute_edit, value_blocks
from core.saving import save_edited_model
from core.tiny import tiny_model
from core.tracing import trace

# value_precision "model": a model spread by a device map always optimises values in its own dtype (its weights
# may be offloaded, so there is no bfloat16 copy to make), and the plain twin must do the same to be compared
TINY = RomeHyperParams(layer=1, context_lengths=((4, 2),), stats_tokens=512, steps=3, value_precision="model")
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
DISK_BLOCKS = (1, 2)  # layer 1 is TINY's edited layer


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny models' statistics go to a throwaway cache shared by the session (same seed: same model)."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "rome-cache"))


def spread_map(lm: LoadedModel, disk_blocks=DISK_BLOCKS, embed: str = "disk") -> dict[str, str]:
    """Every top-level module on the CPU but the embedding (on `embed`); blocks in `disk_blocks` on disk."""
    device_map: dict[str, str] = {}

    def walk(module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == lm.arch.blocks:
                device_map.update({f"{path}.{i}": "disk" if i in disk_blocks else "cpu" for i in range(len(child))})
            elif lm.arch.blocks.startswith(path + "."):
                walk(child, path + ".")
            else:
                device_map[path] = embed if path == lm.arch.embed else "cpu"

    walk(lm.model, "")
    return device_map


def spread(family: str, tokenizer, **kwargs) -> tuple[LoadedModel, LoadedModel]:
    """The same tiny random model twice: plain, and dispatched with `spread_map`."""
    plain = tiny_model(family, tokenizer)
    twin = tiny_model(family, tokenizer)
    dispatched = wrap_model(twin.model, tokenizer, twin.name, device_map=spread_map(twin, **kwargs), source="random")
    return plain, dispatched


def logits(lm: LoadedModel, text: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]], device=lm.device)
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])  # qwen2, mistral: as llama
def test_fast_trace_equal_with_cpu_and_disk_blocks(family, tokenizer):
    plain, dispatched = spread(family, tokenizer)
    down = f"{dispatched.arch.layer_name(dispatched.model, 1, 'mlp_out')}.weight"
    assert is_offloaded(dispatched.model, down) and dispatched.model.get_parameter(down).device.type == "meta"
    assert dispatched.device == torch.device("cpu")  # the embedding is on disk, it computes on the CPU
    assert weights_fingerprint(dispatched) == weights_fingerprint(plain)
    a = trace(plain, PROMPT, SUBJECT, samples=3)
    b = trace(dispatched, PROMPT, SUBJECT, samples=3)
    assert a.answer == b.answer and a.corrupted_score == pytest.approx(b.corrupted_score, abs=1e-7)
    for kind in ("hidden", "mlp", "attn"):
        assert abs(a.scores[kind] - b.scores[kind]).max() < 1e-6, kind


def test_naive_and_estimate_equal_with_cpu_and_disk_blocks(tokenizer):
    plain, dispatched = spread("llama", tokenizer)
    for engine in ("naive", "estimate"):
        a = trace(plain, PROMPT, SUBJECT, samples=2, kinds=["hidden", "mlp"], engine=engine)
        b = trace(dispatched, PROMPT, SUBJECT, samples=2, kinds=["hidden", "mlp"], engine=engine)
        for kind in ("hidden", "mlp"):
            assert abs(a.scores[kind] - b.scores[kind]).max() < 1e-6, (engine, kind)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # a transposed Conv1D weight, and a plain Linear
def test_rome_edit_on_a_disk_offloaded_layer(family, tokenizer):
    plain, dispatched = spread(family, tokenizer)
    before = logits(dispatched)
    edit = compute_edit(plain, REQUEST, TINY)
    twin = compute_edit(dispatched, REQUEST, TINY)  # the same key statistics: the cache knows these weights
    for name in ("u", "v", "key", "value"):
        assert torch.allclose(getattr(edit, name), getattr(twin, name), rtol=1e-4, atol=1e-6), name

    down = f"{dispatched.arch.layer_name(dispatched.model, 1, 'mlp_out')}.weight"
    original = read_parameter(dispatched.model, down).clone()
    plain_stack, stack = EditStack(plain), EditStack(dispatched)
    plain_stack.apply(edit)
    stack.apply(edit)
    edited = logits(dispatched)
    assert not torch.allclose(edited, before)
    assert torch.allclose(edited, logits(plain), atol=1e-6)
    assert dispatched.model.get_parameter(down).device.type == "meta"  # still offloaded, edited all the same
    assert weights_fingerprint(dispatched) == weights_fingerprint(plain)
    with unedited(dispatched):
        assert torch.equal(logits(dispatched), before)
    assert torch.equal(logits(dispatched), edited)

    stack.undo()
    plain_stack.undo()
    assert torch.equal(read_parameter(dispatched.model, down), original)
    assert torch.equal(logits(dispatched), before)
    with applied(dispatched, [edit]):  # a session's edit, put back bitwise afterwards
        assert torch.allclose(logits(dispatched), edited, atol=1e-6)
    assert torch.equal(logits(dispatched), before)


def test_key_statistics_through_the_offload_hooks(tokenizer, tmp_path, monkeypatch):
    plain, dispatched = spread("llama", tokenizer)
    moments = []
    for lm, cache in ((plain, "plain"), (dispatched, "dispatched")):
        monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / cache))  # each computes its own
        stats = key_statistics(lm, 1, tokens=256)
        assert not stats.cached
        moments.append(stats.mom2)
    assert torch.allclose(moments[0], moments[1], atol=1e-6)
    assert {p.device.type for p in dispatched.model.model.layers[1].parameters()} == {"meta"}  # still offloaded


def test_bfloat16_values_on_a_device_map_are_refused_and_auto_keeps_the_model_dtype(tokenizer):
    _, dispatched = spread("llama", tokenizer)
    before = logits(dispatched)
    with pytest.raises(UserError, match="without a device map"):
        compute_edit(dispatched, REQUEST, replace(TINY, value_precision="bfloat16"))
    assert torch.equal(logits(dispatched), before)
    assert value_blocks(dispatched, 1, "auto") is None


def test_ft_on_an_offloaded_layer_is_refused(tokenizer):
    _, dispatched = spread("llama", tokenizer)
    with pytest.raises(UserError, match="offloaded"):
        ft_delta(dispatched, REQUEST, FTHyperParams(layer=1, steps=1))


@pytest.mark.parametrize(
    "text, message",
    [
        ("everywhere", "not known"),
        ('{"model.layers.0": "moon"}', "not a device"),
        ("[1, 2]", "not a JSON object"),
        ("{bad json", "not valid JSON"),
    ],
)
def test_bad_device_maps(text, message):
    with pytest.raises(UserError, match=message):
        parse_device_map(text)


def test_device_map_must_cover_the_model(tokenizer):
    lm = tiny_model("llama", tokenizer)
    with pytest.raises(UserError, match="cannot place"):
        wrap_model(lm.model, tokenizer, lm.name, device_map={"model.layers.0": "cpu"})
    with pytest.raises(UserError, match="lacks"):
        wrap_model(lm.model, tokenizer, lm.name, device_map={"model.nothing": "cpu", "": "cpu"})


def run_cli(args, capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def saved(tokenizer, tmp_path) -> tuple[LoadedModel, Path]:
    """A tiny model and the folder it is saved in (a checkpoint from_pretrained loads with a device map)."""
    lm = tiny_model("llama", tokenizer)
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return lm, folder


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_edit_and_save_a_model_loaded_with_a_map(saved, tmp_path):
    """from_pretrained leaves disk-mapped weights in the checkpoint's safetensors file: an edit of one is made
    in memory (the checkpoint is never written), undone bitwise, and saved with the model."""
    plain, folder = saved
    checkpoint = (folder / "model.safetensors").read_bytes()
    lm = load_model(str(folder), device_map=spread_map(plain))
    assert lm.card()["device map"] == "disk: 3, cpu: 5"
    before = logits(lm)
    assert torch.allclose(before, logits(plain), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    out_features, in_features = lm.arch.mlp_out_shape(lm.model, 1)
    u, v = torch.randn(in_features, generator=generator), torch.randn(out_features, generator=generator)
    edit = Edit(REQUEST, 1, u, v, torch.zeros(in_features), torch.zeros(out_features), model=lm.name)
    stack = EditStack(lm)
    stack.apply(edit)
    with applied(plain, [edit]):
        edited = logits(plain)
    assert not torch.allclose(edited, before) and torch.allclose(logits(lm), edited, atol=1e-6)
    save_edited_model(lm, [], tmp_path / "edited")  # the model as it is: with the stack's edit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    with torch.no_grad():
        ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
        assert torch.allclose(reloaded(input_ids=ids).logits[0, -1], edited, atol=1e-6)
    stack.undo()
    assert torch.equal(logits(lm), before)
    assert (folder / "model.safetensors").read_bytes() == checkpoint


def test_cli_device_map(saved, tmp_path, capsys):
    """`--device-map auto` and an explicit map with disk blocks load a saved model through from_pretrained and
    give the plain run's table."""
    lm, folder = saved
    explicit = tmp_path / "map.json"
    explicit.write_text(json.dumps(spread_map(lm)))
    tables = {}
    for name, extra in [
        ("plain", ["--device", "cpu"]),
        ("auto", ["--device-map", "auto"]),
        ("map", ["--device-map", str(explicit)]),
    ]:
        out = tmp_path / f"{name}.json"
        args = ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--model", str(folder), "--samples", "2"]
        code, err = run_cli([*args, "--kind", "hidden", "--json", str(out), *extra], capsys)
        assert code == 0, err
        tables[name] = torch.tensor(json.loads(out.read_text())["hidden"]["scores"])
    assert torch.allclose(tables["auto"], tables["plain"], atol=1e-6)
    assert torch.allclose(tables["map"], tables["plain"], atol=1e-6)
    code, err = run_cli(["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--device-map", "everywhere"], capsys)
    assert code == 2 and "not known" in err
    both = ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--model", str(folder), "--device", "cpu"]
    code, err = run_cli([*both, "--device-map", "auto"], capsys)
    assert code == 2 and "not both" in err
