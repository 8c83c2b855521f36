"""Fixtures shared by the SDK tests: an in-process fake daemon and a publisher to it."""

import pytest

from ekko.sdk.publisher import Publisher
from test_sdk_server import FakeDaemon


@pytest.fixture
def srv():
    with FakeDaemon() as s:
        yield s


@pytest.fixture
def pub(srv, tmp_path):
    """A publisher of origin "trainer" to ``srv`` (test_sdk.py has its own, which registers a spec)."""
    with Publisher([srv.endpoint], origin="trainer", state_dir=tmp_path, timeout=5) as p:
        yield p
