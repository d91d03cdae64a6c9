"""Finding a subject's token span, a target's token ids (with and without a BOS), the token categories."""

from __future__ import annotations

import copy

import pytest

from core.prompts import PromptError, subject_span, target_ids, token_categories, tokenize


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


# ------------------------------------------------------------------- tokenizers that add a BOS (item 7)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer made to put a BOS before every text, as Llama-2's and Mistral's do."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = (tok.bos_token, tok.bos_token_id)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
    )
    assert tok("Paris")["input_ids"][0] == bos[1]  # the fixture really adds one
    return tok


def test_target_ids_never_hold_a_bos(tokenizer, bos_tokenizer):
    plain = target_ids(tokenizer, "Paris")
    assert plain == tokenizer(" Paris")["input_ids"]
    assert target_ids(bos_tokenizer, "Paris") == plain
    assert target_ids(bos_tokenizer, " New York City ") == target_ids(tokenizer, "New York City")
    assert bos_tokenizer.bos_token_id not in target_ids(bos_tokenizer, "Rome")
    with pytest.raises(PromptError, match="target is empty"):
        target_ids(tokenizer, "  ")


def test_first_token_of_an_attribute_skips_the_bos(bos_tokenizer):
    from types import SimpleNamespace

    from core.facts import first_token_id

    assert first_token_id(SimpleNamespace(tokenizer=bos_tokenizer), "Paris") == target_ids(bos_tokenizer, "Paris")[0]


def test_subject_span_counts_the_bos(tokenizer, bos_tokenizer):
    text = "Many tourists visit the Colosseum every year"
    ids, span = subject_span(tokenizer, text, "the Colosseum")
    bos_ids, bos_span = subject_span(bos_tokenizer, text, "the Colosseum")
    assert bos_ids == [bos_tokenizer.bos_token_id] + ids
    assert bos_span == (span[0] + 1, span[1] + 1)
    assert tokenizer.decode(bos_ids[bos_span[0] : bos_span[1]]).strip() == "the Colosseum"
    at = text.index("the Colosseum")  # a character span gives the same tokens as the string
    assert subject_span(bos_tokenizer, text, (at, at + len("the Colosseum"))) == (bos_ids, bos_span)
    assert tokenize(bos_tokenizer, text, "the Colosseum").subject_range == bos_span
    assert subject_span(bos_tokenizer, text, "the Colosseum", add_special_tokens=False) == (ids, span)


def test_subject_at_the_start_after_a_bos(bos_tokenizer):
    ids, span = subject_span(bos_tokenizer, "The Eiffel Tower is tall", "The Eiffel Tower")
    assert span[0] == 1 and bos_tokenizer.decode(ids[span[0] : span[1]]) == "The Eiffel Tower"


def test_a_character_span_outside_the_text_is_refused(tokenizer):
    with pytest.raises(PromptError, match="not a span"):
        subject_span(tokenizer, "Rome is old", (5, 40))


# ------------------------------------------------------------------------------------- token categories


def test_token_categories_follow_the_paper():
    assert token_categories((0, 4), 7) == [[0], [1, 2], [3], [4], [5], [6]]
    one = token_categories((2, 3), 6)  # a one-token span is the first and the last span token
    assert one == [[2], [], [2], [3], [4], [5]]
    ends = token_categories((1, 3), 4)  # the span ends one before the last token: that token is both
    assert ends == [[1], [], [2], [3], [], [3]]
