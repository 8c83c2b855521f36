"""What a publisher (and the read client) raise for wrong endpoints and a wrong key
(issue #19): wrong endpoints fail in seconds, not at the deadline; refusals after a
replica has answered are still retried; a rejected key is the public KeyRejected."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ekko
import ekko.sdk
from ekko.core.errors import RemoteError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.sdk import transport
from ekko.sdk.ack import KeyRejected, PublishError
from ekko.sdk.client import Client
from ekko.sdk.publisher import Publisher
from test_sdk import dead_endpoint
from test_sdk_server import FakeDaemon

SPEC = ModelSpec("ranker", [TableSpec("emb", rows=100, dim=4, shards=2)])
#: a publish's timeout in these tests: far longer than the fail-fast window.
LONG_TIMEOUT_S = 30.0
#: slack over UNREACHABLE_GIVE_UP_S for the last backoff sleep and a slow machine.
SLACK_S = transport.BACKOFF_MAX_S + 3.0


def test_wrong_endpoints_fail_within_seconds_naming_them(tmp_path):
    eps = [dead_endpoint(), dead_endpoint()]
    with Publisher(eps, origin="lost", state_dir=tmp_path, timeout=LONG_TIMEOUT_S) as p:
        t0 = time.monotonic()
        with pytest.raises(PublishError) as ei:
            p.register(SPEC)
        took = time.monotonic() - t0
    assert transport.UNREACHABLE_GIVE_UP_S <= took < transport.UNREACHABLE_GIVE_UP_S + SLACK_S < LONG_TIMEOUT_S
    msg = str(ei.value)
    assert "no replica reachable" in msg and all(ep in msg for ep in eps), msg
    assert ei.value.attempts >= 2 and ei.value.status is None


def test_refusals_after_an_answer_are_retried_until_the_replica_is_back(tmp_path, monkeypatch):
    """A replica that answered before and now refuses is restarting: keep retrying."""
    monkeypatch.setattr(transport, "UNREACHABLE_GIVE_UP_S", 0.2)
    down_s = 1.5                     # well past the (shortened) give-up window
    with FakeDaemon() as srv:
        with Publisher([srv.endpoint], origin="patient", state_dir=tmp_path, timeout=LONG_TIMEOUT_S) as p:
            p.register(SPEC)
            srv.stop()
            threading.Timer(down_s, srv.restart).start()
            t0 = time.monotonic()
            ack = p.publish("ranker", "emb", [1, 2], torch.ones(2, 4))
            assert ack.rows == 2 and time.monotonic() - t0 >= down_s * 0.9


def test_one_refusing_endpoint_among_answering_ones_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "UNREACHABLE_GIVE_UP_S", 0.0)
    with FakeDaemon() as srv:
        with Publisher([dead_endpoint(), srv.endpoint], origin="mixed", state_dir=tmp_path, timeout=10) as p:
            assert p.register(SPEC) is True


def test_wrong_key_is_the_public_key_rejected(tmp_path):
    assert ekko.KeyRejected is ekko.sdk.KeyRejected is KeyRejected
    assert "KeyRejected" in ekko.__all__ and "KeyRejected" in ekko.sdk.__all__
    assert issubclass(KeyRejected, RemoteError) and KeyRejected.__doc__
    with FakeDaemon(key=b"k" * 16) as srv:
        with Publisher([srv.endpoint], origin="wrong", key="w" * 16, state_dir=tmp_path) as p:
            with pytest.raises(ekko.KeyRejected) as ei:
                p.register(SPEC)
            assert ei.value.status == 401 and "rejected the key" in str(ei.value)
            assert ei.value.endpoint.endswith(srv.endpoint.split("//")[-1])
            p._core._specs["ranker"] = SPEC
            with pytest.raises(ekko.KeyRejected):
                p.publish("ranker", "emb", [1], torch.ones(1, 4))
            assert p.pending_models == ["ranker"]      # kept: the right key re-signs it
        with pytest.raises(ekko.KeyRejected, match="key was rejected"):
            Client(srv.endpoint, key="w" * 16).register(SPEC)
