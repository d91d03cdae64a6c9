"""Reading a user's JSON file (UTF-8, with or without a BOM): a missing or malformed file is one clear UserError
naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import UserError


def read_json(path: str | Path, what: str = "file") -> Any:
    """The parsed content of `path`; `what` names the file in the error ("facts file", ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # utf-8-sig: a leading BOM is dropped
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({err})") from None
