"""How accurately does the Attributor recover per-request energy from a realistic energy counter?

Run: ``.venv/bin/python benchmarks/attribution_accuracy.py [--seconds S] [--seed N]``
(``--rows-json PATH`` also writes the headline figures as rows for ``run_all.py``)

The simulated GPU has a known power timeline: an idle baseline plus, for every request in flight,
that request's own constant power (homogeneous requests: the same power each, scaled as
``LOAD_WATTS / concurrency`` so the loaded GPU draws about the same at every concurrency, as a real
one saturates). Requests are closed-loop, ``concurrency`` clients each sending one request after
another with a short random think time, every request 0.6-1.5 s long (12-30 sampling intervals).

Ground truth uses the paper's measure, the same definition the Attributor implements: a request's
energy is the device energy used while it ran, divided equally between the requests in flight at
each moment (``integral of P(t) / n(t) dt`` over its life); its dynamic energy is the same split
of the power above idle (here exactly its own added power times its duration). Because the truth
and the estimator share the definition, the error printed is purely the *measurement* error:
sampling every 50 ms, an energy counter that only moves every ~100 ms (jittered ±10 %, with 2 %
noise per update and 1 mJ resolution, as NVML's), and sampler scheduling jitter.

Known limit, visible at concurrency 1: the design takes power as constant within a (merged)
window, so a request's own power step is smeared over one counter period at each of its edges and
about ``update_period * step_watts / 6`` per edge leaks to the idle gaps around it — roughly 2.5 %
of a 1 s request with a 100 ms counter. With other requests around it (concurrency 8, 64) the leak
is symmetric and cancels on average. A load-aware split of merged windows would remove it.

Also printed: conservation (attributed + unattributed vs metered, per device) and the Sampler's
CPU cost per 1,000 samples with a trivial meter, each with its target and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import Row, write_rows
from benchmarks.results import verdict as row_verdict
from proxy.attribution import Attributor, Span
from proxy.meter.base import Meter, Reading
from proxy.sampler import Sampler

IDLE_WATTS = 60.0
LOAD_WATTS = 250.0  # added by a full GPU's worth of requests
SAMPLE_PERIOD = 0.05  # s, the sampler's default
COUNTER_PERIOD = 0.1  # s, how often the simulated energy counter moves
COUNTER_JITTER = 0.1  # ± fraction of COUNTER_PERIOD
COUNTER_NOISE = 0.02  # relative sd of each counter update's energy
COUNTER_RESOLUTION = 0.001  # J (NVML reports mJ)
SAMPLE_JITTER = 0.002  # s, sampler wake-up lateness (uniform 0..this)
WARMUP = 3.0  # s of idle at the start, so the idle baseline is learned before traffic

# Relative per-request energy error (the targets): alone <= 1 %, concurrent <= 2 %.
TARGET_MEDIAN = {1: 0.01, 8: 0.02, 64: 0.02}
TARGET_P95 = 0.05
TARGET_CONSERVATION = 1e-9
TARGET_CPU_PER_1000 = 0.250  # s of CPU per 1,000 samples = 0.5 % of one core at the 50 ms default


@dataclass(slots=True)
class Request:
    """One simulated request and what we know and measured about it."""

    rid: str
    start: float
    end: float
    watts: float
    true_energy: float = 0.0
    true_dynamic: float = 0.0
    energy: float | None = None
    dynamic: float | None = None
    estimate: bool = False


@dataclass(slots=True)
class Result:
    """One concurrency level's outcome."""

    concurrency: int
    requests: int
    median: float
    p95: float
    dyn_median: float
    dyn_p95: float
    missing: int
    conservation: float
    seconds: float


def workload(rng: random.Random, concurrency: int, horizon: float) -> list[Request]:
    """Closed-loop homogeneous traffic: each client sends, waits 0-200 ms, sends again."""
    watts = LOAD_WATTS / concurrency
    out: list[Request] = []
    for client in range(concurrency):
        t = WARMUP + rng.uniform(0.0, 1.0)
        k = 0
        while True:
            start = t + rng.uniform(0.0, 0.2)
            end = start + rng.uniform(0.6, 1.5)
            if end > horizon:
                break
            out.append(Request(f"c{client}-{k}", start, end, watts))
            t = end
            k += 1
    return out


def power_steps(requests: list[Request]) -> tuple[list[float], list[float], list[int]]:
    """The true power timeline as steps: (change times, watts after each, requests in flight)."""
    deltas: dict[float, tuple[float, int]] = {}
    for r in requests:
        w, n = deltas.get(r.start, (0.0, 0))
        deltas[r.start] = (w + r.watts, n + 1)
        w, n = deltas.get(r.end, (0.0, 0))
        deltas[r.end] = (w - r.watts, n - 1)
    times = [0.0]
    watts = [IDLE_WATTS]
    flying = [0]
    for t in sorted(deltas):
        dw, dn = deltas[t]
        times.append(t)
        watts.append(watts[-1] + dw)
        flying.append(flying[-1] + dn)
    return times, watts, flying


def ground_truth(
    requests: list[Request], steps: tuple[list[float], list[float], list[int]]
) -> None:
    """Fill in each request's true equal-share energy: G(end) - G(start), G = ∫ P/n dt."""
    times, watts, flying = steps
    per_capita = [0.0]  # G at each step time
    for i in range(1, len(times)):
        dt = times[i] - times[i - 1]
        n = flying[i - 1]
        per_capita.append(per_capita[-1] + (watts[i - 1] / n * dt if n else 0.0))

    def g(t: float) -> float:
        i = bisect.bisect_right(times, t) - 1
        n = flying[i]
        return per_capita[i] + (watts[i] / n * (t - times[i]) if n else 0.0)

    for r in requests:
        r.true_energy = g(r.end) - g(r.start)
        r.true_dynamic = r.watts * (r.end - r.start)


def counter_readings(
    rng: random.Random, steps: tuple[list[float], list[float], list[int]], horizon: float
) -> list[Reading]:
    """What a sampler would read from a quantised, noisy, jittered energy counter."""
    times, watts, _ = steps

    def true_energy(t: float) -> float:  # cumulative, walked in increasing t
        nonlocal idx, acc
        while idx + 1 < len(times) and times[idx + 1] <= t:
            acc += watts[idx] * (times[idx + 1] - times[idx])
            idx += 1
        return acc + watts[idx] * (t - times[idx])

    idx, acc = 0, 0.0
    updates: list[float] = []
    values: list[float] = []
    u = rng.uniform(0.0, COUNTER_PERIOD)
    exact_prev, counter = 0.0, 0.0
    while u < horizon:
        exact = true_energy(u)
        counter += (exact - exact_prev) * (1.0 + rng.gauss(0.0, COUNTER_NOISE))
        exact_prev = exact
        updates.append(u)
        values.append(math.floor(counter / COUNTER_RESOLUTION) * COUNTER_RESOLUTION)
        u += COUNTER_PERIOD * (1.0 + rng.uniform(-COUNTER_JITTER, COUNTER_JITTER))
    readings: list[Reading] = []
    j = 0
    while (s := j * SAMPLE_PERIOD + rng.uniform(0.0, SAMPLE_JITTER)) < horizon:
        k = bisect.bisect_right(updates, s) - 1
        readings.append(Reading(time=s, joules=(values[k] if k >= 0 else 0.0,)))
        j += 1
    return readings


def run_level(
    rng: random.Random, concurrency: int, seconds: float, *, center_changes: bool = True
) -> Result:
    horizon = WARMUP + seconds + 3.0  # idle tail so every request is finalised
    requests = workload(rng, concurrency, WARMUP + seconds)
    steps = power_steps(requests)
    ground_truth(requests, steps)
    readings = counter_readings(rng, steps, horizon)

    events: list[tuple[float, int, object]] = [(r.time, 2, r) for r in readings]
    for q in requests:
        events.append((q.start, 0, q))
        events.append((q.end, 1, q))
    events.sort(key=lambda e: (e[0], e[1]))

    att = Attributor(["gpu0"], update_period=COUNTER_PERIOD, center_changes=center_changes)
    by_id = {q.rid: q for q in requests}
    t0 = time.perf_counter()
    for t, kind, obj in events:
        if kind == 0:
            assert isinstance(obj, Request)
            att.start(Span(obj.rid, t))
        elif kind == 1:
            assert isinstance(obj, Request)
            att.end(obj.rid, t)
        else:
            assert isinstance(obj, Reading)
            att.add_reading(obj)
            for rec in att.pop_finished():
                q = by_id[rec.request_id]
                q.energy, q.dynamic, q.estimate = (
                    rec.energy_joules,
                    rec.dynamic_energy_joules,
                    rec.estimate,
                )
    elapsed = time.perf_counter() - t0

    errors = [abs(q.energy - q.true_energy) / q.true_energy for q in requests if q.energy]
    dyn = [abs(q.dynamic - q.true_dynamic) / q.true_dynamic for q in requests if q.dynamic]
    metered = att.metered["gpu0"]
    conservation = abs(att.attributed["gpu0"] + att.unattributed["gpu0"] - metered) / metered
    return Result(
        concurrency=concurrency,
        requests=len(requests),
        median=statistics.median(errors),
        p95=quantile(errors, 0.95),
        dyn_median=statistics.median(dyn) if dyn else math.nan,
        dyn_p95=quantile(dyn, 0.95) if dyn else math.nan,
        missing=sum(q.energy is None for q in requests),
        conservation=conservation,
        seconds=elapsed,
    )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class TrivialMeter(Meter):
    """Costs almost nothing to read, so the Sampler's own overhead is what gets measured."""

    def __init__(self) -> None:
        self.name = "trivial"
        self.estimate = False
        self.devices = ("dev0",)
        self.update_period = 0.0

    def read(self) -> Reading:
        return Reading(time=time.monotonic(), joules=(0.0,))

    @property
    def up(self) -> bool:
        return True


def sampler_cpu_per_1000(seconds: float) -> tuple[float, int, float]:
    """(thread CPU s per 1,000 samples, samples taken, achieved Hz) at the fastest interval."""
    sampler = Sampler(TrivialMeter(), 0.005, on_reading=lambda reading: None)
    sampler.start()
    time.sleep(seconds)
    snap = sampler.snapshot()
    sampler.stop()
    samples = snap["samples"]
    cpu = snap["cpu_seconds"]
    rate = snap["actual_rate_hz"]
    assert isinstance(samples, int) and isinstance(cpu, float) and isinstance(rate, float)
    return cpu / samples * 1000.0, samples, rate


def wait_floor_per_1000(seconds: float) -> float:
    """Thread CPU s per 1,000 bare ``Event.wait(0.005)`` wake-ups: what any periodic thread pays.

    On bare metal this is a few microseconds per wake-up; in VMs and sandboxes a timed wait can
    cost 100 us or more of (mostly kernel) CPU, which would otherwise be blamed on the sampler.
    """
    result: list[float] = []

    def loop() -> None:
        event = threading.Event()
        cpu0 = time.thread_time()
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            event.wait(0.005)
            n += 1
        result.append((time.thread_time() - cpu0) / n * 1000.0)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    return result[0]


def loop_body_per_1000(iterations: int = 20_000) -> float:
    """Thread CPU s per 1,000 runs of the sampler's per-sample work alone (read, buffer, callback).

    Uses the private ``_sample_once`` on purpose: it isolates the sampler's own cost from the
    host's wake-up cost, which the total above includes.
    """
    sampler = Sampler(TrivialMeter(), 0.005, on_reading=lambda reading: None)
    cpu0 = time.thread_time()
    for _ in range(iterations):
        sampler._sample_once()
    return (time.thread_time() - cpu0) / iterations * 1000.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(
    title: str, seed: int, seconds: float, center_changes: bool
) -> tuple[bool, list[Result]]:
    """Run the three concurrency levels and print one table; (every row passes, results)."""
    print(title)
    header = (
        f"{'concurrency':>11} {'requests':>8} {'median err':>10} {'p95 err':>8} "
        f"{'dyn median':>10} {'dyn p95':>8} {'null':>4} {'conservation':>12} {'cpu s':>6}  result"
    )
    print(header)
    print("-" * len(header))
    ok_all = True
    results = []
    for level, concurrency in enumerate((1, 8, 64)):
        rng = random.Random(seed * 1000 + level)
        r = run_level(rng, concurrency, seconds, center_changes=center_changes)
        results.append(r)
        ok = level_ok(r)
        ok_all &= ok
        print(
            f"{r.concurrency:>11} {r.requests:>8} {r.median:>10.2%} {r.p95:>8.2%} "
            f"{r.dyn_median:>10.2%} {r.dyn_p95:>8.2%} {r.missing:>4} {r.conservation:>12.1e} "
            f"{r.seconds:>6.2f}  {verdict(ok)}"
        )
    return ok_all, results


def level_ok(r: Result) -> bool:
    return (
        r.median <= TARGET_MEDIAN[r.concurrency]
        and r.p95 < TARGET_P95
        and r.conservation < TARGET_CONSERVATION
        and r.missing == 0
    )


def summary_rows(results: list[Result], sampler_per_1000: float) -> list[Row]:
    """The headline figures for `run_all.py`: error per concurrency, conservation, sampler."""
    rows = [
        Row(
            f"attribution error, concurrency {r.concurrency} (median / p95)",
            f"<= {TARGET_MEDIAN[r.concurrency]:.0%} / < {TARGET_P95:.0%}",
            f"{r.median:.2%} / {r.p95:.2%} ({r.requests:,} requests, {r.missing} null)",
            row_verdict(
                r.median <= TARGET_MEDIAN[r.concurrency] and r.p95 < TARGET_P95 and not r.missing
            ),
        )
        for r in results
    ]
    worst = max(r.conservation for r in results)
    rows.append(
        Row(
            "attribution conservation (attributed + idle vs metered)",
            f"< {TARGET_CONSERVATION:.0e} relative",
            f"{worst:.1e}",
            row_verdict(worst < TARGET_CONSERVATION),
        )
    )
    rows.append(
        Row(
            "sampler CPU per 1,000 samples",
            f"< {TARGET_CPU_PER_1000 * 1000:.0f} ms",
            f"{sampler_per_1000 * 1000:.1f} ms "
            f"({sampler_per_1000 / 1000 / SAMPLE_PERIOD:.2%} of a core at 50 ms)",
            row_verdict(sampler_per_1000 < TARGET_CPU_PER_1000),
        )
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="simulated traffic per level")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    args = parser.parse_args()

    print(
        f"simulated GPU: idle {IDLE_WATTS:.0f} W + {LOAD_WATTS:.0f} W / concurrency per request; "
        f"counter every {COUNTER_PERIOD * 1000:.0f} ms ±{COUNTER_JITTER:.0%}, "
        f"noise {COUNTER_NOISE:.0%}; sampling every {SAMPLE_PERIOD * 1000:.0f} ms; "
        f"{args.seconds:.0f} s of traffic per level, seed {args.seed}\n"
    )
    ok_all, results = print_table(
        "Attributor as configured (center_changes=True):", args.seed, args.seconds, True
    )
    print(
        "targets: per-request energy error median <= 1% alone, <= 2% concurrent, and "
        f"p95 < {TARGET_P95:.0%}, no null energies, conservation < {TARGET_CONSERVATION:.0e} "
        "relative.\nDynamic-energy error (vs. each request's own added power x duration) and "
        "cpu s (Attributor time) are informational.\n"
    )
    print_table(
        "Ablation, window boundary at the reading time (center_changes=False), informational:",
        args.seed,
        args.seconds,
        False,
    )

    per_1000, samples, rate = sampler_cpu_per_1000(2.0)
    floor = wait_floor_per_1000(2.0)
    body = loop_body_per_1000()
    ok = per_1000 < TARGET_CPU_PER_1000
    ok_all &= ok
    print(
        f"\nsampler CPU: {per_1000 * 1000:.1f} ms per 1,000 samples "
        f"({samples} samples at {rate:.0f} Hz, trivial meter, sampler thread CPU time)  "
        f"target < {TARGET_CPU_PER_1000 * 1000:.0f} ms  {verdict(ok)}\n"
        f"  for scale: a bare timed wait costs this host {floor * 1000:.1f} ms per 1,000 "
        f"wake-ups; the sampler's per-sample work alone {body * 1000:.1f} ms per 1,000\n"
        f"  at the default 50 ms interval that is {per_1000 / 1000 / SAMPLE_PERIOD:.2%} of one core"
    )
    print(f"\noverall: {verdict(ok_all)}")
    write_rows(args.rows_json, summary_rows(results, per_1000))
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
