"""Fixtures shared by the tests."""

import pytest
from support import Run


@pytest.fixture
def run():
    """``run(lines, caps=None)``: a :class:`support.Run` of the real parser and kernel."""
    return Run
