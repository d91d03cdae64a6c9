"""Tokenising prompts: a subject's token span, a target's token ids, and the paper's six token categories.

These are the one place for each: tracing, the sentiment trace, known facts, ROME and the evaluation all ask
here, so a tokenizer that adds a BOS (Llama-2, Mistral) is handled the same way everywhere:
- a prompt is tokenised as the tokenizer does by default (its special tokens kept, e.g. a leading BOS);
- a target is a continuation: " " + target without any special token (`target_ids`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from core.errors import UserError


class PromptError(UserError):
    """Bad prompt or subject; the message is one sentence for the user."""


@dataclass(frozen=True)
class TokenizedPrompt:
    text: str
    input_ids: list[int]
    tokens: list[str]  # each token decoded on its own, as the paper's code shows them
    subject_range: tuple[int, int] | None  # [start, end) token positions of the subject

    @property
    def subject_last(self) -> int:
        assert self.subject_range is not None
        return self.subject_range[1] - 1


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, subject: str | None = None) -> TokenizedPrompt:
    """Tokenise `text` as the tokenizer does by default and locate `subject` (its first occurrence)."""
    if not text or not text.strip():
        raise PromptError("the prompt is empty")
    if subject is None:
        ids, span = list(tokenizer(text)["input_ids"]), None
    else:
        ids, span = subject_span(tokenizer, text, subject)
    tokens = [tokenizer.decode([i]) for i in ids]
    return TokenizedPrompt(text=text, input_ids=ids, tokens=tokens, subject_range=span)


def find_subject_chars(text: str, subject: str) -> tuple[int, int]:
    """Character span of the first occurrence of `subject` in `text`.

    Tries the subject as given, then without surrounding spaces, then ignoring case."""
    if not subject or not subject.strip():
        raise PromptError("the subject is empty")
    for candidate in (subject, subject.strip()):
        at = text.find(candidate)
        if at >= 0:
            return at, at + len(candidate)
    stripped = subject.strip()
    at = text.lower().find(stripped.lower())
    if at >= 0:
        return at, at + len(stripped)
    raise PromptError(f"the subject {subject.strip()!r} does not occur in the prompt {text!r}")


def _token_ends(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> tuple[list[int], list[int], str]:
    """(ids, character end of each token, the text the ends index). Fast tokenizers: the offsets into `text`.
    Slow ones: cumulative lengths of the decoded tokens (as the paper's code), special tokens counting 0."""
    if tokenizer.is_fast:
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        return list(encoding["input_ids"]), [end for _, end in encoding["offset_mapping"]], text
    encoding = tokenizer(text, return_special_tokens_mask=True, add_special_tokens=special)
    ids = list(encoding["input_ids"])
    pieces = ["" if special else tokenizer.decode([i]) for i, special in zip(ids, encoding["special_tokens_mask"])]
    ends, at = [], 0
    for piece in pieces:
        at += len(piece)
        ends.append(at)
    return ids, ends, "".join(pieces)


def subject_span(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    subject: str | tuple[int, int],
    add_special_tokens: bool = True,
) -> tuple[list[int], tuple[int, int]]:
    """`text`'s token ids (tokenised as the tokenizer does by default, special tokens kept) and the [start, end)
    tokens covering the subject: the first token ending after the subject starts, through the first token
    ending at or after the subject ends (the paper's `find_token_range` rule).

    `subject` is either a string (its first occurrence, see `find_subject_chars`) or its [start, end)
    character span in `text` (ROME knows where its "{}" was). `add_special_tokens=False` leaves out what the
    tokenizer adds (a BOS): for a text that follows other tokens (ROME's context texts)."""
    ids, ends, indexed = _token_ends(tokenizer, text, add_special_tokens)
    if isinstance(subject, str):
        char_start, char_end = find_subject_chars(indexed, subject)
        shown = subject
    else:
        char_start, char_end = subject
        shown = text[char_start:char_end]
        if not 0 <= char_start < char_end <= len(text):
            raise PromptError(f"the characters {tuple(subject)} are not a span of {text!r}")
    start = next((i for i, e in enumerate(ends) if e > char_start), None)
    end = next((i + 1 for i, e in enumerate(ends) if e >= char_end), None)
    if start is None or end is None or end <= start:
        raise PromptError(f"cannot map the subject {shown!r} to tokens of {text!r}")
    return ids, (start, end)


def whole_word_spans(text: str, words: str) -> list[tuple[int, int]]:
    """[start, end) characters of every whole-word occurrence of `words` in `text`, any case, in order
    (none for empty `words`)."""
    words = words.strip()
    if not words:
        return []
    return [m.span() for m in re.finditer(rf"(?<!\w){re.escape(words)}(?!\w)", text, flags=re.IGNORECASE)]


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of `target` as a continuation of a prompt: one leading space (as the paper's code), and no
    special token, even from a tokenizer that adds a BOS to every text (Llama-2, Mistral)."""
    if not target or not target.strip():
        raise PromptError("the target is empty")
    return list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])


def token_categories(span: tuple[int, int], num_tokens: int) -> list[list[int]]:
    """Token positions of the paper's six categories, in order: first span token, middle span tokens, last
    span token, first token after the span, further tokens, last token. As the paper's notebook, a position
    may serve two categories (a one-token span is first and last; a span ending the prompt but one makes the
    first token after the last token); positions before the span belong to none."""
    first, after = span
    last_in_span, last = after - 1, num_tokens - 1
    rows = [
        [first],
        list(range(first + 1, last_in_span)),
        [last_in_span],
        [after],
        list(range(after + 1, last)),
        [last],
    ]
    return [[r for r in category if r < num_tokens] for category in rows]
