"""A tqdm bar on stderr as a `core.progress.Progress` callback; it appears only once work is reported."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from core.progress import Progress


@contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    bars: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=description, total=total, file=sys.stderr, leave=False, dynamic_ncols=True))
        bar = bars[0]
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
