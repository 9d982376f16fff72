"""What recording a request costs the event loop: `Recorder.started`, `ended`, and its share of
the meter readings that settle energy and publish records (metrics, store, ledger).

    .venv/bin/python benchmarks/recording.py [--records 50000] [--rounds 5] [--access-log]
        [--rows-json PATH]

The timeline is the proxy's under load (32 clients on keep-alive connections, about 1,300
requests/s, a reading every 50 ms): 32 requests in flight at all times, the oldest ending as
each new one starts, and a meter reading after every 64 ended requests, so each reading
settles an interval shared by some 100 spans and publishes the 64 records it makes final.
Records are made beforehand (the HTTP layer's work); what is timed is only the Recorder's
part, driven exactly as `proxy.forward` and `proxy.server` drive it, against a real
`Attributor`, `Metrics` (prometheus_client), `RecordStore`, `CarbonModel` and a `Ledger`
whose rows are never written (the writer runs off the loop; `benchmarks/ledger.py` times it).
Times are real `time.monotonic()` readings, as in the proxy; the meter draws 300 W.

Printed: microseconds of CPU per record, the best of `--rounds` rounds, for the whole path
and for two of its publication steps alone (`Metrics.observe`, `Ledger.append`); and, as the
baseline, the same metrics counted through prometheus_client's own labelled Counter and
Histogram (`.labels(...).inc()`, as `Metrics` did before it kept plain floats).
The access log line is off unless `--access-log` (then written to /dev/null at INFO, as
`joulegate serve` logs by default). Every record is checked to have been published with
its energy, and the attributor's conservation (attributed + unattributed = metered).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, Histogram

from benchmarks.results import INFO, Row, write_rows
from proxy.attribution import Attributor
from proxy.carbon import CarbonModel
from proxy.ledger.base import Ledger
from proxy.ledger.schema import Group
from proxy.meter.base import Reading
from proxy.metrics import DURATION_BUCKETS, ENERGY_BUCKETS, LabelGuard, Metrics
from proxy.recorder import Recorder
from proxy.records import RECORDS_KEPT_WITH_LEDGER, STATUS_OK, RecordStore, RequestRecord

CONCURRENCY = 32
RECORDS_PER_READING = 64  # 1,300 requests/s x 50 ms
WATTS = 300.0
TENANTS = ("team-a", "team-b", "team-c")
TASKS = ("text-generation", "embeddings")


class UnwrittenLedger(Ledger):
    """A ledger whose writer never runs: `append` does all its event-loop work (the row, the
    backlog), and the rows simply stay in memory."""

    backend = "bench"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _get_stored(self, request_id: str) -> dict[str, Any] | None:
        return None

    async def iter_records(  # type: ignore[override]
        self, start: float, end: float, *, batch_size: int = 5000, tenant: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        return
        yield []

    async def _groups(
        self, hours: tuple[int, int] | None, edges: list[tuple[float, float]], step: int
    ) -> list[Group]:
        return []

    def _wake(self) -> None:
        return None


def synthetic_records(count: int) -> list[RequestRecord]:
    """Requests as the HTTP layer makes them: a few tenants, one model, small answers."""
    now = time.time()
    return [
        RequestRecord(
            id=f"{number:032x}",
            task=TASKS[number % len(TASKS)],
            model="llama-3-8b",
            tenant=TENANTS[number % len(TENANTS)],
            streaming=number % 4 == 0,
            method="POST",
            path="/v1/chat/completions",
            upstream="http://127.0.0.1:8000",
            started_at=now + number * 0.001,
            start=0.0,
        )
        for number in range(count)
    ]


def make_recorder(count: int) -> tuple[Recorder, Attributor, UnwrittenLedger]:
    """A Recorder wired as `proxy.server.create_app` wires it, metered by a one-GPU meter."""
    guard = LabelGuard(TENANTS, (), max_models=50)
    recorder = Recorder(Metrics(guard), RecordStore(RECORDS_KEPT_WITH_LEDGER), carbon=CarbonModel())
    ledger = UnwrittenLedger(instance="bench", max_pending=count + 2000)
    recorder.ledger = ledger
    attributor = Attributor(("gpu0",))
    recorder.attach(attributor, "nvml", None)
    return recorder, attributor, ledger


def drive(count: int) -> tuple[float, Recorder, Attributor, UnwrittenLedger]:
    """Seconds of CPU the Recorder took for `count` records on the load's timeline."""
    records = synthetic_records(count)
    recorder, attributor, ledger = make_recorder(count)
    origin = time.monotonic()

    def reading() -> Reading:
        now = time.monotonic()
        return Reading(time=now, joules=(WATTS * (now - origin),))

    recorder.on_reading(reading())
    flying: deque[RequestRecord] = deque()
    ended = 0
    clock = time.monotonic
    began = time.process_time()
    for record in records:
        record.start = clock()
        recorder.started(record)
        flying.append(record)
        if len(flying) > CONCURRENCY:
            oldest = flying.popleft()
            oldest.input_tokens, oldest.output_tokens = 14, 8
            oldest.finish(clock(), STATUS_OK, 200)
            recorder.ended(oldest)
            ended += 1
            if ended % RECORDS_PER_READING == 0:
                recorder.on_reading(reading())
    for record in flying:
        record.finish(clock(), STATUS_OK, 200)
        recorder.ended(record)
    recorder.on_reading(reading())
    elapsed = time.process_time() - began
    return elapsed, recorder, attributor, ledger


def check(count: int, recorder: Recorder, attributor: Attributor, ledger: Ledger) -> None:
    """Every record published with its energy, and the energy conserved."""
    assert not recorder.in_flight and not recorder.pending and attributor.tracked == 0
    assert ledger.stats().queued == count and ledger.stats().dropped == 0
    assert len(recorder.store) == min(count, recorder.store.capacity)
    metered = attributor.metered["gpu0"]
    settled = attributor.attributed["gpu0"] + attributor.unattributed["gpu0"]
    assert math.isclose(metered, settled, rel_tol=1e-9), (metered, settled)
    measured = sum(
        sample.value
        for metric in recorder.metrics.registry.collect()
        if metric.name == "joulegate_metered_requests"
        for sample in metric.samples
        if sample.labels["quality"] == "measured"
    )
    assert measured == count, measured


def per_record(count: int, rounds: int, step: Callable[[int], float]) -> float:
    """Best of `rounds` runs of `step(count)` (seconds), in microseconds per record."""
    return min(step(count) for _ in range(rounds)) / count * 1e6


def recording_seconds(count: int) -> float:
    elapsed, recorder, attributor, ledger = drive(count)
    check(count, recorder, attributor, ledger)
    return elapsed


def published_records(count: int) -> list[RequestRecord]:
    """Records as they leave the Recorder: finished, metered, with their carbon figures."""
    _, recorder, _, _ = drive(count)
    records = [recorder.store.get(f"{number:032x}") for number in range(count)]
    assert None not in records, "a record was not kept"
    return records  # type: ignore[return-value]  # no None left


def observe_seconds(records: list[RequestRecord]) -> float:
    metrics = Metrics(LabelGuard(TENANTS, (), max_models=50))
    began = time.process_time()
    for record in records:
        metrics.observe(record)
    return time.process_time() - began


def client_observe_seconds(records: list[RequestRecord]) -> float:
    """The reference: the same counting through prometheus_client's labelled Counter and
    Histogram (`.labels(...).inc()`), as `Metrics.observe` did before it kept plain floats."""
    guard = LabelGuard(TENANTS, (), max_models=50)
    registry = CollectorRegistry()
    group = ["task", "model", "tenant"]
    requests = Counter("r", "-", [*group, "code"], registry=registry)
    duration = Histogram("d", "-", ["task", "model"], buckets=DURATION_BUCKETS, registry=registry)
    tokens = Counter("t", "-", [*group, "direction"], registry=registry)
    request_energy = Histogram("re", "-", group, buckets=ENERGY_BUCKETS, registry=registry)
    energy = Counter("e", "-", group, registry=registry)
    dynamic_energy = Counter("de", "-", group, registry=registry)
    carbon = Counter("c", "-", group, registry=registry)
    metered = Counter("m", "-", ["task", "quality"], registry=registry)
    images = Counter("i", "-", ["model", "tenant"], registry=registry)
    began = time.process_time()
    for record in records:
        model = guard.model(record.model, record.code)
        tenant = guard.tenant(record.tenant)
        if record.meter is not None:
            if record.energy_joules is None:
                quality = "unknown"
            else:
                quality = "estimate" if record.estimate else "measured"
                request_energy.labels(record.task, model, tenant).observe(record.energy_joules)
                energy.labels(record.task, model, tenant).inc(record.energy_joules)
            if record.carbon_grams is not None:
                carbon.labels(record.task, model, tenant).inc(record.carbon_grams)
            if record.dynamic_energy_joules is not None:
                dynamic_energy.labels(record.task, model, tenant).inc(record.dynamic_energy_joules)
            metered.labels(record.task, quality).inc()
        requests.labels(record.task, model, tenant, str(record.code)).inc()
        if record.duration_seconds is not None:
            duration.labels(record.task, model).observe(record.duration_seconds)
        if record.input_tokens:
            tokens.labels(record.task, model, tenant, "input").inc(record.input_tokens)
        if record.output_tokens:
            tokens.labels(record.task, model, tenant, "output").inc(record.output_tokens)
        if record.images and record.task == "image-generation":
            images.labels(model, tenant).inc(record.images)
    return time.process_time() - began


def append_seconds(records: list[RequestRecord]) -> float:
    ledger = UnwrittenLedger(instance="bench", max_pending=len(records) + 2000)
    began = time.process_time()
    for record in records:
        ledger.append(record)
    return time.process_time() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000, help="records per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is kept")
    parser.add_argument("--access-log", action="store_true", help="log each record (INFO)")
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()
    count = arguments.records
    access = logging.getLogger("joulegate.access")
    access.propagate = False
    if arguments.access_log:
        handler = logging.FileHandler("/dev/null")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)

    whole = per_record(count, arguments.rounds, recording_seconds)
    records = published_records(min(count, RECORDS_KEPT_WITH_LEDGER))
    gc.collect()
    observe = per_record(len(records), arguments.rounds, lambda _: observe_seconds(records))
    append = per_record(len(records), arguments.rounds, lambda _: append_seconds(records))
    client = per_record(len(records), arguments.rounds, lambda _: client_observe_seconds(records))
    log_state = "access log on" if arguments.access_log else "access log off"
    print(
        f"recording: {count:,} records, {CONCURRENCY} in flight, a reading per "
        f"{RECORDS_PER_READING} ended, {log_state}; best of {arguments.rounds} rounds"
    )
    print(f"  started + ended + readings + publish   {whole:7.1f} us/record")
    print(f"    of which Metrics.observe             {observe:7.1f} us/record")
    print(f"    of which Ledger.append               {append:7.1f} us/record")
    print(f"  baseline: the metrics via prometheus_client's .labels() {client:5.1f} us/record")
    rows = [
        Row(f"recording CPU per request (Recorder, {log_state})", "-", f"{whole:.1f} us", INFO),
        Row("recording: Metrics.observe per request", "-", f"{observe:.1f} us", INFO),
        Row("recording: Ledger.append per request", "-", f"{append:.1f} us", INFO),
        Row(
            "recording: the metrics via prometheus_client .labels() | reference",
            "-",
            f"{client:.1f} us",
            INFO,
        ),
    ]
    write_rows(arguments.rows_json, rows)
    return 0  # a benchmark reports; the tests are what fail


if __name__ == "__main__":
    sys.exit(main())
