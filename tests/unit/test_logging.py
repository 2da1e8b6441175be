"""Log lines never carry a secret, even in a traceback."""

from __future__ import annotations

import io
import json

import pytest

from kms_agent import logging as agent_logging
from kms_agent.config import LoggingConfig
from tests.conftest import PLANTED, TOKEN


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_logged_traceback_shows_no_local_variables(fmt, log_capture):
    """An exception logged from a frame holding a token and a value names the error and its
    place, never the frame's locals (structlog's default traceback renderer shows them)."""
    out = io.StringIO()
    agent_logging.configure(LoggingConfig(level="debug", format=fmt), stream=out)
    try:
        token, value = TOKEN, PLANTED  # noqa: F841 (locals the renderer must not show)
        raise RuntimeError("boom")
    except RuntimeError:
        agent_logging.get("kms_agent.test").exception("request_failed")
    finally:
        agent_logging.configure(LoggingConfig(level="debug"), stream=log_capture)
    text = out.getvalue()
    assert "RuntimeError" in text
    assert "boom" in text
    assert PLANTED not in text
    assert TOKEN not in text
    if fmt == "json":
        assert json.loads(text)["exception"][0]["exc_type"] == "RuntimeError"
