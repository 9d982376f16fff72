"""joulegate's Grafana dashboards, built as Python dicts: the one source of truth.

The JSON under `grafana/dashboards/` (provisioned by compose) and the Kubernetes ConfigMap
(`deploy/kubernetes/grafana-dashboards.yaml`) are written from these dicts, and tests check
that the committed files equal them, so a query is changed in one place only. `joulegate
grafana push` sends the same dicts to a running Grafana.

    python -m proxy.grafana write grafana/dashboards   # regenerate the committed JSON
    python -m proxy.grafana check grafana/dashboards   # exit 1 if it is out of date

Every query is plain PromQL over the raw metrics (not the recording rules), so the dashboards
work on a Prometheus that has not loaded joulegate's rules, and can filter on any label.
A new dashboard is one more builder function in `DASHBOARDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy.study import study_figures

JSON = dict[str, Any]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's unit ids.
WATT = "watt"
JOULE = "joule"
WATT_HOUR = "watth"
KWH = "kwatth"
RATIO = "percentunit"
HERTZ = "hertz"
REQUESTS_PER_SECOND = "reqps"
JOULES_PER_KWH_PER_1000 = 3600  # J per request / 3600 = kWh per 1,000 requests
JOULES_PER_KWH = 3_600_000
FOLDER_UID = "joulegate"
FOLDER_TITLE = "joulegate"
PUSHED_DATASOURCE_UID = "joulegate-prometheus"
PUSHED_DATASOURCE_NAME = "Prometheus (joulegate)"
# Matches the scrape interval of deploy/prometheus/prometheus.yml, so `$__rate_interval`
# always spans enough scrapes.
SCRAPE_INTERVAL = "15s"

# Label filters from the template variables, per metric family (each has different labels).
NODE = 'instance=~"$instance"'
REQUEST = f'{NODE}, model=~"$model", tenant=~"$tenant"'
BUDGET = f'{NODE}, tenant=~"$tenant"'


# --------------------------------------------------------------------------------------------
# Building blocks


def query(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> JSON:
    """One Prometheus target; refIds are assigned by `panel`."""
    target: JSON = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
    if instant:
        target |= {"instant": True, "range": False}
    else:
        target |= {"instant": False, "range": True}
    if table:
        target["format"] = "table"
    return target


def panel(
    kind: str,
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str,
    size: tuple[int, int] = (12, 8),
    stacked: bool = False,
    log_scale: bool = False,
    extra: JSON | None = None,
) -> JSON:
    """A panel without id or position: `dashboard` lays panels out and numbers them."""
    defaults: JSON = {"unit": unit}
    if kind == "timeseries":
        custom: JSON = {"fillOpacity": 20 if stacked else 0, "showPoints": "never"}
        if stacked:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        if log_scale:
            custom["scaleDistribution"] = {"type": "log", "log": 10}
        defaults["custom"] = custom
    result: JSON = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(kind),
        "targets": [
            {"refId": chr(ord("A") + index), **target} for index, target in enumerate(targets)
        ],
        "gridPos": {"w": size[0], "h": size[1]},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = {**result[key], **value}
        else:
            result[key] = value
    return result


def _options(kind: str) -> JSON:
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind in ("stat", "bargauge"):
        return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return {}


def _variable_query(name: str, label: str, expr: str) -> JSON:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": expr,
        "definition": expr,
        "refresh": 2,  # on time range change: nodes and models come and go
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def variables(*, request_filters: bool, budget_filters: bool = False) -> list[JSON]:
    """Data source and node always; model and tenant where the panels carry those labels,
    or the budgets' tenants (`*` for a budget shared by every tenant) on budget panels."""
    found = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "options": [],
            "refresh": 1,
            "regex": "",
        },
        _variable_query("instance", "Node", "label_values(joulegate_meter_up, instance)"),
    ]
    if request_filters:
        for name, label in (("model", "Model"), ("tenant", "Tenant")):
            expr = f"label_values(joulegate_requests_total{{{NODE}}}, {name})"
            found.append(_variable_query(name, label, expr))
    if budget_filters:
        expr = f"label_values(joulegate_budget_joules{{{NODE}}}, tenant)"
        found.append(_variable_query("tenant", "Tenant", expr))
    return found


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: Sequence[JSON],
    *,
    request_filters: bool,
    budget_filters: bool = False,
) -> JSON:
    """Numbers the panels and flows them left to right into rows 24 units wide."""
    x = y = row_height = 0
    placed = []
    for number, item in enumerate(panels, start=1):
        width, height = item["gridPos"]["w"], item["gridPos"]["h"]
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        placed.append({"id": number, **item, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
        x += width
        row_height = max(row_height, height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["joulegate"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "links": [
            {
                "type": "dashboards",
                "title": "joulegate",
                "tags": ["joulegate"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {
            "list": variables(request_filters=request_filters, budget_filters=budget_filters)
        },
        "panels": placed,
    }


def rate(metric: str, labels: str, by: str, window: str = "$__rate_interval") -> str:
    return f"sum by ({by}) (rate({metric}{{{labels}}}[{window}]))"


def increase(metric: str, labels: str, by: str = "", window: str = "$__range") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (increase({metric}{{{labels}}}[{window}]))"


def mean_request_energy(by: str, window: str) -> str:
    """Mean Joules per request with a known energy figure (unknown ones are not zeros)."""
    total = rate("joulegate_request_energy_joules_sum", REQUEST, by, window)
    count = rate("joulegate_request_energy_joules_count", REQUEST, by, window)
    return f"{total}\n/\n{count}"


def study_series() -> str:
    """The study's kWh per 1,000 inferences per task as constant series with a `task` label."""
    figures = sorted(study_figures().items())
    return "\nor ".join(
        f'label_replace(vector({figure.kwh_per_1000_mean}), "task", "{task}", "", "")'
        for task, figure in figures
    )


# --------------------------------------------------------------------------------------------
# Inference energy overview


def energy_overview() -> JSON:
    def by_task_model_tenant(by: str) -> JSON:
        return panel(
            "timeseries",
            f"Power attributed to requests, by {by}",
            f"Joules per second attributed to requests, summed by {by}. The device power"
            " not attributed to any request (idle) is on the meter health dashboard.",
            [query(rate("joulegate_energy_joules_total", REQUEST, by), f"{{{{{by}}}}}")],
            unit=WATT,
            size=(8, 8),
            stacked=True,
        )

    quantile_by_task = [
        query(
            f"histogram_quantile({q}, "
            + rate("joulegate_request_energy_joules_bucket", REQUEST, "task, le")
            + ")",
            f"{{{{task}}}} p{round(q * 100)}",
        )
        for q in (0.5, 0.95)
    ]
    panels = [
        panel(
            "timeseries",
            "Device power",
            "Power of each metered device (GPU) as the meter reads it, idle or busy.",
            [
                query(
                    f"sum by (instance, device) (joulegate_device_power_watts{{{NODE}}})",
                    "{{instance}} {{device}}",
                )
            ],
            unit=WATT,
        ),
        panel(
            "stat",
            "Device energy in range",
            "Everything the devices used over the dashboard's time range, idle included.",
            [
                query(
                    f"{increase('joulegate_device_energy_joules_total', NODE)} / {JOULES_PER_KWH}",
                    instant=True,
                )
            ],
            unit=KWH,
            size=(6, 8),
        ),
        panel(
            "stat",
            "Energy attributed to requests in range",
            "The part of the device energy that went to the selected models' and tenants'"
            " requests over the dashboard's time range.",
            [
                query(
                    f"{increase('joulegate_energy_joules_total', REQUEST)} / {JOULES_PER_KWH}",
                    instant=True,
                )
            ],
            unit=KWH,
            size=(6, 8),
        ),
        by_task_model_tenant("task"),
        by_task_model_tenant("model"),
        by_task_model_tenant("tenant"),
        panel(
            "table",
            "Energy in range by task, model and tenant",
            "Energy attributed to requests over the dashboard's time range: who spent it, on what.",
            [
                query(
                    increase("joulegate_energy_joules_total", REQUEST, "task, model, tenant")
                    + f" / {JOULES_PER_KWH}",
                    instant=True,
                    table=True,
                )
            ],
            unit=KWH,
            size=(24, 8),
            extra={
                "transformations": [
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "task": "Task",
                                "model": "Model",
                                "tenant": "Tenant",
                                "Value": "Energy (kWh)",
                            },
                        },
                    }
                ],
                "options": {
                    "showHeader": True,
                    "sortBy": [{"displayName": "Energy (kWh)", "desc": True}],
                },
            },
        ),
        panel(
            "timeseries",
            "kWh per 1,000 requests by task",
            "Mean energy per request in the study's unit (Luccioni et al., Power Hungry"
            " Processing, 2024), over requests with a known energy figure.",
            [
                query(
                    f"{mean_request_energy('task', '$__rate_interval')}\n"
                    f"/ {JOULES_PER_KWH_PER_1000}",
                    "{{task}}",
                )
            ],
            unit=KWH,
            log_scale=True,
        ),
        panel(
            "table",
            "kWh per 1,000 requests: here and in the study",
            "joulegate's mean over the dashboard's time range beside the study's mean per"
            " task (Table 2 of Power Hungry Processing: A100 GPUs, batch size 1, many models"
            " per task), so a deployment can see where it stands.",
            [
                query(
                    f"{mean_request_energy('task', '$__range')}\n/ {JOULES_PER_KWH_PER_1000}",
                    instant=True,
                    table=True,
                ),
                query(study_series(), instant=True, table=True),
            ],
            unit=KWH,
            extra={
                "transformations": [
                    {"id": "merge", "options": {}},
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "task": "Task",
                                "Value #A": "Here (kWh / 1,000 requests)",
                                "Value #B": "Study mean (kWh / 1,000 inferences)",
                            },
                        },
                    },
                ],
                "options": {"showHeader": True, "sortBy": [{"displayName": "Task"}]},
            },
        ),
        panel(
            "timeseries",
            "Energy per request by task: p50 and p95",
            "From the per-request energy histogram (buckets 0.1 J to 100 kJ, three a decade):"
            " a quantile is only as fine as its bucket.",
            quantile_by_task,
            unit=JOULE,
            log_scale=True,
        ),
        panel(
            "timeseries",
            "Energy per output token, by model",
            "Joules attributed to requests per token they generated, for tasks that report"
            " output tokens.",
            [
                query(
                    rate("joulegate_energy_joules_total", REQUEST, "task, model")
                    + "\n/\n("
                    + rate(
                        "joulegate_tokens_total",
                        REQUEST + ', direction="output"',
                        "task, model",
                    )
                    + " > 0)",
                    "{{model}} ({{task}})",
                )
            ],
            unit=JOULE,
        ),
        panel(
            "timeseries",
            "Energy per image, by model",
            "Watt-hours attributed to image generation per image generated.",
            [
                query(
                    rate(
                        "joulegate_energy_joules_total",
                        REQUEST + ', task="image-generation"',
                        "model",
                    )
                    + "\n/ 3600\n/\n("
                    + rate("joulegate_images_total", REQUEST, "model")
                    + " > 0)",
                    "{{model}}",
                )
            ],
            unit=WATT_HOUR,
        ),
        panel(
            "timeseries",
            "Carbon emitted, by task",
            "Grams of CO2-equivalent per hour: the attributed energy times the grid's carbon"
            " intensity (joulegate_carbon_grams_total).",
            [
                query(
                    rate("joulegate_carbon_grams_total", REQUEST, "task") + " * 3600",
                    "{{task}}",
                )
            ],
            unit="suffix: gCO₂e/h",
            size=(8, 8),
            stacked=True,
        ),
        panel(
            "stat",
            "Carbon in range",
            "Grams of CO2-equivalent over the dashboard's time range.",
            [query(increase("joulegate_carbon_grams_total", REQUEST), instant=True)],
            unit="suffix: gCO₂e",
            size=(4, 8),
        ),
    ]
    return dashboard(
        "joulegate-energy",
        "joulegate: inference energy",
        "Energy per inference request by task, model and tenant, metered by joulegate.",
        panels,
        request_filters=True,
    )


# --------------------------------------------------------------------------------------------
# Meter health


def meter_health() -> JSON:
    def state(title: str, description: str, metric: str, names: tuple[str, str]) -> JSON:
        off, on = names
        return panel(
            "stat",
            title,
            description,
            [query(f"{metric}{{{NODE}}}", "{{instance}} {{meter}}")],
            unit="none",
            size=(6, 6),
            extra={
                "fieldConfig": {
                    "defaults": {
                        "unit": "none",
                        "mappings": [
                            {
                                "type": "value",
                                "options": {
                                    "0": {"text": off, "index": 0},
                                    "1": {"text": on, "index": 1},
                                },
                            }
                        ],
                    }
                }
            },
        )

    metered = "joulegate_metered_requests_total"
    all_records = rate(metered, NODE, "task")

    def share(quality: str) -> str:
        # `or 0 * all` makes the share 0, not absent, for tasks with no such record.
        part = rate(metered, f'{NODE}, quality="{quality}"', "task")
        return f"(\n  {part}\n  or 0 * {all_records}\n)\n/\n({all_records} > 0)"

    panels = [
        state(
            "Meter up",
            "1 when the meter read every device at its last sample. While it is down,"
            " records carry no energy (never a fake 0) and traffic keeps flowing.",
            "joulegate_meter_up",
            ("DOWN", "UP"),
        ),
        state(
            "Meter kind",
            "Whether the meter measures energy (NVML, RAPL) or estimates it (CPU time x"
            " power per core).",
            "joulegate_meter_estimate",
            ("measured", "estimate"),
        ),
        panel(
            "timeseries",
            "Meter sample rate",
            "Readings per second; the sampler reads every sample_interval_seconds (default"
            " 50 ms, so 20/s). A drop means the sampler thread is stalled.",
            [
                query(
                    rate("joulegate_meter_samples_total", NODE, "instance, meter"),
                    "{{instance}} {{meter}}",
                )
            ],
            unit=HERTZ,
            size=(6, 6),
        ),
        panel(
            "timeseries",
            "Meter read errors",
            "Readings per second that failed for at least one device.",
            [
                query(
                    rate("joulegate_meter_read_errors_total", NODE, "instance, meter"),
                    "{{instance}} {{meter}}",
                )
            ],
            unit="short",
            size=(6, 6),
        ),
        panel(
            "timeseries",
            "Idle share of device energy",
            "Unattributed energy (no request in flight on the device) over all metered"
            " energy. A GPU that is mostly idle spends its energy for nobody.",
            [
                query(
                    rate("joulegate_unattributed_energy_joules_total", NODE, "instance, device")
                    + "\n/\n("
                    + rate("joulegate_device_energy_joules_total", NODE, "instance, device")
                    + " > 0)",
                    "{{instance}} {{device}}",
                )
            ],
            unit=RATIO,
        ),
        panel(
            "timeseries",
            "Device power: attributed and idle",
            "Per node, the power attributed to requests and the power left idle. They add"
            " up to the metered device power (conservation).",
            [
                query(
                    rate("joulegate_energy_joules_total", NODE, "instance"),
                    "{{instance}} attributed",
                ),
                query(
                    rate("joulegate_unattributed_energy_joules_total", NODE, "instance"),
                    "{{instance}} idle",
                ),
            ],
            unit=WATT,
            stacked=True,
        ),
        panel(
            "timeseries",
            "Records by energy quality",
            "Finished requests per second: measured, estimate (interpolated, or from an"
            " estimating meter) or unknown (a device was unreadable).",
            [query(rate(metered, NODE, "quality"), "{{quality}}")],
            unit=REQUESTS_PER_SECOND,
            stacked=True,
        ),
        panel(
            "timeseries",
            "Share of records estimated or unknown, by task",
            "Requests shorter than the meter's counter can resolve are estimates; a rising"
            " unknown share means the meter is failing.",
            [
                query(share("estimate"), "{{task}} estimate"),
                query(share("unknown"), "{{task}} unknown"),
            ],
            unit=RATIO,
        ),
    ]
    return dashboard(
        "joulegate-meters",
        "joulegate: meter health",
        "Whether joulegate's energy figures can be trusted: meter state, sampling, idle share"
        " and the share of estimated or unknown records.",
        panels,
        request_filters=False,
    )


# --------------------------------------------------------------------------------------------
# Energy budgets


def per_budget(metric: str, by: str = "budget, tenant") -> str:
    """A budget gauge per budget (or tenant). Every proxy exports each budget as it sees it:
    the largest figure, not the sum, so that two proxies do not double a budget."""
    return f"max by ({by}) ({metric}{{{BUDGET}}})"


def budget_slope(window: str) -> str:
    """Joules per second going into each budget. joulegate_budget_used_joules is a gauge that
    drops when a window ends or energy ages out of a rolling one: its slope (deriv), clamped
    at 0 so a drop reads as no spending, as in deploy/prometheus/rules/budgets.yml."""
    used = f"joulegate_budget_used_joules{{{BUDGET}}}[{window}]"
    return f"clamp_min(max by (budget, tenant) (deriv({used})), 0)"


def budget_requests(metric: str) -> str:
    """Requests per second by budget; the counters carry no tenant, so the tenant filter
    keeps the budgets whose gauges match it."""
    return (
        f"sum by (budget) (rate({metric}{{{NODE}}}[$__rate_interval]))\n"
        f"and on (budget)\n{per_budget('joulegate_budget_joules', 'budget')}"
    )


def budgets() -> JSON:
    limit = per_budget("joulegate_budget_joules")
    used = per_budget("joulegate_budget_used_joules")

    def used_and_limit(by: str, legend: str, description: str, width: int) -> JSON:
        return panel(
            "timeseries",
            f"Energy used and budget, by {by}",
            description,
            [
                query(f"sum by ({by}) ({used})", f"{legend} used"),
                query(f"sum by ({by}) ({limit})", f"{legend} budget"),
            ],
            unit=JOULE,
            size=(width, 8),
        )

    panels = [
        panel(
            "bargauge",
            "Budget used",
            "The part of each budget used in its current window: measured energy plus"
            " reservations for requests in flight. A budget whose action is alert can pass"
            " 100%.",
            [query(f"{used}\n/\n({limit} > 0)", "{{budget}} ({{tenant}})", instant=True)],
            unit=RATIO,
            size=(8, 8),
            extra={
                "fieldConfig": {
                    "defaults": {
                        "unit": RATIO,
                        "min": 0,
                        "max": 1,
                        "thresholds": {
                            "mode": "absolute",
                            "steps": [
                                {"color": "green", "value": None},
                                {"color": "orange", "value": 0.8},
                                {"color": "red", "value": 1},
                            ],
                        },
                    }
                },
                "options": {"displayMode": "gradient", "orientation": "horizontal"},
            },
        ),
        used_and_limit(
            "budget",
            "{{budget}}",
            "Energy used in each budget's current window against its limit. Used drops back"
            " when a calendar window ends, and as energy ages out of a rolling window.",
            16,
        ),
        used_and_limit(
            "tenant",
            "{{tenant}}",
            "The same summed over each tenant's budgets (* is a budget shared by every tenant).",
            24,
        ),
        panel(
            "timeseries",
            "Burn: share of the budget spent per hour",
            "How fast each budget is being spent, as a part of its limit per hour. A daily"
            " budget spent evenly burns 1/24 (4.2%) an hour; the burn-rate alerts fire at 14.4x"
            " and 6x that pace. Over a rolling window this is new spending minus what ages"
            " out, so it reads low.",
            [
                query(
                    f"{budget_slope('$__rate_interval')} * 3600\n/\n({limit} > 0)",
                    "{{budget}} ({{tenant}})",
                )
            ],
            unit=RATIO,
        ),
        panel(
            "timeseries",
            "Time to exhaustion",
            "What is left of each budget over its spending in the last hour. No line: the"
            " budget is not being spent; 0: it is spent.",
            [
                query(
                    "clamp_min("
                    + per_budget("joulegate_budget_remaining_ratio")
                    + f", 0) * {limit}\n/\n({budget_slope('1h')} > 0)",
                    "{{budget}} ({{tenant}})",
                )
            ],
            unit="s",
        ),
        panel(
            "timeseries",
            "Requests rejected by budget",
            "Requests refused with a 429 (energy_budget_exceeded) because a budget whose"
            " action is reject was spent.",
            [query(budget_requests("joulegate_budget_rejected_requests_total"), "{{budget}}")],
            unit=REQUESTS_PER_SECOND,
            stacked=True,
        ),
        panel(
            "timeseries",
            "Requests degraded by budget",
            "Requests let through rewritten (cheaper model, capped tokens, size or steps)"
            " because a budget whose action is degrade was spent.",
            [query(budget_requests("joulegate_budget_degraded_requests_total"), "{{budget}}")],
            unit=REQUESTS_PER_SECOND,
            stacked=True,
        ),
        panel(
            "table",
            "Budgets now",
            "Each budget's limit, use and what is left in its current window.",
            [
                query(limit, instant=True, table=True),
                query(used, instant=True, table=True),
                query(per_budget("joulegate_budget_remaining_ratio"), instant=True, table=True),
            ],
            unit=JOULE,
            size=(24, 8),
            extra={
                "transformations": [
                    {"id": "merge", "options": {}},
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "budget": "Budget",
                                "tenant": "Tenant",
                                "Value #A": "Budget (J)",
                                "Value #B": "Used (J)",
                                "Value #C": "Left",
                            },
                        },
                    },
                ],
                "fieldConfig": {
                    "overrides": [
                        {
                            "matcher": {"id": "byName", "options": "Left"},
                            "properties": [{"id": "unit", "value": RATIO}],
                        }
                    ]
                },
                "options": {"showHeader": True, "sortBy": [{"displayName": "Budget"}]},
            },
        ),
    ]
    return dashboard(
        "joulegate-budgets",
        "joulegate: energy budgets",
        "Energy budgets per tenant: used against the limit, how fast they burn, when they run"
        " out, and the requests rejected or degraded once they have.",
        panels,
        request_filters=False,
        budget_filters=True,
    )


# Dashboard file name (without .json) -> builder. Add a dashboard here.
DASHBOARDS: dict[str, Callable[[], JSON]] = {
    "joulegate-energy": energy_overview,
    "joulegate-meters": meter_health,
    "joulegate-budgets": budgets,
}


def dashboards() -> dict[str, JSON]:
    return {name: build() for name, build in DASHBOARDS.items()}


def render(document: JSON) -> str:
    """The exact text of a committed dashboard file."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in dashboards().items():
        path = directory / f"{name}.json"
        path.write_text(render(document), encoding="utf-8")
        written.append(path)
    return written


def stale_dashboards(directory: Path) -> list[Path]:
    """Dashboard files that are missing or differ from what the builders produce."""
    stale = []
    for name, document in dashboards().items():
        path = directory / f"{name}.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(document):
            stale.append(path)
    return stale


# --------------------------------------------------------------------------------------------
# `joulegate grafana push`


class PushError(Exception):
    """Grafana refused or could not be reached; the message says which call."""


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    parser.add_argument(
        "--token",
        help="a service account token with dashboard (and datasource) write rights"
        " (default: $GRAFANA_TOKEN)",
    )
    parser.add_argument(
        "--datasource-url",
        help="also create or update a Prometheus datasource at this URL, and make it the"
        " dashboards' default",
    )
    parser.add_argument("--folder", default=FOLDER_TITLE, help="folder title (default joulegate)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per API call")


def push(
    url: str,
    token: str,
    datasource_url: str | None = None,
    folder_title: str = FOLDER_TITLE,
    timeout: float = 10.0,
) -> list[str]:
    """Create or update the folder, the datasource (when asked) and every dashboard.

    Idempotent: the folder, datasource and dashboards have fixed uids, and dashboards are
    saved with `overwrite`, so pushing again updates them in place. Returns what was done,
    one line each.
    """
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException
        from niquests.exceptions import RequestException
    except ImportError as error:
        raise PushError(
            "grafana push needs grafana-client: pip install 'grafana-client>=5'"
        ) from error
    # grafana-client appends "api" to the URL's path as it is: a sub-path needs its slash.
    api = GrafanaApi.from_url(url.rstrip("/") + "/", credential=token, timeout=timeout)
    done: list[str] = []

    def exists(lookup: Callable[[], Any]) -> bool:
        try:
            lookup()
        except GrafanaClientError as error:
            if error.status_code == 404:
                return False
            raise
        return True

    try:
        documents = dashboards()
        if datasource_url is not None:
            body = {
                "uid": PUSHED_DATASOURCE_UID,
                "name": PUSHED_DATASOURCE_NAME,
                "type": "prometheus",
                "access": "proxy",
                "url": datasource_url,
                "jsonData": {"timeInterval": SCRAPE_INTERVAL, "httpMethod": "POST"},
            }
            if exists(lambda: api.datasource.get_datasource_by_uid(PUSHED_DATASOURCE_UID)):
                api.datasource.update_datasource_by_uid(PUSHED_DATASOURCE_UID, body)
                done.append(f"updated datasource {PUSHED_DATASOURCE_NAME} -> {datasource_url}")
            else:
                api.datasource.create_datasource(body)
                done.append(f"created datasource {PUSHED_DATASOURCE_NAME} -> {datasource_url}")
            for document in documents.values():
                _select_datasource(document, PUSHED_DATASOURCE_UID, PUSHED_DATASOURCE_NAME)
        if exists(lambda: api.folder.get_folder(FOLDER_UID)):
            api.folder.update_folder(FOLDER_UID, title=folder_title, overwrite=True)
        else:
            api.folder.create_folder(folder_title, uid=FOLDER_UID)
            done.append(f"created folder {folder_title}")
        for document in documents.values():
            answer = api.dashboard.update_dashboard(
                {
                    "dashboard": document,
                    "folderUid": FOLDER_UID,
                    "overwrite": True,
                    "message": "joulegate grafana push",
                }
            )
            where = answer.get("url", "") if isinstance(answer, dict) else ""
            done.append(f"saved dashboard {document['title']} {where}".rstrip())
    except GrafanaException as error:
        raise PushError(f"Grafana answered {error.status_code}: {error.message}") from error
    except RequestException as error:  # connection refused, DNS, TLS, timeouts
        raise PushError(f"cannot reach Grafana at {url}: {error}") from error
    return done


def _select_datasource(document: JSON, uid: str, name: str) -> None:
    """Open the dashboard on the pushed datasource instead of Grafana's default one."""
    for variable in document["templating"]["list"]:
        if variable["type"] == "datasource":
            variable["current"] = {"selected": True, "text": name, "value": uid}


def push_command(arguments: argparse.Namespace) -> int:
    """`joulegate grafana push`: 0 when everything was saved, 1 otherwise (one line why)."""
    import os

    token = arguments.token or os.environ.get("GRAFANA_TOKEN")
    if not token:
        print("joulegate: grafana push needs --token or GRAFANA_TOKEN", file=sys.stderr)
        return 2
    try:
        for line in push(
            arguments.url, token, arguments.datasource_url, arguments.folder, arguments.timeout
        ):
            print(line)
    except PushError as error:
        print(f"joulegate: grafana push: {error}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.grafana", description="Write or check the dashboard JSON files."
    )
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("grafana/dashboards"))
    arguments = parser.parse_args(argv)
    if arguments.action == "write":
        for path in write_dashboards(arguments.directory):
            print(f"wrote {path}")
        return 0
    stale = stale_dashboards(arguments.directory)
    for path in stale:
        print(f"out of date: {path} (run: python -m proxy.grafana write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
