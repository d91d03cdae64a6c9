"""One small context manager to read or rewrite module outputs (in the spirit of baukit's nethook).

    with Hooks(model, {"model.layers.3.mlp": edit_fn}, record=["model.layers.5"]) as hooks:
        model(**inputs)
    hooks.outputs["model.layers.5"]   # the output tensor of that module (first element of a tuple output)

A forward can end early once what it is for is recorded: the layers above are skipped.

    with Hooks(model, record=["model.layers.2"]) as hooks, stop_after(model, "model.layers.2"):
        model(**inputs)  # runs blocks 0-2 only

`edit_fn(output_tensor, name)` may modify the tensor in place or return a replacement tensor. On a model spread
over devices (core/devices.py) each output is on its module's device: an edit moves what it writes there (a
replacement is moved there for it), and recorded tensors stay there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

EditFn = Callable[[torch.Tensor, str], torch.Tensor | None]


def first_tensor(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple (attention modules)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return tensor


class Hooks:
    """Record and/or rewrite the outputs of named modules while the context is open."""

    def __init__(
        self,
        model: nn.Module,
        edit: dict[str, EditFn] | None = None,
        record: Iterable[str] = (),
        record_inputs: Iterable[str] = (),
        detach: bool = True,
    ) -> None:
        self.model = model
        self.edit = dict(edit or {})
        self.record = list(record)
        self.record_inputs = list(record_inputs)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "Hooks":
        try:
            for name in dict.fromkeys([*self.edit, *self.record]):
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            for name in self.record_inputs:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone() if self.detach else tensor

    def _output_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if name in self.edit:
                tensor = first_tensor(output)
                replaced = self.edit[name](tensor, name)
                if replaced is not None and replaced is not tensor:
                    output = _replace_first(output, replaced.to(tensor.device))
            if name in self.record:
                self.outputs[name] = self._keep(first_tensor(output))
            return output

        return hook

    def _input_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any) -> None:
            self.inputs[name] = self._keep(inputs[0])

        return hook


class StopForward(Exception):
    """Raised by `stop_after`'s hook to end a forward pass; `stop_after` catches it."""


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """End any forward pass run inside the context right after module `name` has given its output (hooks
    registered before this one, e.g. an enclosing `Hooks`, still see it). The model returns nothing then."""
    handle = model.get_submodule(name).register_forward_hook(lambda module, inputs, output: _stop())
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


def _stop() -> None:
    raise StopForward
