"""The Recorder publishes what a reading finished in slices, so no reading stalls the loop."""

from __future__ import annotations

import asyncio
import time

from proxy.attribution import Attributor
from proxy.meter.base import Reading
from proxy.metrics import LabelGuard, Metrics
from proxy.recorder import PUBLISH_SLICE, Recorder
from proxy.records import STATUS_OK, RecordStore, RequestRecord

JOULES = 100.0


class Published(list[RequestRecord]):
    """Stands in for the ledger: the records in the order they were published."""


def metered_recorder() -> tuple[Recorder, Published]:
    recorder = Recorder(Metrics(LabelGuard((), (), max_models=10)), RecordStore(10_000))
    recorder.attach(Attributor(("gpu0",)), "synthetic", None)
    published = Published()
    recorder.ledger = published  # type: ignore[assignment]  # only append is called
    return recorder, published


def finish_many(recorder: Recorder, count: int) -> list[str]:
    """`count` requests, one after another between two readings; the second settles all.
    (The Recorder times spans by time.monotonic(), so the readings do too.)"""
    recorder.on_reading(Reading(time=time.monotonic() - 1, joules=(0.0,)))
    ids = []
    for number in range(count):
        record = RequestRecord(
            id=f"req-{number}",
            task="embeddings",
            model="m",
            tenant="anonymous",
            streaming=False,
            method="POST",
            path="/v1/embeddings",
            upstream="http://127.0.0.1:8000",
            started_at=1_700_000_000.0 + number,
            start=time.monotonic(),
        )
        recorder.started(record)
        record.finish(time.monotonic(), STATUS_OK, 200)
        recorder.ended(record)
        ids.append(record.id)
    recorder.on_reading(Reading(time=time.monotonic() + 1, joules=(JOULES,)))
    return ids


async def test_a_reading_that_finishes_many_requests_publishes_them_a_slice_per_turn() -> None:
    recorder, published = metered_recorder()
    count = 3 * PUBLISH_SLICE + 5
    ids = finish_many(recorder, count)

    assert len(published) == PUBLISH_SLICE  # the rest waits for the loop's next turns
    assert all(recorder.knows(request_id) for request_id in ids[PUBLISH_SLICE:])
    turns = 0
    while len(published) < count:
        await asyncio.sleep(0)
        turns += 1
        assert len(published) <= (turns + 1) * PUBLISH_SLICE
    assert turns == 3
    assert [record.id for record in published] == ids  # oldest first, each once
    assert all((record.energy_joules or 0.0) > 0 for record in published)  # with its energy
    assert not any(recorder.knows(request_id) for request_id in ids)


async def test_draining_publishes_everything_at_once() -> None:
    recorder, published = metered_recorder()
    ids = finish_many(recorder, 2 * PUBLISH_SLICE)
    recorder.drain(None)  # the loop is about to stop: nothing may wait for later turns
    assert [record.id for record in published] == ids
    await asyncio.sleep(0)  # the slice that was scheduled finds nothing left to do
    assert len(published) == len(ids)


def test_without_a_running_loop_everything_is_published_at_once() -> None:
    recorder, published = metered_recorder()
    ids = finish_many(recorder, 2 * PUBLISH_SLICE + 1)
    assert [record.id for record in published] == ids
