"""Tokenising prompts and finding a subject's token span in them."""

from __future__ import annotations

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
    encoding = tokenizer(text, return_offsets_mapping=tokenizer.is_fast)
    ids = list(encoding["input_ids"])
    tokens = [tokenizer.decode([i]) for i in ids]
    span = None
    if subject is not None:
        span = subject_token_range(tokenizer, text, subject, ids, encoding.get("offset_mapping"))
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


def subject_token_range(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    subject: str,
    ids: list[int],
    offsets: list[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """[start, end) of the tokens covering the subject: the first token ending after the subject starts,
    through the first token ending at or after the subject ends (the paper's `find_token_range` rule)."""
    if offsets is None:  # slow tokenizers: cumulative lengths of the decoded tokens, as the paper's code
        pieces = [tokenizer.decode([i]) for i in ids]
        char_start, char_end = find_subject_chars("".join(pieces), subject)
        ends, loc = [], 0
        for piece in pieces:
            loc += len(piece)
            ends.append(loc)
    else:
        char_start, char_end = find_subject_chars(text, subject)
        ends = [end for _, end in offsets]
    start = next((i for i, e in enumerate(ends) if e > char_start), None)
    end = next((i + 1 for i, e in enumerate(ends) if e >= char_end), None)
    if start is None or end is None or end <= start:
        raise PromptError(f"cannot map the subject {subject!r} to tokens of the prompt")
    return start, end
