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
    v = np.sort(values[~np.isnan(values)].ravel())
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


def plot(results: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    systems = results["systems"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in systems.items():
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["latency_cdf"] = out / "latency_cdf.png"
    fig.savefig(paths["latency_cdf"], dpi=110)
    plt.close(fig)

    first = next((n for n in ("ekko", *systems) if n in systems and systems[n].get("_latency_matrix") is not None),
                 None)
    if first is not None:
        r = systems[first]
        m, dcs = r["_latency_matrix"], np.array(r["_replica_dcs"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for dc in sorted(set(dcs.tolist())):
            x, f = cdf_points(m[:, dcs == dc])
            if len(x):
                ax.plot(x, f, label=dc + (" (training)" if dc == results.get("training_dc") else ""))
        ax.set_xlabel("update latency (s)")
        ax.set_ylabel("fraction")
        ax.set_title(f"{first}: latency CDF per DC")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["latency_per_dc"] = out / "latency_per_dc.png"
        fig.savefig(paths["latency_per_dc"], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(systems)
    links = sorted({l for r in systems.values() for l in r.get("wan_bytes_by_link", {})})
    if links:
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
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["wan_bytes"] = out / "wan_bytes.png"
        fig.savefig(paths["wan_bytes"], dpi=110)
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
             "", "| system | intra-DC mean | cross-DC mean | cross-DC p99 | all p50 | WAN MB | WAN / min | converged |",
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
    lines += ["", "Latency: publisher emission until the replica holds the row at that version or newer "
              "(sampled rows, every replica). `WAN / min`: bytes across DC boundaries over the least any scheme "
              "must move to deliver every update to every other DC once (values + id + version).", ""]
    return "\n".join(lines)
