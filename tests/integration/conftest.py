"""Integration tier fixtures: every process a test starts is reaped at teardown, pass or fail."""
from __future__ import annotations

import pytest

from .helpers import Procs


@pytest.fixture
def procs(tmp_path):
    """A Procs rooted at tmp_path/procs; everything it started is reaped after the test."""
    p = Procs(tmp_path / "procs")
    try:
        yield p
    finally:
        p.stop_all()
