"""The app's error boundary: an unexpected error on a page is one clear st.error (details in the server log),
never a traceback in the browser."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ui import common

ROOT = Path(__file__).resolve().parent.parent


def test_uncaught_errors_never_show_details_in_the_browser():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"


@pytest.mark.slow
def test_an_unexpected_error_is_one_message_and_logged(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/path")

    monkeypatch.setattr(common, "run_aie", broken)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    at.switch_page("pages/2_Averages.py").run()
    with caplog.at_level(logging.ERROR, logger="rome_studio"):
        at.button(key="aie_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    messages = [e.value for e in at.error]
    assert len(messages) == 1 and "went wrong while averaging (RuntimeError)" in messages[0]
    assert "secret internal detail" not in messages[0]
    assert any("secret internal detail" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


@pytest.mark.slow
def test_the_trace_explorer_shows_the_memory_and_refuses_over_the_cap(monkeypatch):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    at.switch_page("pages/1_Trace_explorer.py").run()
    from core.budget import check_trace
    from core.models import EMBEDDED_MODEL

    # before the run: the memory against the cap, and no time (it is forecast once, when the trace starts)
    size = check_trace(common.load(EMBEDDED_MODEL), 10, samples=10, kinds=3)
    expected = f"Memory: {size.describe()}. {common.TIME_NOTE} Results already kept here are instant."
    assert expected in [c.value for c in at.caption] and "10 tokens, 3 kinds" in expected
    monkeypatch.setenv("ROME_STUDIO_MAX_TRACE_MB", "1")
    at.button(key="trace_run").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "over the 1 MB cap" in at.error[0].value
    assert "trace_result" not in at.session_state
