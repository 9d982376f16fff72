"""`joulegate report`: figures equal hand-computed sums on a known ledger, in every format;
bad arguments give one line and exit 2; the HTML report renders in a headless browser."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.ledger import open_ledger
from proxy.records import RequestRecord
from proxy.report import build_report, number, parse_when, quantile, render_html

DAY1 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()
DAY2 = DAY1 + 86400
WH = 3600.0

# (day start, hour, tenant, task, model, joules or None, output tokens, images)
FIXTURE: list[tuple[float, int, str, str, str | None, float | None, int | None, int | None]] = [
    (DAY1, 9, "acme", "text-generation", "llama", 1 * WH, 100, None),
    (DAY1, 9, "acme", "text-generation", "llama", 2 * WH, 200, None),
    (DAY1, 13, "acme", "text-generation", "llama", 3 * WH, 300, None),
    (DAY1, 14, "beta", "text-generation", "llama", None, 50, None),  # energy unknown
    (DAY1, 15, "acme", "image-generation", "sd", 10 * WH, None, 2),
    (DAY2, 2, "acme", "image-generation", "sd", 20 * WH, None, 4),
    (DAY2, 5, "beta", "text-classification", None, 0.1 * WH, None, None),
    (DAY2, 5, "beta", "text-classification", None, 0.1 * WH, None, None),
    (DAY2, 6, "beta", "text-classification", None, 0.1 * WH, None, None),
    (DAY2, 7, "beta", "text-classification", None, 0.1 * WH, None, None),
    (DAY2, 8, "gamma", "summarization", "bart", None, None, None),  # no energy at all
    (DAY1 - 3600, 0, "acme", "text-generation", "llama", 1000 * WH, 10, None),  # before since
    (DAY2 + 86400, 1, "acme", "text-generation", "llama", 1000 * WH, 10, None),  # after until
]
PUE = 1.5
GRAMS_PER_KWH = 400.0


def _record(index: int, row: tuple) -> RequestRecord:
    day, hour, tenant, task, model, joules, tokens, images = row
    facility = None if joules is None else joules * PUE
    return RequestRecord(
        id=f"r{index}",
        task=task,
        model=model,
        tenant=tenant,
        streaming=False,
        method="POST",
        path="/v1/x",
        upstream="http://up",
        started_at=day + hour * 3600 + 17.25 + index,
        start=0.0,
        end=1.0,
        status="ok",
        code=200,
        duration_seconds=1.0,
        output_tokens=tokens,
        images=images,
        energy_joules=joules,
        meter="nvml" if joules is not None else None,
        facility_energy_joules=facility,
        carbon_grams=None if facility is None else facility / 3.6e6 * GRAMS_PER_KWH,
    )


async def _write_ledger(data_dir: Path) -> None:
    ledger = open_ledger("sqlite", data_dir, instance="test")
    assert ledger is not None
    await ledger.start()
    for index, row in enumerate(FIXTURE):
        ledger.append(_record(index, row))
    await ledger.close()
    assert ledger.stats().written == len(FIXTURE)


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("ledger")
    asyncio.run(_write_ledger(data_dir))
    return data_dir


@pytest.fixture(scope="module")
def config_file(ledger_dir: Path) -> Path:
    path = ledger_dir / "joulegate.yaml"
    path.write_text(f"ledger: sqlite\ndata_dir: {ledger_dir}\n")
    return path


@pytest.fixture(autouse=True)
def _no_environment_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("JOULEGATE_"):
            monkeypatch.delenv(name)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["report", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


RANGE = ("--since", "2026-11-02", "--until", "2026-11-03")  # both days, whole

# Hand-computed, by task (kWh = J / 3.6e6; Wh = J / 3600).
EXPECTED_BY_TASK: dict[str, dict[str, Any]] = {
    "image-generation": {
        "requests": 2,
        "metered_requests": 2,
        "kwh": 0.030,
        "facility_kwh": 0.045,
        "kg_co2e": 0.045 * 0.4,
        "kwh_per_1000_requests": 15.0,
        "median_wh_per_request": 15.0,
        "p95_wh_per_request": 10 + 0.95 * 10,
        "joules_per_output_token": None,
        "wh_per_image": 30 / 6,
    },
    "summarization": {
        "requests": 1,
        "metered_requests": 0,
        "kwh": None,
        "facility_kwh": None,
        "kg_co2e": None,
        "kwh_per_1000_requests": None,
        "median_wh_per_request": None,
        "p95_wh_per_request": None,
        "joules_per_output_token": None,
        "wh_per_image": None,
    },
    "text-classification": {
        "requests": 4,
        "metered_requests": 4,
        "kwh": 0.0004,
        "facility_kwh": 0.0006,
        "kg_co2e": 0.0006 * 0.4,
        "kwh_per_1000_requests": 0.1,
        "median_wh_per_request": 0.1,
        "p95_wh_per_request": 0.1,
        "joules_per_output_token": None,
        "wh_per_image": None,
    },
    "text-generation": {
        "requests": 4,
        "metered_requests": 3,
        "kwh": 0.006,
        "facility_kwh": 0.009,
        "kg_co2e": 0.009 * 0.4,
        "kwh_per_1000_requests": 2.0,
        "median_wh_per_request": 2.0,
        "p95_wh_per_request": 2.9,  # 2 + 0.9 x (3 - 2), interpolated
        # the unmetered request's 50 tokens are not charged to the metered ones
        "joules_per_output_token": 6 * WH / 600,
        "wh_per_image": None,
    },
}


def _assert_figures(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, name
        else:
            assert actual[name] == pytest.approx(value, rel=1e-9), name


async def test_figures_equal_hand_computed_sums(ledger_dir: Path) -> None:
    ledger = open_ledger("sqlite", ledger_dir, instance="reader")
    assert ledger is not None
    await ledger.start()
    try:
        report = await build_report(
            ledger, parse_when("2026-11-02"), parse_when("2026-11-03", until=True), ["task"]
        )
        by_day_tenant = await build_report(
            ledger,
            parse_when("2026-11-02"),
            parse_when("2026-11-03", until=True),
            ["day", "tenant"],
        )
    finally:
        await ledger.close()
    assert [key for key, _ in report.groups] == [(task,) for task in sorted(EXPECTED_BY_TASK)]
    for (task,), figures in report.groups:
        _assert_figures(figures, EXPECTED_BY_TASK[task])
    _assert_figures(
        report.total,
        {
            "requests": 11,
            "metered_requests": 9,
            "kwh": 0.0364,
            "facility_kwh": 0.0546,
            "kg_co2e": 0.0546 * 0.4,
            "kwh_per_1000_requests": 0.0364 / 9 * 1000,
            "median_wh_per_request": 1.0,  # of 0.1 x4, 1, 2, 3, 10, 20
            "p95_wh_per_request": 10 + 0.6 * 10,  # rank 7.6 of 0..8: between 10 and 20
            "joules_per_output_token": 36.0,
            "wh_per_image": 5.0,
        },
    )
    assert report.failed_requests == 0
    # Day and tenant groups, days in UTC, keys in --by order.
    groups = {key: figures for key, figures in by_day_tenant.groups}
    assert set(groups) == {
        (DAY1, "acme"),
        (DAY1, "beta"),
        (DAY2, "acme"),
        (DAY2, "beta"),
        (DAY2, "gamma"),
    }
    _assert_figures(groups[(DAY1, "acme")], {"requests": 4, "kwh": 16 * WH / 3.6e6})
    _assert_figures(
        groups[(DAY1, "beta")], {"requests": 1, "kwh": None, "median_wh_per_request": None}
    )
    _assert_figures(groups[(DAY2, "acme")], {"requests": 1, "wh_per_image": 5.0})
    # The chart series: kWh per day, by task and tenant.
    assert report.energy_by_task["image-generation"] == {
        DAY1: pytest.approx(0.01),
        DAY2: pytest.approx(0.02),
    }
    assert report.energy_by_tenant["beta"] == {DAY2: pytest.approx(0.0004)}
    assert "gamma" not in report.energy_by_tenant  # no known energy: no bar, not a zero
    study = {row["task"]: row for row in report.study}
    assert study["text-generation"]["study_kwh_per_1000_mean"] == 0.047
    assert study["text-generation"]["ratio_to_study"] == pytest.approx(2.0 / 0.047)
    assert study["summarization"]["kwh_per_1000_requests"] is None
    assert study["summarization"]["ratio_to_study"] is None


def test_quantile_and_number() -> None:
    assert quantile([], 0.5) is None
    assert quantile([4.0], 0.95) == 4.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert number(None) == "-"
    assert number(0.0) == "0"
    assert number(1234) == "1,234"
    assert number(0.000012345) == "0.00001234"
    assert number(2.9) == "2.900"
    assert number(12345.678) == "12,345.7"


def test_json_format(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    status, out, err = _run(
        capsys, *RANGE, "--by", "task", "--format", "json", "--config", str(config_file)
    )
    assert status == 0, err
    document = json.loads(out)
    assert document["since"] == "2026-11-02T00:00:00+00:00"
    assert document["until"] == "2026-11-04T00:00:00+00:00"
    assert document["by"] == ["task"]
    groups = {group["task"]: group for group in document["groups"]}
    assert set(groups) == set(EXPECTED_BY_TASK)
    for task, expected in EXPECTED_BY_TASK.items():
        _assert_figures(groups[task], expected)
    assert groups["summarization"]["kwh"] is None  # null, not 0
    assert document["total"]["requests"] == 11
    assert any(row["task"] == "image-generation" for row in document["study_comparison"])


def test_csv_format(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    status, out, err = _run(
        capsys,
        *RANGE,
        "--by",
        "tenant,task,model,day",
        "--format",
        "csv",
        "--config",
        str(config_file),
    )
    assert status == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[:5] == ["tenant", "task", "model", "day", "requests"]
    assert len(rows) == 6
    keyed = {(row["tenant"], row["task"], row["model"], row["day"]): row for row in rows}
    generation = keyed[("acme", "text-generation", "llama", "2026-11-02")]
    assert int(generation["requests"]) == 3
    assert float(generation["kwh"]) == pytest.approx(0.006)
    assert float(generation["p95_wh_per_request"]) == pytest.approx(2.9)
    classification = keyed[("beta", "text-classification", "", "2026-11-03")]  # no model
    assert int(classification["requests"]) == 4
    unknown = keyed[("beta", "text-generation", "llama", "2026-11-02")]
    assert unknown["kwh"] == "" and unknown["median_wh_per_request"] == ""  # never "0"
    assert int(unknown["requests"]) == 1


def test_table_format_and_out_file(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    status, out, err = _run(capsys, *RANGE, "--config", str(config_file))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "joulegate report, 2026-11-02 to 2026-11-03 (UTC, inclusive)"
    assert lines[2].split()[:2] == ["task", "requests"]
    generation = next(line for line in lines if line.startswith("text-generation"))
    assert generation.split()[1:8] == [
        "4",
        "3",
        "0.006000",
        "0.009000",
        "0.003600",
        "2.000",
        "2.000",
    ]
    summarization = next(line for line in lines if line.startswith("summarization"))
    assert summarization.split()[1:] == ["1", "0", *["-"] * 8]
    assert lines[-1].split()[:3] == ["all", "11", "9"]

    target = tmp_path / "report.txt"
    status, out, err = _run(capsys, *RANGE, "--config", str(config_file), "--out", str(target))
    assert (status, out, err) == (0, "", "")
    assert target.read_text().splitlines() == lines


def test_html_format(capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    status, _, err = _run(
        capsys,
        *RANGE,
        "--by",
        "tenant,task",
        "--format",
        "html",
        "--out",
        str(target),
        "--config",
        str(config_file),
    )
    assert status == 0, err
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no script, no external resource of any kind.
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "src=" not in page
    assert page.count("<svg") == 3  # by task, by tenant, beside the study
    assert "<style>" in page
    for text in (
        "Summary",
        "energy per day by task",
        "energy per day by tenant",
        "Power Hungry Processing",
    ):
        assert text in page
    assert "2026-11-02 to 2026-11-03" in page
    assert "<td>gamma</td><td>summarization</td>" in page


def test_html_escapes_names() -> None:
    from proxy.report import Report

    nasty = '<img src=x onerror="alert(1)">'
    figures = {
        "requests": 1,
        "metered_requests": 1,
        "kwh": 0.001,
        "facility_kwh": None,
        "kg_co2e": None,
        "kwh_per_1000_requests": 1.0,
        "median_wh_per_request": 1.0,
        "p95_wh_per_request": 1.0,
        "joules_per_output_token": None,
        "wh_per_image": None,
    }
    report = Report(
        since=DAY1,
        until=DAY2,
        by=("tenant",),
        groups=[((nasty,), figures)],
        total=figures,
        failed_requests=0,
        estimated_requests=0,
        energy_by_task={"text-generation": {DAY1: 0.001}},
        energy_by_tenant={nasty: {DAY1: 0.001}},
        study=[],
    )
    page = render_html(report)
    assert nasty not in page
    assert "&lt;img src=x" in page


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "yesterday"], "expected YYYY-MM-DD"),
        (["--until", "2026-13-01"], "expected YYYY-MM-DD"),
        (["--since", "2026-11-05", "--until", "2026-11-01"], "--since must be before --until"),
        (["--by", "tenant,colour"], "unknown 'colour'"),
        (["--by", "task,task"], "twice"),
        (["--by", ""], "comma-separated"),
        (["--format", "pdf"], "--format: expected one of"),
        (["--config", "/nonexistent/joulegate.yaml"], "configuration error"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    status, out, err = _run(capsys, *arguments)
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("joulegate report: ") and message in err


def test_missing_or_disabled_ledger_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "joulegate.yaml"
    config.write_text(f"data_dir: {tmp_path / 'nowhere'}\n")
    status, _, err = _run(capsys, "--config", str(config))
    assert status == 2 and "no ledger at" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()  # a report never creates a ledger
    config.write_text("ledger: 'off'\n")
    status, _, err = _run(capsys, "--config", str(config))
    assert status == 2 and "ledger: off" in err and len(err.splitlines()) == 1


CHROMIUM = next(
    (
        path
        for path in ("/usr/bin/chromium", shutil.which("chromium") or "")
        if path and os.access(path, os.X_OK)
    ),
    None,
)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    page = tmp_path / "report.html"
    status, _, err = _run(
        capsys,
        *RANGE,
        "--by",
        "tenant,task,day",
        "--format",
        "html",
        "--out",
        str(page),
        "--config",
        str(config_file),
    )
    assert status == 0, err
    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,2000",
            "--enable-logging=stderr",
            "--v=0",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000, "the screenshot looks blank"  # a blank page is a few KB
    console = [
        line
        for line in result.stderr.splitlines()
        if "Uncaught" in line or ("CONSOLE" in line.upper() and "error" in line.lower())
    ]
    assert not console, console
