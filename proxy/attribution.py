"""Energy attribution: split metered device energy between the requests in flight.

This is the *monitor* layer's pure core (see DESIGN.md, "Energy attribution"). It has no clock,
no I/O and no threads: every time it knows comes from its inputs (request spans and meter
readings), so the same inputs always give the same Joules, and the property tests can replay any
timeline. The model is Zeus's measurement windows cut at request boundaries and Kepler's split of
a device's energy between its consumers:

* Between two readings the device's power is taken as constant.
* The interval is cut at every request start and end inside it; each piece's energy goes to the
  requests in flight on that device during it, in proportion to their weights (equal by default).
* Pieces with nobody in flight are *unattributed* (idle), so for every device
  ``attributed + unattributed == metered`` (conservation) holds to floating-point precision.

:func:`split_interval` is the one-interval rule; :class:`Attributor` drives it from a stream of
cumulative meter readings and handles what real meters do: counters that only move every
``update_period`` (quantisation), unreadable devices (``None``), and requests shorter than the
counter can resolve.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.meter.base import Meter, Reading

__all__ = [
    "Attribution",
    "Attributor",
    "IntervalShares",
    "Span",
    "split_interval",
]


# Span and Attribution are made for every request: not frozen, since a frozen dataclass
# costs about 5 times as much to create. Neither is changed after it is made.
@dataclass(slots=True)
class Span:
    """One request's time on the devices.

    ``end`` is ``None`` while the request is in flight. ``devices`` is ``None`` for "every metered
    device" (the default routing), else the devices serving the request's upstream. ``weight`` is
    the request's relative claim on a shared piece (a weight policy; 1.0 = equal shares).
    """

    request_id: str
    start: float
    end: float | None = None
    weight: float = 1.0
    devices: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.start):
            raise ValueError(f"span start must be finite, got {self.start!r}")
        if self.end is not None and not (math.isfinite(self.end) and self.end >= self.start):
            raise ValueError(f"span end {self.end!r} must be finite and >= start {self.start!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"span weight must be finite and > 0, got {self.weight!r}")

    def on(self, device: str) -> bool:
        """Whether this span draws on ``device``."""
        return self.devices is None or device in self.devices


@dataclass(frozen=True, slots=True)
class IntervalShares:
    """How one interval's energy was split.

    ``energy`` and ``dynamic`` are keyed by request id and include every span that was in flight
    for a non-empty part of the interval (possibly with 0.0). ``dynamic`` is empty when the idle
    power was unknown. ``unattributed`` is the energy of the pieces with nobody in flight.
    """

    energy: dict[str, float]
    dynamic: dict[str, float]
    unattributed: float


def split_interval(
    t0: float,
    t1: float,
    joules: float,
    spans: Iterable[Span],
    idle_watts: float | None,
    *,
    device: str | None = None,
) -> IntervalShares:
    """Split ``joules`` metered over ``[t0, t1]`` between the spans in flight.

    Power is constant within the interval, so a piece's energy is proportional to its length.
    The interval is cut at every span start/end inside it; a piece goes to the spans covering it
    by weight, or to ``unattributed`` when none does. Dynamic energy is each piece's energy above
    ``idle_watts * piece_length`` (floored at 0, since power below the idle estimate is noise, not
    negative work), split the same way; with ``idle_watts=None`` no dynamic shares are given.

    When ``device`` is given, spans not on that device are ignored (the caller may pass all spans).
    Piece energies are taken as differences of the cumulative fraction of ``joules`` so they sum
    back to ``joules`` to rounding, which keeps conservation tight over millions of intervals.
    """
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise ValueError(f"interval needs finite t1 > t0, got [{t0!r}, {t1!r}]")
    if not (math.isfinite(joules) and joules >= 0):
        raise ValueError(f"interval energy must be finite and >= 0, got {joules!r}")
    if idle_watts is not None and not (math.isfinite(idle_watts) and idle_watts >= 0):
        raise ValueError(f"idle_watts must be finite and >= 0, got {idle_watts!r}")

    live = [
        s
        for s in spans
        if (device is None or s.on(device))
        and s.start < t1
        and (s.end is None or s.end > t0)
        and (s.end is None or s.end > s.start)
    ]
    bounds = sorted(
        {t0, t1}
        | {s.start for s in live if s.start > t0}
        | {s.end for s in live if s.end is not None and s.end < t1}
    )
    index = {t: i for i, t in enumerate(bounds)}
    # A sweep over the pieces: how many spans and how much weight are in flight in each.
    pieces = len(bounds) - 1
    count_change = [0] * (pieces + 1)
    weight_change = [0.0] * (pieces + 1)
    extent = []  # each span's first and past-last piece
    for s in live:
        first = index[max(s.start, t0)]
        last = index[t1 if s.end is None or s.end > t1 else s.end]
        extent.append((first, last))
        count_change[first] += 1
        count_change[last] -= 1
        weight_change[first] += s.weight
        weight_change[last] -= s.weight
    flying, weights = [], []
    count, weight = 0, 0.0
    for i in range(pieces):
        count += count_change[i]
        weight += weight_change[i]
        flying.append(count > 0)
        weights.append(weight)

    lengths = [b - a for a, b in pairwise(bounds)]
    levels = _power_levels(t1 - t0, joules, lengths, flying, idle_watts)
    total_level = math.fsum(length * level for length, level in zip(lengths, levels, strict=True))
    # Energy per unit of weight, accumulated piece by piece: a span's share of the interval is
    # its weight times the difference of this sum across its pieces (linear, not pieces x spans).
    per_weight = [0.0]
    extra_per_weight = [0.0]
    unattributed = 0.0
    done = 0.0  # cumulative energy of the pieces so far
    reached = 0.0  # cumulative (length x level) of the pieces so far
    for i in range(pieces):
        reached += lengths[i] * levels[i]
        upto = joules if i == pieces - 1 or total_level == 0 else joules * (reached / total_level)
        piece = upto - done
        done = upto
        if not flying[i]:
            unattributed += piece
            per_weight.append(per_weight[-1])
            extra_per_weight.append(extra_per_weight[-1])
            continue
        per_weight.append(per_weight[-1] + piece / weights[i])
        if idle_watts is not None:
            extra = max(0.0, piece - idle_watts * lengths[i])
            extra_per_weight.append(extra_per_weight[-1] + extra / weights[i])

    energy: dict[str, float] = {}
    dynamic: dict[str, float] = {}
    for s, (first, last) in zip(live, extent, strict=True):
        if last <= first:
            continue
        energy[s.request_id] = s.weight * (per_weight[last] - per_weight[first])
        if idle_watts is not None:
            dynamic[s.request_id] = s.weight * (extra_per_weight[last] - extra_per_weight[first])
    return IntervalShares(energy=energy, dynamic=dynamic, unattributed=unattributed)


def _power_levels(
    duration: float,
    joules: float,
    lengths: Sequence[float],
    flying: Sequence[bool],
    idle_watts: float | None,
) -> list[float]:
    """Relative power of each piece: idle pieces at the idle baseline, busy ones at the rest.

    A merged counter window often holds a request's edge: part idle, part busy. Spreading its
    energy evenly (one constant power) moves about update_period x (busy - idle power) / 6 of
    every request's energy into the idle gap beside it, 2.5 % of a 1 s request at a 100 ms
    counter. With a known idle baseline the window's energy is split as two levels instead:
    idle pieces draw the baseline, busy pieces the remainder. When the window's energy is
    below what idle would draw (noise), or nothing is known of idle, power is one constant.
    """
    flat = [1.0] * len(lengths)
    if idle_watts is None:
        return flat
    idle_time = math.fsum(length for length, busy in zip(lengths, flying, strict=True) if not busy)
    busy_time = duration - idle_time
    if idle_time <= 0 or busy_time <= 0 or joules < idle_watts * duration:
        return flat
    busy_watts = (joules - idle_watts * idle_time) / busy_time
    return [busy_watts if busy else idle_watts for busy in flying]


@dataclass(slots=True)
class Attribution:
    """A finished request's energy, once every device it used is settled past its end.

    ``energy_joules`` is its share of all device energy while it ran (the paper's measure);
    ``dynamic_energy_joules`` its share above the idle baseline. Either is ``None`` (never a fake
    0) when a device reading was missing during its life, or, for dynamic, while the idle baseline
    was not yet known. ``estimate`` is true when the value leans on interpolation more than on
    measurement: the request was shorter than the counter's update period, the meter itself is an
    estimate, or the span was registered after part of its life was already settled.
    """

    request_id: str
    start: float
    end: float
    energy_joules: float | None
    dynamic_energy_joules: float | None
    per_device: dict[str, float | None]
    per_device_dynamic: dict[str, float | None]
    estimate: bool


@dataclass(slots=True)
class _Tracked:
    """Mutable bookkeeping for one registered span (internal)."""

    span: Span  # start may be clamped forward for a late registration
    requested_start: float
    requested_end: float | None
    devices: tuple[str, ...]
    energy: dict[str, float]
    dynamic: dict[str, float]
    unknown: set[str] = field(default_factory=set)  # devices with a missing reading in its life
    dynamic_unknown: set[str] = field(default_factory=set)  # devices with no idle baseline yet
    late: bool = False


@dataclass(slots=True)
class _DeviceState:
    """Per-device position in the reading stream (internal).

    ``base_time``/``base_joules`` is when the counter last changed (as estimated from the reading
    that showed the change), or the first good reading after a gap; everything up to
    ``base_time`` is *settled*. ``gap_start`` is set while the device is unreadable: energy from
    there on is unknown until the next good reading.
    """

    base_time: float | None = None
    base_joules: float | None = None
    gap_start: float | None = -math.inf  # before the first reading nothing is known
    last_time: float = -math.inf
    settled: float = -math.inf
    idle: deque[float] = field(default_factory=deque)  # watts of recent idle intervals
    idle_cache: float | None = None
    idle_dirty: bool = False


class Attributor:
    """Turns a stream of meter readings and request spans into per-request energy.

    Driven only by its inputs: :meth:`start` and :meth:`end` register request intervals,
    :meth:`add_reading` settles the energy since the previous reading on each device, and
    :meth:`pop_finished` hands out (and forgets) requests whose energy is final. It is not
    thread-safe: call it from one thread (the proxy's event loop).

    Counter quantisation: NVML's energy counter moves only every ~20-100 ms while we sample every
    50 ms. Splitting an unchanged reading would credit 0 J to whoever ran in that window and the
    whole jump to the next window's requests. So while a device's counter is unchanged (and
    ``update_period > 0``) readings are merged and the jump, when it comes, is spread over the
    whole window since the last change. A request inside one window then gets the window's
    average power times its duration — the short-request fallback — and requests shorter than
    ``update_period`` are flagged ``estimate``. A counter that stays flat for ``max_merge``
    seconds is settled as 0 J so requests can finalise.

    Change time (``center_changes``, on by default): a quantised counter's jump happened somewhere
    between the previous reading and the one that shows it, not at the latter, so taking the
    reading time as the window boundary shifts every window late by half a sampling interval on
    average. The boundary is placed at ``t - min(update_period, t - t_prev) / 2`` instead, the
    expected time of the last counter update before ``t``; with ``update_period == 0`` (a
    continuous counter) the reading time is used as is. The shift mostly cancels between a
    request's two edges, so the gain is small (see ``benchmarks/attribution_accuracy.py``); the
    larger error left is the constant-power-per-window rule smearing each power step over one
    counter period.

    Unreadable devices: a ``None`` reading makes the energy from the last good reading until the
    next good one unknown. Requests overlapping it get ``None`` for that device; that energy is in
    neither ``attributed`` nor ``unattributed`` nor ``metered``, and the next good reading is a new
    base (the meter contract drops gap energy from the counter too, see ``proxy.meter.base``).

    Idle baseline: learned per device from settled intervals with nobody in flight, as the
    median power of the last ``idle_window`` such intervals once there are ``idle_min_samples``.
    A median, not an EWMA or an energy/time ratio, because idle gaps on a busy server are often
    the GPU ramping down after a request (high outliers) and one such tail would drag a mean for
    many samples. Not a low quantile, because counter quantisation makes each merged interval's
    power jitter a lot — window lengths are off by up to one sampling interval, so 60 W of idle
    reads as 40-120 W at 50 ms sampling of a 100 ms counter — and a low quantile of that is biased
    low; the median of it is within about 1 % (benchmark simulation). A fixed ``idle_watts`` (one
    value, or per device) replaces learning for the devices it names.
    """

    def __init__(
        self,
        devices: Sequence[str],
        *,
        update_period: float = 0.0,
        idle_watts: float | Mapping[str, float] | None = None,
        estimate: bool = False,
        max_merge: float | None = None,
        center_changes: bool = True,
        idle_window: int = 64,
        idle_min_samples: int = 4,
    ) -> None:
        self.devices: tuple[str, ...] = tuple(devices)
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"duplicate device names: {self.devices!r}")
        if not (math.isfinite(update_period) and update_period >= 0):
            raise ValueError(f"update_period must be finite and >= 0, got {update_period!r}")
        if max_merge is None:
            max_merge = 10.0 * update_period
        if not max_merge >= 0:  # also rejects NaN
            raise ValueError(f"max_merge must be >= 0, got {max_merge!r}")
        if idle_window < 1 or idle_min_samples < 1 or idle_min_samples > idle_window:
            raise ValueError("need 1 <= idle_min_samples <= idle_window")
        self.update_period = float(update_period)
        self.max_merge = float(max_merge)
        self.center_changes = center_changes
        self.estimate = estimate
        self.idle_min_samples = idle_min_samples
        self._fixed_idle: dict[str, float] = {}
        if isinstance(idle_watts, Mapping):
            unknown = set(idle_watts) - set(self.devices)
            if unknown:
                raise ValueError(f"idle_watts names unknown devices: {sorted(unknown)}")
            self._fixed_idle = {d: float(w) for d, w in idle_watts.items()}
        elif idle_watts is not None:
            self._fixed_idle = {d: float(idle_watts) for d in self.devices}
        for d, w in self._fixed_idle.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"idle_watts for {d!r} must be finite and >= 0, got {w!r}")
        self._dev: dict[str, _DeviceState] = {
            d: _DeviceState(idle=deque(maxlen=idle_window)) for d in self.devices
        }
        self._tracked: dict[str, _Tracked] = {}
        self._metered = dict.fromkeys(self.devices, 0.0)
        self._attributed = dict.fromkeys(self.devices, 0.0)
        self._unattributed = dict.fromkeys(self.devices, 0.0)

    @classmethod
    def for_meter(
        cls,
        meter: Meter,
        *,
        idle_watts: float | Mapping[str, float] | None = None,
        max_merge: float | None = None,
        center_changes: bool = True,
    ) -> Attributor:
        """An attributor matching ``meter``'s devices, update period and estimate flag."""
        return cls(
            meter.devices,
            update_period=meter.update_period,
            idle_watts=idle_watts,
            estimate=meter.estimate,
            max_merge=max_merge,
            center_changes=center_changes,
        )

    # -- requests -------------------------------------------------------------------------------

    def start(self, span: Span) -> None:
        """Register a request. ``span.end`` may already be set (a request known only afterwards).

        Call it with a start time taken just before, on the same thread that feeds readings, so
        that no reading taken after the start has been settled yet. If one has (a late
        registration), the settled part of its life cannot be re-split: its start is moved to
        the settled time and the result is flagged ``estimate`` (or has ``None`` energy if its
        whole life was already settled).
        """
        if span.request_id in self._tracked:
            raise ValueError(f"request {span.request_id!r} is already tracked")
        if span.devices is None:
            devices = self.devices
        else:
            unknown = span.devices - set(self.devices)
            if unknown:
                raise ValueError(f"span names devices not metered here: {sorted(unknown)}")
            devices = tuple(d for d in self.devices if d in span.devices)
        settled = self._latest_settled(devices)
        late = span.start < settled
        effective = span
        if late:
            new_start = settled if span.end is None else min(settled, span.end)
            effective = replace(span, start=new_start)
        self._tracked[span.request_id] = tracked = _Tracked(
            span=effective,
            requested_start=span.start,
            requested_end=span.end,
            devices=devices,
            energy=dict.fromkeys(devices, 0.0),
            dynamic=dict.fromkeys(devices, 0.0),
            late=late,
        )
        if late and span.end is not None and span.end <= settled:
            tracked.unknown.update(devices)  # its whole life was settled before we heard of it

    def end(self, request_id: str, t: float) -> bool:
        """Mark a request (finished or aborted) as ended at ``t``. False if it is not tracked.

        Ending an already-ended request is ignored (the first end wins), so an abort racing a
        normal completion is harmless.
        """
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.span.end is not None:
            return False
        if not math.isfinite(t):
            raise ValueError(f"end time must be finite, got {t!r}")
        if t < tracked.requested_start:
            raise ValueError(f"request {request_id!r} ends at {t!r}, before it started")
        if self._latest_settled(tracked.devices) > t:
            tracked.late = True  # energy after t was already credited to it
        tracked.requested_end = t
        if tracked.late and t <= tracked.span.start:
            # Its whole life was settled before it was registered: its energy is unknown.
            tracked.unknown.update(tracked.devices)
        span = tracked.span  # a new Span as `replace` would make, without its field lookups
        tracked.span = Span(
            span.request_id, span.start, max(t, span.start), span.weight, span.devices
        )
        return True

    def _latest_settled(self, devices: tuple[str, ...]) -> float:
        """The latest time up to which one of ``devices`` is settled (-inf for none); one
        device, the usual case, without a loop: this runs twice per request."""
        if len(devices) == 1:
            return self._dev[devices[0]].settled
        return max((self._dev[d].settled for d in devices), default=-math.inf)

    def pop_finished(self) -> list[Attribution]:
        """Requests whose energy is final, oldest end first; they are forgotten here.

        A request is final once every device it uses is settled up to its end: a counter change
        at or after the end has been read (after merging), or the device was unreadable there.
        """
        done: list[Attribution] = []
        every = self.devices
        # Most spans use every device: for them, settled everywhere up to the end is one test.
        everywhere = min((st.settled for st in self._dev.values()), default=math.inf)
        for rid, tr in list(self._tracked.items()):
            end = tr.span.end
            if end is None:
                continue
            if tr.devices is every:
                if end > everywhere:
                    continue
            elif any(self._dev[d].settled < end for d in tr.devices):
                continue
            del self._tracked[rid]
            done.append(self._record(tr))
        done.sort(key=lambda a: (a.end, a.request_id))
        return done

    def _record(self, tr: _Tracked) -> Attribution:
        end = tr.requested_end
        assert end is not None
        # `energy` and `dynamic` hold every device of the span, in its order: copied as they
        # are when nothing is unknown (the usual case), else with None where it is.
        per_device: dict[str, float | None]
        per_dynamic: dict[str, float | None]
        if not tr.unknown:
            per_device = dict(tr.energy)
        else:
            per_device = {d: (None if d in tr.unknown else tr.energy[d]) for d in tr.devices}
        if not tr.unknown and not tr.dynamic_unknown:
            per_dynamic = dict(tr.dynamic)
        else:
            per_dynamic = {
                d: (None if d in tr.unknown or d in tr.dynamic_unknown else tr.dynamic[d])
                for d in tr.devices
            }
        return Attribution(
            request_id=tr.span.request_id,
            start=tr.requested_start,
            end=end,
            energy_joules=_total(per_device),
            dynamic_energy_joules=_total(per_dynamic),
            per_device=per_device,
            per_device_dynamic=per_dynamic,
            estimate=(self.estimate or tr.late or (end - tr.requested_start) < self.update_period),
        )

    # -- readings -------------------------------------------------------------------------------

    def add_reading(self, reading: Reading, *, flush: bool = False) -> None:
        """Settle the energy since the previous reading on every device.

        Readings must come in time order per device; one not after the previous one is ignored
        (the counter is cumulative, so the next reading still carries its energy).

        ``flush=True`` settles everything up to the reading's time even if a counter has not
        moved (no merging, no centring): for the last reading at shutdown, so requests that ended
        before it can be finalised without waiting for another counter update.
        """
        if len(reading.joules) != len(self.devices):
            raise ValueError(
                f"reading has {len(reading.joules)} values, attributor has {len(self.devices)}"
            )
        t = float(reading.time)
        if not math.isfinite(t):
            return
        for device, value in zip(self.devices, reading.joules, strict=True):
            if value is not None and not math.isfinite(value):
                value = None
            self._advance(device, t, value, flush)

    def _advance(self, device: str, t: float, value: float | None, flush: bool = False) -> None:
        st = self._dev[device]
        previous = st.last_time
        if t <= previous:
            return
        st.last_time = t
        if value is None:
            if st.gap_start is None:  # a gap opens at the last settled point
                st.gap_start = st.base_time
            self._taint(device, st.gap_start, t)
            st.base_time = st.base_joules = None
            st.settled = t
            return
        if st.gap_start is not None:  # first good reading after a gap (or ever): new base
            self._taint(device, st.gap_start, t)
            st.gap_start = None
            self._rebase(st, t, value)
            return
        assert st.base_time is not None and st.base_joules is not None
        delta = value - st.base_joules
        if delta < 0:  # a meter promised monotonic counters; treat a step back as a gap
            self._taint(device, st.base_time, t)
            self._rebase(st, t, value)
            return
        merge = not flush and self.update_period > 0
        if merge and delta == 0 and t - st.base_time < self.max_merge:
            return  # counter not updated yet: merge with the next reading
        boundary = t
        if merge and delta > 0 and self.center_changes:
            # previous >= base_time here, so the boundary stays after the base.
            boundary = t - min(self.update_period, t - previous) / 2.0
        self._settle(device, st, st.base_time, boundary, delta)
        self._rebase(st, boundary, value)

    @staticmethod
    def _rebase(st: _DeviceState, t: float, value: float) -> None:
        st.base_time = t
        st.base_joules = value
        st.settled = t

    def _taint(self, device: str, t0: float | None, t1: float) -> None:
        """Mark every span on ``device`` overlapping ``(t0, t1)`` as having unknown energy."""
        lo = -math.inf if t0 is None else t0
        for tr in self._tracked.values():
            s = tr.span
            if device in tr.energy and s.start < t1 and (s.end is None or s.end > lo):
                tr.unknown.add(device)

    def _settle(self, device: str, st: _DeviceState, t0: float, t1: float, joules: float) -> None:
        spans = [
            tr.span
            for tr in self._tracked.values()
            if device in tr.energy
            and tr.span.start < t1
            and (tr.span.end is None or tr.span.end > t0)
        ]
        idle = self.idle_watts(device)
        shares = split_interval(t0, t1, joules, spans, idle)
        self._metered[device] += joules
        self._unattributed[device] += shares.unattributed
        self._attributed[device] += math.fsum(shares.energy.values())
        for rid, e in shares.energy.items():
            tr = self._tracked[rid]
            tr.energy[device] += e
            if idle is None:
                tr.dynamic_unknown.add(device)
            else:
                tr.dynamic[device] += shares.dynamic[rid]
        if not shares.energy and device not in self._fixed_idle:
            st.idle.append(joules / (t1 - t0))
            st.idle_dirty = True

    # -- introspection --------------------------------------------------------------------------

    def idle_watts(self, device: str) -> float | None:
        """The idle baseline used for ``device`` now: fixed, learned, or None if not yet known."""
        fixed = self._fixed_idle.get(device)
        if fixed is not None:
            return fixed
        st = self._dev[device]
        if st.idle_dirty:
            st.idle_cache = (
                statistics.median(st.idle) if len(st.idle) >= self.idle_min_samples else None
            )
            st.idle_dirty = False
        return st.idle_cache

    def settled_until(self, device: str) -> float:
        """Time up to which ``device``'s energy is final (``-inf`` before its first reading)."""
        return self._dev[device].settled

    @property
    def tracked(self) -> int:
        """Spans held now (in flight, or ended but not yet final/popped)."""
        return len(self._tracked)

    @property
    def metered(self) -> dict[str, float]:
        """Cumulative Joules per device settled into intervals (excludes unreadable gaps)."""
        return dict(self._metered)

    @property
    def attributed(self) -> dict[str, float]:
        """Cumulative Joules per device credited to requests (final or not yet popped)."""
        return dict(self._attributed)

    @property
    def unattributed(self) -> dict[str, float]:
        """Cumulative Joules per device metered while nobody was in flight (idle)."""
        return dict(self._unattributed)


def _total(values: Mapping[str, float | None]) -> float | None:
    """Sum of the per-device values, or None if any is unknown or there are none."""
    figures = values.values()
    if not figures or None in figures:
        return None
    return math.fsum(figures)  # type: ignore[arg-type]  # no None left
