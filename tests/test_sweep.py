"""Layer sweep: the same edit at several layers, measured alike, weights untouched after; layer parsing."""

from __future__ import annotations

import pytest
import torch

from core.edits import EditRequest
from core.errors import UserError
from core.evaluation import names_object
from core.rome import RomeHyperParams
from core.sweep import MEASURES, average_sweeps, correlation, layer_sweep, parse_layers
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
        assert len(row["texts"]) == 2  # the prompt's and the paraphrase's continuations
        expected = sum(names_object(t, "Rome") for t in row["texts"]) / 2
        assert row["generation_efficacy"] == expected
    data = sweep.to_json()
    assert data["best_layer"] in (0, 2) and data["request"]["target_true"]
    assert set(data["correlation"]) == set(MEASURES)  # two layers: too few for a correlation
    assert all(r is None for r in data["correlation"].values())
    mean = average_sweeps([sweep, sweep])
    assert mean.n == 2 and mean.means["p_new"] == pytest.approx([r["p_new"] for r in sweep.rows])
    assert mean.to_json()["rows"][1]["layer"] == 2
    for name, p in lm.model.named_parameters():  # every edit was undone
        assert torch.equal(p, weights[name]), name


def test_correlation_over_layers():
    assert correlation([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert correlation([0.1, 0.2, 0.3, 0.4], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert correlation([0.1, None, 0.3, 0.4, 0.0], [1.0, 9.0, 3.0, 4.0, 0.0]) == pytest.approx(
        float(torch.corrcoef(torch.tensor([[0.1, 0.3, 0.4, 0.0], [1.0, 3.0, 4.0, 0.0]]))[0, 1]), abs=1e-6
    )
    assert correlation([0.1, 0.2], [1.0, 2.0]) is None  # fewer than 3 layers
    assert correlation([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]) is None  # a constant measure
    assert correlation([0.1, 0.2, 0.3, float("nan")], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)


def test_sweep_command_averages_a_set(tmp_path, tiny_folder, capsys):
    import json

    from core.__main__ import main

    folder = tiny_folder
    out = tmp_path / "sweep.json"
    args = [
        "sweep",
        "--data",
        "tests/data/counterfact_small.json",
        "--limit",
        "2",
        "--layers",
        "1-3",
        "--stats-tokens",
        "256",
    ]
    code = main([*args, "--trace-samples", "2", "--model", str(folder), "--device", "cpu", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["n"] == 2 and [r["layer"] for r in data["rows"]] == [1, 2, 3]
    assert set(data["correlation"]) == set(MEASURES)
    for i, row in enumerate(data["rows"]):  # each averaged row is the mean of the facts' rows
        for measure in ("p_new", "generation_efficacy", "trace_effect"):
            assert row[measure] == pytest.approx(sum(f["rows"][i][measure] for f in data["facts"]) / 2)
    assert "correlation of the trace effect" in capsys.readouterr().out

    code = main([*args, "--prompt", "{} is in", "--model", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "error: --data sweeps a set: leave out --prompt, --subject and --target"
    ]
