"""A long many-edits run (core.many) kept in a folder, so that a stopped run resumes where it stopped: on
another day, another process or another device.

The folder holds `edits.safetensors` (the edits applied so far, in order: core.edits.export_edits) and
`state.json` (which run it is, how far it got, what it measured). Both are written after every curve point,
each atomically (a temporary file renamed over the old one), edits first. `state.json` names how many edits
its run had applied and edits are only ever appended, so after a crash between the two writes the state's
first edits are read back and the rest is done again.

    state = read_checkpoint(folder, run_id)           # None: nothing there yet
    ... apply state's edits, go on from case state.seen ...
    write_checkpoint(folder, RunState(run_id, seen, ...), edits)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.atomic import write_atomically
from core.edits import Edit, export_edits, import_edits
from core.errors import UserError
from core.models import LoadedModel

FORMAT = "rome-studio-many-checkpoint-1"
EDITS_FILE = "edits.safetensors"
STATE_FILE = "state.json"


def run_id(settings: dict, case_keys: list[tuple]) -> str:
    """What identifies a run: its settings and its cases, in order (a digest of both, as JSON)."""
    text = json.dumps({"settings": settings, "cases": case_keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class RunState:
    """How far a run got. `applied` and `skipped` hold case ids in case order; `curve` the curve points as
    dictionaries; `seconds` the run's time so far, over every process that worked on it."""

    run: str
    model: str
    seen: int
    edits: int
    applied: list = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    edit_seconds: float = 0.0
    seconds: float = 0.0
    fluency_unedited: float | None = None


def write_checkpoint(folder: str | Path, state: RunState, edits: list[Edit]) -> None:
    """Write the edits, then the state (see the module docstring)."""
    folder = Path(folder)
    write_atomically(folder / EDITS_FILE, lambda p: export_edits(edits, p))
    data = json.dumps({"format": FORMAT, **asdict(state)}, indent=1, allow_nan=True)
    write_atomically(folder / STATE_FILE, lambda p: p.write_text(data + "\n"))


def read_checkpoint(folder: str | Path, run: str, lm: LoadedModel) -> tuple[RunState, list[Edit]] | None:
    """The state and edits a folder holds for the run `run` on `lm` (edits on its device); None when the
    folder holds no state yet. A folder of another run or model, or a damaged one, is a UserError."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        return None
    where = str(folder)
    try:
        data = json.loads(path.read_text())
        if data.pop("format") != FORMAT:
            raise ValueError("unknown format")
        state = RunState(**data)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {where!r} is damaged ({err}): remove it to start over") from None
    if state.run != run:
        raise UserError(
            f"checkpoint {where!r} belongs to another run (other cases or settings): "
            "give a new folder, or the same cases and settings"
        )
    if state.model != lm.name:
        raise UserError(f"checkpoint {where!r} was made on the model {state.model!r}, not {lm.name!r}")
    edits = import_edits(folder / EDITS_FILE, lm) if state.edits else []
    if len(edits) < state.edits:
        raise UserError(
            f"checkpoint {where!r} is damaged: its state names {state.edits} edits, its edits file holds {len(edits)}"
        )
    return state, edits[: state.edits]
