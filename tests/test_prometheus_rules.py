"""deploy/prometheus: the config, rules and rule unit tests, checked by Prometheus' promtool.

CI installs Debian's `prometheus` package (which brings promtool) before the tests; where
promtool is absent these tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install prometheus)"
)


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *arguments], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def rules() -> list[dict[str, object]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_config_loads_every_rules_file() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    loaded = {path for pattern in config["rule_files"] for path in PROMETHEUS_DIR.glob(pattern)}
    assert loaded == set(RULE_FILES)


def test_every_alert_has_a_unit_test() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {
                check["alertname"]
                for check in case.get("alert_rule_test", [])
                if check.get("exp_alerts")
            }
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts, "no alerts found"
    assert alerts - tested == set(), "alerts no test sees firing"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_recording_rule_names_follow_the_convention() -> None:
    """level:metric:operations (https://prometheus.io/docs/practices/rules/)."""
    for rule in rules():
        if "record" in rule:
            level, metric, operations = str(rule["record"]).split(":")
            assert level and operations and metric.startswith("joulegate_"), rule["record"]
