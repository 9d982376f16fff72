"""The in-memory record store behind `/joulegate/requests/{id}`."""

from __future__ import annotations

from typing import Any

from proxy.records import RecordStore, RequestRecord


def record(request_id: str, **fields: Any) -> RequestRecord:
    """A record as the forwarder starts one; `fields` replace its defaults."""
    defaults: dict[str, Any] = {
        "task": "text-generation",
        "model": None,
        "tenant": "anonymous",
        "streaming": False,
        "method": "POST",
        "path": "/v1/chat/completions",
        "upstream": "http://127.0.0.1:8000",
        "started_at": 1_700_000_000.0,
        "start": 10.0,
    }
    return RequestRecord(id=request_id, **(defaults | fields))


def test_the_store_keeps_the_newest_and_a_repeated_id_counts_as_newest() -> None:
    store = RecordStore(capacity=3)
    for request_id in ("a", "b", "c"):
        store.add(record(request_id))
    again = record("a")  # a client may send the same X-Request-Id twice
    store.add(again)
    store.add(record("d"))  # one too many: the oldest goes, which is now b
    assert store.get("b") is None
    assert store.get("a") is again
    assert [store.get(request_id) is not None for request_id in "acd"] == [True] * 3
    assert len(store) == 3
