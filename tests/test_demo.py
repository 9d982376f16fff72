"""`joulegate demo`: the whole stack on tiny models, and the table it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo import WORKLOAD, format_table
from proxy.records import RequestRecord
from proxy.study import study_figures
from tests.servers import free_port


def _record(task: str, joules: float | None, status: str = "ok") -> RequestRecord:
    record = RequestRecord("r", task, "m", "anonymous", False, "POST", "/", "u", 0.0, 0.0)
    record.status, record.energy_joules = status, joules
    return record


def test_table_gives_wh_per_request_and_the_study_beside_it() -> None:
    records = [
        _record("text-generation", 36.0),
        _record("text-generation", 72.0),
        _record("text-generation", 999.0, status="aborted"),  # not a finished inference
        _record("image-generation", 3600.0),
        _record("embeddings", None),
    ]
    table = format_table(records, "nvml", estimate=False).splitlines()
    text_generation = next(line for line in table if line.startswith("text-generation"))
    # (36 + 72) / 2 J = 54 J = 0.015 Wh per request = 0.015 kWh per 1,000 requests.
    assert text_generation.split()[1:] == ["2", "1.500e-02", "1.500e-02", "0.047"]
    embeddings = next(line for line in table if line.startswith("embeddings"))
    assert "unknown" in embeddings  # no energy known: never shown as 0
    assert any("image / text generation: 66.7x here, 61.9x in the study" in line for line in table)
    assert any("meter: nvml (a measurement)" in line for line in table)


def test_study_figures_come_from_table_2() -> None:
    figures = study_figures()
    assert figures["image-generation"].kwh_per_1000_mean == 2.907
    assert figures["text-classification"].kwh_per_1000_mean == 0.002
    assert "other" not in figures


def test_demo_runs_the_mixed_workload_end_to_end() -> None:
    pytest.importorskip("diffusers", reason="needs the model-server extra")
    port = free_port()
    joulegate = Path(sys.executable).with_name("joulegate")
    arguments = ["demo", "--exit", "--rounds", "1", "--meter", "synthetic:100"]
    done = subprocess.run(
        [str(joulegate), *arguments, "--listen", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    for call in WORKLOAD:
        row = rows[call.task]
        assert row[1] == "1", row  # one request per task, finished
        assert float(row[2]) > 0, row  # energy known and attributed
    assert f"http://127.0.0.1:{port}/metrics" in done.stdout
