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


@pytest.fixture
def tiny_folder(tmp_path, tokenizer, monkeypatch):
    """A tiny random GPT-2 saved as a Hugging Face folder (for commands that take --model). The test's caches
    (statistics, contexts) go to its own folder: a model at a temporary path leaves nothing in the user's."""
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("gpt2", tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def open_page():
    """Opens a new app session (streamlit AppTest) on the given page, checked to render without exception."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    def open_(page: str):
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=900).run()
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return open_
