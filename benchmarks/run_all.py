"""Every benchmark in one run, and one table of their figures against their targets.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out bench-results.md]

Each benchmark runs as its own process, one after another (they measure time and memory, so
they must not share the machine with each other), with `--rows-json` so it hands over its
headline figures as rows; each keeps printing its own detailed output, which goes into the
markdown file below the table. The table has one row per figure: measure, target, measured
value, and PASS or MISS against the target, or INFO for reference figures and for what could
not be measured here (the GPU benchmarks without a GPU). A benchmark that fails to run gets a
MISS row saying so, and the exit status is then 1; MISS rows of benchmarks that ran are
results, not failures, so the exit status stays 0.

The full run takes about 20 minutes on 2 cores, most of it the soak (10 minutes, after a
prefill of some 50,000 requests). `--quick` runs every benchmark shortened, in under 2
minutes: a smoke test of the benchmarks, whose figures are rough (fewer samples, a 30 s
soak without the prefill, so its slope is not judged).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import MISS, Row, markdown_table, read_rows, text_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    script: str
    quick: tuple[str, ...] = ()  # arguments that shorten it for --quick
    timeout: float = 1800.0  # s; the soak's own default length is 600 s


BENCHMARKS = (
    Benchmark("proxy_overhead.py", ("--seconds", "1")),
    Benchmark("attribution_accuracy.py", ("--seconds", "10")),
    Benchmark("ledger.py", ("--records", "20000", "--rows", "200000")),
    Benchmark("recording.py", ("--records", "5000", "--rounds", "1")),
    Benchmark("streams_memory.py", ("--seconds", "5", "--prefill", "0")),
    Benchmark("soak.py", ("--seconds", "30", "--warmup", "10", "--prefill", "0")),
    Benchmark("gpu_check.py"),
    Benchmark("gpu_tasks.py"),
)


@dataclass(frozen=True)
class Outcome:
    benchmark: Benchmark
    rows: list[Row]
    output: str
    seconds: float
    failed: bool


def run(benchmark: Benchmark, quick: bool, scratch: Path) -> Outcome:
    """Run one benchmark; its rows, or one MISS row saying why there are none."""
    rows_path = scratch / f"{benchmark.script}.json"
    command = [sys.executable, str(HERE / benchmark.script), "--rows-json", str(rows_path)]
    if quick:
        command += benchmark.quick
    began = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=benchmark.timeout,
        )
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else ""
        code = None
    seconds = time.monotonic() - began
    if rows_path.exists():
        return Outcome(benchmark, read_rows(rows_path), output, seconds, failed=False)
    last = (output.strip().splitlines() or ["no output"])[-1][:160]
    why = f"timed out after {benchmark.timeout:.0f} s" if code is None else f"exit {code}"
    row = Row(f"{benchmark.script} ran", "runs", f"failed ({why}): {last}", MISS)
    return Outcome(benchmark, [row], output, seconds, failed=True)


def describe_host(quick: bool) -> str:
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    mode = "quick mode (rough figures)" if quick else "full run"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}, {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}{load} at the start; {mode}"
    )


def markdown_report(host: str, outcomes: list[Outcome]) -> str:
    rows = [row for outcome in outcomes for row in outcome.rows]
    parts = ["# joulegate benchmarks", "", host, "", markdown_table(rows), ""]
    for outcome in outcomes:
        parts += [
            f"## {outcome.benchmark.script} ({outcome.seconds:.0f} s)",
            "",
            "```",
            outcome.output.rstrip(),
            "```",
            "",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened runs, rough figures")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these benchmarks (script names, with or without .py)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench-results.md", help="the markdown report"
    )
    arguments = parser.parse_args(argv)
    chosen = list(BENCHMARKS)
    if arguments.only:
        wanted = {name.removesuffix(".py") + ".py" for name in arguments.only}
        unknown = wanted - {b.script for b in BENCHMARKS}
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))}")
        chosen = [b for b in BENCHMARKS if b.script in wanted]

    host = describe_host(arguments.quick)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="joulegate-bench-rows-") as scratch:
        for number, benchmark in enumerate(chosen, 1):
            print(f"[{number}/{len(chosen)}] {benchmark.script} ...", end=" ", flush=True)
            outcome = run(benchmark, arguments.quick, Path(scratch))
            state = "FAILED" if outcome.failed else f"{len(outcome.rows)} rows"
            print(f"{outcome.seconds:.0f} s, {state}", flush=True)
            outcomes.append(outcome)

    print(f"\n{host}\n")
    print(text_table([row for outcome in outcomes for row in outcome.rows]))
    arguments.out.write_text(markdown_report(host, outcomes))
    print(f"\nthe table and each benchmark's own output: {arguments.out}")
    return 1 if any(outcome.failed for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
