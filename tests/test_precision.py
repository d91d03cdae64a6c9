"""TF32 (core/precision.py): a CUDA-only option that always puts the previous matmul precision back."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from core.precision import tf32_matmuls


def test_tf32_refuses_a_cpu_model_and_changes_nothing(tiny):
    before = torch.get_float32_matmul_precision()
    with pytest.raises(UserError, match="CUDA option"):
        with tf32_matmuls(tiny):
            pass
    assert torch.get_float32_matmul_precision() == before


def test_disabled_tf32_is_a_no_op(tiny):
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(tiny, enabled=False):
        assert torch.get_float32_matmul_precision() == before
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_is_restored_after_a_failure(tokenizer):
    from core.tiny import tiny_model

    lm = tiny_model("gpt2", tokenizer)
    lm.model.to("cuda")
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError, match="inside"):
        with tf32_matmuls(lm):
            assert torch.get_float32_matmul_precision() == "high"
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before
