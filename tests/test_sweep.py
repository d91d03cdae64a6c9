"""Layer sweep: the same edit at several layers, measured alike, weights untouched after; layer parsing."""

from __future__ import annotations

import pytest
import torch

from core.edits import EditRequest
from core.errors import UserError
from core.rome import RomeHyperParams
from core.sweep import layer_sweep, parse_layers
from core.tiny import tiny_model

TINY = RomeHyperParams(context_lengths=((4, 2),), stats_tokens=512, steps=3)


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("0-29:3", 30) == list(range(0, 30, 3))
    assert parse_layers("5, 2,2", 30) == [2, 5]
    with pytest.raises(UserError, match="layers 0..3"):
        parse_layers("4", 4)
    with pytest.raises(UserError, match="use e.g."):
        parse_layers("x-y", 4)


def test_sweep_on_a_tiny_model(tokenizer):
    lm = tiny_model("llama", tokenizer)
    weights = {n: p.clone() for n, p in lm.model.named_parameters()}
    request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    sweep = layer_sweep(
        lm,
        request,
        [0, 2],
        paraphrases=["Where is The Eiffel Tower? In the city of"],
        neighbors=["The Louvre is located in the city of"],
        hparams=TINY,
        trace_samples=2,
    )
    assert [r["layer"] for r in sweep.rows] == [0, 2]
    for row in sweep.rows:
        assert {"p_new", "p_true", "efficacy", "paraphrase", "neighborhood", "score", "trace_effect"} <= set(row)
        assert 0 <= row["score"] <= 1 and row["trace_effect"] is not None
    data = sweep.to_json()
    assert data["best_layer"] in (0, 2) and data["request"]["target_true"]
    for name, p in lm.model.named_parameters():  # every edit was undone
        assert torch.equal(p, weights[name]), name
