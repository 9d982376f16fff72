"""Where request records go: the HTTP layer reports starts and ends; outputs get them finished."""

from __future__ import annotations

import logging

from proxy.metrics import Metrics
from proxy.records import RecordStore, RequestRecord

access_log = logging.getLogger("joulegate.access")


class Recorder:
    def __init__(self, metrics: Metrics, store: RecordStore) -> None:
        self.metrics = metrics
        self.store = store
        self.in_flight: dict[str, RequestRecord] = {}

    def started(self, record: RequestRecord) -> None:
        self.in_flight[record.id] = record

    def finished(self, record: RequestRecord) -> None:
        self.in_flight.pop(record.id, None)
        self.metrics.observe(record)
        self.store.add(record)
        if access_log.isEnabledFor(logging.INFO):
            # Ids, labels and counts only: never a query string, a body or a key.
            access_log.info(
                "%s %s %s %s %.3fs task=%s model=%s tenant=%s status=%s",
                record.id,
                record.method,
                record.path,
                record.code,
                record.duration_seconds or 0.0,
                record.task,
                record.model,
                record.tenant,
                record.status,
            )
