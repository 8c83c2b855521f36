"""``ekko sim ...``: run scenarios with a progress bar and write their reports."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ekko.core.errors import UsageError


class SystemBars:
    """One progress bar per simulated system, each ending at 100 %.

    A run stops at the first progress step after it converged, usually well before its
    simulated end; so a bar is completed when its system is done: when the next system
    reports (systems run one after another) and at :meth:`finish`.  Its text then says
    when the system stopped.

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> from rich.progress import Progress
        >>> prog = Progress(console=Console(file=io.StringIO()))
        >>> bars = SystemBars(prog)
        >>> bars("ekko", 5.5, 35.0); bars("broadcast", 700.0, 720.0); bars.finish()
        >>> [t.percentage for t in prog.tasks], prog.tasks[0].fields["t"]
        ([100.0, 100.0], 'done at 5.5 of 35 s simulated')
    """

    def __init__(self, prog: Any) -> None:
        self.prog = prog
        self.tasks: dict[str, Any] = {}
        self._done: set[str] = set()
        self._last: dict[str, float] = {}

    def __call__(self, system: str, t: float, end: float) -> None:
        """The :data:`simulator.progress.Progress` callback."""
        if system not in self.tasks:
            self.finish()
            self.tasks[system] = self.prog.add_task(system, total=end, t="")
        self._last[system] = t
        self.prog.update(self.tasks[system], completed=min(t, end), total=end, t=f"{t:7.1f}/{end:.0f} s simulated")

    def finish(self) -> None:
        """Complete every bar whose system has stopped reporting."""
        for system, task in self.tasks.items():
            if system in self._done:
                continue
            self._done.add(system)
            total = next(x.total for x in self.prog.tasks if x.id == task)
            self.prog.update(task, completed=total, t=f"done at {self._last[system]:.1f} of {total:.0f} s simulated")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simulator.scenario import ALL_SYSTEMS  # light: numpy is loaded by ``import ekko`` already
    p = sub.add_parser("sim", help="discrete-event WAN simulator (runs the real protocol)")
    ss = p.add_subparsers(dest="sim_command", required=True)
    r = ss.add_parser("run", help="run a scenario: every system on the same WAN and workload")
    r.add_argument("scenario", help="shipped scenario name (paper, congestion, rollback, faults, hashed) or a .toml file")
    r.add_argument("--replicas", type=int, help="override the scenario's replica count")
    r.add_argument("--seed", type=int, help="override the scenario's seed")
    r.add_argument("--duration", type=float, help="override the workload length (simulated seconds)")
    r.add_argument("--systems", metavar="A,B,...",
                   help="comma-separated subset of systems to run (default: the scenario's); systems: "
                        + ", ".join(ALL_SYSTEMS))
    r.add_argument("--mode", choices=["auto", "metadata", "full"], help="values mode")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--workers", type=int, default=1,
                   help="split each ekko-family system's DCs over N processes (simulator.parallel; "
                        "Linux/fork); not with --jobs")
    r.add_argument("--jobs", type=int, default=1,
                   help="run systems in this many processes (same results; no progress bar)")
    r.set_defaults(func=run_cmd)
    f = ss.add_parser("faults", help="seeded fault-injection runs of the real nodes; checks the invariants")
    f.add_argument("--seeds", type=int, default=10, help="number of seeded scenarios (default 10)")
    f.add_argument("--seed", type=int, default=0, help="first seed (a failing seed replays with --seeds 1)")
    f.add_argument("--replicas", type=int, help="replicas over 3 DCs (default 9)")
    f.add_argument("--out", required=True, help="output directory (results.json)")
    f.set_defaults(func=faults_cmd)
    ls = ss.add_parser("list", help="list shipped scenarios")
    ls.set_defaults(func=list_cmd)


def list_cmd(args: argparse.Namespace) -> int:
    from simulator.scenario import load_scenario, shipped
    for name in shipped():
        sc = load_scenario(name)
        print(f"{name:12s} {sc.description}")
    return 0


def faults_cmd(args: argparse.Namespace) -> int:
    """Run the fault-injection harness (:mod:`simulator.faults`); exit 1 on any violation."""
    from simulator.faults import run_faults
    try:
        res = run_faults(args.seeds, args.seed, args.replicas, Path(args.out))
    except UsageError as e:
        print(f"ekko sim: {e}", file=sys.stderr)
        return 2
    return _report_faults(res, Path(args.out))


def _report_faults(res: dict, out: Path) -> int:
    for v in res["violations"]:
        where = ", ".join(f"{k} {v[k]}" for k in ("replica", "table", "row", "shard") if k in v)
        print(f"seed {v['seed']}: {v['invariant']} violated at {where}: {v['detail']}")
    print(f"{res['seeds']} seeds from {res['first_seed']}, "
          f"{len(res['violations'])} violations, {res['wall_s']:.1f} s; wrote {out / 'results.json'}")
    return 1 if res["violations"] else 0


def _run_fault_scenario(sc, args: argparse.Namespace) -> int:
    """``ekko sim run faults``: the scenario's seeds through the fault harness, with progress."""
    from dataclasses import replace

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from simulator.faults import run_faults
    if args.seed is not None:
        sc.seed = args.seed
    cfg = sc.faults
    if args.replicas is not None:
        cfg = replace(cfg, replicas=args.replicas)
    if args.duration is not None:
        cfg = replace(cfg, fault_phase_s=args.duration)
    if args.systems or args.mode:
        raise UsageError("a fault scenario takes no --systems or --mode")
    console = Console(stderr=True)
    console.print(f"[bold]ekko sim[/]: fault scenario {sc.name}, {sc.seeds} seeds from {sc.seed}, "
                  f"{cfg.replicas} replicas, {cfg.fault_phase_s:g} s of faults")
    if args.quiet:
        res = run_faults(sc.seeds, sc.seed, out=Path(args.out), faults=cfg)
    else:
        with Progress(TextColumn("seeds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as prog:
            task = prog.add_task("seeds", total=sc.seeds)
            res = run_faults(sc.seeds, sc.seed, out=Path(args.out), faults=cfg,
                             progress=lambda done: prog.update(task, completed=done))
    return _report_faults(res, Path(args.out))


def run_cmd(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        print(f"ekko sim: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulator.experiment import run_scenario
    from simulator.report import summary, write_results
    from simulator.scenario import load_scenario

    sc = load_scenario(args.scenario)
    if not hasattr(sc, "systems"):
        return _run_fault_scenario(sc, args)
    if args.replicas is not None:
        if args.replicas < 1:
            raise UsageError("--replicas must be >= 1")
        sc.replicas = args.replicas
    if args.seed is not None:
        sc.seed = args.seed
    if args.duration is not None:
        sc.duration_s = args.duration
    if args.mode:
        sc.mode = args.mode
    systems = args.systems.split(",") if args.systems else None
    console = Console(stderr=True)
    if "rollback" in sc.raw:
        return _run_rollback(sc, args, console)
    console.print(f"[bold]ekko sim[/]: scenario {sc.name}, {sc.replicas} replicas, {len(sc.wan.dc_names)} DCs, "
                  f"seed {sc.seed}, {sc.duration_s:g} s of workload, mode "
                  f"{'full' if sc.with_values else 'metadata'}")
    t0 = time.perf_counter()
    if args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.quiet or args.jobs > 1:
        results = run_scenario(sc, systems, jobs=args.jobs, workers=args.workers)
    else:
        with Progress(TextColumn("{task.description:18s}"), BarColumn(), TextColumn("{task.fields[t]}"),
                      TimeElapsedColumn(), console=console) as prog:
            bars = SystemBars(prog)
            results = run_scenario(sc, systems, bars, workers=args.workers)
            bars.finish()
    paths = write_results(results, Path(args.out))
    print(summary(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s; "
          f"{results['events_per_s']:,.0f} events/s, peak RSS {results['peak_rss_mb']:.0f} MB")
    return 0


def _run_rollback(sc, args: argparse.Namespace, console) -> int:
    """The ``rollback`` scenario (a ``[rollback]`` table): :mod:`simulator.rollback_experiment`."""
    from simulator.measure import peak_rss_mb
    from simulator.rollback_experiment import run_rollback, summary, write_rollback_results

    console.print(f"[bold]ekko sim[/]: scenario {sc.name}, {sc.replicas} replicas, {len(sc.wan.dc_names)} DCs, "
                  f"seed {sc.seed}, {sc.duration_s:g} s, mode {'full' if sc.with_values else 'metadata'}")
    t0 = time.perf_counter()
    res = run_rollback(sc, None if args.quiet else
                       (lambda _s, t, end: console.print(f"  {t:6.1f}/{end:.0f} s simulated", end="\r")))
    res["peak_rss_mb"] = peak_rss_mb()
    path = write_rollback_results(res, Path(args.out))
    print(summary(res))
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0 if res.get("detected") and res.get("exact") else 1
