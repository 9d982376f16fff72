"""Prometheus metrics from finished request records (names as in DESIGN.md).

Label values that come from clients pass through `LabelGuard`, so no client can create
unbounded series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.records import RequestRecord

OTHER = "other"
UNKNOWN_MODEL = "unknown"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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


class Metrics:
    def __init__(self, guard: LabelGuard, registry: CollectorRegistry | None = None) -> None:
        self.guard = guard
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "joulegate_requests",
            "Requests through joulegate, by the HTTP status sent to the client.",
            ["task", "model", "tenant", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "joulegate_request_duration_seconds",
            "Time from the request's arrival to the last byte of its answer.",
            ["task", "model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "joulegate_tokens",
            "Tokens processed, as reported by the upstream's usage.",
            ["task", "model", "tenant", "direction"],
            registry=self.registry,
        )
        self.images = Counter(
            "joulegate_images",
            "Images generated, as reported by the upstream.",
            ["model", "tenant"],
            registry=self.registry,
        )

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        model = self.guard.model(record.model, record.code)
        tenant = self.guard.tenant(record.tenant)
        self.requests.labels(record.task, model, tenant, str(record.code)).inc()
        if record.duration_seconds is not None:
            self.duration.labels(record.task, model).observe(record.duration_seconds)
        if record.input_tokens:
            self.tokens.labels(record.task, model, tenant, "input").inc(record.input_tokens)
        if record.output_tokens:
            self.tokens.labels(record.task, model, tenant, "output").inc(record.output_tokens)
        if record.images:
            self.images.labels(model, tenant).inc(record.images)
