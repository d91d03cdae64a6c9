"""Edits as data: a small record (request, layer, u, v) meaning W_layer += v u^T on the MLP output projection.

Two ways to put edits on a model:

- `applied(lm, edits)`: a context manager for a model shared by many sessions (the app). Under a per-model
  lock it applies the session's edits, runs the caller's computation, then puts the original weights back
  bitwise, so one session's edit never shows in another's answers:

      with applied(lm, session_edits):
          text = generate(lm, prompts)

  Long work takes the lock per step (per fact, per batch: `step=lambda: applied(lm, edits, ...)`), so other
  sessions get their turn in between; `what`/`who` say who holds it (`holder(lm)`), and a session waiting for
  it is told so through `waiting` every half second (the app shows "busy: <what> for <who>" and a Cancel
  button there).

- `EditStack(lm)`: edits that stay on the model (the command line): apply, undo any one, undo all. Each
  touched layer's original matrix is kept; undoing restores it and re-applies the remaining edits in order,
  so the weights equal bitwise what they would be had the undone edit never been made.

Every change of a weight goes through `changed_weights(lm, layers)`, which keeps the layer's matrix as it was
before any edit (its *pristine* copy, shared by nested holders). `unedited(lm)` puts the pristine matrices
back for the length of a computation (and the edited ones after it, bitwise): what is cached for every
session and process (key statistics, ROME's context texts) is computed inside it, so it never carries an edit.

Export/import: one safetensors file holding every edit's u and v, with the records as JSON in its metadata.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from core.devices import writable_parameter
from core.errors import UserError
from core.models import LoadedModel

FORMAT = "rome-studio-edits/1"


@dataclass(frozen=True)
class EditRequest:
    """A new fact: `prompt` holds "{}" where the subject goes, e.g. "{} is located in the city of"."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None  # the model's answer before the edit, when known

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


@dataclass
class Edit:
    """W' = W + v u^T at `layer`'s MLP output projection (W as (out, in)); `key`/`value` are k* and v*,
    the key the edit was made for and the module output it now gives for it."""

    request: EditRequest
    layer: int
    u: torch.Tensor  # (in_features,)  C^-1 k*
    v: torch.Tensor  # (out_features,) (v* - W k* - b) / (u . k*)
    key: torch.Tensor  # (in_features,)  k*
    value: torch.Tensor  # (out_features,) v*
    model: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    info: dict = field(default_factory=dict)  # hyper-parameters, timings, loss history: JSON-able only

    def delta(self) -> torch.Tensor:
        """The (out, in) change of the matrix."""
        return torch.outer(self.v, self.u)

    def record(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "layer": self.layer,
            "request": asdict(self.request),
            "info": self.info,
        }


# --- putting edits on weights ------------------------------------------------------------------------------


def _weight(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The stored weight (for Conv1D: (in, out)): the tensor the model computes with, also where accelerate
    offloaded it (core.devices.writable_parameter)."""
    return writable_parameter(lm.model, f"{lm.arch.layer_name(lm.model, layer, 'mlp_out')}.weight")


def check_edit(lm: LoadedModel, edit: Edit) -> None:
    if not 0 <= edit.layer < lm.num_layers:
        raise UserError(f"edit {edit.id} is for layer {edit.layer}, outside this model's {lm.num_layers} layers")
    out_features, in_features = lm.arch.mlp_out_shape(lm.model, edit.layer)
    if edit.u.shape != (in_features,) or edit.v.shape != (out_features,):
        raise UserError(
            f"edit {edit.id} does not fit this model's layer {edit.layer} (made for {edit.model or 'another model'})"
        )


def _add(lm: LoadedModel, edit: Edit) -> None:
    with torch.no_grad():
        view = lm.arch.mlp_out_weight(lm.model, edit.layer)  # (out, in) view of the stored weight
        view.add_(edit.delta().to(device=view.device, dtype=view.dtype))


def _restore(lm: LoadedModel, matrices: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, matrix in matrices.items():
            _weight(lm, layer).copy_(matrix)


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(lm: LoadedModel) -> threading.RLock:
    """The one lock of this model (re-entrant: nested `applied` in one thread is fine)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(lm.model)
        if lock is None:
            lock = _LOCKS[lm.model] = threading.RLock()
        return lock


# --- pristine weights --------------------------------------------------------------------------------------

# model -> layer -> [the matrix before any edit, number of holders]
_PRISTINE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, list]]" = weakref.WeakKeyDictionary()


def _hold(lm: LoadedModel, layer: int) -> None:
    """Keep `layer`'s matrix as it is now unless a holder already keeps an earlier one (caller has the lock)."""
    held = _PRISTINE.setdefault(lm.model, {})
    if layer in held:
        held[layer][1] += 1
    else:
        held[layer] = [_weight(lm, layer).detach().clone(), 1]


def _release(lm: LoadedModel, layer: int) -> None:
    """Drop one holder of `layer`; the last one forgets the pristine matrix (caller has the lock)."""
    held = _PRISTINE[lm.model]
    held[layer][1] -= 1
    if held[layer][1] == 0:
        del held[layer]


@contextmanager
def changed_weights(lm: LoadedModel, layers: set[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hold the model's lock while the caller changes `layers`' MLP output matrices; afterwards (also on error)
    put them back bitwise as they were on entry. Yields {layer: matrix on entry}."""
    with model_lock(lm):
        entry = {layer: _weight(lm, layer).detach().clone() for layer in layers}
        for layer in layers:
            _hold(lm, layer)
        try:
            yield entry
        finally:
            for layer in layers:
                _release(lm, layer)
            _restore(lm, entry)


@contextmanager
def unedited(lm: LoadedModel) -> Iterator[LoadedModel]:
    """Hold the model's lock and give it its weights from before any edit for the length of the block; the
    edited weights come back afterwards, bitwise (also on error)."""
    with model_lock(lm):
        held = dict(_PRISTINE.get(lm.model, {}))
        current = {layer: _weight(lm, layer).detach().clone() for layer in held}
        try:
            _restore(lm, {layer: pristine for layer, (pristine, _) in held.items()})
            yield lm
        finally:
            _restore(lm, current)


def is_edited(lm: LoadedModel) -> bool:
    """Whether some layer of the model now differs from its pristine matrix (an edit is held on it)."""
    return bool(_PRISTINE.get(lm.model))


@dataclass(frozen=True)
class Holder:
    """Who holds a model's lock: what for (e.g. "tracing 'The Eiffel Tower ...'"), for whom, since when."""

    what: str
    who: str
    since: float  # time.time()

    def describe(self) -> str:
        return f"busy: {self.what or 'working'} for {self.who or 'another session'} ({time.time() - self.since:.0f} s)"


_HOLDERS: "weakref.WeakKeyDictionary[torch.nn.Module, Holder]" = weakref.WeakKeyDictionary()
_WAITERS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
WAIT_POLL = 0.5  # seconds between two `waiting` calls


def holder(lm: LoadedModel) -> Holder | None:
    """Who holds the model's lock now (None: it is free, or held without a note)."""
    return _HOLDERS.get(lm.model)


@contextmanager
def _locked(lm: LoadedModel, what: str, who: str, waiting: Callable[[Holder | None], None] | None) -> Iterator[None]:
    """The model's lock, noting `what`/`who` while held; `waiting(holder)` is called every WAIT_POLL seconds
    while another thread has it (raising there, e.g. a cancel, stops the wait). On release, a moment is left
    to a waiting thread, so a long run taking the lock per step cannot starve it."""
    lock = model_lock(lm)
    if not lock.acquire(blocking=False):
        with _LOCKS_GUARD:
            _WAITERS[lm.model] = _WAITERS.get(lm.model, 0) + 1
        try:
            while not lock.acquire(timeout=WAIT_POLL):
                if waiting:
                    waiting(holder(lm))
        finally:
            with _LOCKS_GUARD:
                _WAITERS[lm.model] -= 1
    previous = _HOLDERS.get(lm.model)
    if what or who or previous is None:
        _HOLDERS[lm.model] = Holder(what, who, time.time())
    try:
        yield
    finally:
        if previous is None:
            _HOLDERS.pop(lm.model, None)
        else:
            _HOLDERS[lm.model] = previous
        lock.release()
        if _WAITERS.get(lm.model, 0):
            time.sleep(0.005)  # let the waiting thread take it before this one comes back for its next step


@contextmanager
def applied(
    lm: LoadedModel,
    edits: Sequence[Edit] = (),
    *,
    what: str = "",
    who: str = "",
    waiting: Callable[[Holder | None], None] | None = None,
) -> Iterator[LoadedModel]:
    """Hold the model's lock, apply `edits` in order, yield, then restore the touched weights bitwise
    (also on error). Everything that reads the model for a session should run inside this; `what`, `who`
    and `waiting` are the lock's note and the waiter's callback (see the module docstring)."""
    for edit in edits:
        check_edit(lm, edit)
    with _locked(lm, what, who, waiting), changed_weights(lm, {e.layer for e in edits}):
        for edit in edits:
            _add(lm, edit)
        yield lm


class EditStack:
    """Edits that stay on the model until undone; see the module docstring."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.edits: list[Edit] = []
        self._originals: dict[int, torch.Tensor] = {}

    def apply(self, edit: Edit) -> Edit:
        check_edit(self.lm, edit)
        with model_lock(self.lm):
            if edit.layer not in self._originals:
                self._originals[edit.layer] = _weight(self.lm, edit.layer).detach().clone()
                _hold(self.lm, edit.layer)
            _add(self.lm, edit)
            self.edits.append(edit)
        return edit

    def undo(self, edit_id: str | None = None) -> Edit:
        """Undo one edit (the last one by default); the others stay."""
        if not self.edits:
            raise UserError("there is no edit to undo")
        index = len(self.edits) - 1 if edit_id is None else self._index(edit_id)
        with model_lock(self.lm):
            removed = self.edits.pop(index)
            layer = removed.layer
            _restore(self.lm, {layer: self._originals[layer]})
            for edit in self.edits:
                if edit.layer == layer:
                    _add(self.lm, edit)
            if not any(e.layer == layer for e in self.edits):
                del self._originals[layer]
                _release(self.lm, layer)
        return removed

    def undo_all(self) -> None:
        with model_lock(self.lm):
            _restore(self.lm, self._originals)
            for layer in self._originals:
                _release(self.lm, layer)
            self._originals.clear()
            self.edits.clear()

    def _index(self, edit_id: str) -> int:
        for i, edit in enumerate(self.edits):
            if edit.id == edit_id:
                return i
        raise UserError(f"no edit with id {edit_id!r} is applied")

    def __len__(self) -> int:
        return len(self.edits)


# --- export / import ---------------------------------------------------------------------------------------


def export_edits(edits: Sequence[Edit], path: str | Path) -> Path:
    """Write `edits` to one safetensors file (tensors u/v/key/value per edit, records as JSON metadata)."""
    path = Path(path)
    tensors, records = {}, []
    for i, edit in enumerate(edits):
        for name in ("u", "v", "key", "value"):
            tensors[f"{i}.{name}"] = getattr(edit, name).detach().float().cpu().contiguous()
        records.append(edit.record())
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "edits": json.dumps(records)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _checked_parts(record: object, i: int, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Check one edit record of a file (every field's type, finite vectors); returns its u, v, key, value."""

    def bad(why: str) -> UserError:
        return UserError(f"edits file {where!r} is malformed: edit {i} {why}")

    if not isinstance(record, dict):
        raise bad("is not a JSON object")
    if not isinstance(record.get("id"), str) or not record["id"].strip():
        raise bad("has no text id")
    if not isinstance(record.get("model"), str):
        raise bad("has no model name")
    if type(record.get("layer")) is not int or record["layer"] < 0:
        raise bad("has no whole, non-negative layer")
    if not isinstance(record.get("info", {}), dict):
        raise bad("has an 'info' that is not a JSON object")
    request = record.get("request")
    if not isinstance(request, dict):
        raise bad("has no request")
    for name in ("prompt", "subject", "target_new"):
        if not isinstance(request.get(name), str) or not request[name].strip():
            raise bad(f"has an empty or non-text request {name!r}")
    if request.get("target_true") is not None and not isinstance(request["target_true"], str):
        raise bad("has a non-text request 'target_true'")
    parts = {}
    for name in ("u", "v", "key", "value"):
        tensor = tensors.get(f"{i}.{name}")
        if tensor is None or tensor.ndim != 1 or not tensor.is_floating_point():
            raise bad(f"lacks its vector {name!r}")
        if not torch.isfinite(tensor).all():
            raise bad(f"has non-finite numbers in {name!r}")
        parts[name] = tensor
    if parts["u"].shape != parts["key"].shape or parts["v"].shape != parts["value"].shape:
        raise bad("has vectors of mismatched sizes")
    return parts


def import_edits(path: str | Path, lm: LoadedModel | None = None) -> list[Edit]:
    """Read edits written by `export_edits`, checking every field (types, finite vectors); with `lm`, check
    they were made for that model and fit its layers (tensors go to its device)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"edits file {str(path)!r} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:
        raise UserError(f"edits file {str(path)!r} is not a safetensors file ({str(err).splitlines()[0]})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"edits file {str(path)!r} was not written by ROME Studio (no {FORMAT} marker)")
    try:
        records = json.loads(metadata["edits"])
    except (KeyError, ValueError) as err:
        raise UserError(f"edits file {str(path)!r} is malformed (no readable edit records: {err})") from None
    if not isinstance(records, list):
        raise UserError(f"edits file {str(path)!r} is malformed (its edit records are not a list)")
    edits = []
    for i, record in enumerate(records):
        parts = _checked_parts(record, i, tensors, str(path))
        if lm is not None:
            if record["model"] and record["model"] != lm.name:
                raise UserError(
                    f"edit {i} ({record['id']}) in {str(path)!r} was made for the model {record['model']!r}, "
                    f"not for {lm.name!r}: load that model to apply it"
                )
            parts = {k: t.to(device=lm.device, dtype=lm.dtype) for k, t in parts.items()}
        request = record["request"]
        edits.append(
            Edit(
                request=EditRequest(
                    request["prompt"], request["subject"], request["target_new"], request.get("target_true")
                ),
                layer=record["layer"],
                model=record["model"],
                id=record["id"],
                info=record.get("info", {}),
                **parts,
            )
        )
    if lm is not None:
        for edit in edits:
            check_edit(lm, edit)
    return edits
