"""Fixtures shared by the task tests: the built-in task and a tool registry without python."""
import pytest

from axpo.tasks import ZoomDigitsTask
from axpo.tools import default_registry


@pytest.fixture(scope="module")
def task():
    return ZoomDigitsTask()


@pytest.fixture(scope="module")
def tools():
    return default_registry(python=False)
