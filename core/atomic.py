"""Files written whole or not at all: the content goes to a temporary name beside the file, then one rename
puts it in place, so a reader (another process, thread or session) sees the old file or the new one, never
half of one. The temporary name holds ".partial", so what a killed process leaves behind is swept away later
(core.models.sweep_partials); a write that fails removes its own.

    write_atomically(folder / "state.json", lambda partial: partial.write_text(text))
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(partial)` to write the content to `partial`, then rename it over `path` (its folder made if
    missing). If `write` raises, `path` is left as it was and the partial file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        write(partial)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
