"""One inference thread per device, each behind a bounded queue.

Why threads and not the event loop: a forward pass blocks for milliseconds to seconds and
would stall every other connection (and joulegate's view of request boundaries). Why one
thread per device: a GPU runs one kernel stream well; piling requests onto it from several
threads only interleaves them and makes per-request energy harder to attribute. The CPU
counts as one device.

Why bounded: a queue that grows without limit turns overload into unbounded latency; a full
queue answers 503 with Retry-After instead, so clients and load balancers can back off.

Cancellation is cooperative: a job carries a flag that the HTTP side sets when the client goes
away; the task code checks it between tokens or denoising steps (``Job.cancelled``) and stops,
so an abandoned request stops burning energy. A job still waiting in the queue when it is
cancelled is skipped without running.

This module is torch-free: it only moves callables between the event loop and the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

STEP_TOKEN = "token"
STEP_DENOISE = "denoise"
_END = object()
_STOP = object()
_EWMA_WEIGHT = 0.3
_MAX_RETRY_AFTER = 60


class JobCancelled(Exception):
    """Raised in a job whose client went away; it ends the computation early."""


class QueueFullError(Exception):
    """The device's queue holds ``queue_size`` waiting jobs already."""

    def __init__(self, device: str, retry_after: int) -> None:
        super().__init__(f"queue for {device} is full")
        self.device = device
        self.retry_after = retry_after


@dataclass
class WorkerStats:
    """Counters for /health and for tests; written from worker threads under the pool's lock."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    cancel_requests: int = 0
    generated_tokens: int = 0
    denoising_steps: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    queue_size: int
    waiting: int
    busy: bool


StepHook = Callable[["Job[Any]", str], None]


class Job(Generic[T]):
    """A unit of work for a device thread, and the handle the task code sees while running.

    Task code calls :meth:`step` once per token or denoising step (it feeds the counters and
    the test hook), checks :attr:`cancelled` to stop early, and :meth:`emit` to stream events
    back to the event loop in order.
    """

    def __init__(
        self,
        pool: WorkerPool,
        fn: Callable[[Job[T]], T],
        loop: asyncio.AbstractEventLoop,
        *,
        stream: bool,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._loop = loop
        self._cancel = threading.Event()
        self.future: asyncio.Future[T] = loop.create_future()
        # Mark exceptions as retrieved: a job whose client left has nobody awaiting it.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._events: asyncio.Queue[object] | None = asyncio.Queue() if stream else None
        self.steps: dict[str, int] = {}

    # --- called from the task code, on the device thread -------------------------------
    @property
    def streaming(self) -> bool:
        """Whether the handler reads events as they come (``submit(..., stream=True)``)."""
        return self._events is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def wait_for_cancel(self, timeout: float) -> bool:
        """Block until cancelled (or ``timeout``): lets a test hold a job mid-generation."""
        return self._cancel.wait(timeout)

    def step(self, kind: str) -> None:
        """Count one unit of work (a token, a denoising step) and run the test hook, if any."""
        self.steps[kind] = self.steps.get(kind, 0) + 1
        self._pool._count_step(kind)
        hook = self._pool.step_hook
        if hook is not None:
            hook(self, kind)

    def emit(self, event: object) -> None:
        """Send an event to the handler reading :meth:`events`; order is preserved."""
        if self._events is None:
            raise RuntimeError("emit() on a job submitted without stream=True")
        self._post(self._events.put_nowait, event)

    # --- called from the event loop ------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop at its next check; harmless once it has finished."""
        if self._cancel.is_set() or self.future.done():
            return
        self._cancel.set()
        self._pool._cancel_requested()

    async def wait(self) -> T:
        """The job's result; if the awaiting handler is cancelled, the job is cancelled too."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[object]:
        """Events emitted by the job, ending when the job ends (its result is then ready)."""
        if self._events is None:
            raise RuntimeError("events() on a job submitted without stream=True")
        try:
            while True:
                event = await self._events.get()
                if event is _END:
                    return
                yield event
        except asyncio.CancelledError:
            self.cancel()
            raise

    # --- internals -------------------------------------------------------------------------
    def _run(self) -> tuple[Any, BaseException | None]:
        if self._cancel.is_set():
            return None, JobCancelled()
        try:
            return self._fn(self), None
        except Exception as exc:
            return None, exc

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        # The loop may be gone when a test or the server stops mid-job; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


class DeviceWorker:
    """The thread that owns one device, fed by a queue of at most ``queue_size`` waiting jobs."""

    def __init__(self, device: str, queue_size: int) -> None:
        self.device = device
        self.queue_size = queue_size
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._busy = False
        self._ewma_seconds = 1.0
        self._thread = threading.Thread(
            target=self._loop, name=f"model-worker-{device}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Job[Any]) -> None:
        with self._lock:
            if self._waiting >= self.queue_size:
                raise QueueFullError(self.device, self._retry_after())
            self._waiting += 1
        self._queue.put(job)

    def status(self) -> DeviceStatus:
        with self._lock:
            return DeviceStatus(self.device, self.queue_size, self._waiting, self._busy)

    def stop(self, timeout: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the recent job time."""
        estimate = self._ewma_seconds * (self._waiting + 1)
        return max(1, min(_MAX_RETRY_AFTER, math.ceil(estimate)))

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, Job)
            with self._lock:
                self._waiting -= 1
                self._busy = True
            started = time.monotonic()
            result, error = job._run()
            elapsed = time.monotonic() - started
            with self._lock:
                self._busy = False
                if not isinstance(error, JobCancelled):
                    self._ewma_seconds += _EWMA_WEIGHT * (elapsed - self._ewma_seconds)
            job._post(job._pool._finish, job, result, error)


class WorkerPool:
    """The device threads of one server, created on first use of each device."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.step_hook: StepHook | None = None
        self._workers: dict[str, DeviceWorker] = {}
        self._jobs: set[Job[Any]] = set()
        self._lock = threading.Lock()
        self._stats = WorkerStats()
        self._changed = asyncio.Event()

    def submit(self, device: str, fn: Callable[[Job[T]], T], *, stream: bool = False) -> Job[T]:
        """Queue ``fn`` on the device's thread; raises :class:`QueueFullError` when full.

        Must be called on the event loop. With ``stream=True`` the job may :meth:`Job.emit`.
        """
        job: Job[T] = Job(self, fn, asyncio.get_running_loop(), stream=stream)
        try:
            self._worker(device).submit(job)
        except QueueFullError:
            with self._lock:
                self._stats.rejected += 1
            raise
        with self._lock:
            self._stats.submitted += 1
            self._stats.in_flight += 1
            self._stats.max_in_flight = max(self._stats.max_in_flight, self._stats.in_flight)
        self._jobs.add(job)
        self._notify()
        return job

    async def run(self, device: str, fn: Callable[[Job[T]], T]) -> T:
        return await self.submit(device, fn).wait()

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(**asdict(self._stats))

    def devices(self) -> list[DeviceStatus]:
        return [worker.status() for worker in self._workers.values()]

    async def wait_for(self, predicate: Callable[[WorkerStats], bool]) -> WorkerStats:
        """Wait until the counters satisfy ``predicate``: deterministic sync for tests."""
        while True:
            changed = self._changed
            stats = self.stats()
            if predicate(stats):
                return stats
            await changed.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the threads."""
        for job in list(self._jobs):
            job.cancel()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, w.stop, timeout) for w in self._workers.values())
        )
        self._workers.clear()

    def _worker(self, device: str) -> DeviceWorker:
        worker = self._workers.get(device)
        if worker is None:
            worker = self._workers[device] = DeviceWorker(device, self.queue_size)
        return worker

    def _count_step(self, kind: str) -> None:
        with self._lock:
            if kind == STEP_TOKEN:
                self._stats.generated_tokens += 1
            elif kind == STEP_DENOISE:
                self._stats.denoising_steps += 1

    def _cancel_requested(self) -> None:
        with self._lock:
            self._stats.cancel_requests += 1
        self._notify()

    def _finish(self, job: Job[Any], result: object, error: BaseException | None) -> None:
        """On the event loop: resolve the job, count it, wake waiters, end its event stream."""
        self._jobs.discard(job)
        with self._lock:
            self._stats.in_flight -= 1
            if error is None:
                self._stats.completed += 1
            elif isinstance(error, JobCancelled):
                self._stats.cancelled += 1
            else:
                self._stats.failed += 1
        if not job.future.done():
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        if job._events is not None:
            job._events.put_nowait(_END)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
