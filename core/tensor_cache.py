"""Cache files of tensors: safetensors written atomically with a hash of their tensors, read back only when
whole. What is cached per set of weights (key statistics, the generated corpus, ROME's context texts, a
catalogue's subject keys) lives in `core.covariance.stats_folder(lm)`, named by the model and its unedited
weights' fingerprint.

    save_tensors(path, {"mom2": c}, {"corpus": "generated"})
    stored = load_tensors(path, {"mom2": (1536, 1536)})   # None: missing or damaged (then deleted)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from core.atomic import write_atomically

Shape = tuple[int | None, ...]  # None: any size along that dimension


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write the tensors (on the CPU) with their digest; atomic: a cache file is never half-written."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = {**(metadata or {}), "sha256": tensors_digest(tensors)}
    write_atomically(path, lambda partial: safetensors.torch.save_file(tensors, str(partial), metadata=metadata))


def _fits(shape: tuple[int, ...], wanted: Shape) -> bool:
    return len(shape) == len(wanted) and all(w is None or s == w for s, w in zip(shape, wanted))


def load_tensors(path: Path, shapes: dict[str, Shape]) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors when it is whole: it opens, holds each name with its shape, and its tensors
    hash to the digest written with them. A damaged file is deleted (None: compute it again)."""
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            written = (f.metadata() or {}).get("sha256")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if set(tensors) != set(shapes) or not all(_fits(tuple(tensors[n].shape), s) for n, s in shapes.items()):
            raise ValueError("unexpected tensors")
        if written != tensors_digest(tensors):
            raise ValueError("hash mismatch")
        return tensors
    except Exception:  # truncated, not safetensors, wrong content: recompute
        path.unlink(missing_ok=True)
        return None
