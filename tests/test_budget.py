"""Caps on long work in a shared server (core.budget): a trace longer than the model's context or over the
memory cap, statistics over the token cap, a sentiment read over the memory cap: one clear error before the
work. And the memory shown before it (the time forecast is core.trace_cost's: tests/test_estimate.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core import aie
from core.__main__ import main
from core.budget import check_trace, trace_size
from core.covariance import MAX_STATS_TOKENS, key_statistics
from core.errors import UserError
from core.facts import Fact
from core.rome import RomeHyperParams
from core.sentiment import FeelingProxy, read_texts
from core.sentiment_trace import trace_sentiment

LONG = "The Eiffel Tower, " + "which is very tall and made of iron, " * 8 + "is located in the city of"


def test_a_traces_memory_grows_with_its_tokens_copies_and_kinds(tiny):
    ten = trace_size(tiny, 10)  # 10 samples, 3 kinds: the clean run and 10 noisy copies, recorded twice per layer
    assert ten.memory_bytes == 2 * tiny.num_layers * 11 * 10 * tiny.hidden_size * tiny.dtype.itemsize * 3
    assert trace_size(tiny, 20).memory_bytes == 2 * ten.memory_bytes
    assert trace_size(tiny, 10, samples=21).memory_bytes == 2 * ten.memory_bytes
    assert trace_size(tiny, 10, kinds=1).memory_bytes * 3 == ten.memory_bytes
    megabytes = f"{ten.memory_bytes / 2**20:,.0f}"
    assert ten.describe() == f"10 tokens, 3 kinds: {megabytes} MB of recorded states (cap 2,048 MB)"


def test_a_prompt_longer_than_the_context_is_refused(tiny):
    context = tiny.model.config.to_dict().get("max_position_embeddings") or tiny.model.config.n_positions
    assert check_trace(tiny, context).tokens == context
    with pytest.raises(UserError, match=f"reads at most {context}"):
        check_trace(tiny, context + 1)


def test_a_trace_over_the_memory_cap_is_refused(tiny, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_MAX_TRACE_MB", "1")
    per_token = trace_size(tiny, 1).memory_bytes
    fits = 2**20 // per_token
    check_trace(tiny, fits)
    with pytest.raises(UserError, match="over the 1 MB cap: shorten the prompt"):
        check_trace(tiny, fits + 1)
    check_trace(tiny, fits + 1, kinds=1)  # fewer kinds make it affordable


def test_the_average_refuses_an_over_long_fact_before_tracing(tiny, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_MAX_TRACE_MB", "1")
    monkeypatch.setattr(aie, "predict", lambda lm, fact: SimpleNamespace(known=True))
    traced = []
    monkeypatch.setattr(aie, "trace", lambda *a, **k: traced.append(a))
    with pytest.raises(UserError, match="the fact .* over the 1 MB cap"):
        aie.average_indirect_effect(tiny, [Fact("The Eiffel Tower", LONG, "Paris")], samples=10)
    assert not traced


def test_the_sentiment_trace_refuses_over_the_memory_cap(tiny, monkeypatch):
    texts = ["I love it!", "This is awful.", "Great day", "The bus was late"]
    proxy = FeelingProxy.fit(tiny, read_texts(tiny, texts), [1, 0, 1, 0])
    monkeypatch.setenv("ROME_STUDIO_MAX_TRACE_MB", "1")
    with pytest.raises(UserError, match="MB cap"):
        trace_sentiment(tiny, LONG[:200], proxy, samples=10, max_tokens=500)


def test_statistics_over_the_token_cap_are_refused_at_once(tiny):
    with pytest.raises(UserError, match=f"over the cap of {MAX_STATS_TOKENS:,}"):
        key_statistics(tiny, 0, tokens=1_000_000)


def test_statistics_under_the_key_size_are_refused_before_any_work(tiny, monkeypatch):
    """Fewer corpus tokens than the keys have dimensions give a singular C: refused by key_statistics and by
    ROME's settings check (so `edit` refuses before any model work); the identity C needs no tokens."""
    from core import covariance

    size = tiny.arch.mlp_out_shape(tiny.model, 0)[1]
    assert covariance.min_statistics_tokens(tiny) == size
    monkeypatch.setattr(covariance, "generated_corpus", lambda *a, **k: pytest.fail("no corpus for a refused size"))
    message = f"over {size - 1:,} tokens cannot be inverted: this model's keys have {size:,} dimensions"
    with pytest.raises(UserError, match=message):
        key_statistics(tiny, 0, tokens=size - 1)
    with pytest.raises(UserError, match=message):
        RomeHyperParams(layer=1, stats_tokens=size - 1).check(tiny)
    RomeHyperParams(layer=1, stats_tokens=size - 1, stats_corpus="identity", preserve_weight=0.0).check(tiny)
    assert torch.equal(key_statistics(tiny, 0, "identity", 0).mom2, torch.eye(size))


def test_a_sentiment_read_over_the_memory_cap_is_refused(tiny, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_MAX_FEATURES_MB", "1")
    per_text = (tiny.num_layers + 1) * tiny.hidden_size * 4
    many = ["I love it!"] * (2**20 // per_text + 1)
    with pytest.raises(UserError, match="over the 1 MB cap: use at most"):
        read_texts(tiny, many, layers=range(tiny.num_layers))
    assert len(read_texts(tiny, many[:3], layers=range(tiny.num_layers)).final) == 3


def test_the_command_line_refuses_before_tracing(monkeypatch, capsys):
    monkeypatch.setenv("ROME_STUDIO_MAX_TRACE_MB", "1")
    code = main(["trace", "--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower"])
    err = capsys.readouterr().err
    assert code == 2 and "MB cap" in err and "Traceback" not in err


def test_the_statistics_estimate_grows_with_the_tokens(tiny):
    from core.covariance import statistics_seconds

    assert statistics_seconds(tiny, 2000) == pytest.approx(2 * statistics_seconds(tiny, 1000))
