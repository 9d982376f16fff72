"""The sampler: reads the meter on its own thread into a bounded ring buffer.

Meter reads block (NVML calls take tens to hundreds of microseconds, sometimes far more), so they
never run on the event loop. The sampler knows nothing about asyncio or HTTP: it hands each
reading to an optional ``on_reading`` callback from its own thread, and the proxy wraps that
callback with ``loop.call_soon_threadsafe`` to feed the :class:`~proxy.attribution.Attributor`.

Ticks follow a fixed monotonic schedule (``t0 + k * interval``), so the rate does not drift by
the cost of each read; when a read overruns, the missed ticks are skipped (counted as
``overruns``), not made up in a burst. Nothing raised by the meter or the callback stops the
thread: errors are counted, the last one is kept for the health endpoint, and sampling goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.meter.base import Meter, Reading

__all__ = ["MAX_INTERVAL", "MIN_INTERVAL", "Sampler", "next_deadline"]

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.005  # s: faster buys nothing (NVML's counter moves every ~20-100 ms) but CPU
MAX_INTERVAL = 1.0  # s: slower makes requests wait too long to be finalised


def next_deadline(start: float, interval: float, tick: int, now: float) -> tuple[float, int, int]:
    """The next tick after ``tick`` on the schedule ``start + k * interval`` that is still ahead.

    Returns ``(deadline, tick, skipped)``. Deadlines are computed from ``start`` rather than by
    adding ``interval`` to the previous one, so rounding and read latency never accumulate into
    drift; ticks already in the past when we get here are skipped and counted.
    """
    tick += 1
    deadline = start + tick * interval
    skipped = 0
    if deadline <= now:
        behind = math.floor((now - start) / interval) + 1
        skipped = behind - tick
        tick = behind
        deadline = start + tick * interval
    return deadline, tick, skipped


@dataclass(slots=True)
class _Stats:
    """Counters shared between the sampling thread and readers (guarded by the sampler lock)."""

    samples: int = 0
    read_errors: int = 0  # reads that raised or could not read every device
    read_exceptions: int = 0  # reads that raised (a meter bug: the contract says never)
    callback_errors: int = 0
    internal_errors: int = 0
    overruns: int = 0
    last_error: str | None = None
    started_at: float | None = None
    cpu_seconds: float = 0.0


class Sampler:
    """Reads ``meter`` every ``interval`` seconds on a daemon thread.

    ``history`` bounds the ring buffer of readings (default: one minute at the default interval).
    ``on_reading`` is called from the sampling thread after each successful read; it must be
    quick and must not block (hand off to the event loop). ``clock`` is the monotonic clock the
    schedule runs on; tests may inject their own.
    """

    def __init__(
        self,
        meter: Meter,
        interval: float = 0.05,
        *,
        history: int = 1200,
        on_reading: Callable[[Reading], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (MIN_INTERVAL <= interval <= MAX_INTERVAL):  # also rejects NaN
            raise ValueError(
                f"sampling interval must be within [{MIN_INTERVAL}, {MAX_INTERVAL}] s, "
                f"got {interval!r}"
            )
        if history < 2:
            raise ValueError(f"history must hold at least 2 readings, got {history!r}")
        self.meter = meter
        self.interval = float(interval)
        self.on_reading = on_reading
        self._clock = clock
        self._buffer: deque[Reading] = deque(maxlen=history)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling (the first read happens at once). No-op if already running.

        Raises RuntimeError if a previous :meth:`stop` timed out and its thread is still inside a
        meter read: two threads must never read one meter at once.
        """
        if self._thread is not None and self._thread.is_alive():
            if self._stop.is_set():
                raise RuntimeError("the previous sampling thread has not exited yet")
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="joulegate-sampler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop sampling and join the thread. True if it has exited.

        A meter read in progress is not interrupted, so this can take up to one read's time.
        The meter is not closed: the caller owns it.
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the thread -----------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        cpu0 = time.thread_time()
        start = self._clock()
        with self._lock:
            self._stats.started_at = start
        tick = 0
        while not stop.is_set():
            try:
                self._sample_once()
                with self._lock:
                    self._stats.cpu_seconds = time.thread_time() - cpu0
                deadline, tick, skipped = next_deadline(start, self.interval, tick, self._clock())
                if skipped:
                    with self._lock:
                        self._stats.overruns += skipped
                delay = deadline - self._clock()
                if delay > 0:
                    stop.wait(delay)
            except Exception as exc:  # a bug here must not end metering for the process
                self._note_error("internal", exc)
                stop.wait(self.interval)

    def _sample_once(self) -> None:
        try:
            reading = self.meter.read()
        except Exception as exc:  # the contract says never, but a broken meter must not kill us
            self._note_error("read", exc)
            return
        with self._lock:
            self._buffer.append(reading)
            self._stats.samples += 1
            if None in reading.joules:
                self._stats.read_errors += 1
        callback = self.on_reading
        if callback is None:
            return
        try:
            callback(reading)
        except Exception as exc:
            self._note_error("callback", exc)

    def _note_error(self, where: str, exc: BaseException) -> None:
        text = f"{where}: {type(exc).__name__}: {exc}"
        with self._lock:
            if where == "read":
                self._stats.read_errors += 1
                self._stats.read_exceptions += 1
            elif where == "callback":
                self._stats.callback_errors += 1
            else:
                self._stats.internal_errors += 1
            first = self._stats.last_error != text
            self._stats.last_error = text
        if first:  # one log line per distinct error, not one every 50 ms
            log.warning("sampler %s", text, exc_info=exc)

    # -- readers (any thread) -------------------------------------------------------------------

    def latest(self) -> Reading | None:
        """The newest reading, or None before the first."""
        with self._lock:
            return self._buffer[-1] if self._buffer else None

    def readings(self) -> list[Reading]:
        """A copy of the ring buffer, oldest first."""
        with self._lock:
            return list(self._buffer)

    def power_watts(self) -> dict[str, float | None]:
        """Average power per device over the most recent stretch the counter can resolve.

        Uses the newest reading with a value and the newest older one at least the meter's
        ``update_period`` before it, so a quantised counter that has not moved yet does not read
        as 0 W. None for a device without two such readings since its last unreadable one.
        """
        readings = self.readings()
        span = self.meter.update_period
        out: dict[str, float | None] = {}
        for i, device in enumerate(self.meter.devices):
            out[device] = _power(readings, i, span)
        return out

    def snapshot(self) -> dict[str, object]:
        """JSON-able sampler state for ``/joulegate/health``."""
        now = self._clock()
        with self._lock:
            stats = replace(self._stats)
            buffered = len(self._buffer)
            latest = self._buffer[-1] if self._buffer else None
        elapsed = None if stats.started_at is None else now - stats.started_at
        rate = stats.samples / elapsed if elapsed and elapsed > 0 else None
        return {
            "running": self.running,
            "interval_seconds": self.interval,
            "target_rate_hz": 1.0 / self.interval,
            "actual_rate_hz": rate,
            "samples": stats.samples,
            "read_errors": stats.read_errors,
            "read_exceptions": stats.read_exceptions,
            "callback_errors": stats.callback_errors,
            "internal_errors": stats.internal_errors,
            "overruns": stats.overruns,
            "last_error": stats.last_error,
            "buffered": buffered,
            "buffer_capacity": self._buffer.maxlen,
            "latest_age_seconds": None if latest is None else now - latest.time,
            "cpu_seconds": stats.cpu_seconds,
        }


def _power(readings: list[Reading], index: int, span: float) -> float | None:
    """Watts for device ``index`` from the newest good reading and one ≥ ``span`` older."""
    newest: Reading | None = None
    for reading in reversed(readings):
        value = reading.joules[index]
        if value is None:
            if newest is not None:
                return None  # a gap in between: energy across it is not counted
            continue
        if newest is None:
            newest = reading
            continue
        dt = newest.time - reading.time
        if dt >= span and dt > 0:
            joules = newest.joules[index]
            assert joules is not None
            return max(0.0, joules - value) / dt
    return None
