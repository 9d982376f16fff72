"""Energy budgets: per tenant (optionally per model or task), per calendar or rolling window,
and what happens once one is spent: `alert` (metrics only), `reject` (429) or `degrade`
(a cheaper model, or capped max_tokens, image size or steps).

Policy only: no HTTP and no clock of its own. Every call takes `now` (Unix seconds), so
windows, reservations and their ageing are plain arithmetic that tests drive directly.

Admission reserves an estimate of the request's energy (the recent p95 for its task and
model) against every budget that applies, and the measured energy replaces the reservation
once the request's record is published. Concurrent requests see each other's reservations,
so a burst cannot overshoot a budget by more than the error of one estimate. Energy is
counted in the bucket of the request's start, the time the ledger keeps it under, so the
used energy can be rebuilt from stored records (`Budgets.load`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger("joulegate.budgets")

ALERT, REJECT, DEGRADE = "alert", "reject", "degrade"
ACTIONS = (ALERT, REJECT, DEGRADE)
ALLOW = "allow"
EVERY_TENANT = "*"  # a budget shared by all tenants together
CALENDAR_WINDOWS = ("day", "week", "month")
ROLLING_BUCKETS = 60  # a rolling window keeps its energy in 1/60ths of its length
MIN_ROLLING_SECONDS = 60
_ENERGY_UNITS = {"j": 1.0, "kj": 1e3, "wh": 3600.0, "kwh": 3.6e6, "mwh": 3.6e9}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_STATE_VERSION = 1


# ---- configuration ----


@dataclass(frozen=True, slots=True)
class Degrade:
    """What a `degrade` budget changes in a request once it is spent."""

    model: str | None = None
    max_tokens: int | None = None
    size: str | None = None  # "WxH"
    steps: int | None = None

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in _fields(self) if value is not None]
        return ", ".join(parts)


def _fields(degrade: Degrade) -> list[tuple[str, Any]]:
    return [(name, getattr(degrade, name)) for name in ("model", "max_tokens", "size", "steps")]


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """One configured budget. `tenant` is a tenant name, or `*` for all tenants together."""

    name: str
    tenant: str
    limit_joules: float
    window: str  # "day", "week", "month" or "rolling:<seconds>s"
    action: str
    model: str | None = None
    task: str | None = None
    degrade: Degrade | None = None

    @property
    def scope(self) -> BudgetScope:
        return BudgetScope(self.tenant, self.model, self.task)


@dataclass(frozen=True, slots=True)
class BudgetScope:
    """Which requests a budget counts: for the ledger's `sum_energy(scope, start, end)`."""

    tenant: str  # "*" for every tenant
    model: str | None = None
    task: str | None = None

    def matches(self, tenant: str, task: str, model: str | None) -> bool:
        return (
            (self.tenant == EVERY_TENANT or self.tenant == tenant)
            and (self.model is None or self.model == model)
            and (self.task is None or self.task == task)
        )


def parse_energy(value: Any) -> float:
    """Joules from "5 kWh", "500 Wh", "1800 J" (also kJ and MWh)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*", str(value))
    if isinstance(value, bool) or not match or match.group(2).lower() not in _ENERGY_UNITS:
        raise ValueError(f"expected an energy such as 5 kWh, 500 Wh or 1800 J, got {value!r}")
    joules = float(match.group(1)) * _ENERGY_UNITS[match.group(2).lower()]
    if not 0 < joules < math.inf:
        raise ValueError(f"expected a positive energy, got {value!r}")
    return joules


def parse_window(value: Any) -> str:
    """`day`, `week` (from Monday), `month`, or `rolling:<N><s|m|h|d>`; rolling ones come
    back in seconds (`rolling:5400s`), so equal windows compare equal."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in CALENDAR_WINDOWS:
        return text
    match = re.fullmatch(r"rolling:\s*([0-9]{1,7})\s*([smhd])", text or "")
    if not match:
        raise ValueError(
            f"expected day, week, month or rolling:<N><s|m|h|d> (rolling:24h), got {value!r}"
        )
    seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < MIN_ROLLING_SECONDS:
        raise ValueError(f"a rolling window is at least {MIN_ROLLING_SECONDS}s, got {value!r}")
    return f"rolling:{seconds}s"


def parse_size(value: Any) -> str:
    match = _SIZE.fullmatch(str(value).strip().lower()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected an image size WIDTHxHEIGHT such as 512x512, got {value!r}")
    return f"{int(match.group(1))}x{int(match.group(2))}"


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _parse_degrade(value: Any) -> Degrade:
    if not isinstance(value, dict) or not value:
        raise ValueError("degrade must be a map with model, max_tokens, size and/or steps")
    unknown = set(value) - {"model", "max_tokens", "size", "steps"}
    if unknown:
        raise ValueError(f"degrade: unknown keys {sorted(map(str, unknown))}")
    model = value.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError(f"degrade.model must be a model name, got {model!r}")
    tokens, size, steps = value.get("max_tokens"), value.get("size"), value.get("steps")
    return Degrade(
        model=model.strip() if model is not None else None,
        max_tokens=None if tokens is None else _count(tokens, "degrade.max_tokens"),
        size=None if size is None else parse_size(size),
        steps=None if steps is None else _count(steps, "degrade.steps"),
    )


_BUDGET_KEYS = {"name", "tenant", "model", "task", "limit", "window", "action", "degrade"}


def parse_budgets(value: Any, tasks: Iterable[str]) -> tuple[BudgetSpec, ...]:
    """The `budgets` setting: a list of {name, tenant, model?, task?, limit, window, action,
    degrade?}. Raises ValueError naming the entry."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("expected a list of {name, tenant, limit, window, action} entries")
    known_tasks = tuple(tasks)
    budgets: list[BudgetSpec] = []
    for index, entry in enumerate(value):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a map with name, tenant, limit, window, action")
        name = entry.get("name")
        if isinstance(name, str) and _NAME.fullmatch(name):
            where = f"entry {index} ({name})"
        try:
            budgets.append(_parse_budget(entry, known_tasks))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    names = [budget.name for budget in budgets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"budget names must be unique: {', '.join(duplicates)}")
    return tuple(budgets)


def _parse_budget(entry: dict[str, Any], tasks: tuple[str, ...]) -> BudgetSpec:
    unknown = set(entry) - _BUDGET_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}")
    missing = [key for key in ("name", "tenant", "limit", "window", "action") if key not in entry]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    name, tenant = entry["name"], entry["tenant"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(tenant, str) or not (tenant == EVERY_TENANT or _NAME.fullmatch(tenant)):
        raise ValueError(f"tenant {tenant!r} must be a tenant name, or * for every tenant")
    model, task = entry.get("model"), entry.get("task")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"model must be a model name, got {model!r}")
    if task is not None and task not in tasks:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(tasks)})")
    action = entry["action"]
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    degrade = None
    if action == DEGRADE:
        if entry.get("degrade") is None:
            raise ValueError("action degrade needs degrade: {model, max_tokens, size, steps}")
        degrade = _parse_degrade(entry["degrade"])
    elif entry.get("degrade") is not None:
        raise ValueError(f"degrade is only for action degrade, not {action}")
    return BudgetSpec(
        name=name,
        tenant=tenant,
        limit_joules=parse_energy(entry["limit"]),
        window=parse_window(entry["window"]),
        action=action,
        model=model,
        task=task,
        degrade=degrade,
    )


def parse_timezone(value: Any) -> str:
    """An IANA time zone name (`Europe/Berlin`), checked against the system's tz database."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an IANA time zone such as Europe/Berlin, got {value!r}")
    try:
        ZoneInfo(value.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC)") from None
    return value.strip()


# ---- windows ----


class CalendarWindow:
    """Days, weeks (from Monday) or months in a time zone: each starts at local midnight, so
    a day across a DST change lasts 23 or 25 hours. Energy is kept per window (bucket key =
    the window's start)."""

    def __init__(self, period: str, zone: ZoneInfo) -> None:
        assert period in CALENDAR_WINDOWS, period
        self.spec = period
        self.zone = zone
        self._current = (math.inf, -math.inf)

    def _first_day(self, day: date) -> date:
        if self.spec == "week":
            return day - timedelta(days=day.weekday())
        if self.spec == "month":
            return day.replace(day=1)
        return day

    def _next_day(self, first: date) -> date:
        if self.spec == "day":
            return first + timedelta(days=1)
        if self.spec == "week":
            return first + timedelta(days=7)
        return date(first.year + first.month // 12, first.month % 12 + 1, 1)

    def _midnight(self, day: date) -> float:
        # fold=0: a midnight skipped by DST maps to the moment of the change, the first
        # instant of that local day; an ambiguous one to its first occurrence.
        return datetime(day.year, day.month, day.day, tzinfo=self.zone).timestamp()

    def bounds(self, now: float) -> tuple[float, float]:
        """[start, end) of the window holding `now`."""
        start, end = self._current
        if start <= now < end:
            return start, end
        first = self._first_day(datetime.fromtimestamp(now, self.zone).date())
        start, end = self._midnight(first), self._midnight(self._next_day(first))
        for _ in range(3):  # a local date that repeats (clocks back over midnight)
            if now < end:
                break
            first = self._next_day(first)
            start, end = end, self._midnight(self._next_day(first))
        self._current = (start, end)
        return start, end

    def bucket(self, when: float) -> float:
        return self.bounds(when)[0]

    def live(self, key: float, now: float) -> bool:
        return key >= self.bounds(now)[0]

    def retry_after(self, buckets: Mapping[float, float], excess: float, now: float) -> float:
        """Seconds until enough energy stops counting: a calendar window resets at its end."""
        return self.bounds(now)[1] - now

    def bucket_ranges(self, now: float) -> list[tuple[float, float]]:
        start, _ = self.bounds(now)
        return [(start, now)]


class RollingWindow:
    """The last `seconds`, kept in 60 buckets: energy counts until its bucket is older than
    the window, so the window is at most 1/60 longer than configured (never shorter)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.width = self.seconds / ROLLING_BUCKETS
        self.spec = f"rolling:{int(seconds)}s"

    def bounds(self, now: float) -> tuple[float, float]:
        return now - self.seconds, now

    def bucket(self, when: float) -> float:
        return math.floor(when / self.width) * self.width

    def live(self, key: float, now: float) -> bool:
        return key + self.width > now - self.seconds

    def retry_after(self, buckets: Mapping[float, float], excess: float, now: float) -> float:
        """Seconds until the oldest buckets holding `excess` Joules have aged out; the
        window's length when that never frees enough (the request is larger than the limit)."""
        freed = 0.0
        for key in sorted(buckets):
            freed += buckets[key]
            if freed >= excess:
                return max(0.0, key + self.width + self.seconds - now)
        return self.seconds

    def bucket_ranges(self, now: float) -> list[tuple[float, float]]:
        first = self.bucket(now - self.seconds)
        return [
            (first + i * self.width, min(now, first + (i + 1) * self.width))
            for i in range(ROLLING_BUCKETS + 1)
            if first + i * self.width <= now
        ]


Window = CalendarWindow | RollingWindow


def make_window(spec: str, zone: ZoneInfo) -> Window:
    if spec.startswith("rolling:"):
        return RollingWindow(float(spec.removeprefix("rolling:").removesuffix("s")))
    return CalendarWindow(spec, zone)


# ---- the estimator ----


def study_estimates() -> dict[str, float]:
    """Joules per request by task from the study's Table 2 (mean kWh per 1,000 inferences on
    an A100, real-size models, batch 1): the reservation before any request of a task and
    model was metered here."""
    from proxy.study import study_figures

    return {task: figure.kwh_per_1000_mean * 3600.0 for task, figure in study_figures().items()}


class Estimator:
    """The recent p95 energy per (task, model): the last `samples` metered requests of each,
    for at most `max_keys` pairs (least recently seen forgotten first). With fewer than
    `min_samples` for a pair, the task's p95 over all its models; with fewer still, the
    default: a configured number, else the study's figure for the task (text generation's
    for tasks the study did not measure)."""

    def __init__(
        self,
        default_joules: float | None = None,
        *,
        samples: int = 100,
        min_samples: int = 3,
        max_keys: int = 512,
    ) -> None:
        self.samples = samples
        self.min_samples = min_samples
        self.max_keys = max_keys
        self._default = default_joules
        self._study = study_estimates() if default_joules is None else {}
        self._fallback = self._study.get("text-generation", 169.2)
        self._pairs: OrderedDict[tuple[str, str | None], deque[float]] = OrderedDict()
        self._tasks: dict[str, deque[float]] = {}
        self._p95: dict[object, float] = {}  # cache, dropped on every new sample of its key

    def default(self, task: str) -> float:
        if self._default is not None:
            return self._default
        return self._study.get(task, self._fallback)

    def observe(self, task: str, model: str | None, joules: float) -> None:
        if not (joules >= 0 and math.isfinite(joules)):
            return
        key = (task, model)
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = deque(maxlen=self.samples)
            while len(self._pairs) > self.max_keys:
                forgotten, _ = self._pairs.popitem(last=False)
                self._p95.pop(forgotten, None)
        else:
            self._pairs.move_to_end(key)
        pair.append(joules)
        self._tasks.setdefault(task, deque(maxlen=self.samples)).append(joules)
        self._p95.pop(key, None)
        self._p95.pop(task, None)

    def estimate(self, task: str, model: str | None) -> float:
        key = (task, model)
        cached = self._p95.get(key)
        if cached is not None:
            return cached
        pair = self._pairs.get(key)
        if pair is not None and len(pair) >= self.min_samples:
            value = self._p95[key] = p95(pair)
            return value
        cached = self._p95.get(task)
        if cached is not None:
            return cached
        of_task = self._tasks.get(task)
        if of_task is not None and len(of_task) >= self.min_samples:
            value = self._p95[task] = p95(of_task)
            return value
        return self.default(task)


def p95(values: Iterable[float]) -> float:
    """The 95th percentile by nearest rank: a value that was actually seen."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("p95 of nothing")
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# ---- the engine ----


class Account:
    """One budget's used energy: settled (measured) and reserved (in flight), by bucket."""

    def __init__(self, spec: BudgetSpec, window: Window) -> None:
        self.spec = spec
        self.window = window
        self.settled: dict[float, float] = {}
        self.reserved: dict[float, float] = {}
        self._holds: dict[float, int] = {}  # reservations in flight per bucket
        self.rejected = 0
        self.degraded = 0

    def prune(self, now: float) -> None:
        for buckets in (self.settled, self.reserved, self._holds):
            for key in [key for key in buckets if not self.window.live(key, now)]:
                del buckets[key]

    def used(self, now: float) -> float:
        self.prune(now)
        return sum(self.settled.values()) + sum(self.reserved.values())

    def add(self, buckets: dict[float, float], key: float, joules: float) -> None:
        buckets[key] = buckets.get(key, 0.0) + joules

    def reserve(self, key: float, joules: float) -> None:
        self.reserved[key] = self.reserved.get(key, 0.0) + joules
        self._holds[key] = self._holds.get(key, 0) + 1

    def unreserve(self, key: float, joules: float) -> None:
        """Drop one reservation; a bucket's last one clears it exactly (no float residue)."""
        holds = self._holds.get(key, 0)
        if holds <= 1:
            self.reserved.pop(key, None)
            self._holds.pop(key, None)
        else:
            self._holds[key] = holds - 1
            self.reserved[key] -= joules

    def retry_after(self, excess: float, now: float) -> int:
        merged = dict(self.settled)
        for key, joules in self.reserved.items():
            merged[key] = merged.get(key, 0.0) + joules
        return max(1, math.ceil(self.window.retry_after(merged, excess, now)))


@dataclass(slots=True)
class Admission:
    """What admission decided for one request, and the reservation it holds until settled."""

    decision: str  # allow, reject or degrade
    estimate_joules: float
    budgets: tuple[str, ...]  # every budget that applies to the request
    exceeded: tuple[str, ...] = ()  # the spent budgets whose action decided (reject/degrade)
    retry_after_seconds: int | None = None  # for reject: until the budget has room again
    degrade: Degrade | None = None
    # (account, bucket, Joules reserved) per applicable budget; empty when rejected.
    charges: list[tuple[Account, float, float]] = field(default_factory=list)
    done: bool = False

    @property
    def rejected(self) -> bool:
        return self.decision == REJECT

    @property
    def reserved_joules(self) -> float:
        return self.charges[0][2] if self.charges else 0.0


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    name: str
    tenant: str
    action: str
    limit_joules: float
    used_joules: float  # settled + reserved in the current window
    rejected: int
    degraded: int
    spec: BudgetSpec
    window_start: float  # the current window's bounds, Unix seconds
    window_end: float

    @property
    def window_seconds(self) -> float:
        """The current window's length (calendar days vary with DST)."""
        return self.window_end - self.window_start

    @property
    def remaining_ratio(self) -> float:
        return max(0.0, self.limit_joules - self.used_joules) / self.limit_joules


SumEnergy = Callable[[BudgetScope, float, float], Awaitable[float]]


class Budgets:
    """The budget engine. Runs on the event loop's thread (no locks): `admit` in the request
    handler, `settle` when the record is published."""

    def __init__(
        self,
        specs: Iterable[BudgetSpec],
        *,
        timezone: str = "UTC",
        default_estimate_joules: float | None = None,
        estimator: Estimator | None = None,
    ) -> None:
        self.zone = ZoneInfo(timezone)
        self.accounts: dict[str, Account] = {
            spec.name: Account(spec, make_window(spec.window, self.zone)) for spec in specs
        }
        self.estimator = estimator or Estimator(default_estimate_joules)
        self._by_tenant: dict[str, list[Account]] = {}
        self._every_tenant: list[Account] = []
        for account in self.accounts.values():
            if account.spec.tenant == EVERY_TENANT:
                self._every_tenant.append(account)
            else:
                self._by_tenant.setdefault(account.spec.tenant, []).append(account)
        self.changed = False  # since the last snapshot

    def applicable(self, tenant: str, task: str, model: str | None) -> list[Account]:
        """The budgets that count a request, in configuration order."""
        candidates = self._by_tenant.get(tenant, [])
        if self._every_tenant:
            candidates = [*candidates, *self._every_tenant]
        return [a for a in candidates if a.spec.scope.matches(tenant, task, model)]

    def admit(self, tenant: str, task: str, model: str | None, now: float) -> Admission:
        """Decide, and reserve the estimate on every applicable budget unless rejected.

        A budget is spent for this request when its used energy (settled + reserved) plus
        the request's estimate would exceed its limit. Spent `degrade` budgets rewrite the
        request (the estimate is then the degraded model's); spent `reject` budgets refuse
        it; spent `alert` budgets only show in metrics."""
        accounts = self.applicable(tenant, task, model)
        if not accounts:
            return Admission(ALLOW, 0.0, ())
        estimate = self.estimator.estimate(task, model)
        used = [account.used(now) for account in accounts]
        degrading = [
            a
            for a, u in zip(accounts, used, strict=True)
            if a.spec.action == DEGRADE and u + estimate > a.spec.limit_joules
        ]
        degrade = merge_degrades([a.spec.degrade for a in degrading if a.spec.degrade])
        if degrade is not None and degrade.model is not None and degrade.model != model:
            estimate = self.estimator.estimate(task, degrade.model)
        names = tuple(a.spec.name for a in accounts)
        rejecting = [
            (a, u + estimate - a.spec.limit_joules)
            for a, u in zip(accounts, used, strict=True)
            if a.spec.action == REJECT and u + estimate > a.spec.limit_joules
        ]
        if rejecting:
            for account, _ in rejecting:
                account.rejected += 1
            retry = max(account.retry_after(excess, now) for account, excess in rejecting)
            exceeded = tuple(a.spec.name for a, _ in rejecting)
            return Admission(REJECT, estimate, names, exceeded, retry)
        admission = Admission(
            DEGRADE if degrade is not None else ALLOW,
            estimate,
            names,
            tuple(a.spec.name for a in degrading),
            degrade=degrade,
        )
        for account in accounts:
            key = account.window.bucket(now)
            account.reserve(key, estimate)
            admission.charges.append((account, key, estimate))
        for account in degrading:
            account.degraded += 1
        return admission

    def settle(self, admission: Admission, measured_joules: float | None, now: float) -> None:
        """The request's energy is known: it replaces the reservation. Unknown energy (the
        meter could not tell) keeps the estimate as used, never 0."""
        if admission.done:
            return
        admission.done = True
        joules = admission.reserved_joules if measured_joules is None else measured_joules
        for account, key, reserved in admission.charges:
            account.unreserve(key, reserved)
            if account.window.live(key, now):
                account.add(account.settled, key, joules)
        if admission.charges:
            self.changed = True

    def charge(
        self,
        tenant: str,
        task: str,
        model: str | None,
        joules: float,
        started_at: float,
        now: float,
    ) -> None:
        """Measured energy of a request that holds no reservation (refused, released, or
        answered by joulegate itself): it still counts, as it will in the ledger's sums."""
        if not joules > 0:
            return
        for account in self.applicable(tenant, task, model):
            key = account.window.bucket(started_at)
            if account.window.live(key, now):
                account.add(account.settled, key, joules)
                self.changed = True

    def release(self, admission: Admission) -> None:
        """The request never reached the upstream: its reservation is dropped at once (its
        record's small measured share is `charge`d when published, like any record's)."""
        if admission.done:
            return
        admission.done = True
        for account, key, reserved in admission.charges:
            account.unreserve(key, reserved)

    def learn(self, task: str, model: str | None, joules: float | None) -> None:
        """A metered request, for the estimator."""
        if joules is not None:
            self.estimator.observe(task, model, joules)

    def seed(self, name: str, used_joules: float, now: float) -> None:
        """Set the settled energy of budget `name`'s current window (from a store at start-up),
        all in the current bucket. Reservations in flight are kept."""
        account = self.accounts[name]
        account.settled.clear()
        if used_joules > 0:
            account.settled[account.window.bucket(now)] = float(used_joules)
        self.changed = True

    async def load(self, sum_energy: SumEnergy, now: float) -> None:
        """Rebuild every budget's settled energy in its current window from stored records:
        `sum_energy(scope, start, end)` returns the Joules of the records in `scope` that
        started in [start, end). Calendar windows ask once; rolling windows once per bucket,
        so their energy ages out as it would have. Reservations in flight are kept."""
        for account in self.accounts.values():
            settled: dict[float, float] = {}
            for start, end in account.window.bucket_ranges(now):
                joules = await sum_energy(account.spec.scope, start, end)
                if joules and joules > 0:
                    key = account.window.bucket(start)
                    settled[key] = settled.get(key, 0.0) + float(joules)
            account.settled = settled
        self.changed = True

    def status(self, now: float) -> list[BudgetStatus]:
        return [
            BudgetStatus(
                account.spec.name,
                account.spec.tenant,
                account.spec.action,
                account.spec.limit_joules,
                account.used(now),
                account.rejected,
                account.degraded,
                account.spec,
                *account.window.bounds(now),
            )
            for account in self.accounts.values()
        ]

    # ---- a small state file, so budgets survive a restart without a ledger ----

    def snapshot(self, now: float) -> dict[str, Any]:
        """Used energy per budget and bucket, reservations in flight counted as used."""
        budgets = {}
        for name, account in self.accounts.items():
            account.prune(now)
            merged = dict(account.settled)
            for key, joules in account.reserved.items():
                merged[key] = merged.get(key, 0.0) + joules
            spec = account.spec
            budgets[name] = {
                "window": spec.window,
                "scope": [spec.tenant, spec.model, spec.task],
                "buckets": [[key, joules] for key, joules in sorted(merged.items())],
            }
        self.changed = False
        return {"version": _STATE_VERSION, "saved_at": now, "budgets": budgets}

    def restore(self, document: Mapping[str, Any], now: float) -> list[str]:
        """Take the settled energy back from a snapshot, for the budgets whose window and scope
        are unchanged (a changed limit keeps what was used). Returns the budgets restored."""
        if not isinstance(document, Mapping) or document.get("version") != _STATE_VERSION:
            raise ValueError("not a joulegate budget state (version 1)")
        saved = document.get("budgets")
        if not isinstance(saved, Mapping):
            raise ValueError("budget state without budgets")
        restored = []
        for name, account in self.accounts.items():
            entry = saved.get(name)
            spec = account.spec
            if not isinstance(entry, Mapping) or entry.get("window") != spec.window:
                continue
            if entry.get("scope") != [spec.tenant, spec.model, spec.task]:
                continue
            for key, joules in entry.get("buckets") or []:
                key, joules = float(key), float(joules)
                if account.window.live(key, now) and math.isfinite(joules) and joules > 0:
                    account.add(account.settled, key, joules)
            restored.append(name)
        return restored


def merge_degrades(degrades: list[Degrade]) -> Degrade | None:
    """Several spent degrade budgets: the first model named, the smallest caps."""
    if not degrades:
        return None
    models = [d.model for d in degrades if d.model is not None]
    tokens = [d.max_tokens for d in degrades if d.max_tokens is not None]
    steps = [d.steps for d in degrades if d.steps is not None]
    sizes = [d.size for d in degrades if d.size is not None]
    return Degrade(
        model=models[0] if models else None,
        max_tokens=min(tokens) if tokens else None,
        size=min(sizes, key=_pixels) if sizes else None,
        steps=min(steps) if steps else None,
    )


def _pixels(size: str) -> int:
    match = _SIZE.fullmatch(size.strip().lower())
    return int(match.group(1)) * int(match.group(2)) if match else 0


# ---- degrading a request body ----


def _capped(body: dict[str, Any], key: str, cap: int, changes: list[str], add: bool) -> bool:
    """Cap a numeric setting the request names (or set it, with `add`); True if named."""
    if key not in body and not add:
        return False
    old = body.get(key)
    number = old if isinstance(old, int | float) and not isinstance(old, bool) else None
    if number is None or number > cap:
        body[key] = cap
        changes.append(f"{key} {'unset' if old is None else old}→{cap}")
    return key in body


def degrade_body(
    body: Mapping[str, Any], task: str, degrade: Degrade
) -> tuple[dict[str, Any], list[str]]:
    """The request body with a degrade applied, and what changed (`model a→b`, `max_tokens
    512→64`). Caps lower what the request names and never raise it; a text-generation request
    that names no token limit gets `max_tokens` (servers otherwise generate up to the context
    length), and an image-generation request with no size or steps gets the caps (its server's
    defaults are unknown here). A model named in the path, not the body, is left alone."""
    new = dict(body)
    changes: list[str] = []
    model = new.get("model")
    if degrade.model is not None and isinstance(model, str) and model != degrade.model:
        new["model"] = degrade.model
        changes.append(f"model {model}→{degrade.model}")
    if degrade.max_tokens is not None:
        named = False
        for key in ("max_completion_tokens", "max_tokens"):
            named = _capped(new, key, degrade.max_tokens, changes, add=False) or named
        parameters = new.get("parameters")
        if isinstance(parameters, dict):  # TGI: {"inputs", "parameters": {"max_new_tokens"}}
            parameters = dict(parameters)
            add = task == "text-generation" and not named
            named = _capped(parameters, "max_new_tokens", degrade.max_tokens, changes, add) or named
            new["parameters"] = parameters
        if not named and task == "text-generation":
            if "inputs" in new:
                parameters = {}
                _capped(parameters, "max_new_tokens", degrade.max_tokens, changes, add=True)
                new["parameters"] = parameters
            else:
                _capped(new, "max_tokens", degrade.max_tokens, changes, add=True)
    if task == "image-generation":
        if degrade.size is not None:
            size = new.get("size")
            pixels = _pixels(size) if isinstance(size, str) else 0
            if pixels == 0 or pixels > _pixels(degrade.size):
                new["size"] = degrade.size
                changes.append(f"size {'unset' if size is None else size}→{degrade.size}")
        if degrade.steps is not None:
            _capped(new, "num_inference_steps", degrade.steps, changes, add=True)
    return new, changes


# ---- the state file ----


def read_state(path: str | Path) -> dict[str, Any] | None:
    """The saved budget state, or None when there is none yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return document


def write_state(path: str | Path, document: Mapping[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous state, never half a file."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(document, file, separators=(",", ":"))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
