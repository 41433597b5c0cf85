"""The alert rules and the Grafana dashboard in ``deploy/`` name only metrics the daemons
export: a renamed metric fails here, not silently in someone's Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskscheduler.agent.metrics import AgentMetrics
from taskscheduler.server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Series Prometheus makes itself (per scrape target), which the rules may use.
PROMETHEUS_OWN = {"up"}
#: What each metric type exposes besides its name.
SUFFIXES = {
    "counter": ["_total"],
    "histogram": ["_bucket", "_count", "_sum"],
    "gauge": [""],
    "info": ["_info"],
}


def exported() -> set[str]:
    """Every series name both daemons export (labelled families included, childless or not)."""
    names: set[str] = set()
    for registry in (AgentMetrics().registry, ServerMetrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, [""])}
            names |= {sample.name for sample in family.samples}
    return names


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\btaskscheduler_[a-z0-9_]+", expr)) | {
        name for name in PROMETHEUS_OWN if re.search(rf"\b{name}\{{", expr)
    }


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_alerts_asked_for_are_there() -> None:
    alerts = {rule["alert"] for rule in rules()}
    for wanted in ("AgentOffline", "TaskFailing", "StartLatenessHigh"):
        assert f"Taskscheduler{wanted}" in alerts, alerts


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_each_alert_names_metrics_that_exist(rule: dict[str, Any]) -> None:
    names = names_in(rule["expr"])
    assert names, f"{rule['alert']} names no metric"
    known = exported() | PROMETHEUS_OWN
    assert names <= known, f"{rule['alert']}: unknown {sorted(names - known)}"
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_charts_only_metrics_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Start lateness p99 per agent", "Runs by status", "Report latency"} <= titles
    assert any("HTTP" in title for title in titles)
    known = exported()
    charted: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = names_in(target["expr"])
            assert names and names <= known, (panel["title"], sorted(names - known))
            charted |= names
    # It is importable: its data source is asked for at import.
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert "taskscheduler_agent_start_lateness_seconds_bucket" in charted


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "taskscheduler_agent_start_latency_seconds_bucket" not in exported()
    assert "taskscheduler_agent_runs_total" in exported()
