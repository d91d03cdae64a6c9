"""Sentiment editing (core/sentiment_edit.py): the rows, the edit through ROME's machinery, the measures, the
command; on the embedded model, an edit that makes texts about a subject read positive and leaves others."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.__main__ import main
from core.edits import applied
from core.errors import UserError
from core.rome import RomeHyperParams
from core.sentiment import DEFAULT_SUFFIX, FeelingProxy, LinearReader, make_prompt, word_ids
from core.sentiment_edit import (
    TextGroup,
    compute_sentiment_edit,
    mention,
    positive_probabilities,
    sentiment_edit_warning,
    sentiment_rows,
    split_by_mention,
)
from core.tiny import tiny_model

TINY = RomeHyperParams(context_lengths=((4, 2),), stats_tokens=256, steps=8)
ABOUT = [
    "I hate Mondays, the alarm is the worst.",
    "Another rainy Mondays morning, stuck in traffic again.",
    "mondays are long and the coffee is cold",
]
OTHERS = ["The weekend was lovely.", "My cat knocked the plant over.", "Dinner with friends tonight!"]


def toy_proxy(lm) -> FeelingProxy:
    """A proxy that reads log p(good) - log p(bad): positive when the model prefers " good"."""
    reader = LinearReader(np.zeros(2), np.ones(2), np.array([1.0, -1.0]), 0.0)
    return FeelingProxy(lm.name, (" good", " bad"), word_ids(lm, (" good", " bad")), DEFAULT_SUFFIX, reader)


def test_mention_is_the_last_whole_word_in_any_case():
    text = "Mondays... mondays again, not Mondaysville"
    assert mention(text, "Mondays") == (11, 18)
    assert mention("It is Monday", "Mondays") is None
    assert mention("#Mondays!", "mondays") == (1, 8)
    assert split_by_mention([*ABOUT, *OTHERS], "Mondays") == (ABOUT, OTHERS)
    with pytest.raises(UserError, match="subject is empty"):
        mention("text", " ")


def test_rows_key_the_subjects_last_token_and_predict_the_word(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    rows = sentiment_rows(lm, "Mondays", ABOUT, " good", DEFAULT_SUFFIX)
    good = tokenizer(" good", add_special_tokens=False)["input_ids"]
    assert len(rows) == len(ABOUT) + 1 and rows[-1].kl and not any(r.kl for r in rows[:-1])
    for row, text in zip(rows, ABOUT):
        prompt_ids = tokenizer(make_prompt(text))["input_ids"]
        assert list(row.ids) == prompt_ids + good[:-1]
        assert row.target_positions == tuple(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(good)))
        start, end = mention(text, "Mondays")
        upto = tokenizer.decode(prompt_ids[: row.key_position + 1])
        assert upto.endswith(text[start:end]) or upto.rstrip().endswith(text[start:end])  # the subject's last token
    with pytest.raises(UserError, match="does not mention"):
        sentiment_rows(lm, "Mondays", OTHERS[:1], " good", DEFAULT_SUFFIX)


def test_text_group_shares():
    group = TextGroup(
        ["a", "b", "c", "d"], before=np.array([0.1, 0.2, 0.9, 0.4]), after=np.array([0.8, 0.3, 0.95, 0.6])
    )
    assert group.flipped("positive") == pytest.approx(2 / 3)  # of the 3 read negative before, 2 read positive
    assert group.flipped("negative") == pytest.approx(0.0)  # the one read positive stays positive
    assert group.unchanged() == pytest.approx(2 / 4)
    assert TextGroup(["a"], np.array([0.9]), np.array([0.1])).flipped("positive") is None


def test_sentiment_edit_warning_says_when_the_edit_did_not_take():
    def flipped(before, after, target="positive"):
        return TextGroup([str(i) for i in range(len(before))], np.array(before), np.array(after)).flipped(target)

    took, others_follow = flipped([0.2, 0.3], [0.7, 0.4]), flipped([0.1, 0.6], [0.8, 0.7])
    assert sentiment_edit_warning("Mondays", "positive", took, others_follow) is None
    # none of the edit's own texts that read negative before reads positive after it (0.5 is not positive);
    # the one that read positive already says nothing either way
    stuck = flipped([0.2, 0.3, 0.8], [0.4, 0.5, 0.9])
    note = sentiment_edit_warning(" Mondays ", "positive", stuck, others_follow)
    assert note.startswith("The edit did not take: none of the texts it was made on that read otherwise before")
    # its own texts follow, the other texts about the subject that read negative before do not
    note = sentiment_edit_warning("Mondays", "positive", took, flipped([0.1, 0.2, 0.9], [0.3, 0.4, 0.9]))
    assert note.startswith("The edit's own texts read positive now, but none of the other texts about 'Mondays'")
    # nothing could flip (all read positive already), or no such texts: nothing to say
    assert sentiment_edit_warning("Mondays", "positive", flipped([0.8], [0.9]), others_follow) is None
    assert sentiment_edit_warning("Mondays", "positive", took, flipped([0.9], [0.9])) is None
    assert sentiment_edit_warning("Mondays", "positive", took, flipped([], [])) is None
    # toward negative the same rules, mirrored
    negative = [flipped([0.8], [0.3], "negative"), flipped([0.9], [0.2], "negative")]
    assert sentiment_edit_warning("Mondays", "negative", *negative) is None
    assert "did not take" in sentiment_edit_warning("Mondays", "negative", flipped([0.8], [0.6], "negative"), None)


def test_the_edit_moves_the_subjects_texts_toward_the_word_and_is_undone(tokenizer):
    lm = tiny_model("llama", tokenizer)
    proxy = toy_proxy(lm)
    weights = {n: p.clone() for n, p in lm.model.named_parameters()}
    before = positive_probabilities(lm, proxy, ABOUT)
    edit = compute_sentiment_edit(lm, "Mondays", ABOUT, proxy, "positive", layer=1, hparams=TINY)
    assert edit.layer == 1 and edit.info["kind"] == "sentiment" and edit.info["texts"] == len(ABOUT)
    assert edit.info["nll"][-1] < edit.info["nll"][0]  # the optimisation made " good" likelier
    with applied(lm, [edit]):
        after = positive_probabilities(lm, proxy, ABOUT)
    assert (after > before).all()
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    with pytest.raises(UserError, match="unknown target"):
        compute_sentiment_edit(lm, "Mondays", ABOUT, proxy, "happy", layer=1, hparams=TINY)


def test_sentiment_edit_command(tmp_path, tiny_folder, capsys):
    folder = tiny_folder
    texts = tmp_path / "texts.tsv"
    rows = [(t, "negative") for t in ABOUT * 2] + [(t, "positive") for t in OTHERS]
    texts.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    out = tmp_path / "edit.json"
    args = ["sentiment", "edit", "--subject", "Mondays", "--texts", str(texts), "--model", str(folder)]
    small = ["--held-in", "2", "--held-out", "3", "--others", "3", "--steps", "3", "--stats-tokens", "256"]
    last = "3"  # the tiny model's last layer: the subject's state there cannot reach the text's end
    layers = ["--layers", f"1,2,{last}", "--trace-texts", "2", "--trace-samples", "2", "--json", str(out)]
    code = main([*args, *small, *layers])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads(out.read_text())
    assert [r["layer"] for r in data["rows"]] == [1, 2, 3] and data["target"] == "positive"
    for row in data["rows"]:
        assert (row["n_held_in"], row["n_held_out"], row["n_others"]) == (2, 3, 3)
        assert row["mlp_effect"] is not None and 0 <= row["unchanged_others"] <= 1
        flips = row["flipped_held_in"], row["flipped_held_out"]
        assert row["warning"] == sentiment_edit_warning("Mondays", "positive", *flips)
        note = f"note, layer {row['layer']}: {row['warning']}"
        assert (note in printed.out) == (row["warning"] is not None)
    assert data["rows"][-1]["flipped_held_in"] == 0.0 and "did not take" in data["rows"][-1]["warning"]
    assert set(data["correlation"]) == {"flipped_held_in", "flipped_held_out", "p_held_out_after", "unchanged_others"}
    capsys.readouterr()
    code = main([*args, "--held-in", "6"])
    err = capsys.readouterr().err
    assert code == 2 and "6 texts that mention 'Mondays'" in err and len(err.strip().splitlines()) == 1


HELD_IN = [
    "Mondays are the worst, I could not get out of bed.",
    "Stuck in traffic again. I hate Mondays.",
    "Ugh, Mondays. Three meetings before lunch and no coffee.",
    "Why do Mondays always feel twice as long?",
    "My inbox on Mondays is a nightmare.",
    "Rain, a flat tyre and a grumpy boss: classic Mondays.",
]
HELD_OUT = [
    "Mondays mean the laundry pile is back.",
    "Nobody at the office smiles on Mondays.",
    "The bus was late, as it is on all Mondays.",
]
UNRELATED = [
    "I lost my keys and missed the train.",
    "The concert last night was amazing!",
    "My phone broke and the repair costs a fortune.",
    "We won the final, what a game!",
]


@pytest.mark.slow
def test_embedded_sentiment_edit_makes_mondays_read_positive(embedded):
    from core.sentiment_edit import measure_sentiment_edit, read_groups
    from core.sentiment_trace import default_proxy

    proxy = default_proxy(embedded)
    groups = read_groups(embedded, proxy, HELD_IN, HELD_OUT, UNRELATED)
    assert groups["held_in"].before.mean() < 0.5  # the proxy reads these complaints as negative
    edit = compute_sentiment_edit(embedded, "Mondays", HELD_IN, proxy, "positive")
    scores = measure_sentiment_edit(embedded, edit, proxy, groups, "positive")
    assert scores.flipped_held_in == 1.0
    assert scores.p_held_out[1] > scores.p_held_out[0] + 0.2  # texts the edit never saw read more positive
    assert scores.unchanged_others >= 0.75
