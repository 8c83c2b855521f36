"""``ekko.attach``: a serving process maps a sidecar daemon's tables read-only, zero-copy
(issue #17).  Real daemon processes; the attached tensors follow publishes and a
rollback with no re-attach, lookups never return a torn row."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ekko
from ekko.core.errors import RemoteError, UsageError
from ekko.sdk.client import Client
from ekko.sdk.publisher import Publisher
from tests.procs import DaemonGroup, wait_for

SPEC = ekko.ModelSpec("m", [ekko.TableSpec("emb", rows=2000, dim=16)])



def lookups_during_publishes(att, pub, ids, numbers) -> tuple[int, list]:
    """Publish every row of ``ids`` as each of ``numbers`` (all 16 values of a row equal to
    the publish's number) while a thread looks the rows up through ``att``; the number of
    lookups, and those that mixed two publishes (copied to the CPU)."""
    stop, bad, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            rows = att.lookup("emb", ids)
            reads[0] += 1
            if not bool((rows == rows[0, 0]).all()):
                bad.append(rows.cpu())

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        for k in numbers:
            pub.publish_many("m", {"emb": (ids, np.full((len(ids), 16), float(k), np.float32))})
    finally:
        stop.set()
        th.join(10)
    return reads[0], bad


def test_attached_tables_follow_publishes_and_a_rollback_in_place(tmp_path):
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1")
        with Publisher([a.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
            ids = np.array([5, 6, 1999])
            pub.publish_many("m", {"emb": (ids, np.full((3, 16), 1.0, np.float32))})
            att = ekko.attach(a.address, "m")
            t = att.tensor("emb")
            assert t.shape == (2000, 16) and float(t[5, 0]) == 1.0     # what was there before attaching
            assert torch.equal(att.lookup("emb", ids), torch.full((3, 16), 1.0))
            pub.cut("m", "c1")          # covers what the publisher had acknowledged (waits for it)
            pub.publish_many("m", {"emb": (ids, np.full((3, 16), 2.0, np.float32))})
            wait_for(lambda: bool((t[ids] == 2.0).all()), 10, 0.02, "the update in the mapped memory")
            seq = att.write_count("emb")
            assert seq > 0 and seq % 2 == 0
            Client(a.address).rollback("m", "c1")
            wait_for(lambda: bool((t[ids] == 1.0).all()), 10, 0.02, "the rollback in the mapped memory")
            assert att.write_count("emb") > seq and att.current()
            from ekko.serving.attach import _describe
            files = [Path(p["path"]) for p in _describe(a.address, "m")["tables"].values()]
            assert all(f.exists() for f in files)
        g.terminate_all([a])
    assert not any(f.exists() for f in files)            # removed when the daemon stops
    assert not att.current()
    assert torch.equal(att.lookup("emb", ids), torch.full((3, 16), 1.0))   # the old mapping stays readable


def test_lookups_never_see_a_half_written_update(tmp_path):
    """A publisher writes the same 1,000 rows again and again, all 16 values of every row
    equal to the publish's number; a reader looks them up all the while: every read holds
    one publish, never two.  (A bare ``index_select`` of the mapped tensor, measured the
    same way: 17 of 6,433 reads mixed two publishes; with the write counter 0 of 3,820.)"""
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1")
        with Publisher([a.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
            ids = np.arange(0, 2000, 2)
            pub.publish_many("m", {"emb": (ids, np.zeros((len(ids), 16), np.float32))})
            att = ekko.attach(a.address, "m")
            reads, bad = lookups_during_publishes(att, pub, ids, range(1, 60))
        assert reads > 10 and not bad
        assert float(att.tensor("emb")[0, 0]) == 59.0


def test_bind_and_refusals(tmp_path):
    class Net(nn.Module):
        def __init__(self, dim: int = 16) -> None:
            super().__init__()
            self.emb = nn.Embedding(2000, dim)

    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1")
        with Publisher([a.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
            pub.publish_many("m", {"emb": (np.array([7]), np.full((1, 16), 3.0, np.float32))})
        att = ekko.attach(a.address, "m")
        net = Net()
        assert att.bind(net) == ["emb"]
        assert net.emb.weight.data_ptr() == att.tensor("emb").data_ptr()
        assert float(net.emb(torch.tensor([7])).sum()) == 48.0
        with pytest.raises(UsageError, match="emb"):
            att.bind(Net(dim=8))
        with pytest.raises(UsageError, match="no table"):
            att.tensor("nope")
        with pytest.raises(RemoteError) as e:
            ekko.attach(a.address, "nope")
        assert e.value.status == 404


def test_shared_files_are_not_readable_by_other_users(tmp_path):
    import stat
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1")
        with Publisher([a.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
        from ekko.serving.attach import _describe
        desc = _describe(a.address, "m")["tables"]["emb"]
        for f in (desc["path"], desc["seq_path"]):
            mode = stat.S_IMODE(Path(f).stat().st_mode)
            assert mode & stat.S_IRWXO == 0 and mode & stat.S_IRUSR, oct(mode)


def test_cuda_ipc_entries_are_checked_before_use():
    """A CPU tensor has no IPC handle; a malformed entry is refused before torch opens it;
    without CUDA a good-looking entry is refused with a clear error."""
    from ekko.core.cuda_ipc import ENTRY_FIELDS, cuda_ipc_handle, open_cuda_ipc
    from ekko.core.errors import ProtocolError
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_ipc_handle(torch.zeros(2, 2))
    with pytest.raises(ProtocolError, match="handle"):
        open_cuda_ipc({"device": 0}, torch.float32)
    sample = {int: 0, str: "AAAA", bool: False, list: [2, 2], (str, type(None)): None}
    entry = {k: sample[t] for k, t in ENTRY_FIELDS.items()}
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            open_cuda_ipc(entry, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attach_maps_the_daemons_gpu_table_and_follows_publishes_and_a_rollback(tmp_path):
    """A daemon with its tables on the GPU shares them by CUDA IPC: this process (another
    one) sees publishes and a rollback in place, lookups hold whole updates, and a bound
    module computes with the daemon's own GPU memory."""
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1", extra=["--device", "cuda"])
        with Publisher([a.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
            ids = np.arange(0, 2000, 2)
            pub.publish_many("m", {"emb": (ids, np.full((len(ids), 16), 1.0, np.float32))})
            att = ekko.attach(a.address, "m")
            t = att.tensor("emb")
            assert t.is_cuda and t.shape == (2000, 16)
            assert torch.equal(att.lookup("emb", ids).cpu(), torch.full((len(ids), 16), 1.0))
            pub.cut("m", "c1")
            reads, bad = lookups_during_publishes(att, pub, ids, range(2, 30))
            assert reads > 5 and not bad
            wait_for(lambda: bool((t[torch.as_tensor(ids, device=t.device)] == 29.0).all()), 10, 0.02,
                     "the last publish in the daemon's GPU memory")
            Client(a.address).rollback("m", "c1")
            wait_for(lambda: bool((t[torch.as_tensor(ids, device=t.device)] == 1.0).all()), 10, 0.02,
                     "the rollback in the daemon's GPU memory")

            class Net(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.emb = nn.Embedding(2000, 16)

            net = Net().cuda()
            assert att.bind(net) == ["emb"]
            assert net.emb.weight.data_ptr() == t.data_ptr()
            assert float(net.emb(torch.tensor([0], device=t.device)).sum()) == 16.0
        g.terminate_all([a])
