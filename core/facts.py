"""Known facts: JSON records {subject, prompt, attribute} and which of them a model predicts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.errors import UserError
from core.jsonfile import read_json
from core.models import LoadedModel
from core.progress import Progress
from core.prompts import target_ids

DEFAULT_FACTS = Path(__file__).resolve().parent.parent / "data" / "known_facts.json"


@dataclass(frozen=True)
class Fact:
    subject: str
    prompt: str  # contains the subject, ends right before the attribute
    attribute: str  # the true object, without a leading space
    relation: str = ""


@dataclass(frozen=True)
class Prediction:
    fact: Fact
    answer: str  # the model's top-1 next token
    probability: float
    known: bool


def load_facts(path: str | Path = DEFAULT_FACTS) -> list[Fact]:
    """Read a facts file, checking every record; a bad record is named in the error."""
    path = Path(path)
    records = read_json(path, "facts file")
    if not isinstance(records, list) or not records:
        raise UserError(f"facts file {str(path)!r} must hold a non-empty JSON list of records")
    facts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"facts file record {i} is not a JSON object")
        missing = [
            k for k in ("subject", "prompt", "attribute") if not isinstance(record.get(k), str) or not record[k].strip()
        ]
        if missing:
            raise UserError(f"facts file record {i} lacks text field(s): {', '.join(missing)}")
        if not isinstance(record.get("relation", ""), str):
            raise UserError(f"facts file record {i}: its relation must be text (got {record['relation']!r})")
        if record["subject"] not in record["prompt"]:
            raise UserError(f"facts file record {i}: subject {record['subject']!r} is not in its prompt")
        facts.append(Fact(record["subject"], record["prompt"], record["attribute"].strip(), record.get("relation", "")))
    return facts


def first_token_id(lm: LoadedModel, attribute: str) -> int:
    """The token the model must predict first to say ` attribute`."""
    return target_ids(lm.tokenizer, attribute)[0]


def predict(lm: LoadedModel, fact: Fact) -> Prediction:
    ids = torch.tensor([lm.tokenizer(fact.prompt)["input_ids"]], device=lm.device)
    with torch.no_grad():
        probs = torch.softmax(lm.model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    answer_id = int(probs.argmax())
    answer = lm.tokenizer.decode([answer_id])
    known = answer_id == first_token_id(lm, fact.attribute) or answer.strip() == fact.attribute
    return Prediction(fact, answer, float(probs[answer_id]), known)


def known_facts(lm: LoadedModel, facts: Sequence[Fact], progress: Progress | None = None) -> list[Prediction]:
    """The model's prediction for every fact (`known` says whether it gives the attribute)."""
    predictions = []
    for i, fact in enumerate(facts):
        predictions.append(predict(lm, fact))
        if progress:
            progress(i + 1, len(facts))
    return predictions


def save_facts(path: str | Path, facts: Sequence[Fact]) -> None:
    """Write `facts` as a facts file (its folder created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(f) for f in facts], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
