"""The dashboards: committed JSON equals the builders' output, and the structure Grafana needs.

Whether every query returns data from a real Prometheus is tested in
test_prometheus_integration.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import grafana
from proxy.study import study_figures

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
# Variables Grafana defines itself.
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval", "__all"}
VARIABLE = re.compile(r"\$\{?(\w+)")

DASHBOARDS = grafana.dashboards()


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel, target


def test_committed_json_is_generated() -> None:
    assert grafana.stale_dashboards(DASHBOARD_DIR) == [], (
        "grafana/dashboards is out of date: python -m proxy.grafana write grafana/dashboards"
    )
    committed = {path.stem for path in DASHBOARD_DIR.glob("*.json")}
    assert committed == set(DASHBOARDS), "a dashboard file no builder produces"


def test_write_then_check(tmp_path: Path) -> None:
    assert grafana.main(["check", str(tmp_path)]) == 1
    assert grafana.main(["write", str(tmp_path)]) == 0
    assert grafana.main(["check", str(tmp_path)]) == 0
    for name, document in DASHBOARDS.items():
        assert json.loads((tmp_path / f"{name}.json").read_text()) == document


def test_uids_and_titles_are_unique() -> None:
    uids = [document["uid"] for document in DASHBOARDS.values()]
    titles = [document["title"] for document in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)
    assert len(set(titles)) == len(titles)
    assert all(len(uid) <= 40 for uid in uids)  # Grafana's limit


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_have_unique_ids_and_a_query(name: str) -> None:
    panels = DASHBOARDS[name]["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids)
    for panel in panels:
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_uses_the_datasource_variable(name: str) -> None:
    dashboard = DASHBOARDS[name]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel, target in targets(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert target["datasource"] == expected, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == expected


@pytest.mark.parametrize("name", DASHBOARDS)
def test_queries_use_only_defined_variables(name: str) -> None:
    dashboard = DASHBOARDS[name]
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    used: set[str] = set()
    for _, target in targets(dashboard):
        used |= set(VARIABLE.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= set(VARIABLE.findall(variable["query"]))
    assert used - BUILTIN_VARIABLES <= defined
    # Every variable a dashboard offers filters something.
    assert defined - {"datasource"} <= used


def test_the_overview_is_templated_by_node_model_and_tenant() -> None:
    variables = {
        variable["name"]: variable
        for variable in DASHBOARDS["joulegate-energy"]["templating"]["list"]
    }
    assert set(variables) == {"datasource", "instance", "model", "tenant"}
    for name in ("instance", "model", "tenant"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in DASHBOARDS[name]["panels"]:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24
        cells = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_study_figures_come_from_the_study_table() -> None:
    table = next(
        panel
        for panel in DASHBOARDS["joulegate-energy"]["panels"]
        if panel["title"].startswith("kWh per 1,000 requests: here and in the study")
    )
    study_expr = table["targets"][1]["expr"]
    shown = {
        task: float(value)
        for value, task in re.findall(r'vector\(([\d.]+)\), "task", "([\w-]+)"', study_expr)
    }
    assert shown == {task: figure.kwh_per_1000_mean for task, figure in study_figures().items()}
    assert shown["image-generation"] == 2.907
    assert shown["text-classification"] == 0.002


def test_carbon_panel_is_there() -> None:
    exprs = [target["expr"] for _, target in targets(DASHBOARDS["joulegate-energy"])]
    assert any("joulegate_carbon_grams_total" in expr for expr in exprs)


def test_the_budgets_dashboard_is_templated_by_node_and_budget_tenant() -> None:
    dashboard = DASHBOARDS["joulegate-budgets"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "tenant"}
    assert "joulegate_budget_joules" in variables["tenant"]["query"]
    exprs = "\n".join(target["expr"] for _, target in targets(dashboard))
    for metric in (
        "joulegate_budget_joules",
        "joulegate_budget_used_joules",
        "joulegate_budget_remaining_ratio",
        "joulegate_budget_rejected_requests_total",
        "joulegate_budget_degraded_requests_total",
    ):
        assert metric in exprs, metric
    # used_joules is a gauge that resets with its window: never rate() or increase() of it.
    assert not re.search(r"(rate|increase)\(joulegate_budget_used_joules", exprs)
