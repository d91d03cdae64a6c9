"""The command line: JSON contract of trace / aie / facts, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.__main__ import build_parser, main
from core.commands import COMMANDS


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["trace", "--prompt", "", "--subject", "x"], "prompt is empty"),
        (["trace", "--prompt", "The Eiffel Tower is tall", "--subject", "Big Ben"], "does not occur"),
        (["trace", "--prompt", "a b", "--subject", "a", "--model", "no-such/model-xyz"], "not found"),
        (["trace", "--prompt", "a b", "--subject", "a", "--samples", "-3"], "must be positive"),
        (["trace", "--prompt", "a b", "--subject", "a", "--noise", "nan"], "finite"),
        (["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "Rome", "--stats-tokens", "10"], "1,536"),
        (["aie", "--facts", "/no/such/facts.json"], "does not exist"),
        (["trace", "--prompt", "a b", "--subject", "a", "--device", "cpu", "--tf32"], "CUDA option"),
        (["edit", "--prompt", "{} is in", "--subject", "Rome", "--target", "Paris", "--preserve-weight", "-1"], ">= 0"),
        (
            ["edit", "--prompt", "{} is in", "--subject", "Rome", "--target", "Paris", "--value-precision", "half"],
            "invalid choice: 'half'",
        ),
        (
            ["evaluate", "--limit", "1", "--preserve-facts", "/no/such/catalogue.json"],
            "preserve catalogue '/no/such/catalogue.json' does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "Loading" not in line and "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in err


def test_malformed_facts_file(tmp_path, capsys):
    bad = tmp_path / "facts.json"
    bad.write_text("{not json")
    code, _, err = run_cli(["aie", "--facts", str(bad)], capsys)
    assert code == 2 and "not valid JSON" in err
    bad.write_text(json.dumps([{"subject": "Rome", "prompt": "Paris is in", "attribute": "France"}]))
    code, _, err = run_cli(["aie", "--facts", str(bad)], capsys)
    assert code == 2 and "record 0" in err and "not in its prompt" in err
    bad.write_text(json.dumps([{"subject": "Rome"}]))
    code, _, err = run_cli(["facts", "--facts", str(bad)], capsys)
    assert code == 2 and "lacks" in err


@pytest.mark.slow
def test_trace_json_contract(tmp_path, capsys):
    out = tmp_path / "trace.json"
    code, stdout, _ = run_cli(
        [
            "trace",
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--subject",
            "The Eiffel Tower",
            "--kind",
            "hidden",
            "--samples",
            "2",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "Paris" in stdout
    data = json.loads(out.read_text())
    for key in (
        "model",
        "prompt",
        "subject",
        "answer",
        "tokens",
        "subject_range",
        "high_score",
        "low_score",
        "seconds",
    ):
        assert key in data
    assert data["answer"] == " Paris" and data["subject_range"] == [0, 4]
    table = data["hidden"]["scores"]
    assert len(table) == len(data["tokens"]) and len(table[0]) == 30
    assert data["high_score"] > data["low_score"]


@pytest.mark.slow
def test_trace_estimate_engine_json_contract(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    args = ["trace", "--prompt", "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower"]
    code, stdout, err = run_cli([*args, "--engine", "estimate", "--verify", "3", "--json", str(out)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["engine"] == "estimate" and data["answer"] == " Paris" and "seconds" in data
    for kind in ("hidden", "mlp", "attn"):
        table = data[kind]["scores"]
        assert len(table) == len(data["tokens"]) and len(table[0]) == 30
        assert len(data[kind]["exact_cells"]) >= 3
    code, _, err = run_cli([*args, "--engine", "fast", "--verify", "3"], capsys)
    assert code == 2 and "--verify goes with --engine estimate" in err


@pytest.mark.slow
def test_aie_json_contract(tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            [
                {
                    "subject": "The Eiffel Tower",
                    "prompt": "The Eiffel Tower is located in the city of",
                    "attribute": "Paris",
                },
                {
                    "subject": "The Eiffel Tower",
                    "prompt": "The Eiffel Tower is located in the city of",
                    "attribute": "Tokyo",
                },
                {"subject": "Germany", "prompt": "The capital of Germany is", "attribute": "Berlin"},
            ]
        )
    )
    out = tmp_path / "aie.json"
    code, _, err = run_cli(["aie", "--facts", str(facts), "--limit", "1", "--samples", "2", "--json", str(out)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["n"] == 1 and data["skipped"] == 0
    assert len(data["categories"]) == 6
    for kind in ("hidden", "mlp", "attn"):
        assert len(data[kind]["scores"]) == 6 and len(data[kind]["scores"][0]) == 30
    code, _, _ = run_cli(["aie", "--facts", str(facts), "--samples", "2", "--json", str(out)], capsys)
    data = json.loads(out.read_text())
    assert data["n"] == 2 and data["skipped"] == 1


def test_edit_prints_and_writes_the_likeliest_next_tokens_before_and_after(tmp_path, tiny_folder, capsys):
    """`edit` lists the request prompt's five likeliest next tokens before and after the edit: the same as the
    model computes them apart, unedited and with the exported edit applied."""
    from core.edits import applied, import_edits
    from core.evaluation import TOP_TOKENS, next_token_log_probs
    from core.models import load_model

    out, exported = tmp_path / "edit.json", tmp_path / "edit.safetensors"
    args = ["edit", "--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "Rome"]
    args += ["--layer", "1", "--stats-tokens", "256", "--model", str(tiny_folder), "--device", "cpu"]
    code, stdout, err = run_cli([*args, "--export", str(exported), "--json", str(out)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    lm = load_model(str(tiny_folder), device="cpu")
    for name, edits in (("before", []), ("after", import_edits(exported, lm))):
        with applied(lm, edits):
            probs, ids = next_token_log_probs(lm, ["The Eiffel Tower is located in"])[0].exp().sort(descending=True)
        listed = data[f"next_tokens_{name}"]
        assert [t for t, _ in listed] == [lm.tokenizer.decode([int(i)]) for i in ids[:TOP_TOKENS]]
        assert [p for _, p in listed] == pytest.approx(probs[:TOP_TOKENS].tolist(), rel=1e-4)
        (line,) = [s for s in stdout.splitlines() if s.startswith(f"  next {name}:")]
        assert line.split(":", 1)[1].lstrip().startswith(f"{listed[0][0]!r} {listed[0][1]:.3f} · ")
    assert data["next_tokens_before"] != data["next_tokens_after"]
    took = data["p_new_after"] > data["p_true_after"]  # no --generate: the probabilities decide
    assert (data["warning"] is None) == took and (f"  note: {data['warning']}" in stdout) == (not took)


def test_help_lists_every_command_without_loading_torch():
    """`python -m core --help` (and a mistyped command) answer without importing torch or transformers: only
    the command asked for is built in full."""
    script = (
        "import sys\nfrom core.__main__ import main\n"
        "for argv in (['--help'], ['bogus']):\n"
        "    try:\n        main(argv)\n    except SystemExit as exit_:\n        print('exit', exit_.code)\n"
        "print('loaded', 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-3:] == ["exit 0", "exit 2", "loaded False False"]
    for name, command in COMMANDS.items():
        assert name in done.stdout and command.help.split(" (")[0][:30] in " ".join(done.stdout.split())
    assert "invalid choice: 'bogus'" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_asked_command_is_built_in_full(name, capsys):
    """The command named first gets its module's parser (its options); another command, not asked for, is its
    name only."""

    def help_of(built_for: str) -> str:
        with pytest.raises(SystemExit):
            build_parser([built_for]).parse_args([name, "--help"])
        return capsys.readouterr().out

    full = help_of(name)
    assert ("--model" in full) or (name == "sentiment" and "{evaluate,trace,edit}" in full)
    other = next(n for n in COMMANDS if n != name)
    bare = help_of(other)
    assert bare.startswith(f"usage: python -m core {name} [-h]\n") and "--model" not in bare
