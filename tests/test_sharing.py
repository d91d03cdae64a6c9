"""One model shared by many sessions: long work takes the lock per step (per fact, per batch) so others get
their turn; a waiting session is told who holds it, and can stop waiting."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from core import aie
from core.covariance import key_statistics
from core.edits import applied, holder, model_lock
from core.facts import Fact
from core.tiny import tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path / "cache"))


def hold_in_another_session(lm, what: str, who: str) -> tuple[threading.Thread, threading.Event]:
    """Another thread holding the model's lock until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def long_work():
        with applied(lm, what=what, who=who):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=long_work)
    worker.start()
    held.wait(10)
    return worker, release


def test_a_waiting_session_is_told_who_holds_the_model(tiny):
    worker, release = hold_in_another_session(tiny, "tracing 'The Eiffel Tower'", "session abc")
    assert holder(tiny).who == "session abc"
    seen = []

    def waiting(h):
        seen.append(h.describe())
        release.set()

    with applied(tiny, what="generating", who="session xyz", waiting=waiting):
        assert holder(tiny).what == "generating"
    worker.join()
    assert seen and seen[0].startswith("busy: tracing 'The Eiffel Tower' for session abc (")
    assert holder(tiny) is None  # free again, no stale note


def test_a_waiting_session_can_cancel(tiny):
    worker, release = hold_in_another_session(tiny, "averaging", "session abc")

    class Cancelled(Exception):
        pass

    def cancel(h):
        raise Cancelled

    with pytest.raises(Cancelled):
        with applied(tiny, waiting=cancel):
            pytest.fail("the cancelled wait must not run the work")
    assert holder(tiny).what == "averaging"  # the holder was not disturbed
    release.set()
    worker.join()
    assert model_lock(tiny).acquire(blocking=False)  # and the lock is free afterwards
    model_lock(tiny).release()


def test_the_average_takes_the_lock_per_fact_so_another_session_gets_in(tokenizer, monkeypatch):
    tiny = tiny_model("llama", tokenizer)  # the lock is the same for every family
    monkeypatch.setattr(aie, "predict", lambda lm, fact: SimpleNamespace(known=True))
    facts = [Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris")] * 8
    done, started, other_at = [], threading.Event(), []

    def step():
        started.set()
        return applied(tiny, what="averaging 8 facts", who="session A")

    def average():
        aie.average_indirect_effect(
            tiny, facts, kinds=("hidden",), samples=2, progress=lambda d, t: done.append(d), step=step
        )

    worker = threading.Thread(target=average)
    worker.start()
    started.wait(10)
    with applied(tiny, what="generating", who="session B"):
        other_at.append(len(done))
    worker.join()
    assert done[-1] == 8
    assert other_at[0] < 8  # session B got the model between two facts, not after the whole run


def test_statistics_take_the_lock_per_batch(tokenizer, monkeypatch):
    from core import covariance

    monkeypatch.setattr(covariance, "SEQUENCE_LENGTH", 8)  # 17 short rows: more than one batch of keys, quickly
    tiny = tiny_model("gpt2", tokenizer)
    entered = []

    @contextmanager
    def step():
        entered.append(time.perf_counter())
        with applied(tiny, what="statistics"):
            yield

    key_statistics(tiny, 1, tokens=8 * 17, step=step)
    assert len(entered) >= 3  # one sampling batch and two key batches, each under the lock on its own
    entered.clear()
    key_statistics(tiny, 1, tokens=8 * 17, step=step)
    assert entered == []  # from the cache: no model work


def test_the_sentiment_trace_takes_the_lock_per_step_and_says_for_what(tokenizer, monkeypatch):
    """The sentiment page's trace (ui.common.trace_sentiment_progressively): it waits for another session with
    a "busy: <what> for <who>" notice, holds the lock noted as its own work, and lets others in between steps."""
    import numpy as np

    from core.sentiment import DEFAULT_SUFFIX, DEFAULT_WORDS, FeelingProxy, LinearReader, word_ids
    from core.tracing import KINDS
    from ui import common

    lm = tiny_model("llama", tokenizer)
    reader = LinearReader(np.zeros(2), np.ones(2), np.array([1.0, -1.0]), 0.0)  # p(positive) from good vs bad
    proxy = FeelingProxy(lm.name, DEFAULT_WORDS, word_ids(lm, DEFAULT_WORDS), DEFAULT_SUFFIX, reader)
    monkeypatch.setattr(common, "session_label", lambda: "session A")
    steps, entered, notices = [], threading.Event(), []
    real_applied = common.applied

    @contextmanager
    def noted_applied(lm, edits=(), **note):
        with real_applied(lm, edits, **note):
            steps.append(holder(lm).describe())
            entered.set()
            yield

    class Notice:  # st.empty() of the waiting notice
        def info(self, text, **_):
            notices.append(text)
            release.set()  # session B finishes once session A has been told

        def empty(self):
            pass

    monkeypatch.setattr(common, "applied", noted_applied)
    monkeypatch.setattr(common.st, "empty", Notice)
    worker, release = hold_in_another_session(lm, "averaging 8 facts", "session B")
    text = "I love this song, it is wonderful."
    traced = []
    trace = threading.Thread(
        target=lambda: traced.append(common.trace_sentiment_progressively(lm, text, proxy, KINDS, samples=1, window=2))
    )
    trace.start()
    entered.wait(30)
    with applied(lm, what="generating", who="session C"):
        other_at = len(steps)
    trace.join(60)
    worker.join()
    shown, exact, _ = traced[0]
    assert exact and set(shown.scores) == set(KINDS)
    assert notices[0].startswith("busy: averaging 8 facts for session B (")
    # the setup, then the estimate's and the exact engine's recordings and kinds: one lock each
    assert len(steps) == 1 + 2 * (1 + len(KINDS))
    assert all(s.startswith(f"busy: a sentiment trace of {text!r} for session A (") for s in steps)
    assert other_at < len(steps)  # session C got the model between two steps, not after the whole trace
