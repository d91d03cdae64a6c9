"""A table of edit requests from a user's file: CSV (columns prompt, subject, target_new or target, optional
target_true) or JSON (a list of such objects, or CounterFact records). Bad input: one UserError line naming
the row."""

from __future__ import annotations

import io
import json

import pandas as pd

from core.edits import EditRequest
from core.errors import UserError

COLUMNS = ("prompt", "subject", "target_new", "target_true")


def _request(record: object, where: str) -> EditRequest:
    if not isinstance(record, dict):
        raise UserError(f"{where} is not an object with prompt, subject and target_new")
    if "requested_rewrite" in record:  # a CounterFact record
        rewrite = record["requested_rewrite"] if isinstance(record["requested_rewrite"], dict) else {}
        record = {
            "prompt": rewrite.get("prompt"),
            "subject": rewrite.get("subject"),
            "target_new": (rewrite.get("target_new") or {}).get("str"),
            "target_true": (rewrite.get("target_true") or {}).get("str"),
        }
    new = record.get("target_new", record.get("target"))
    values = {"prompt": record.get("prompt"), "subject": record.get("subject"), "target_new": new}
    for name, value in values.items():
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where} lacks a text {name!r}")
    true = record.get("target_true")
    true = true.strip() if isinstance(true, str) and true.strip() else None
    return EditRequest(values["prompt"], values["subject"].strip(), values["target_new"].strip(), true)


def read_requests(data: bytes, name: str = "upload") -> list[EditRequest]:
    """Requests from the bytes of a CSV or JSON file called `name`."""
    text = data.decode("utf-8", errors="replace")
    if name.lower().endswith(".json") or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{name} is not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise UserError(f"{name} must hold a JSON list of requests")
    else:
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise UserError(f"{name} is not a readable CSV table ({str(err).splitlines()[0]})") from None
        records = frame.to_dict("records")
    if not records:
        raise UserError(f"{name} holds no requests")
    return [_request(record, f"{name} row {i + 1}") for i, record in enumerate(records)]
