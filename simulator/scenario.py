"""Scenarios: a WAN, a model, a workload and the systems to compare, from TOML.

A scenario file has these tables (every key optional except where noted; the
shipped files in ``simulator/scenarios/`` document where each value comes from):

``[scenario]``  name, description, seed, duration_s (workload length),
                settle_s (extra simulated time for convergence), replicas,
                mode ("auto" | "metadata" | "full"), systems (list),
                samples_per_batch (tracked rows per batch for latency),
                daemon_identities (true: replicas carry the identities real daemons
                put on the wire -- ids ``<dc>-r<k>``, ``host:port`` addresses,
                ``time_ns`` incarnations -- so gossip bytes match theirs; default
                false: compact ``r00000`` ids that double as addresses)
``[wan]``       dcs (list, first = training DC unless training_dc given),
                training_dc, rtt_ms (``{"a-b" = ms}`` or a number),
                intra_dc_rtt_ms, nic_gbps, wan_gbps, background_load, loss,
                jitter_ms, per_message_overhead_bytes
``[node]``      any :class:`ekko.core.config.NodeConfig` field plus ``preset``
``[[table]]``   name, rows, dim, dtype, shards, dense, cold_rows (rows a real
                replica holds that the run never updates: not allocated, only
                charged by the CPU model's whole-shard scans, :mod:`simulator.cpu`)
``[workload]``  batch_interval_s, and ``[[workload.sparse]]`` (table, rows_per_s,
                zipf_s, initial_rows, new_row_fraction, impact_sigma),
                ``[[workload.dense]]`` (table, period_s), ``[[workload.burst]]``
                (t0, t1, multiplier)
``[baselines]`` checkpoint_interval_s, checkpoint_validate_s (broadcast),
                adam_batch_s (2PC batching window)
``[cpu]``       per_message_s, apply_s_per_row, scan_s_per_row, index_s_per_row;
                optional transport costs recv_per_message_s, recv_s_per_byte,
                send_per_message_s, send_s_per_byte, the publish path
                publish_recv_per_message_s, publish_recv_s_per_byte,
                publisher_per_message_s, publisher_s_per_byte, and wake_s (default 0),
                and shared_cores (one pool of K cores for all replicas and the
                publisher; default a core each) (measured by ``bench/sim_cpu_costs.py``
                and ``bench/daemon_costs.py``; see :mod:`simulator.cpu`); absent = no
                endpoint CPU time is charged
``[faults]``    makes it a fault-injection scenario instead (only ``[scenario]``
                with name, description, seed, seeds, and ``[faults]`` with the fields of
                :class:`simulator.faults.FaultConfig`; see ``scenarios/faults.toml``)
``[scheduler]`` k_percent (top-k% high priority), wan_budget_fraction_of_burst
                (the push budget of every WAN link as a fraction of the update
                bytes/s offered at the burst's peak) or wan_budget_bytes_per_s,
                staleness_interval_s (sampling step of the staleness error)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ekko.core.config import NodeConfig, config_from_dict
from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec, TableSpec
from simulator.cpu import MAX_COLD_ROWS, CpuCosts
from simulator.wan_config import WanConfig
from simulator.workload import Burst, DenseTable, SparseTable, WorkloadConfig

#: every system the runner knows, in report order.
ALL_SYSTEMS = ("ekko", "ekko-no-gateways", "ekko-full-scan", "random-gossip", "direct-push", "adam-2pc",
               "broadcast", "fifo", "ekko-uncongested", "ekko-replicated")
#: above this many replicas "auto" mode keeps versions only (no tensors).
AUTO_METADATA_REPLICAS = 200
MODEL_NAME = "model"
#: most distinct feature keys a hashed table's workload draws from.
MAX_KEY_SPACE = 1 << 40


@dataclass
class Scenario:
    """A parsed scenario.  Build with :func:`load_scenario`."""

    name: str
    description: str
    seed: int
    duration_s: float
    settle_s: float
    replicas: int
    mode: str
    systems: list[str]
    samples_per_batch: int
    wan: WanConfig
    training_dc: str
    node: NodeConfig
    model: ModelSpec
    workload: WorkloadConfig
    baselines: dict[str, float] = field(default_factory=dict)
    scheduler: dict[str, float] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: endpoint CPU cost constants (``[cpu]``); None = CPU time not modelled.
    cpu: CpuCosts | None = None
    #: per table: rows held but never updated (``[[table]] cold_rows``).
    cold_rows: dict[str, int] = field(default_factory=dict)
    #: replicas carry real daemons' wire identities (``[scenario] daemon_identities``).
    daemon_identities: bool = False

    def scan_scale(self) -> dict[str, float]:
        """Per table, rows a whole-shard scan walks per simulated row: (rows + cold) / rows."""
        return {t.name: (t.rows + self.cold_rows.get(t.name, 0)) / t.rows for t in self.model.tables}

    @property
    def with_values(self) -> bool:
        if self.mode == "auto":
            return self.replicas <= AUTO_METADATA_REPLICAS
        return self.mode == "full"


def sc_placement(sc: dict[str, Any]) -> int:
    """``[scenario] replicas_per_shard``: each shard on that many replicas per DC (issue
    #18, :mod:`p2p.placement`); 0 (default) every replica holds every shard."""
    r = sc.get("replicas_per_shard", 0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise UsageError(f"[scenario] replicas_per_shard must be an integer >= 0, got {r!r}")
    return r


def _feature_rows(t: TableSpec, s: dict[str, Any]) -> int:
    """The ids a sparse workload draws from: a dense table's rows, or a hashed table's
    feature keys ``0..key_space-1``."""
    if not t.hashed:
        if "key_space" in s:
            raise UsageError(f"workload of table {t.name!r}: key_space is for hashed tables")
        return t.rows
    space = s.get("key_space", 4 * t.rows)
    if not isinstance(space, int) or isinstance(space, bool) or not 1 <= space <= MAX_KEY_SPACE:
        raise UsageError(f"workload of table {t.name!r}: key_space must be an integer in [1, {MAX_KEY_SPACE}]")
    return space


def _pair_key(k: str, dcs: list[str]) -> tuple[str, str]:
    for a in dcs:
        if k.startswith(a + "-") and k[len(a) + 1:] in dcs:
            return a, k[len(a) + 1:]
    raise UsageError(f"rtt_ms key {k!r} is not 'dcA-dcB' with known DCs")


def parse_scenario(d: dict[str, Any], name: str = "custom") -> Scenario:
    if "faults" in d:
        from simulator.fault_plan import parse_fault_scenario
        return parse_fault_scenario(d, name)  # type: ignore[return-value]  # run by the faults harness
    sc = d.get("scenario", {})
    wan = d.get("wan", {})
    dcs = list(wan.get("dcs", ["dc0", "dc1", "dc2"]))
    rtt = wan.get("rtt_ms", 50.0)
    if isinstance(rtt, dict):
        rtt = {_pair_key(k, dcs): float(v) for k, v in rtt.items()}
    wcfg = WanConfig(dcs, rtt_ms=rtt, intra_dc_rtt_ms=float(wan.get("intra_dc_rtt_ms", 0.2)),
                     nic_bps=float(wan.get("nic_gbps", 25)) * 1e9, wan_capacity_bps=float(wan.get("wan_gbps", 1)) * 1e9,
                     background_load=float(wan.get("background_load", 0.0)), loss=float(wan.get("loss", 0.0)),
                     jitter_ms=float(wan.get("jitter_ms", 0.0)),
                     per_message_overhead_bytes=int(wan.get("per_message_overhead_bytes", 0)))
    training_dc = wan.get("training_dc", dcs[0])
    if training_dc not in dcs:
        raise UsageError(f"training_dc {training_dc!r} not in dcs")
    node = config_from_dict(dict(d.get("node", {"preset": "wan"})))
    tables = [TableSpec(t["name"], rows=int(t.get("rows", 0)), dim=int(t["dim"]), dtype=t.get("dtype", "float32"),
                        shards=t.get("shards"), dense=bool(t.get("dense", False)), keys=t.get("keys", "dense"),
                        capacity=t.get("capacity"), eviction=t.get("eviction", "none"))
              for t in d.get("table", [])]
    if not tables:
        raise UsageError("a scenario needs at least one [[table]]")
    placed = sc_placement(d.get("scenario", {}))
    model = ModelSpec(MODEL_NAME, tables, replicas_per_shard=placed)
    if placed and "scheduler" in d:
        raise UsageError("a [scheduler] scenario with a placed model (replicas_per_shard) is not modelled: "
                         "its classes are decided at one ingest replica, a placed model has one per shard")
    if "scheduler" in d and any(t.hashed for t in tables):
        # The hindsight measures (staleness, class agreement) weigh rows by their feature's
        # popularity; a hashed table's slots change features as keys are evicted.
        raise UsageError("a [scheduler] scenario with hashed tables is not modelled: its staleness and "
                         "class agreement weigh rows by feature, and a hashed table's slots change features")
    cold_rows: dict[str, int] = {}
    for t in d.get("table", []):
        cold = t.get("cold_rows", 0)
        if not isinstance(cold, int) or isinstance(cold, bool) or not 0 <= cold <= MAX_COLD_ROWS:
            raise UsageError(f"table {t['name']!r}: cold_rows must be an integer in [0, {MAX_COLD_ROWS}], "
                             f"got {cold!r}")
        if cold:
            cold_rows[t["name"]] = cold
    cpu = CpuCosts.from_dict(d["cpu"]) if "cpu" in d else None
    wl = d.get("workload", {})
    # A hashed table's workload draws feature keys 0..key_space-1 (default: 4x its capacity),
    # which the simulated publisher assigns slots (simulator.ekko_run).
    sparse = [SparseTable(MODEL_NAME, s["table"], rows=_feature_rows(model.table(s["table"]), s),
                          rows_per_s=float(s["rows_per_s"]), zipf_s=float(s.get("zipf_s", 1.05)),
                          initial_rows=s.get("initial_rows"), new_row_fraction=float(s.get("new_row_fraction", 0.0)),
                          impact_sigma=float(s.get("impact_sigma", 1.0))) for s in wl.get("sparse", [])]
    dense = [DenseTable(MODEL_NAME, x["table"], rows=model.table(x["table"]).rows, period_s=float(x["period_s"]))
             for x in wl.get("dense", [])]
    bursts = [Burst(float(b["t0"]), float(b["t1"]), float(b["multiplier"])) for b in wl.get("burst", [])]
    wcfg_load = WorkloadConfig(sparse=sparse, dense=dense, bursts=bursts,
                               batch_interval_s=float(wl.get("batch_interval_s", 0.1)))
    systems = list(sc.get("systems", ["ekko"]))
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown:
        raise UsageError(f"unknown systems {sorted(unknown)}; known: {list(ALL_SYSTEMS)}")
    mode = sc.get("mode", "auto")
    if mode not in ("auto", "metadata", "full"):
        raise UsageError("mode must be auto, metadata or full")
    identities = sc.get("daemon_identities", False)
    if not isinstance(identities, bool):
        raise UsageError(f"[scenario] daemon_identities must be true or false, got {identities!r}")
    return Scenario(name=sc.get("name", name), description=sc.get("description", ""), seed=int(sc.get("seed", 1)),
                    duration_s=float(sc.get("duration_s", 60)), settle_s=float(sc.get("settle_s", 30)),
                    replicas=int(sc.get("replicas", 60)), mode=mode, systems=systems,
                    samples_per_batch=int(sc.get("samples_per_batch", 4)), wan=wcfg, training_dc=training_dc,
                    node=node, model=model, workload=wcfg_load, baselines=dict(d.get("baselines", {})),
                    scheduler=dict(d["scheduler"]) if "scheduler" in d else None, raw=d, cpu=cpu,
                    cold_rows=cold_rows, daemon_identities=identities)


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name (``paper``, ``congestion``, ``rollback``, ``faults``) or a TOML file."""
    p = Path(name_or_path)
    try:
        if p.suffix == ".toml" or p.is_file():  # not p.exists(): the package dir rollback/ is no scenario
            with open(p, "rb") as f:
                return parse_scenario(tomllib.load(f), p.stem)
        text = resources.files("simulator").joinpath("scenarios", f"{name_or_path}.toml").read_text()
    except FileNotFoundError:
        raise UsageError(f"no scenario {name_or_path!r}: give a shipped name ({', '.join(shipped())}) "
                         f"or a .toml file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read scenario {name_or_path}: {e}") from None
    return parse_scenario(tomllib.loads(text), name_or_path)


def shipped() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("simulator").joinpath("scenarios").iterdir()
                  if p.name.endswith(".toml"))
