"""Write a scenario's results: ``results.json``, PNG plots and a Markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


#: points drawn per CDF curve: evenly spaced ranks of the sorted sample (a 10,000-replica
#: run has 24 M (sample, replica) latencies; drawn whole they took matplotlib minutes).
MAX_CDF_POINTS = 4096


def cdf_points(values: np.ndarray, limit: int = MAX_CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(x, F(x))`` of the empirical CDF of ``values`` (NaN dropped) at no more than
    ``limit`` points, the first and last included.

    Example:
        >>> x, f = cdf_points(np.array([3.0, 1.0, np.nan, 2.0]))
        >>> x.tolist(), f.tolist()
        ([1.0, 2.0, 3.0], [0.3333333333333333, 0.6666666666666666, 1.0])
    """
    v = np.sort(values[np.isfinite(values)].ravel())   # +inf: not held there (placed)
    ranks = np.arange(len(v)) if len(v) <= limit else np.unique(np.linspace(0, len(v) - 1, limit).round().astype(int))
    return v[ranks], (ranks + 1) / len(v)


def public(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of the results (private ``_`` arrays removed, NaN -> null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not str(k).startswith("_")}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, np.generic):
            return clean(x.item())
        return x
    return clean(results)


def write_results(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "summary": out / "summary.md"}
    paths["results"].write_text(json.dumps(public(results), indent=2, sort_keys=False) + "\n")
    paths.update(plot(results, out))
    paths["summary"].write_text(summary(results))
    return paths


def _legend_outside(ax: Any, fontsize: int = 8) -> None:
    """The legend to the right of the axes, so that it never covers a curve or a bar
    (``fig.tight_layout()`` then makes room for it inside the figure)."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def latency_cdf_figure(results: dict[str, Any]) -> Any:
    """The latency CDF of every system (``latency_cdf.png``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name, r in results["systems"].items():
        m = r.get("_latency_matrix")
        if m is None or not m.size:
            continue
        x, f = cdf_points(m)
        if not len(x):
            continue
        ax.plot(x, f, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("update latency (s, log scale)")
    ax.set_ylabel("fraction of (update, replica) pairs")
    ax.set_title(f"{results['scenario']}: latency CDF, {results['replicas']} replicas")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def latency_per_dc_figure(results: dict[str, Any]) -> Any | None:
    """The latency CDF per DC of ``ekko`` (else the first system with latencies), or None
    (``latency_per_dc.png``)."""
    import matplotlib.pyplot as plt

    systems = results["systems"]
    first = next((n for n in ("ekko", *systems) if n in systems and systems[n].get("_latency_matrix") is not None),
                 None)
    if first is None:
        return None
    r = systems[first]
    m, dcs = r["_latency_matrix"], np.array(r["_replica_dcs"])
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for dc in sorted(set(dcs.tolist())):
        x, f = cdf_points(m[:, dcs == dc])
        if len(x):
            ax.plot(x, f, label=dc + (" (training)" if dc == results.get("training_dc") else ""))
    ax.set_xlabel("update latency (s)")
    ax.set_ylabel("fraction")
    ax.set_title(f"{first}: latency CDF per DC")
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def wan_bytes_figure(results: dict[str, Any]) -> Any | None:
    """Bytes per directed DC link and system, or None without WAN traffic (``wan_bytes.png``)."""
    import matplotlib.pyplot as plt

    systems = results["systems"]
    names = list(systems)
    links = sorted({l for r in systems.values() for l in r.get("wan_bytes_by_link", {})})
    if not links:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(links))
    for i, n in enumerate(names):
        vals = [systems[n].get("wan_bytes_by_link", {}).get(l, 0) / 1e6 for l in links]
        ax.bar(x + i * width, vals, width, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2)
    ax.set_xticklabels(links, rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("MB sent over the link (log)")
    ax.set_title("WAN bytes per directed DC link")
    _legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


def plot(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the PNG plots of ``results`` under ``out``; their paths by name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    for name, make in (("latency_cdf", latency_cdf_figure), ("latency_per_dc", latency_per_dc_figure),
                       ("wan_bytes", wan_bytes_figure)):
        fig = make(results)
        if fig is None:
            continue
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def summary(results: dict[str, Any]) -> str:
    sys_ = results["systems"]
    lines = [f"# Scenario `{results['scenario']}`", "",
             f"seed {results['seed']}, {results['replicas']} replicas in {len(results['dcs'])} DCs "
             f"({', '.join(results['dcs'])}; training DC {results.get('training_dc')}), mode {results.get('mode')}, "
             f"{results['events']:,} events in {results['wall_s']:.1f} s ({results['events_per_s']:,.0f} events/s).",
             "", "| system | intra-DC mean (s) | cross-DC mean (s) | cross-DC p99 (s) | all p50 (s) | WAN MB | "
             "WAN bytes / minimum | converged |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sys_.items():
        lat = r["latency_s"]
        ratio = r["wan_bytes"] / r["wan_bytes_min"] if r.get("wan_bytes_min") else float("nan")
        lines.append(f"| {name} | {_f(lat['intra_dc']['mean'])} | {_f(lat['cross_dc']['mean'])} | "
                     f"{_f(lat['cross_dc']['p99'])} | {_f(lat['all']['p50'])} | {r['wan_bytes'] / 1e6:,.1f} | "
                     f"{_f(ratio, 2)} | {r['converged']} |")
    if "ekko" in sys_:
        e = sys_["ekko"]["latency_s"]["cross_dc"]["mean"]
        lines += ["", "Cross-DC mean latency relative to `ekko`:", ""]
        for name, r in sys_.items():
            v = r["latency_s"]["cross_dc"]["mean"]
            if name != "ekko" and v is not None and e:
                lines.append(f"- `{name}`: {v / e:,.1f}x")
    placed = {n: r["per_replica"] for n, r in sys_.items() if r.get("per_replica")}
    if placed and "ekko-replicated" in placed:
        base = placed["ekko-replicated"]
        lines += ["", "Per replica (mean / max over the live replicas), against `ekko-replicated` (the same "
                  "protocol, every shard on every replica):", "",
                  "| system | traffic MB sent + received | x replicated | table MB | x replicated |",
                  "|---|---|---|---|---|"]
        for name, p in placed.items():
            lines.append(f"| {name} | {p['traffic_bytes_mean'] / 1e6:,.2f} / {p['traffic_bytes_max'] / 1e6:,.2f} | "
                         f"{p['traffic_bytes_mean'] / max(base['traffic_bytes_mean'], 1):.3f} | "
                         f"{p['table_bytes_mean'] / 1e6:,.2f} / {p['table_bytes_max'] / 1e6:,.2f} | "
                         f"{p['table_bytes_mean'] / max(base['table_bytes_mean'], 1):.3f} |")
    lines += ["", "Latency: publisher emission until the replica holds the row at that version or newer "
              "(sampled rows, every replica), in seconds. `WAN bytes / minimum`: bytes across DC boundaries over "
              "the least any scheme must move to deliver every update to every other DC once (values + id + "
              "version); 1.00 is the minimum.", ""]
    return "\n".join(lines)
