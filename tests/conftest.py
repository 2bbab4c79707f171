import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from shared_data import SHARED  # noqa: E402

# Under pytest-xdist (pyproject's addopts) each worker takes one core: threads beyond it only contend.
# An xdist worker ignores SIGINT, and a child inherits an ignored signal: the commands the tests
# start (and Ctrl-C) must see SIGINT as a user's shell gives it.
if os.environ.get("PYTEST_XDIST_WORKER") and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def quiet_logger(monkeypatch):
    """Each test starts with the package logger as a fresh process has it: a console handler that
    a command installed in an earlier test (setup_logging) would print notes into a later test's
    output and break its one-line checks; none is left for the next test either."""
    import logging
    import warnings

    logger = logging.getLogger("ccnn_convert")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # setup_logging replaces it
