"""``deploy/``: the Grafana dashboard and the Prometheus alert rules (issue 19).

* every metric that a dashboard query, a dashboard variable or an alert expression names
  is exported by a real ``ekko daemon`` (a subprocess, after a registration and a
  publish): a histogram through its ``_bucket``/``_sum``/``_count`` series, a counter
  through ``_total``; a label a selector matches on is one the metric carries;
* the dashboard is a Grafana dashboard model: panels with unique ids, titles, grid
  positions that do not overlap, Prometheus targets through the ``datasource`` variable,
  and no query fixed to one instance;
* the rules file loads as YAML and each rule has alert, expr, for, labels.severity and
  annotations.summary.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType
from ekko.core.spec import ModelSpec, TableSpec
from procs import REPO, DaemonGroup, http, post_frame

DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
RULE_FILES = sorted((DEPLOY / "prometheus").glob("*-alerts.yml"))
#: series Prometheus makes itself (not a daemon's): the scrape health.
PROMETHEUS_SERIES = {"up"}
#: labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
#: PromQL words that look like names but are not metrics.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "Inf", "NaN"}
SEVERITIES = {"critical", "warning", "info"}
GRID_COLUMNS = 24


# ------------------------------------------------------------------------ PromQL names

def _strip(expr: str) -> str:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                            # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                           # range and subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)   # label lists
    return re.sub(r"(?<![\w:.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", s)                    # numbers


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels left out).

    Example:
        >>> sorted(metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[5m]))) / b > 1e3'))
        ['a_bucket', 'b']
    """
    s = _strip(expr)
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group() in PROMQL_KEYWORDS:
            continue      # a function or aggregation
        out.add(m.group())
    return out


def matched_labels(expr: str) -> set[tuple[str, str]]:
    """``(metric, label)`` for every label a selector of ``expr`` matches on."""
    out = set()
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            out.add((m.group(1), label))
    return out


def test_metric_names_of_promql():
    assert metric_names('sum by (instance, model) (rate(ekko_x_total{instance=~"$instance"}[$__rate_interval]))') \
        == {"ekko_x_total"}
    assert metric_names("rate(a[5m]) / rate(b[5m]) > 0.1") == {"a", "b"}
    assert metric_names('max by (instance) (ekko_members{state="dead"}) > 0 and on (instance) up == 1') \
        == {"ekko_members", "up"}
    assert metric_names("increase(c{event=\"rollbacks\"}[15m]) > 0") == {"c"}
    assert matched_labels('a{x="1", y=~"2"} / b{z!="3"}') == {("a", "x"), ("a", "y"), ("b", "z")}


# ------------------------------------------------------------------------ what files name

def dashboard_exprs(dash: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, and variable queries."""
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\)\s*", q)
            assert m, f"variable {v['name']}: unexpected query {q!r}"
            out.append(m.group(1))
    return out


def rule_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    out = []
    for f in DASHBOARDS:
        out += [(f.name, e) for e in dashboard_exprs(json.loads(f.read_text()))]
    for f in RULE_FILES:
        out += [(f.name, e) for e in rule_exprs(yaml.safe_load(f.read_text()))]
    return out


def test_deploy_ships_a_dashboard_and_rules():
    assert DASHBOARDS and RULE_FILES
    assert len(all_exprs()) >= 20


# ------------------------------------------------------------------------ a running daemon

def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names a scrape exports (each family's, even with no sample yet) and the
    labels seen on each."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["", "_sum", "_count"]}.get(fam.type, [""])
        names |= {fam.name + s for s in suffixes}
        for s in fam.samples:
            names.add(s.name)
            labels.setdefault(s.name, set()).update(k for k in s.labels if k != "le")
    return names, labels


@pytest.mark.slow
def test_every_queried_metric_is_exported_by_a_running_daemon(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=1000, dim=8)])
    with DaemonGroup(tmp_path) as g:
        d = g.start("r1", "dc1")
        status, ack = post_frame(d.address, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()})
        assert status == 200, ack
        chain = PublisherChain(origin=7)
        f = chain.frame(spec, {"emb": (np.arange(100, dtype=np.int64), np.ones((100, 8), np.float32))},
                        now_ms=time.time() * 1000)
        status, ack = post_frame(d.address, "/v1/publish", MsgType.PUBLISH, f.body)
        assert status == 200 and ack["rows"] == 100, ack
        status, raw, _ = http("GET", f"http://{d.address}/metrics")
        assert status == 200
    text = raw.decode()
    names, labels = exported(text)
    assert "ekko_publish_ack_seconds_count 1.0" in text      # the publish above was counted
    missing, bad_labels = [], []
    for where, expr in all_exprs():
        for name in metric_names(expr) - PROMETHEUS_SERIES:
            if name not in names:
                missing.append(f"{where}: {name} in {expr!r}")
        for name, label in matched_labels(expr):
            seen = labels.get(name)
            if seen and label not in seen | TARGET_LABELS:   # a family with samples shows its labels
                bad_labels.append(f"{where}: {name} has no label {label} ({sorted(seen)})")
    assert not missing, "\n".join(missing)
    assert not bad_labels, "\n".join(bad_labels)


# ------------------------------------------------------------------------ dashboard structure

def _overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_grafana_dashboard_model(path: Path):
    dash = json.loads(path.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    grids = []
    for p in dash["panels"]:
        assert p["title"].strip() and p["type"], p
        gp = p["gridPos"]
        assert all(isinstance(gp[k], int) and gp[k] >= 0 for k in ("h", "w", "x", "y")), p["title"]
        assert gp["h"] > 0 and 0 < gp["w"] and gp["x"] + gp["w"] <= GRID_COLUMNS, p["title"]
        grids.append((p["title"], gp))
        if p["type"] == "row":
            assert gp["h"] == 1 and gp["w"] == GRID_COLUMNS and "targets" not in p
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
            # Every selector is scoped by the instance variable, never a fixed instance.
            for sel in re.findall(r"\{([^}]*)\}", t["expr"]):
                assert 'instance=~"$instance"' in sel, (p["title"], t["expr"])
            assert not re.search(r'instance\s*(?:=|!=)\s*"[^$]', t["expr"]), t["expr"]
    for i, (ta, a) in enumerate(grids):
        for tb, b in grids[i + 1:]:
            assert not _overlap(a, b), f"panels {ta!r} and {tb!r} overlap"


# ------------------------------------------------------------------------ rules structure

@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_alert_rules_are_complete(path: Path):
    rules = yaml.safe_load(path.read_text())
    names = []
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            names.append(r["alert"])
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"]), r
            assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]
            assert re.fullmatch(r"\d+[smhdwy]", str(r["for"])), r["alert"]
            assert r["labels"]["severity"] in SEVERITIES, r["alert"]
            assert r["annotations"]["summary"].strip(), r["alert"]
    assert len(names) == len(set(names))
    # the conditions an operator pages on are all there
    exprs = " ".join(rule_exprs(rules))
    for needed in ("up{", "ekko_freshness_lag_seconds", "ekko_send_failures_total", 'status="429"',
                   'event="rollbacks"', "ekko_wal_fsync_seconds_total"):
        assert needed in exprs, needed
