"""The benchmarks' plumbing: the rows they hand over, the one table `make bench` prints, the
nginx reference, and the GPU benchmarks saying plainly that there is no GPU where there is none.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import proxy_overhead, run_all, soak, streams_memory
from benchmarks.results import (
    INFO,
    MISS,
    PASS,
    Row,
    markdown_table,
    read_rows,
    text_table,
    write_rows,
)

ROOT = Path(__file__).resolve().parent.parent


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_tasks.py"])
def test_gpu_benchmarks_exit_cleanly_without_a_gpu(script: str, tmp_path: Path) -> None:
    if _has_gpu():
        pytest.skip("a GPU is visible here: the benchmark would run for real")
    rows_path = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--rows-json", str(rows_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no" in done.stdout.lower() and "gpu" in done.stdout.lower()
    assert "nothing" in done.stdout.lower()
    [row] = read_rows(rows_path)
    assert row.verdict == INFO and row.value.startswith("no GPU")


CANNED = [
    Row("joulegate throughput / direct, c=32", ">= 0.50", "0.61 (3,500 vs 5,800 req/s)", PASS),
    Row("report over 10,000,000 rows", "< 10 s", "12.3 s", MISS),
    Row("nginx added p50 | reference", "-", "+0.085 ms", INFO),
]


def test_rows_survive_the_json_they_are_handed_over_in(tmp_path: Path) -> None:
    write_rows(tmp_path / "rows.json", CANNED)
    assert read_rows(tmp_path / "rows.json") == CANNED


def test_a_row_has_one_of_three_verdicts() -> None:
    with pytest.raises(ValueError, match="verdict"):
        Row("x", "y", "z", "FAIL")


def test_the_text_table_has_every_row_in_aligned_columns() -> None:
    lines = text_table(CANNED).splitlines()
    assert lines[0].split() == ["measure", "target", "measured", "result"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    for row, line in zip(CANNED, lines[2:], strict=True):
        assert line.startswith(row.measure)
        assert line.endswith(row.verdict)
        # every column starts where its header does
        assert line.index(row.target, len(row.measure)) == lines[0].index("target")
        assert line.rindex(row.verdict) == lines[0].index("result")


def test_the_markdown_table_escapes_pipes_in_cells() -> None:
    lines = markdown_table(CANNED).splitlines()
    assert lines[0] == "| measure | target | measured | result |"
    assert lines[1] == "| --- | --- | --- | --- |"
    assert lines[4] == "| nginx added p50 \\| reference | - | +0.085 ms | INFO |"
    assert all(line.count(" | ") == 3 for line in lines)


def test_run_all_puts_every_benchmarks_rows_in_one_table_and_says_which_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Benchmarks as processes: one hands over rows, one crashes; both show in the table."""
    (tmp_path / "measures.py").write_text(
        "import json, sys\n"
        "print('detailed output of measures')\n"
        "path = sys.argv[sys.argv.index('--rows-json') + 1]\n"
        "quick = '--short' in sys.argv\n"
        "rows = [{'measure': 'widgets per second', 'target': '>= 10', "
        "'value': '5' if quick else '12', 'verdict': 'MISS' if quick else 'PASS'}]\n"
        "open(path, 'w').write(json.dumps(rows))\n"
    )
    (tmp_path / "crashes.py").write_text("print('boom'); raise SystemExit(3)\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(
        run_all,
        "BENCHMARKS",
        (run_all.Benchmark("measures.py", ("--short",)), run_all.Benchmark("crashes.py")),
    )
    out = tmp_path / "results.md"

    assert run_all.main(["--out", str(out)]) == 1
    printed = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()]
    assert ["widgets per second", ">= 10", "12", "PASS"] in printed
    assert ["crashes.py ran", "runs", "failed (exit 3): boom", "MISS"] in printed
    report = out.read_text()
    assert "| widgets per second | >= 10 | 12 | PASS |" in report
    assert "| crashes.py ran | runs | failed (exit 3): boom | MISS |" in report
    assert "detailed output of measures" in report  # each benchmark's own output follows

    assert run_all.main(["--quick", "--only", "measures", "--out", str(out)]) == 0
    assert "| widgets per second | >= 10 | 5 | MISS |" in out.read_text()
    assert "crashes.py" not in out.read_text()


def test_run_all_refuses_a_benchmark_it_does_not_know() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark"])


def test_every_benchmark_in_the_directory_is_in_run_all() -> None:
    scripts = {
        path.name for path in (ROOT / "benchmarks").glob("*.py") if "__main__" in path.read_text()
    } - {"run_all.py", "chat_upstream.py"}
    assert scripts == {benchmark.script for benchmark in run_all.BENCHMARKS}


def _results(nginx: bool) -> dict[tuple[str, int], proxy_overhead.Result]:
    Result = proxy_overhead.Result
    results = {
        (proxy_overhead.DIRECT, 1): Result(4000, 0.200, 0.4, 40),
        (proxy_overhead.DIRECT, 32): Result(6000, 5.0, 9.0, 40),
        (proxy_overhead.MINIMAL, 1): Result(2000, 0.500, 0.9, 200),
        (proxy_overhead.MINIMAL, 32): Result(2400, 13.0, 20.0, 200),
        (proxy_overhead.JOULEGATE, 1): Result(1500, 0.700, 1.2, 300),
        (proxy_overhead.JOULEGATE, 32): Result(2700, 11.0, 19.0, 280),
    }
    if nginx:
        results[proxy_overhead.NGINX, 1] = Result(3500, 0.290, 0.5, 60)
        results[proxy_overhead.NGINX, 32] = Result(6100, 5.0, 9.0, 55)
    return results


def test_proxy_overhead_rows_judge_joulegate_and_show_nginx_as_reference() -> None:
    table = {row.measure: row for row in proxy_overhead.rows(_results(True), 32, None)}
    throughput = table["joulegate throughput / direct, c=32"]
    assert (throughput.value, throughput.verdict) == ("0.45 (2,700 vs 6,000 req/s)", MISS)
    latency = table["joulegate added p50 latency, c=1"]
    assert latency.value.startswith("+0.500 ms") and latency.verdict == PASS
    assert table["nginx throughput / direct, c=32"].value.startswith("1.02 ")
    assert table["nginx added p50 latency, c=1"].verdict == INFO
    assert "nginx 55 us" in table["proxy CPU per request, c=32"].value


def test_proxy_overhead_rows_say_when_nginx_is_missing() -> None:
    rows = proxy_overhead.rows(_results(False), 32, "not installed (/usr/sbin/nginx)")
    [nginx] = [row for row in rows if row.measure.startswith("nginx")]
    assert (nginx.value, nginx.verdict) == ("not installed (/usr/sbin/nginx)", INFO)
    assert all(row.verdict in (PASS, MISS, INFO) for row in rows)


def test_proxy_overhead_runs_end_to_end_with_nginx_beside_joulegate(tmp_path: Path) -> None:
    """A short real run: every case answers (nginx too, where installed) and rows come out."""
    rows_path = tmp_path / "rows.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "proxy_overhead.py"),
            "--seconds",
            "0.3",
            "--concurrency",
            "4",
            "--rows-json",
            str(rows_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row.measure: row for row in read_rows(rows_path)}
    assert rows["joulegate throughput / direct, c=4"].verdict in (PASS, MISS)
    if Path("/usr/sbin/nginx").exists():
        assert "through nginx (c=4)" in done.stdout
        assert "nginx throughput / direct, c=4" in rows
    else:
        assert rows["nginx"].value.startswith("not installed")
    assert json.loads(rows_path.read_text())


def _soak(samples: list[tuple[float, float]], flat: bool, errors: int = 0) -> soak.Soak:
    prefill = 180_000 if flat else 10_000
    run = soak.Soak(600.0, 200.0, 60.0, prefill, prefill_flat=flat)
    run.samples = samples
    run.load.sent = 120_000
    if errors:
        run.load.errors["HTTP 502"] = errors
    run.recorded = run.ledger = prefill + run.load.sent
    return run


def test_the_soak_fits_the_slope_after_the_warm_up_and_judges_it() -> None:
    flat = [(t, 200.0 + (10.0 if t >= 60 else t / 6)) for t in range(0, 605, 5)]
    run = _soak(flat, True)
    assert run.slope_mb_per_hour == pytest.approx(0.0, abs=1e-9)  # the warm-up's rise left out
    [row, prefill_row] = soak.rows(run)
    assert row.verdict == PASS and row.value.startswith("+0.0 MB/h")
    assert prefill_row.verdict == INFO

    # 6 MB an hour: 1 MB over the 10 minutes
    growing = [(float(t), 200.0 + t / 600) for t in range(0, 605, 5)]
    assert soak.rows(_soak(growing, True))[0].verdict == MISS
    assert soak.Soak(600, 200, 60, 0, samples=growing).slope_mb_per_hour == pytest.approx(6.0)

    # the same figures while the caches still fill say so and are not judged...
    unjudged = soak.rows(_soak(growing, False))[0]
    assert unjudged.verdict == INFO and unjudged.value.startswith("caches still filling")
    # ...but a failed request always is
    assert soak.rows(_soak(flat, False, errors=1))[0].verdict == MISS


def test_the_stream_counter_finds_events_split_anywhere() -> None:
    wire = (
        b"".join(b'data: {"choices":[{"delta":{"content":"joule "}}]}\n\n' for _ in range(3))
        + b"data: [DONE]\n\n"
    )
    for cut in range(1, len(wire)):
        stream = streams_memory.Stream()
        stream.feed(wire[:cut])
        stream.feed(wire[cut:])
        assert (stream.chunks, stream.done) == (3, True), cut
