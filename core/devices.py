"""Models spread over several devices by a device map (accelerate): `--device-map auto` and explicit maps.

A device map puts each module on a GPU ("cuda:0", or its index), on the CPU ("cpu") or on the disk ("disk");
"auto" / "balanced" / "balanced_low_0" / "sequential" let accelerate choose from the GPUs and memory at hand.
accelerate's hooks then move each module's inputs to its *execution device*, and load *offloaded* weights
("disk", and "cpu" beside a GPU) for the length of the module's forward only: between forwards such a
parameter sits on the `meta` device and its values live in the hook's weights map.

What the rest of ROME Studio needs of that:
  - `parse_device_map`: a map from the command line or the app; `dispatch`: an in-memory model dispatched;
  - `execution_device(module)`: where a module computes (where its inputs go);
  - `read_parameter(model, name)`: a parameter's values, offloaded or not;
  - `writable_parameter(model, name)`: the tensor to change in place so that the next forward computes with
    the change (an edit, its undo). A weight offloaded to disk is copied into memory the first time it is
    asked for here (that matrix only) and read from there from then on; the disk copy, which may be the
    user's own checkpoint file, is never written;
  - `disk_source(model, name)`: for a parameter still read from disk at every forward, the mapping and key it
    is read from (unchanging while the model lives: caches may key on it);
  - `is_offloaded(model, name)`: whether a parameter lives in a weights map (such a weight cannot be trained
    in place, e.g. by FT-L).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, get_balanced_memory
from torch import nn

from core.errors import UserError

DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


def parse_device_map(text: str) -> DeviceMap:
    """A device map from text: one of DEVICE_MAP_NAMES, a JSON object {module: device}, or a JSON file holding
    one. Devices: "cpu", "disk", "cuda:N" (or N), "mps". Raises UserError naming what is wrong."""
    text = text.strip()
    if text in DEVICE_MAP_NAMES:
        return text
    usage = f"use {', '.join(DEVICE_MAP_NAMES)}, a JSON object {{module: device}} or a JSON file holding one"
    source = text
    if not text.startswith(("{", "[")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"device map {text!r} is not known: {usage}")
        source = path.read_text(encoding="utf-8")
    try:
        value = json.loads(source)
    except ValueError as err:
        raise UserError(f"device map {text!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict) or not value:
        raise UserError(f"device map {text!r} is not a JSON object: {usage}")
    for module, device in value.items():
        if not _valid_device(device):
            raise UserError(f"device map: {module!r} goes to {device!r}, not a device (cpu, disk, cuda:N, mps)")
    return value


def _valid_device(device: object) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if not isinstance(device, str):
        return False
    if device == "disk":
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True


def offload_folder() -> Path:
    """A fresh temporary folder for weights offloaded to disk; `remove_with` ties its life to the model's."""
    return Path(tempfile.mkdtemp(prefix="rome-studio-offload-"))


def remove_with(owner: object, folder: Path) -> None:
    """Remove `folder` when `owner` is freed (or at exit)."""
    weakref.finalize(owner, shutil.rmtree, folder, True)


def dispatch(model: nn.Module, device_map: DeviceMap, no_split: list[str], folder: Path | None = None) -> None:
    """Spread an in-memory `model` over devices as `device_map` says (a named strategy is resolved with
    accelerate's infer_auto_device_map, never splitting a module of a class in `no_split`); weights mapped to
    "disk" are written to `folder` (default: a temporary folder that lives as long as the model). The map
    used is `model.hf_device_map` afterwards."""
    if isinstance(device_map, str):
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    modules = dict(model.named_modules())
    unknown = [name for name in device_map if name and name not in modules]
    if unknown:
        raise UserError(f"device map names module(s) the model lacks: {', '.join(unknown[:5])}")
    if folder is None and "disk" in device_map.values():
        folder = offload_folder()
        remove_with(model, folder)
    try:
        dispatch_model(model, device_map, offload_dir=folder)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise UserError(f"cannot place the model with this device map: {str(err).splitlines()[0]}") from None


def _align_hooks(module: nn.Module) -> Iterator[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if isinstance(one, AlignDevicesHook):
            yield one


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else where its tensors are."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _offload_slot(model: nn.Module, name: str) -> tuple[Mapping, str] | None:
    """Where accelerate keeps the values of the parameter `name` (dotted, from the model root) while it sits on
    `meta`: the innermost mapping and its key there. None for a parameter that holds its own values."""
    tensor = model.get_parameter(name)
    if tensor.device.type != "meta":
        return None
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the owning module first, then its parents
        owner = model.get_submodule(".".join(parts[:cut]))
        key = ".".join(parts[cut:])
        for hook in _align_hooks(owner):
            if hook.offload and hook.weights_map is not None:
                store = hook.weights_map
                while isinstance(store, PrefixedDataset):
                    key, store = store.prefix + key, store.dataset
                return store, key
    raise UserError(f"{name} is on the meta device but no accelerate hook holds its values")


def is_offloaded(model: nn.Module, name: str) -> bool:
    """Whether the parameter `name` lives in an accelerate weights map (CPU or disk) between forwards."""
    return _offload_slot(model, name) is not None


def read_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The values of the parameter `name` (dotted, from the model root), also where it is offloaded (then a
    tensor in memory: a copy for one on disk, which nothing should change)."""
    slot = _offload_slot(model, name)
    if slot is None:
        return model.get_parameter(name)
    store, key = slot
    return store[key]


def writable_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor holding the values of the parameter `name` that the model computes with: change it in place
    and the next forward sees the change. An offloaded weight read from disk is copied into memory here (once)
    and served from there from then on (see the module docstring)."""
    slot = _offload_slot(model, name)
    if slot is None:
        return model.get_parameter(name)
    store, key = slot
    if isinstance(store, OffloadedWeightsLoader):
        if key not in store.state_dict:  # still read from disk at every forward: keep it in memory from now on
            store.state_dict[key] = store[key].to("cpu")
        return store.state_dict[key]
    return store[key]  # a dict of CPU tensors, read at every forward


def disk_source(model: nn.Module, name: str) -> tuple[Mapping, str] | None:
    """For a parameter read from disk at every forward (offloaded, never written here): its mapping and key;
    else None."""
    slot = _offload_slot(model, name)
    if slot is None:
        return None
    store, key = slot
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        return slot
    return None


def move_to(value: object, device: torch.device) -> object:
    """`value` (a tensor, or a tuple/list/dict of them, or anything else) with its tensors on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value
