"""The per-request record: what was asked, what happened, and (once metered) what it cost.

It never holds prompt or output text, and never an API key: only ids, labels and counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

# How a request ended. `ok`: the upstream answer reached the client in full (whatever its
# HTTP status); `aborted`: the stream was cut (client gone, upstream closed or timed out
# mid-answer); `error`: joulegate answered itself because no upstream answer could be had.
STATUS_IN_FLIGHT = "in_flight"
STATUS_OK = "ok"
STATUS_ABORTED = "aborted"
STATUS_ERROR = "error"


@dataclass(slots=True)
class RequestRecord:
    id: str
    task: str
    model: str | None
    tenant: str
    streaming: bool
    method: str
    path: str
    upstream: str
    started_at: float  # Unix time, for people and reports
    start: float  # monotonic time, the clock the meter samples on
    end: float | None = None
    status: str = STATUS_IN_FLIGHT
    code: int | None = None
    reason: str | None = None  # why a request was aborted or failed, in a few words
    duration_seconds: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    images: int | None = None
    pixels: int | None = None
    steps: int | None = None
    # Energy stays None until metered, and stays None when the meter could not tell.
    energy_joules: float | None = None
    dynamic_energy_joules: float | None = None
    devices: dict[str, float | None] = field(default_factory=dict)
    meter: str | None = None
    estimate: bool = False
    team: str | None = None
    facility_energy_joules: float | None = None  # energy_joules x PUE
    carbon_grams: float | None = None  # facility energy x grid intensity at the time
    carbon_intensity_g_per_kwh: float | None = None
    # What a spent `degrade` energy budget changed, e.g. "model big→small, max_tokens 512→64".
    degraded: str | None = None

    def finish(self, end: float, status: str, code: int, reason: str | None = None) -> None:
        self.end = end
        self.status = status
        self.code = code
        self.reason = reason
        self.duration_seconds = max(0.0, end - self.start)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        del document["start"], document["end"]
        return document


# How many finished records joulegate keeps in memory for `/joulegate/requests/{id}`, at
# about 1 kB of RSS each. Without a ledger they are the only copy: the last 100,000 (100 MB).
# With one, the ledger answers for every record from the moment it is appended, so memory
# only saves it a query for the newest: 10,000 (10 MB, about 2 s of traffic at full speed).
RECORDS_KEPT = 100_000
RECORDS_KEPT_WITH_LEDGER = 10_000


class RecordStore:
    """The most recent finished records by id, bounded so memory stays flat under any load."""

    def __init__(self, capacity: int = RECORDS_KEPT) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

    def add(self, record: RequestRecord) -> None:
        records = self._records
        if record.id in records:  # a new id goes to the end by itself
            records.move_to_end(record.id)
        records[record.id] = record
        while len(records) > self.capacity:
            records.popitem(last=False)

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def __len__(self) -> int:
        return len(self._records)
