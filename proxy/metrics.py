"""Prometheus metrics from finished request records (names as in DESIGN.md).

Label values that come from clients pass through `LabelGuard`, so no client can create
unbounded series.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.attribution import Attributor
from proxy.budgets import Budgets
from proxy.ledger import Ledger
from proxy.meter.base import Meter
from proxy.records import RequestRecord
from proxy.sampler import Sampler

# `_created` series double every counter's series count and no dashboard here reads them.
disable_created_metrics()

OTHER = "other"
UNKNOWN_MODEL = "unknown"
# 0.1 J (a short classification) to 100 kJ (a large image batch), three buckets a decade.
ENERGY_BUCKETS = (
    *(round(mantissa * 10.0**exponent, 10) for exponent in range(-1, 5) for mantissa in (1, 2, 5)),
    1e5,
)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Why an exchange with the upstream failed: the `reason` label's whole value set.
UPSTREAM_ERROR_REASONS = (
    "refused",  # no connection could be made
    "timeout",  # no connection, or no bytes for read_timeout_seconds, before or mid-answer
    "invalid_response",  # not HTTP/1.x, or the connection ended before a whole status and headers
    "closed_mid_answer",  # the body broke off: closed, reset, short, or its chunking broken
)


class LabelGuard:
    """Bounds the `model` and `tenant` label values.

    Tenants come from configuration, so they are bounded already. Models are either the
    configured list, or, when none is configured, learned from answers the upstream accepted
    (2xx) up to `max_models`: a made-up model name gets an error upstream and never becomes a
    label of its own.
    """

    def __init__(self, tenants: Iterable[str], models: Iterable[str], max_models: int) -> None:
        self._tenants = frozenset(tenants)
        self._models = set(models)
        self._learn_models = not self._models
        self._max_models = max_models

    def tenant(self, tenant: str) -> str:
        return tenant if tenant in self._tenants else OTHER

    def model(self, model: str | None, code: int | None) -> str:
        if model is None:
            return UNKNOWN_MODEL
        if model in self._models:
            return model
        if (
            self._learn_models
            and code is not None
            and 200 <= code < 300
            and len(self._models) < self._max_models
        ):
            self._models.add(model)
            return model
        return OTHER


class LabelledCounter(Collector):
    """A counter with labels, kept as one float per label set and exported at scrape time.

    It exports exactly what a `prometheus_client.Counter` with the same name and labels
    would (series appear at their first `inc`, in that order; `_created` is off), but an
    `inc` is one dict update: the client's `.labels().inc()` validates, converts and takes
    two locks, some 2 us per call and half a dozen calls per request on the event loop.
    Label values are given as a tuple of strings (the client would `str()` them). Not
    thread-safe: incremented and collected on the event loop's thread only (`/metrics` is
    served there)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        total = values.get(labels)
        if total is None:  # the series exists from here on, as `.labels()` would make it
            total = values[labels] = 0.0
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        values[labels] = total + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class LabelledHistogram(Collector):
    """A histogram with labels, kept as plain floats per label set: bucket counts, then the
    sum. Exports exactly what a `prometheus_client.Histogram` would (see `LabelledCounter`
    for why, and its thread rule)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if not bounds or bounds != sorted(bounds):
            raise ValueError(f"buckets must be sorted and not empty, got {buckets!r}")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(bound) for bound in bounds)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], amount: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 1)
        series[-1] += amount
        if amount == amount:  # NaN falls in no bucket, as in prometheus_client
            series[bisect_left(self.bounds, amount)] += 1.0

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self.series.items()):
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._le, series, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(labels, buckets, series[-1])
        yield family


class Metrics:
    def __init__(self, guard: LabelGuard, registry: CollectorRegistry | None = None) -> None:
        self.guard = guard
        self.registry = registry or CollectorRegistry()
        self.requests = LabelledCounter(
            "joulegate_requests",
            "Requests through joulegate, by the HTTP status sent to the client.",
            ["task", "model", "tenant", "code"],
        )
        self.duration = LabelledHistogram(
            "joulegate_request_duration_seconds",
            "Time from the request's arrival to the last byte of its answer.",
            ["task", "model"],
            buckets=DURATION_BUCKETS,
        )
        self.tokens = LabelledCounter(
            "joulegate_tokens",
            "Tokens processed, as reported by the upstream's usage.",
            ["task", "model", "tenant", "direction"],
        )
        self.images = LabelledCounter(
            "joulegate_images",
            "Images generated, as reported by the upstream.",
            ["model", "tenant"],
        )

        self.request_energy = LabelledHistogram(
            "joulegate_request_energy_joules",
            "Energy attributed to each request (its share of all device energy while it ran).",
            ["task", "model", "tenant"],
            buckets=ENERGY_BUCKETS,
        )
        self.energy = LabelledCounter(
            "joulegate_energy_joules",
            "Energy attributed to requests.",
            ["task", "model", "tenant"],
        )
        self.dynamic_energy = LabelledCounter(
            "joulegate_dynamic_energy_joules",
            "Energy attributed to requests above the devices' idle baseline.",
            ["task", "model", "tenant"],
        )
        self.carbon = LabelledCounter(
            "joulegate_carbon_grams",
            "Carbon attributed to requests: facility energy (x PUE) x grid intensity, gCO2e.",
            ["task", "model", "tenant"],
        )
        self.metered_requests = LabelledCounter(
            "joulegate_metered_requests",
            "Finished requests by the quality of their energy figure: measured, estimate"
            " (interpolated or from an estimating meter) or unknown (a device was unreadable).",
            ["task", "quality"],
        )
        for family in (
            self.requests,
            self.duration,
            self.tokens,
            self.images,
            self.request_energy,
            self.energy,
            self.dynamic_energy,
            self.carbon,
            self.metered_requests,
        ):
            self.registry.register(family)
        upstream_errors = Counter(
            "joulegate_upstream_errors",
            "Exchanges with the upstream that failed, by reason: before the answer started the"
            " client got a 502 or 504, after it the client's stream was cut (recorded aborted).",
            ["reason"],
            registry=self.registry,
        )
        # Every reason exported from the start (at 0), so rate() and alerts see the first one.
        self.upstream_errors = {
            reason: upstream_errors.labels(reason) for reason in UPSTREAM_ERROR_REASONS
        }

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        task = record.task
        model = self.guard.model(record.model, record.code)
        tenant = self.guard.tenant(record.tenant)
        group = (task, model, tenant)
        if record.meter is not None:
            if record.energy_joules is None:
                quality = "unknown"
            else:
                quality = "estimate" if record.estimate else "measured"
                self.request_energy.observe(group, record.energy_joules)
                self.energy.inc(group, record.energy_joules)
            if record.carbon_grams is not None:
                self.carbon.inc(group, record.carbon_grams)
            if record.dynamic_energy_joules is not None:
                self.dynamic_energy.inc(group, record.dynamic_energy_joules)
            self.metered_requests.inc((task, quality))
        self.requests.inc((task, model, tenant, str(record.code)))
        if record.duration_seconds is not None:
            self.duration.observe((task, model), record.duration_seconds)
        if record.input_tokens:
            self.tokens.inc((task, model, tenant, "input"), record.input_tokens)
        if record.output_tokens:
            self.tokens.inc((task, model, tenant, "output"), record.output_tokens)
        if record.images and task == "image-generation":  # not images classified
            self.images.inc((model, tenant), record.images)


class DeviceCollector(Collector):
    """Device-level series, read from the meter, sampler and attributor at scrape time.

    Reading at scrape time (rather than pushing from the sampler thread) keeps every value
    consistent with one moment and keeps the sampler free of Prometheus.
    """

    def __init__(self, meter: Meter, sampler: Sampler, attributor: Attributor) -> None:
        self.meter = meter
        self.sampler = sampler
        self.attributor = attributor

    def collect(self) -> Iterator[Metric]:
        device_energy = CounterMetricFamily(
            "joulegate_device_energy_joules",
            "Energy metered on each device since joulegate started.",
            labels=["device", "meter"],
        )
        for device, joules in self.attributor.metered.items():
            device_energy.add_metric([device, self.meter.name], joules)
        yield device_energy
        unattributed = CounterMetricFamily(
            "joulegate_unattributed_energy_joules",
            "Metered energy with no request in flight on the device (idle).",
            labels=["device"],
        )
        for device, joules in self.attributor.unattributed.items():
            unattributed.add_metric([device], joules)
        yield unattributed
        power = GaugeMetricFamily(
            "joulegate_device_power_watts",
            "Average device power over the last counter update period.",
            labels=["device"],
        )
        for device, watts in self.sampler.power_watts().items():
            if watts is not None:  # unknown is absent, never 0
                power.add_metric([device], watts)
        yield power
        up = GaugeMetricFamily(
            "joulegate_meter_up",
            "1 when the meter read every device at its last sample, else 0.",
            labels=["meter"],
        )
        up.add_metric([self.meter.name], 1.0 if self.meter.up else 0.0)
        yield up
        estimate = GaugeMetricFamily(
            "joulegate_meter_estimate",
            "1 when the meter estimates energy (CPU time x power) instead of measuring it.",
            labels=["meter"],
        )
        estimate.add_metric([self.meter.name], 1.0 if self.meter.estimate else 0.0)
        yield estimate
        snapshot = self.sampler.snapshot()
        samples = CounterMetricFamily(
            "joulegate_meter_samples", "Meter readings taken by the sampler.", labels=["meter"]
        )
        samples.add_metric([self.meter.name], float(snapshot["samples"]))  # type: ignore[arg-type]
        yield samples
        errors = CounterMetricFamily(
            "joulegate_meter_read_errors",
            "Meter readings that failed for at least one device.",
            labels=["meter"],
        )
        errors.add_metric([self.meter.name], float(snapshot["read_errors"]))  # type: ignore[arg-type]
        yield errors


class BudgetCollector(Collector):
    """Energy budget series, read from the budget engine at scrape time. Label values come
    from the configured budgets only."""

    def __init__(self, budgets: Budgets, clock: Callable[[], float] = time.time) -> None:
        self.budgets = budgets
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        statuses = self.budgets.status(self.clock())
        limit = GaugeMetricFamily(
            "joulegate_budget_joules",
            "The energy budget's limit per window.",
            labels=["budget", "tenant"],
        )
        used = GaugeMetricFamily(
            "joulegate_budget_used_joules",
            "Energy used in the budget's current window: measured, plus reservations in flight.",
            labels=["budget", "tenant"],
        )
        remaining = GaugeMetricFamily(
            "joulegate_budget_remaining_ratio",
            "The part of the budget left in its current window, 0 to 1.",
            labels=["budget", "tenant"],
        )
        window = GaugeMetricFamily(
            "joulegate_budget_window_seconds",
            "The length of the budget's current window: the pace its burn rate is judged by.",
            labels=["budget", "tenant"],
        )
        rejected = CounterMetricFamily(
            "joulegate_budget_rejected_requests",
            "Requests refused (429) because the budget was spent.",
            labels=["budget"],
        )
        degraded = CounterMetricFamily(
            "joulegate_budget_degraded_requests",
            "Requests admitted degraded (cheaper model or capped settings) because the budget"
            " was spent.",
            labels=["budget"],
        )
        for status in statuses:
            labels = [status.name, status.tenant]
            limit.add_metric(labels, status.limit_joules)
            used.add_metric(labels, status.used_joules)
            remaining.add_metric(labels, status.remaining_ratio)
            window.add_metric(labels, status.window_seconds)
            if status.action == "reject":
                rejected.add_metric([status.name], float(status.rejected))
            elif status.action == "degrade":
                degraded.add_metric([status.name], float(status.degraded))
        yield limit
        yield window
        yield used
        yield remaining
        yield rejected
        yield degraded


class LedgerCollector(Collector):
    """The ledger's counters, so a store in trouble shows before anyone asks for a record."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        stats = self.ledger.stats()
        for name, kind, value, text in (
            ("records_written", CounterMetricFamily, stats.written, "Records made durable."),
            (
                "failed_flushes",
                CounterMetricFamily,
                stats.failed_flushes,
                "Flushes the store refused (full or read-only disk, database down): retried.",
            ),
            (
                "dropped_records",
                CounterMetricFamily,
                stats.dropped,
                "Records that could not be kept: the backlog was full or the store gave up.",
            ),
            (
                "queued_records",
                GaugeMetricFamily,
                stats.queued,
                "Records accepted and not yet durable.",
            ),
        ):
            family = kind(f"joulegate_ledger_{name}", text, labels=["backend"])
            family.add_metric([stats.backend], float(value))
            yield family
        if stats.last_flush_seconds is not None:
            flush = GaugeMetricFamily(
                "joulegate_ledger_last_flush_seconds",
                "How long the last successful flush took.",
                labels=["backend"],
            )
            flush.add_metric([stats.backend], stats.last_flush_seconds)
            yield flush
