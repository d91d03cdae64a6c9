"""CounterFact records (the public file format of Meng et al. 2022): load, check, download and cache.

    cases = load_counterfact("data/counterfact_project.json")       # a local file
    cases = load_counterfact(PUBLIC)                                 # the public file, downloaded once

A malformed record raises a UserError naming the record (its index and case_id) and the field.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.atomic import write_atomically
from core.errors import UserError
from core.jsonfile import read_json
from core.models import cache_dir

PUBLIC = "counterfact"  # the name that means the public file
PUBLIC_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
PROJECT_FILE = Path(__file__).resolve().parent.parent / "data" / "counterfact_project.json"


@dataclass(frozen=True)
class CounterFactCase:
    case_id: int | str
    prompt: str  # with "{}" for the subject
    subject: str
    target_new: str
    target_true: str
    relation_id: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


def _field(record: dict, path: str, where: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"{where} lacks the field {path!r}")
        value = value[part]
    return value


def _text(record: dict, path: str, where: str) -> str:
    value = _field(record, path, where)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} has an empty or non-text {path!r}")
    return value


def _texts(record: dict, name: str, where: str, required: bool = True) -> tuple[str, ...]:
    """A list of non-empty texts; a `required` list must hold at least one (its score is a mean over it)."""
    if name not in record:
        if required:
            raise UserError(f"{where} lacks the field {name!r}")
        return ()
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where} has a {name!r} that is not a list of non-empty texts")
    if required and not value:
        raise UserError(f"{where} has an empty {name!r}: give at least one prompt")
    return tuple(value)


def parse_case(record: object, index: int) -> CounterFactCase:
    """One record of the public format, checked."""
    case_id = record.get("case_id", index) if isinstance(record, dict) else index
    where = f"record {index} (case_id {case_id})"
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object")
    prompt = _text(record, "requested_rewrite.prompt", where)
    if prompt.count("{}") != 1:
        raise UserError(f"{where} has a prompt without exactly one {{}} for the subject: {prompt!r}")
    subject = _text(record, "requested_rewrite.subject", where)
    new = _text(record, "requested_rewrite.target_new.str", where)
    true = _text(record, "requested_rewrite.target_true.str", where)
    if new.strip() == true.strip():
        raise UserError(f"{where} has the same new and true target {new!r}")
    relation = record["requested_rewrite"].get("relation_id", "")
    return CounterFactCase(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        relation_id=str(relation),
        paraphrase_prompts=_texts(record, "paraphrase_prompts", where),
        neighborhood_prompts=_texts(record, "neighborhood_prompts", where),
        attribute_prompts=_texts(record, "attribute_prompts", where, required=False),
        generation_prompts=_texts(record, "generation_prompts", where, required=False),
    )


def parse_cases(data: object, source: str = "data") -> list[CounterFactCase]:
    if not isinstance(data, list):
        raise UserError(f"{source} is not a JSON list of CounterFact records")
    if not data:
        raise UserError(f"{source} holds no records")
    return [parse_case(record, i) for i, record in enumerate(data)]


def public_path() -> Path:
    return cache_dir() / "data" / "counterfact.json"


def download_public(timeout: float = 60.0) -> Path:
    """The public CounterFact file, downloaded once into the cache (needs the network the first time)."""
    path = public_path()
    if path.exists():
        return path

    def fetch(partial: Path) -> None:
        with urllib.request.urlopen(PUBLIC_URL, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)

    try:
        write_atomically(path, fetch)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"cannot download CounterFact from {PUBLIC_URL} ({err}); give a local file instead") from None
    return path


def load_counterfact(source: str | Path = PROJECT_FILE, limit: int | None = None) -> list[CounterFactCase]:
    """Cases from a local CounterFact-format file, or the public file when `source` is "counterfact"."""
    path = download_public() if str(source) == PUBLIC else Path(source)
    data = read_json(path, "CounterFact file")
    if limit is not None:
        if limit < 1:
            raise UserError(f"the limit must be at least 1 (got {limit})")
        data = data[:limit] if isinstance(data, list) else data
    return parse_cases(data, f"CounterFact file {str(path)!r}")
