"""The read and operator endpoints of a daemon: rows, status, metrics, cuts, rollbacks, quality.

:class:`OperatorHandlers` answers every route of ``docs/http-api.md`` that is not
the write path of :mod:`ekko.server.ingest`: reading rows, the status and
Prometheus metrics, health, cuts and the baseline pin, rollbacks (taking one,
listing them), quality reports and the knowledge view for fault harnesses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import msgpack
import numpy as np
import torch
from aiohttp import web

from ekko.core.codec import MsgType, field
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.delta import WIRE_DTYPES
from ekko.core.hashed import check_keys, keys_of, values_of, with_keys
from ekko.core.spec import check_name
from ekko.core.store import TORCH_DTYPES, from_wire_values, to_wire_values
from ekko.core.version import last_counter_at
from ekko.replica.node import ReplicaNode
from ekko.server.backpressure import PublishGate
from ekko.server.driver import NodeDriver
from ekko.server.frames import RETRY_AFTER_S, FrameReader, RequestRejected
from ekko.server.metrics import DaemonMetrics
from ekko.server.persistence import Persistence
from ekko.server.placed_routes import PlacedRoutes
from ekko.server.rollback_view import rollback_view
from rollback.manager import check_sample

# The daemon's logger: operators filter and tests capture "ekko.server.daemon" for all of it.
log = logging.getLogger("ekko.server.daemon")

#: most row ids one GET .../rows request may name.
MAX_READ_IDS = 16384
#: longest a cut request may wait for knowledge to cover a publisher's heads (seconds).
MAX_CUT_WAIT_S = 60.0
#: how often such a wait looks again (seconds).
CUT_WAIT_POLL_S = 0.02
#: quality samples one POST /v1/quality may carry.
MAX_QUALITY_SAMPLES = 1024


def _hlc_now() -> int:
    """This host's wall clock as an HLC counter (the top logical tick of this millisecond)."""
    return max(1, last_counter_at(time.time() * 1000))


class OperatorHandlers:
    """Request handlers for reads and operator actions on one node.

    Args:
        node: the replica node.
        config: its configuration.
        frames: reads request frames.
        driver: sends what the node produced (and owns the transport).
        persistence: the data dir (baseline pin file, the log's state, recovery stats).
        gate: the publish gate (its gauges go to ``/metrics``).
        metrics: the daemon's metrics.
        clock: protocol time source (seconds, monotonic).
        is_draining: whether the daemon is shutting down.

    Example:
        :class:`ekko.server.http_api.HttpApi` routes to them::

            app.router.add_get("/v1/status", operator.status)
    """

    def __init__(self, node: ReplicaNode, config: NodeConfig, frames: FrameReader, driver: NodeDriver,
                 persistence: Persistence, gate: PublishGate, metrics: DaemonMetrics, clock: Callable[[], float],
                 is_draining: Callable[[], bool]) -> None:
        self.node = node
        self.config = config
        self.frames = frames
        self.driver = driver
        self.persistence = persistence
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.is_draining = is_draining
        #: reads of placed tables routed to the holders of their shards.
        self.routes = PlacedRoutes(node, driver.transport)

    def _known_model(self, model: str) -> None:
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")

    # ------------------------------------------------------------------ cuts and the baseline pin
    async def take_cut(self, request: web.Request) -> web.Response:
        """Frame ``CUT`` ``{"model", "name"?}``: take a named cut here and tell every peer."""
        frame = await self.frames.read_frame(request)
        self.frames.expect(frame, MsgType.CUT)
        model = field(frame.body, "model", str)
        self._known_model(model)
        name = field(frame.body, "name", str, optional=True) or f"cut-{int(time.time() * 1000)}"
        covers = frame.body.get("covers")
        if covers is not None:
            # A publisher's cut covers everything it had acknowledged: wait until this
            # replica's knowledge reaches its chain heads (a gap may need a probe first).
            origin, heads = self.node.parse_coverage(model, covers)
            wait_s = min(float(field(frame.body, "wait_s", (int, float), optional=True, default=0.0)),
                         MAX_CUT_WAIT_S)
            deadline = time.monotonic() + max(0.0, wait_s)
            while (missing := self.node.uncovered(model, origin, heads)) and time.monotonic() < deadline:
                await asyncio.sleep(CUT_WAIT_POLL_S)
            if missing:
                raise RequestRejected(f"{len(missing)} shard(s) of {model!r} are not yet known up to the "
                                      f"publisher's acknowledged updates (first: {missing[0]}); retry", "incomplete")
        cut = self.node.take_cut(model, name, self.clock())
        self.driver.send_out()
        log.info("took cut %s of %s", cut.name, model)
        return web.json_response({"ok": True, "model": model, "name": cut.name, "taken_at": time.time()})

    async def cuts(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}/cuts``: the cuts known here, the undo horizon and the pin."""
        model = request.match_info["model"]
        self._known_model(model)
        undo = self.node.undo
        horizon = undo.horizon(model) if undo is not None else None
        pin = self.node.baseline_pin
        # restorable: the undo history here holds every change since the cut (else the
        # rows it lacks are zeroed and repaired from peers); learnt: from a peer or a
        # snapshot rather than taken here.
        cuts = [{"name": c.name, "taken_at": self.node.cut_wall_time(c), "taken_at_monotonic": c.taken_at,
                 "restorable": self.node.cuts.restorable(c) if undo is not None else False,
                 "learnt": c.seq == 0, "pinned": c.name == pin, "shards": len(c.knowledge)}
                for c in self.node.cuts.cuts(model)]
        return web.json_response({"model": model, "cuts": cuts, "undo_horizon_seq": horizon,
                                  "baseline_pin": pin})

    async def baseline(self, request: web.Request) -> web.Response:
        """Frame ``BASELINE`` ``{"cut": name}`` pins this replica as a baseline to a cut of
        the model (it must be known here: see ``GET /v1/models/{model}/cuts``); ``""``
        unpins.  The pin holds every model of the replica; it is kept in the data dir."""
        model = request.match_info["model"]
        frame = await self.frames.read_frame(request)
        self.frames.expect(frame, MsgType.BASELINE)
        cut = field(frame.body, "cut", str)
        self._known_model(model)
        if cut:
            check_name("cut", cut, ProtocolError)
            if all(c.name != cut for c in self.node.cuts.cuts(model)):
                raise RequestRejected(f"model {model!r} has no cut {cut!r} here (see ekko cuts)", "not_found")
        before = self.node.baseline_pin
        record = {"cut": cut, "config": self.config.baseline_pin_cut}
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.persistence.write_baseline_file, record)
        except OSError as e:   # not pinned: a pin a restart would silently drop is worse
            raise RequestRejected(f"cannot keep the pin in {self.persistence.data_dir}: {e}",
                                  "persist_error") from None
        self.node.set_baseline_pin(cut)
        self.driver.send_out()
        log.warning("baseline pin %r -> %r (through the API)", before, cut)
        return web.json_response({"ok": True, "model": model, "cut": cut, "previous": before})

    async def model_spec(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``: ``{"spec": ...}``, the model's tables and their layout
        (what ``ekko.load`` and a serving module need to find each parameter's table)."""
        model = request.match_info["model"]
        self._known_model(model)
        return web.json_response({"spec": self.node.spec(model).to_dict()})

    async def knowledge(self, request: web.Request) -> web.Response:
        """Read-only view for fault harnesses: per table, per shard ``[shard, knowledge,
        pending chains]`` (knowledge as ``[[origin, counter], ...]``), and the rollback
        records held here (each with its cut's knowledge and its ``upper`` bounds)."""
        model = request.match_info["model"]
        self._known_model(model)
        shards = self.node.models[model].shards
        tables = {t: [[s, sync.knowledge.to_wire(), sum(len(c) for c in sync.pending.values())]
                      for s, sync in sorted(by_shard.items())] for t, by_shard in shards.items()}
        rollbacks = [r for r in self.node.rollbacks.values() if r.get("model") == model]
        return web.json_response({"model": model, "tables": tables, "rollbacks": rollbacks})

    # ------------------------------------------------------------------ rollbacks and quality
    def rollback_point(self, model: str) -> int:
        """The counter up to which a rollback "now" fences: this host's wall clock, or the
        greatest counter of ``model`` held here or reported by a peer if that is ahead.
        A publisher runs its HLC ahead of wall time by its rows / 256 per millisecond (a
        2,000-row publish: 7.8 ms), so the wall clock alone could leave the tail of a
        publish made just before unfenced.  Peers' heads are bounded by the skew horizon."""
        heads = [h.get(model, 0) for h in self.node.peer_heads.values()]
        return max([_hlc_now(), self.node.models[model].head] + heads)

    async def rollback(self, request: web.Request) -> web.Response:
        """Frame ``ROLLBACK`` ``{"model", "cut"}``: roll the model back to a cut everywhere.

        The rollback point is now (:meth:`rollback_point`): every update of the model
        after the cut and up to now is fenced.
        """
        frame = await self.frames.read_frame(request)
        self.frames.expect(frame, MsgType.ROLLBACK)
        model = field(frame.body, "model", str)
        cut = field(frame.body, "cut", str)
        self._known_model(model)
        record = self.node.rollback(model, cut, self.rollback_point(model), self.clock())
        self.driver.send_out()
        log.warning("rolled back %s to cut %s (record %s)", model, cut, record["id"])
        return web.json_response({"ok": True, "model": model, "cut": cut, "id": record["id"],
                                  "rolled_back_rows": int(self.node.counters["rolled_back_rows"])})

    async def rollbacks(self, request: web.Request) -> web.Response:
        """The model's rollback records here (for a trainer's watch): see :mod:`ekko.server.rollback_view`."""
        model = request.match_info["model"]
        self._known_model(model)
        return web.json_response(rollback_view(self.node, model))

    async def quality(self, request: web.Request) -> web.Response:
        """Frame ``QUALITY``: one sample ``{"model", "variant", "metric", "value", "count"}``
        or a batch ``{"samples": [sample, ...]}`` (at most MAX_QUALITY_SAMPLES); every
        sample is validated before any is taken, so a bad batch changes nothing."""
        frame = await self.frames.read_frame(request)
        self.frames.expect(frame, MsgType.QUALITY)
        raw = frame.body.get("samples", [frame.body]) if isinstance(frame.body, dict) else None
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_QUALITY_SAMPLES:
            raise RequestRejected(f"samples must be a list of 1..{MAX_QUALITY_SAMPLES} maps", "bad_body")
        samples = []
        for smp in raw:
            if not isinstance(smp, dict):
                raise RequestRejected("a quality sample must be a map", "bad_body")
            args = tuple(smp.get(k) for k in ("model", "variant", "metric", "value", "count"))
            check_sample(*args)
            if args[0] not in self.node.models:
                raise RequestRejected(f"unknown model {args[0]!r}", "unknown_model")
            if args[2] not in self.node.quality.config.detector.metrics:
                raise RequestRejected(f"unknown metric {args[2]!r}; known: "
                                      f"{sorted(self.node.quality.config.detector.metrics)}", "bad_metric")
            samples.append(args)
        started = []
        for args in samples:
            record = self.node.report_quality(*args, self.clock(), until_counter=self.rollback_point(args[0]))
            if record is not None:
                started.append(record["id"])
        self.driver.send_out()
        states = {a[0]: self.node.quality.state(a[0]).value for a in samples}
        return web.json_response({"ok": True, "samples": len(samples), "states": states, "rollbacks": started})

    # ------------------------------------------------------------------ reads
    async def rows(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}/tables/{table}/rows?ids=...&format=json|msgpack``; a
        hashed table's rows also by key: ``?keys=K,K,...`` (an absent key reads as slot -1,
        version 0, zeros).  A hashed table's answer holds each row's ``keys``."""
        model, table = request.match_info["model"], request.match_info["table"]
        self._known_model(model)
        spec = self.node.table_spec(model, table)
        if spec is None:
            raise RequestRejected(f"model {model!r} has no table {table!r}", "unknown_table")
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "msgpack"):
            raise RequestRejected("format must be json or msgpack", "bad_format")
        by_key = "keys" in request.query
        if by_key and not spec.hashed:
            raise RequestRejected(f"table {table!r} is not hashed: read it by ids", "bad_ids")
        name = "keys" if by_key else "ids"
        raw = request.query.get(name)
        if raw is None:
            raise RequestRejected("missing ids=ID,ID,... (or keys=KEY,... of a hashed table)", "bad_ids")
        parts = raw.split(",") if raw.strip() else []
        if len(parts) > MAX_READ_IDS:
            raise RequestRejected(f"{len(parts)} {name} exceed MAX_READ_IDS={MAX_READ_IDS}", "too_many_ids")
        try:
            asked = np.array([int(p) for p in parts], dtype=np.int64)
        except (ValueError, OverflowError):
            raise RequestRejected(f"{name} must be comma-separated 64-bit integers", "bad_ids") from None
        if not by_key and len(asked) and (asked.min() < 0 or asked.max() >= spec.rows):
            raise RequestRejected(f"row ids must be within 0..{spec.rows - 1}", "bad_ids")
        m = self.node.models[model]
        held = m.held(table)
        if held is not None and request.query.get("local") != "1":
            # A placed table: ids of shards kept elsewhere are read from their holders.
            ids, found, values, versions = await self._routed_rows(m, spec, held, asked, by_key, request.path)
        else:
            filling_ok = held is None or request.query.get("filling_ok") == "1"   # local=1: a routed part
            ids, found, values, versions = self._rows_here(model, table, asked, by_key, filling_ok)
        answer: dict[str, Any] = {"model": model, "table": table, "n": len(ids), "dim": spec.dim, "dtype": spec.dtype}
        if spec.hashed:
            keys = keys_of(values, spec)
            values = values_of(values, spec)
            if not found.all():
                keys[~found] = asked[~found]
                values = values.clone()
                values[torch.from_numpy(~found).to(values.device)] = 0
            answer["found"] = found.tolist() if fmt == "json" else np.packbits(found).tobytes()
        if fmt == "msgpack":
            wire = to_wire_values(values)
            answer.update(ids=ids.astype("<i8").tobytes(), versions=versions.astype("<i8").tobytes(),
                          values=np.ascontiguousarray(wire).astype(wire.dtype.newbyteorder("<"), copy=False).tobytes())
            if spec.hashed:
                answer["keys"] = keys.astype("<i8").tobytes()
            return web.Response(body=msgpack.packb(answer, use_bin_type=True), content_type="application/msgpack")
        vals = values.detach().to("cpu")
        if vals.dtype != torch.float64:
            vals = vals.float()  # float16/bfloat16 widen exactly; JSON numbers are doubles anyway
        answer.update(ids=ids.tolist(), versions=versions.tolist(), values=vals.tolist())
        if spec.hashed:
            answer["keys"] = keys.tolist()
        return web.json_response(answer)

    def _rows_here(self, model: str, table: str, asked: np.ndarray, by_key: bool, filling_ok: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
        """Rows of ids (or a hashed table's keys) from this replica's store: ``(ids,
        found, values, versions)``, a key not held at slot -1, version 0.  Without
        ``filling_ok``, rows of placed shards still filling here are refused (503)."""
        store = self.node.table_store(model, table)
        if store.blocks is not None:
            # A placed table: answer only for shards kept here -- a key of a shard kept
            # elsewhere is not "absent" here, it is not ours to answer for.
            spec = store.spec
            shards = spec.key_shards(asked) if by_key else spec.shards_of(asked)
            if not store.blocks.held[shards].all():
                raise RequestRejected(f"shards of {table} asked for are not kept by this replica", "bad_ids")
            filling = self.node.models[model].filling[table]
            if filling and not filling_ok and np.isin(shards, np.fromiter(filling, np.int64)).any():
                raise RequestRejected(f"shards of {table} asked for are still filling here; read them from "
                                      "another holder", "incomplete")
        try:
            ids = store.lookup(check_keys(asked)) if by_key else asked
            found = ids >= 0
            values = self.node.read_rows(model, table, np.where(found, ids, 0))
        except UsageError as e:
            raise RequestRejected(str(e), "bad_ids") from None
        versions = np.where(found, store.versions[np.maximum(ids, 0)], 0)
        return ids, found, values, versions

    async def _routed_rows(self, m: Any, spec: Any, held: np.ndarray, asked: np.ndarray, by_key: bool,
                           path: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
        """:meth:`_rows_here` for a placed table: each part from the holder of its shards
        in this DC (this replica for the shards it keeps), merged in the order asked.  A
        part whose holder is unreachable or still filling (it took the shard moments ago,
        :attr:`p2p.model_state.ModelState.filling`) is read from the shards' holders in
        the other DCs, in DC order; only when none of them can answer is it read from a
        filling holder after all."""
        me = self.node.node_id
        shards = spec.key_shards(asked) if by_key else spec.shards_of(asked)
        ids = np.zeros(len(asked), np.int64)
        found = np.zeros(len(asked), bool)
        versions = np.zeros(len(asked), np.int64)
        values = torch.zeros(len(asked), spec.width, dtype=TORCH_DTYPES[spec.dtype])

        async def fetch(node: str, pos: np.ndarray, filling_ok: bool) -> None:
            if node == me:
                i, f, v, ver = self._rows_here(m.spec.name, spec.name, asked[pos], by_key, filling_ok)
                ids[pos], found[pos], versions[pos] = i, f, ver
                values[torch.from_numpy(pos)] = v.detach().to("cpu")
                return
            self.metrics.routed_parts.inc()
            a = await self.routes.read(node, path, "keys" if by_key else "ids", asked[pos], filling_ok)
            k = len(pos)
            if a.get("n") != k:
                raise RequestRejected(f"holder {node} answered {a.get('n')} rows for {k}", "incomplete")
            ids[pos] = np.frombuffer(a["ids"], "<i8")
            versions[pos] = np.frombuffer(a["versions"], "<i8")
            wire = np.frombuffer(a["values"], np.dtype(WIRE_DTYPES[spec.dtype]).newbyteorder("<"))
            rows = wire.astype(wire.dtype.newbyteorder("="), copy=False).reshape(k, spec.dim)
            if spec.hashed:
                rows = with_keys(rows, np.frombuffer(a["keys"], "<i8").astype(np.int64), spec)
                found[pos] = np.unpackbits(np.frombuffer(a["found"], np.uint8), count=k).astype(bool)
            else:
                found[pos] = True
            values[torch.from_numpy(pos)] = from_wire_values(np.ascontiguousarray(rows), spec.dtype,
                                                             torch.device("cpu"))

        async def round_of(dc: str, pos: np.ndarray, filling_ok: bool) -> np.ndarray:
            """Read ``pos`` from the first holders of their shards in ``dc``; the positions
            that failed."""
            owner = self.node.placement.owners(m.spec, spec.name, dc, held)
            if not len(owner):
                return pos
            dest = owner[shards[pos]]
            parts = {n: pos[dest == n] for n in sorted(set(dest.tolist()))}
            got = await asyncio.gather(*(fetch(n, p, filling_ok) for n, p in parts.items()), return_exceptions=True)
            failed = [p for p, g in zip(parts.values(), got) if isinstance(g, BaseException)]
            for g in got:
                if isinstance(g, BaseException) and not isinstance(g, (RequestRejected, ProtocolError)):
                    raise g
            return np.concatenate(failed) if failed else pos[:0]

        left = await round_of(self.node.dc, np.arange(len(asked)), False)
        for dc in [d for d in self.node.topology.dcs() if d != self.node.dc]:
            if not len(left):
                break
            left = await round_of(dc, left, False)
        for dc in [self.node.dc] + [d for d in self.node.topology.dcs() if d != self.node.dc]:
            if len(left):   # no settled holder answered: a filling one's rows are the best there are
                left = await round_of(dc, left, True)
        if len(left):
            raise RequestRejected(f"no holder could answer for {len(left)} of the rows asked; retry", "incomplete")
        return ids, found, values, versions

    async def _routed_keys(self, m: Any, spec: Any, held: np.ndarray, slots: np.ndarray, keys: np.ndarray,
                           path: str) -> tuple[np.ndarray, np.ndarray]:
        """A placed hashed table's keys over every shard: each shard's from its first holder
        in this DC (this replica's for the shards it keeps), in slot order -- a publisher
        resumes its slot assignment from this, so no shard may be missing."""
        me = self.node.node_id
        owner = self.node.placement.owners(m.spec, spec.name, kept=held)
        mine = owner[spec.shards_of(slots)] == me
        got_slots, got_keys = [slots[mine]], [keys[mine]]
        others = sorted(set(owner.tolist()) - {me})
        self.metrics.routed_parts.inc(len(others))
        answers = await asyncio.gather(*(self.routes.get(n, path) for n in others))
        for n, a in zip(others, answers):
            k = int(a["n"])
            s_, k_ = np.frombuffer(a["slots"], "<i8").astype(np.int64), np.frombuffer(a["keys"], "<i8").astype(np.int64)
            if len(s_) != k or len(k_) != k:
                raise RequestRejected(f"bad key listing from {n}", "incomplete")
            theirs = owner[spec.shards_of(s_)] == n
            got_slots.append(s_[theirs])
            got_keys.append(k_[theirs])
        slots, keys = np.concatenate(got_slots), np.concatenate(got_keys)
        order = np.argsort(slots, kind="stable")
        return slots[order], keys[order]

    async def keys(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}/tables/{table}/keys``: a hashed table's held keys and
        their slots (msgpack ``{"n", "slots", "keys"}``, little-endian int64): what a
        publisher that starts again resumes its slot assignment from."""
        model, table = request.match_info["model"], request.match_info["table"]
        self._known_model(model)
        spec = self.node.table_spec(model, table)
        if spec is None or not spec.hashed:
            raise RequestRejected(f"model {model!r} has no hashed table {table!r}", "unknown_table")
        try:
            slots, keys = self.node.table_store(model, table).held_keys()
        except UsageError as e:
            raise RequestRejected(str(e), "no_values") from None
        m = self.node.models[model]
        held = m.held(table)
        if held is not None and request.query.get("local") != "1":
            slots, keys = await self._routed_keys(m, spec, held, slots, keys, request.path)
        body = {"model": model, "table": table, "n": len(slots), "slots": slots.astype("<i8").tobytes(),
                "keys": keys.astype("<i8").tobytes()}
        return web.Response(body=msgpack.packb(body, use_bin_type=True), content_type="application/msgpack")

    async def status(self, request: web.Request) -> web.Response:
        """``GET /v1/status[?cluster=1]``: the node's status, durability, and the member list."""
        cluster = request.query.get("cluster", "0")
        if cluster not in ("0", "1", "true", "false"):
            raise RequestRejected("cluster must be 0 or 1", "bad_query")
        st = self.node.status()
        st["serving"] = not self.is_draining()
        st["baseline_pin"] = self.node.baseline_pin
        wal = self.persistence.wal
        st["durability"] = {"mode": self.config.durability, "recovery": self.persistence.recovery,
                            "wal_retained_bytes": wal.retained_bytes if wal is not None else 0}
        if cluster in ("1", "true"):
            st["members"] = self.node.cluster_view()
        return web.json_response(st)

    async def metrics_page(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text."""
        self.metrics.sends_in_flight.set(self.driver.transport.in_flight)
        self.metrics.set_pressure(**self.gate.gauges())
        from prometheus_client import CONTENT_TYPE_LATEST
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200, or 503 while shutting down."""
        if self.is_draining():
            return web.Response(status=503, text="draining\n", headers={"Retry-After": str(RETRY_AFTER_S)})
        return web.Response(text="ok\n")
