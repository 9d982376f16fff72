"""joulegate under load, as users run it (`joulegate serve` in its own process).

The slow tests (`make test-slow`) run the benchmarks' own code: 1,000 concurrent SSE streams
held for JOULEGATE_STREAMS_SECONDS (default 60) with peak RSS <= 200 MB, and a soak at 200
requests a second for JOULEGATE_SOAK_SECONDS (default 600) whose memory must not keep growing.
Both start after a prefill until joulegate's memory stops growing (what it keeps: recent
records, the ledger's page cache), as after a day of traffic. CI sets both shorter. The fast
test checks what lets 1,000 streams in at all: joulegate raises its own limit on open files.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks import soak, streams_memory
from benchmarks.harness import free_port, start_joulegate, stop, wait_listening

STREAMS = 1000
STREAMS_SECONDS = float(os.environ.get("JOULEGATE_STREAMS_SECONDS", "60"))
SOAK_SECONDS = float(os.environ.get("JOULEGATE_SOAK_SECONDS", "600"))
SHORT_SOAK_RISE_MB = 1.0


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit in /proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_raises_its_soft_open_files_limit_to_the_hard_limit() -> None:
    """Started with a soft limit of 256 (many systems default to 1,024), joulegate serves
    with the hard limit: 1,000 streams need over 2,000 sockets."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    port, upstream_port = free_port(), free_port()  # nothing need answer upstream
    with tempfile.TemporaryDirectory() as data_dir:
        proxy = start_joulegate(
            upstream_port, port, Path(data_dir), {"ledger": "off"}, preexec_fn=lower_soft_limit
        )
        try:
            wait_listening(port, process=proxy)
            new_soft, new_hard = _open_files_limits(proxy.pid)
        finally:
            stop(proxy)
    assert new_soft > 256
    if hard != resource.RLIM_INFINITY:
        assert (new_soft, new_hard) == (hard, hard)


@pytest.mark.slow
def test_1000_concurrent_streams_all_flow_and_joulegate_stays_under_200_mb() -> None:
    outcome = streams_memory.run(STREAMS, STREAMS_SECONDS)
    failed = [stream for stream in outcome.streams if stream.error or not stream.done]
    assert not failed, f"{len(failed)} streams failed, e.g. {failed[0]}"
    assert outcome.complete == STREAMS  # every chunk of every stream
    assert outcome.recorded == STREAMS == outcome.ledger  # nothing recorded is lost
    print(
        f"peak RSS {outcome.peak_mb:.1f} MB, before {outcome.before.rss_mb:.1f}, "
        f"after {outcome.after.rss_mb if outcome.after else 0:.1f}"
    )
    assert outcome.peak_mb <= streams_memory.TARGET_PEAK_MB


@pytest.mark.slow
def test_soak_memory_stops_growing_and_no_request_fails() -> None:
    """Memory once what joulegate keeps is full (the in-memory records, the ledger's page
    cache: see benchmarks/soak.py): the slope's target holds over the full 10-minute
    run. A shortened run (CI) is too short for a slope of a few MB an hour to stand out of
    the noise, so it is held to the fitted line rising under 1 MB: a leak of 150 bytes a
    request rises 1.8 MB over the 60 s that a 120 s run (CI) measures at 200 requests a second."""
    # The prefill goes on until RSS is flat (a fixed 167,773 requests left the ledger's page
    # cache growing 10 MB more); the warm-up leaves out the switch to the steady mix.
    warmup = min(60.0, SOAK_SECONDS / 2)
    run = soak.run(SOAK_SECONDS, 200.0, warmup)  # after a prefill until RSS is flat
    assert run.prefill_flat, f"RSS still grew after {run.prefill:,} requests of prefill"
    assert run.load.error_count == 0, dict(run.load.errors)
    assert run.recorded == run.prefill + run.load.sent == run.ledger  # nothing lost
    print(
        f"RSS slope {run.slope_mb_per_hour:+.1f} MB/h, rise {run.rise_mb:+.2f} MB over "
        f"{SOAK_SECONDS:g} s; RSS {run.measured[0][1]:.1f} -> {run.samples[-1][1]:.1f} MB"
    )
    if SOAK_SECONDS >= 600:
        assert run.slope_mb_per_hour < soak.TARGET_MB_PER_HOUR, run.samples
    else:
        assert run.rise_mb < SHORT_SOAK_RISE_MB, run.samples
