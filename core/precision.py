"""TF32 matrix products on CUDA: fp32 traces and edits on tensor cores, at a measured cost in precision.

TF32 keeps fp32's range but rounds the matmul inputs to a 10-bit mantissa. bench/gpu.py measures what that
does to causal-tracing tables on large model shapes (the largest cell difference against plain fp32), which is
why it is offered as an option and never the default.

    with tf32_matmuls(lm):
        result = trace(lm, prompt, subject)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from core.errors import UserError
from core.models import LoadedModel


def allow_tf32(lm: LoadedModel) -> None:
    """From now on, fp32 matrix products may use TF32 (the command line's --tf32: one process, one command)."""
    if lm.device.type != "cuda":
        raise UserError(f"--tf32 is a CUDA option: the model is on {lm.device.type} (use --device cuda on a GPU)")
    torch.set_float32_matmul_precision("high")


@contextmanager
def tf32_matmuls(lm: LoadedModel, enabled: bool = True) -> Iterator[None]:
    """Allow TF32 for fp32 matrix products inside the block (a no-op when `enabled` is False); the previous
    setting comes back afterwards, also on failure. Only for a model on CUDA."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    allow_tf32(lm)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
