"""The aiohttp application: joulegate's own endpoints beside the proxied API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.attribution import Attributor
from proxy.budgets import Budgets, BudgetScope, SumEnergy, read_state, write_state
from proxy.carbon import CarbonModel, IntensitySeries
from proxy.classify import Classifier
from proxy.config import Config, ConfigError
from proxy.errors import error_response
from proxy.forward import Forwarder
from proxy.ledger import Ledger, LedgerError, open_ledger
from proxy.meter import Meter, open_meter
from proxy.metrics import BudgetCollector, DeviceCollector, LabelGuard, LedgerCollector, Metrics
from proxy.recorder import Recorder
from proxy.records import RecordStore
from proxy.sampler import Sampler

log = logging.getLogger("joulegate")

RECORDER = web.AppKey("recorder", Recorder)
FORWARDER = web.AppKey("forwarder", Forwarder)
CONFIG = web.AppKey("config", Config)
SAMPLER = web.AppKey("sampler", Sampler)
BUDGETS = web.AppKey("budgets", Budgets)
# How often the budget state file is rewritten (when something changed), besides at shutdown.
BUDGET_STATE_SAVE_SECONDS = 10.0
# How often budgets over a shared (PostgreSQL) ledger re-read the fleet's spending.
BUDGET_RELOAD_SECONDS = 10.0


async def health(request: web.Request) -> web.Response:
    """Liveness: joulegate answers while its meter is down (traffic keeps flowing), and says so."""
    config = request.app[CONFIG]
    recorder = request.app[RECORDER]
    document: dict[str, object] = {
        "status": "ok",
        "version": __version__,
        "upstream": config.upstream,
        "in_flight": len(recorder.in_flight),
        "awaiting_energy": len(recorder.pending),
        "meter": None,
    }
    if recorder.ledger is not None:
        document["ledger"] = dataclasses.asdict(recorder.ledger.stats())
    if SAMPLER in request.app:
        sampler = request.app[SAMPLER]
        document["meter"] = sampler.meter.describe()
        document["sampler"] = sampler.snapshot()
        document["power_watts"] = sampler.power_watts()
    return web.json_response(document)


async def request_record(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    record = request.app[RECORDER].store.get(request_id)
    if record is not None:
        return web.json_response(record.to_json())
    ledger = request.app[RECORDER].ledger
    document = None
    if ledger is not None:
        try:
            document = await ledger.get(request_id)
        except LedgerError as error:
            return error_response(
                503, f"The ledger cannot be read now: {error}", "server_error", "ledger_unavailable"
            )
    if document is None:
        return error_response(
            404,
            f"No finished request with id {request_id!r} is known.",
            "not_found_error",
            "request_not_found",
            param="id",
        )
    return web.json_response(document)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RECORDER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _open_meter(config: Config) -> Meter:
    return open_meter(
        config.meter, cpu_watts_per_core=config.cpu_watts_per_core, cpu_pid=config.cpu_pid
    )


def _carbon_model(config: Config) -> CarbonModel:
    intensity: float | IntensitySeries | None = None
    if isinstance(config.carbon_intensity, str):
        intensity = IntensitySeries.from_csv(config.carbon_intensity, config.carbon_intensity_unit)
    elif config.carbon_intensity is not None:
        intensity = config.carbon_intensity
    return CarbonModel(config.pue, intensity)


def _budgets(config: Config) -> Budgets | None:
    if not config.budgets:
        return None
    return Budgets(
        config.budgets,
        timezone=config.budget_timezone,
        default_estimate_joules=config.budget_default_estimate_joules,
    )


async def _budget_state(
    budgets: Budgets, path: str | None, app: web.Application
) -> AsyncIterator[None]:
    """Budget state across restarts: read at start, written every few seconds when it changed
    and once more at shutdown, after the in-flight requests were drained and settled."""
    loop = asyncio.get_running_loop()
    if path is None:
        log.warning("budgets: no budget_state_path, so used energy is lost on restart")
        yield
        return
    try:
        document = await loop.run_in_executor(None, read_state, path)
        if document is not None:
            restored = budgets.restore(document, time.time())
            log.info("budgets: used energy restored from %s for %s", path, restored)
    except (OSError, ValueError, TypeError) as error:
        log.error("budgets: cannot read %s (%s); starting from zero", path, error)

    async def save() -> None:
        try:
            await loop.run_in_executor(None, write_state, path, budgets.snapshot(time.time()))
        except OSError as error:
            log.error("budgets: cannot write %s: %s", path, error)

    async def periodically() -> None:
        while True:
            await asyncio.sleep(BUDGET_STATE_SAVE_SECONDS)
            if budgets.changed:
                await save()

    task = asyncio.create_task(periodically())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await save()


async def _ledgering(
    ledger: Ledger, budgets: Budgets | None, app: web.Application
) -> AsyncIterator[None]:
    await ledger.start()
    reload = None
    if budgets is not None:
        sum_energy = partial(_ledger_energy, ledger)
        await budgets.load(sum_energy, time.time())
        log.info("budgets: used energy rebuilt from the ledger")
        if ledger.backend == "postgresql":
            reload = asyncio.create_task(_reload_budgets(budgets, sum_energy))
    yield
    if reload is not None:
        reload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reload
    await ledger.close()


async def _reload_budgets(budgets: Budgets, sum_energy: SumEnergy) -> None:
    """A shared ledger holds the whole fleet's records: re-reading it now and then lets each
    proxy's budgets count what the others spent (up to their flush interval and this one);
    each proxy's reservations in flight stay its own."""
    while True:
        await asyncio.sleep(BUDGET_RELOAD_SECONDS)
        try:
            await budgets.load(sum_energy, time.time())
        except LedgerError as error:
            log.warning("budgets: cannot re-read the ledger (%s); keeping what is known", error)


async def _ledger_energy(ledger: Ledger, scope: BudgetScope, start: float, end: float) -> float:
    """The Joules of the ledger's records in a budget's scope that started in [start, end)."""
    totals = await ledger.totals(start, end, period="hour")
    return math.fsum(
        t.energy_joules or 0.0 for t in totals if scope.matches(t.tenant, t.task, t.model)
    )


def create_app(config: Config, *, meter: Meter | None = None) -> web.Application:
    """The whole proxy as an aiohttp application, ready for `web.AppRunner` or `run_app`.

    The meter named by `config.meter` is opened at start-up; `meter` replaces it (tests hand
    in meters over a fake NVML)."""
    guard = LabelGuard(config.tenants, config.models, config.max_models)
    budgets = _budgets(config)
    recorder = Recorder(
        Metrics(guard), RecordStore(), carbon=_carbon_model(config), budgets=budgets
    )
    classifier = Classifier(
        config.routes, config.api_keys, teams=config.teams, tenant_header=config.tenant_header
    )
    forwarder = Forwarder(config, classifier, recorder, budgets)

    given_meter = meter
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[RECORDER] = recorder
    app[FORWARDER] = forwarder
    ledger = open_ledger(
        config.ledger,
        config.data_dir,
        instance=config.instance,
        flush_interval=config.ledger_flush_interval_seconds,
        max_pending=config.ledger_max_pending,
    )
    if ledger is not None:
        recorder.ledger = ledger
        recorder.metrics.registry.register(LedgerCollector(ledger))
        # First in, last out: open before traffic, closed after the last records are drained.
        app.cleanup_ctx.append(partial(_ledgering, ledger, budgets))
    if budgets is not None:
        app[BUDGETS] = budgets
        recorder.metrics.registry.register(BudgetCollector(budgets))
        if ledger is None:  # with a ledger, budgets are rebuilt from its records instead
            app.cleanup_ctx.append(partial(_budget_state, budgets, config.budget_state_path))

    async def pool(app: web.Application):  # type: ignore[no-untyped-def]
        await forwarder.open()
        yield
        await forwarder.close()

    async def metering(app: web.Application):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        meter = given_meter or await loop.run_in_executor(None, partial(_open_meter, config))
        unknown = set(config.devices) - set(meter.devices)
        if unknown:
            meter.close()
            raise ConfigError(
                "devices", f"{sorted(unknown)} not among the meter's {list(meter.devices)}"
            )
        attributor = Attributor.for_meter(meter, idle_watts=config.idle_watts)
        recorder.attach(attributor, meter.name, frozenset(config.devices) or None)
        sampler = Sampler(
            meter,
            config.sample_interval_seconds,
            on_reading=lambda reading: loop.call_soon_threadsafe(recorder.on_reading, reading),
        )
        app[SAMPLER] = sampler
        recorder.metrics.registry.register(DeviceCollector(meter, sampler, attributor))
        log.info("meter %s: devices %s, up=%s", meter.name, list(meter.devices), meter.up)
        sampler.start()
        yield
        await loop.run_in_executor(None, sampler.stop)
        recorder.drain(meter.read)
        meter.close()

    app.cleanup_ctx.append(metering)
    app.cleanup_ctx.append(pool)
    app.router.add_get("/joulegate/health", health)
    app.router.add_get("/joulegate/requests/{id}", request_record)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    return app


@asynccontextmanager
async def serving(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `app` inside a running loop (tests, benchmarks, the demo); yields its base URL.

    Handlers are cancelled when their client disconnects, as under `run`."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are drained on the way out."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = create_app(config)

    async def announce(app: web.Application) -> None:
        host = "127.0.0.1" if config.listen_host in ("0.0.0.0", "::") else config.listen_host
        base = f"http://{host}:{config.listen_port}"
        meter = app[SAMPLER].meter if SAMPLER in app else None
        print(
            f"joulegate {__version__} listening on {base}, forwarding to {config.upstream}\n"
            f"  meter:   {meter.name if meter else '-'} {list(meter.devices) if meter else ''}"
            f"{' (estimate)' if meter and meter.estimate else ''}\n"
            f"  metrics: {base}/metrics\n"
            f"  health:  {base}/joulegate/health\n"
            f"  records: {base}/joulegate/requests/<X-Request-Id>",
            file=sys.stderr,
            flush=True,
        )

    app.on_startup.append(announce)
    web.run_app(
        app,
        host=config.listen_host,
        port=config.listen_port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        loop=loop,
    )
