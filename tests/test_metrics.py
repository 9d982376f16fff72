"""The per-request metrics: what `/metrics` shows is exactly what prometheus_client's own
Counter and Histogram would show, though joulegate keeps them as plain floats (cheaper on the
event loop, see `LabelledCounter`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from proxy.metrics import (
    DURATION_BUCKETS,
    ENERGY_BUCKETS,
    LabelGuard,
    LabelledCounter,
    LabelledHistogram,
    Metrics,
)
from proxy.records import STATUS_OK
from tests.test_records import record as a_record

LABEL_VALUES = st.tuples(
    st.sampled_from(["text-generation", "embeddings"]), st.sampled_from(["a", 'q"\\\n'])
)
# Bucket bounds themselves, either side of them, nothing, negatives, NaN and infinities.
AMOUNTS = st.one_of(
    st.sampled_from([*ENERGY_BUCKETS, *DURATION_BUCKETS]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 10**6),
)
OPERATIONS = st.lists(st.tuples(LABEL_VALUES, AMOUNTS), max_size=30)

Failure = tuple[int, str, str]


def exposition(registry: CollectorRegistry) -> bytes:
    """Both formats Prometheus may ask for."""
    return generate_latest(registry) + openmetrics_latest(registry)


def failures(
    operations: Sequence[tuple[tuple[str, str], float]],
    step: Callable[[tuple[str, str], float], None],
) -> list[Failure]:
    """Apply every operation; which ones raised, and how."""
    failed = []
    for number, (labels, amount) in enumerate(operations):
        try:
            step(labels, amount)
        except Exception as error:  # compared, not hidden: both sides must fail alike
            failed.append((number, type(error).__name__, str(error)))
    return failed


@settings(max_examples=300, deadline=None)
@given(operations=OPERATIONS)
def test_a_labelled_counter_exports_what_a_prometheus_counter_would(
    operations: list[tuple[tuple[str, str], float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LabelledCounter("joulegate_things", "Things.", ["task", "model"])
    ours.register(counter)
    reference = Counter("joulegate_things", "Things.", ["task", "model"], registry=theirs)

    assert failures(operations, counter.inc) == failures(
        operations, lambda labels, amount: reference.labels(*labels).inc(amount)
    )
    assert exposition(ours) == exposition(theirs)


@settings(max_examples=300, deadline=None)
@given(operations=OPERATIONS, buckets=st.sampled_from([ENERGY_BUCKETS, DURATION_BUCKETS]))
def test_a_labelled_histogram_exports_what_a_prometheus_histogram_would(
    operations: list[tuple[tuple[str, str], float]], buckets: tuple[float, ...]
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LabelledHistogram("joulegate_sizes", "Sizes.", ["task", "model"], buckets)
    ours.register(histogram)
    reference = Histogram(
        "joulegate_sizes", "Sizes.", ["task", "model"], buckets=buckets, registry=theirs
    )

    assert failures(operations, histogram.observe) == failures(
        operations, lambda labels, amount: reference.labels(*labels).observe(amount)
    )
    assert exposition(ours) == exposition(theirs)


def test_request_metrics_come_out_in_their_order_with_series_only_once_observed() -> None:
    metrics = Metrics(LabelGuard(["team-a"], [], max_models=5))
    record = a_record("r1", model="tiny", tenant="team-a")
    record.finish(10.5, STATUS_OK, 200)
    record.output_tokens = 8
    record.meter = "nvml"
    record.energy_joules = 2.0
    metrics.observe(record)

    series = {
        metric.name: [sample.labels for sample in metric.samples if sample.name.endswith("total")]
        for metric in metrics.registry.collect()
    }
    assert list(series) == [
        "joulegate_requests",
        "joulegate_request_duration_seconds",
        "joulegate_tokens",
        "joulegate_images",
        "joulegate_request_energy_joules",
        "joulegate_energy_joules",
        "joulegate_dynamic_energy_joules",
        "joulegate_carbon_grams",
        "joulegate_metered_requests",
        "joulegate_upstream_errors",
    ]
    group = {"task": "text-generation", "model": "tiny", "tenant": "team-a"}
    assert series["joulegate_requests"] == [{**group, "code": "200"}]
    assert series["joulegate_tokens"] == [{**group, "direction": "output"}]  # no input tokens
    assert series["joulegate_energy_joules"] == [group]
    assert series["joulegate_images"] == series["joulegate_carbon_grams"] == []
    assert series["joulegate_dynamic_energy_joules"] == []  # unknown: no series, never a 0
