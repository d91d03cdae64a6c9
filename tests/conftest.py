"""Shared fixtures: the embedded model (loaded once per session) and tiny random models of every family."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

from core.models import LoadedModel, load_model
from core.tiny import TINY_FAMILIES, tiny_model

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded.tokenizer


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request, tokenizer) -> LoadedModel:
    """A fresh tiny random model of each supported family (fresh: tests may edit it)."""
    return tiny_model(request.param, tokenizer)
