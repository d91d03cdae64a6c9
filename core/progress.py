"""The one progress type: `progress(done, total)`, called as long work advances (tqdm in the CLI,
st.progress in the app). Every module that reports progress takes a `Progress | None`."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]  # (done, total): `done` of `total` units of work are finished


def within(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """A sub-task's progress mapped into the whole task's: its `done` reported as `offset + done` of `total`."""
    if progress is None:
        return None
    return lambda done, _of: progress(offset + done, total)
