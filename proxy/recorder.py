"""Where request records go between the HTTP layer and the outputs.

The HTTP layer reports when a request starts being served and when it ends; the meter's
readings arrive from the sampler (through the event loop). A record is published (metrics,
the record store, the access log) once a reading at or after its end has been attributed, so
its energy is final. Without an attributor, records are published as soon as they end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from proxy.attribution import Attribution, Attributor, Span
from proxy.budgets import Admission, Budgets
from proxy.carbon import CarbonModel
from proxy.ledger import Ledger
from proxy.meter.base import Reading
from proxy.metrics import Metrics
from proxy.records import STATUS_ABORTED, STATUS_OK, RecordStore, RequestRecord

access_log = logging.getLogger("joulegate.access")
log = logging.getLogger("joulegate")

# Records published per turn of the event loop. Under load one reading finishes hundreds of
# requests at once (about 450 at 9,000 requests/s and the 50 ms interval), and publishing
# one (metrics, record store, ledger row) costs 10-15 us: all in one go, every client
# would wait 5-7 ms for the loop each interval. In slices, no wait is over about 1 ms.
PUBLISH_SLICE = 64


class Recorder:
    def __init__(
        self,
        metrics: Metrics,
        store: RecordStore,
        attributor: Attributor | None = None,
        *,
        meter_name: str | None = None,
        devices: frozenset[str] | None = None,
        carbon: CarbonModel | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.attributor = attributor
        self.meter_name = meter_name
        self.devices = devices
        self.carbon = carbon or CarbonModel()
        self.in_flight: dict[str, RequestRecord] = {}
        self.pending: dict[str, RequestRecord] = {}  # ended, waiting for their energy
        self._finished: deque[Attribution] = deque()  # final energy, not yet published
        self._slice_scheduled = False
        self._waiters: dict[str, list[asyncio.Future[RequestRecord]]] = {}
        # ---- energy budgets: reservations held until the record's energy is known ----
        self.budgets = budgets
        self.ledger: Ledger | None = None
        self._admissions: dict[str, Admission] = {}

    def attach(
        self, attributor: Attributor, meter_name: str, devices: frozenset[str] | None
    ) -> None:
        """Start metering: from now on records wait for their energy before publication."""
        self.attributor = attributor
        self.meter_name = meter_name
        self.devices = devices

    def knows(self, request_id: str) -> bool:
        """Whether a request with this id is in flight or waiting for its energy."""
        return request_id in self.in_flight or request_id in self.pending

    def started(self, record: RequestRecord, weight: float = 1.0) -> None:
        """The request starts being served now (after its body was read and classified);
        `weight` is its claim on shared device time (see proxy.weights)."""
        self.in_flight[record.id] = record
        if self.attributor is not None:
            span = Span(record.id, time.monotonic(), weight=weight, devices=self.devices)
            self.attributor.start(span)

    def admitted(self, request_id: str, admission: Admission) -> None:
        """The request holds a budget reservation, settled when its record is published."""
        if admission.charges:
            self._admissions[request_id] = admission

    def release(self, request_id: str) -> None:
        """The request never reached the upstream: its budget reservation is dropped now."""
        admission = self._admissions.pop(request_id, None)
        if admission is not None and self.budgets is not None:
            self.budgets.release(admission)

    def _settle_budget(self, record: RequestRecord) -> None:
        assert self.budgets is not None
        admission = self._admissions.pop(record.id, None)
        if admission is not None:
            self.budgets.settle(admission, record.energy_joules, time.time())
        elif record.energy_joules:  # refused or released: its measured share still counts
            self.budgets.charge(
                record.tenant,
                record.task,
                record.model,
                record.energy_joules,
                record.started_at,
                time.time(),
            )
        if record.status == STATUS_OK and record.code is not None and 200 <= record.code < 300:
            self.budgets.learn(record.task, record.model, record.energy_joules)

    def ended(self, record: RequestRecord) -> None:
        """The request is over (`record.finish` was called); its energy settles soon."""
        if self.in_flight.pop(record.id, None) is None:
            return
        assert record.end is not None, "ended() before record.finish()"
        if self.attributor is None:
            self._publish(record)
            return
        self.pending[record.id] = record
        self.attributor.end(record.id, record.end)

    async def settled(self, record: RequestRecord, timeout: float) -> RequestRecord:
        """Wait until the record is published with its energy (for inline energy answers)."""
        if record.id not in self.pending:
            return record
        future: asyncio.Future[RequestRecord] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(record.id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return record

    def on_reading(self, reading: Reading) -> None:
        """A meter reading, on the event loop's thread: settle energy, publish what is final."""
        if self.attributor is None:
            return
        try:
            self.attributor.add_reading(reading)
        except ValueError:
            log.exception("reading rejected by the attributor")
            return
        self._publish_finished()

    def _publish_finished(self) -> None:
        assert self.attributor is not None
        self._finished.extend(self.attributor.pop_finished())
        if not self._slice_scheduled:
            self._publish_slice()

    def _publish_slice(self, *, all_now: bool = False) -> None:
        """Publish up to PUBLISH_SLICE finished records, oldest first, and the rest on the
        loop's next turns; all of them now with `all_now` or where no loop runs."""
        self._slice_scheduled = False
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        finished = self._finished
        count = len(finished) if all_now or loop is None else min(PUBLISH_SLICE, len(finished))
        for _ in range(count):
            self._publish_final(finished.popleft())
        if finished and loop is not None:
            self._slice_scheduled = True
            loop.call_soon(self._publish_slice)

    def _publish_final(self, attribution: Attribution) -> None:
        record = self.pending.pop(attribution.request_id, None)
        if record is not None:
            self._apply(record, attribution)
            self._publish(record)

    def drain(self, read: Callable[[], Reading] | None) -> None:
        """On the way out: end what is still in flight, settle with one last reading, then
        publish whatever is left with unknown energy rather than not at all."""
        for record in list(self.in_flight.values()):
            if record.end is None:
                record.finish(time.monotonic(), STATUS_ABORTED, record.code or 503, "shut down")
            self.ended(record)
        if read is not None and self.pending and self.attributor is not None:
            # flush: settle up to this reading even if a quantised counter has not moved yet.
            self.attributor.add_reading(read(), flush=True)
            self._finished.extend(self.attributor.pop_finished())
        self._publish_slice(all_now=True)  # not on later turns: the loop is about to stop
        for record in list(self.pending.values()):
            del self.pending[record.id]
            record.meter = self.meter_name
            self._publish(record)

    def _apply(self, record: RequestRecord, attribution: Attribution) -> None:
        record.meter = self.meter_name
        record.energy_joules = attribution.energy_joules
        record.dynamic_energy_joules = attribution.dynamic_energy_joules
        record.devices = dict(attribution.per_device)
        record.estimate = attribution.estimate
        if record.energy_joules is not None:
            midpoint = record.started_at + (record.duration_seconds or 0.0) / 2
            footprint = self.carbon.footprint(record.energy_joules, midpoint)
            record.facility_energy_joules = footprint.facility_energy_joules
            record.carbon_grams = footprint.carbon_grams
            record.carbon_intensity_g_per_kwh = footprint.intensity_g_per_kwh

    def _publish(self, record: RequestRecord) -> None:
        if self.budgets is not None:
            self._settle_budget(record)
        self.metrics.observe(record)
        self.store.add(record)
        if self.ledger is not None:
            self.ledger.append(record)  # never blocks: written in batches off the loop
        for future in self._waiters.pop(record.id, ()):
            if not future.done():
                future.set_result(record)
        if access_log.isEnabledFor(logging.INFO):
            # Ids, labels and counts only: never a query string, a body or a key.
            access_log.info(
                "%s %s %s %s %.3fs task=%s model=%s tenant=%s status=%s energy_j=%s",
                record.id,
                record.method,
                record.path,
                record.code,
                record.duration_seconds or 0.0,
                record.task,
                record.model,
                record.tenant,
                record.status,
                "unknown" if record.energy_joules is None else f"{record.energy_joules:.3f}",
            )
