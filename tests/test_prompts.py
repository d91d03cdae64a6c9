"""Finding a subject's token span."""

from __future__ import annotations

import pytest

from core.prompts import PromptError, tokenize


def span_text(t, tokenizer):
    start, end = t.subject_range
    return tokenizer.decode(t.input_ids[start:end])


def test_subject_at_start(tokenizer):
    t = tokenize(tokenizer, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    assert t.subject_range[0] == 0
    assert span_text(t, tokenizer) == "The Eiffel Tower"
    assert t.tokens[t.subject_last] == " Tower"


def test_subject_inside_prompt_covers_leading_space_token(tokenizer):
    t = tokenize(tokenizer, "Many tourists visit the Colosseum every year", "the Colosseum")
    assert span_text(t, tokenizer).strip() == "the Colosseum"
    # the subject given with a leading space, or in other case, maps to the same tokens
    assert tokenize(tokenizer, t.text, " the Colosseum").subject_range == t.subject_range
    assert tokenize(tokenizer, t.text, "The Colosseum").subject_range == t.subject_range


def test_repeated_subject_takes_first_occurrence(tokenizer):
    t = tokenize(tokenizer, "Rome is old. Rome is in Italy", "Rome")
    assert t.subject_range == (0, 1)


def test_subject_partly_inside_a_token(tokenizer):
    t = tokenize(tokenizer, "The Eiffel Tower is tall", "Eiffel")
    start, end = t.subject_range
    assert "Eiffel" in tokenizer.decode(t.input_ids[start:end])


def test_absent_or_empty_subject_and_prompt(tokenizer):
    with pytest.raises(PromptError, match="does not occur"):
        tokenize(tokenizer, "The Eiffel Tower is tall", "Big Ben")
    with pytest.raises(PromptError, match="subject is empty"):
        tokenize(tokenizer, "The Eiffel Tower is tall", "  ")
    with pytest.raises(PromptError, match="prompt is empty"):
        tokenize(tokenizer, "", "x")
