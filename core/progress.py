"""How long work reports and paces itself: the one progress type, `progress(done, total)`, called as the work
advances (tqdm in the CLI, st.progress in the app; every module that reports progress takes a
`Progress | None`), and `Step`, a context each step of the work runs in (the app: the model's lock, taken per
fact, per batch or per kind of a trace, so other sessions get their turn)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

Progress = Callable[[int, int], None]  # (done, total): `done` of `total` units of work are finished
Step = Callable[[], AbstractContextManager]  # a context for one step of long work (contextlib.nullcontext: none)


def within(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """A sub-task's progress mapped into the whole task's: its `done` reported as `offset + done` of `total`."""
    if progress is None:
        return None
    return lambda done, _of: progress(offset + done, total)
