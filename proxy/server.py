"""joulegate assembled: its own endpoints as an aiohttp application, the forwarder beside
them, and `serving`, which puts the front (proxy/front.py) before both."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.access import AccessControl
from proxy.attribution import Attributor
from proxy.budgets import Budgets, BudgetScope, SumEnergy, read_state, write_state
from proxy.carbon import CarbonModel, IntensitySeries
from proxy.classify import Classifier
from proxy.config import Config, ConfigError
from proxy.errors import error_response
from proxy.forward import Forwarder, is_sane_request_id
from proxy.front import (
    KEEPALIVE_TIMEOUT_SECONDS,
    MAX_REQUEST_LINE_BYTES,
    Front,
    Limits,
    listening_unix_socket,
    relay_to_unix_socket,
)
from proxy.ledger import Ledger, LedgerError, open_ledger
from proxy.meter import Meter, open_meter
from proxy.metrics import BudgetCollector, DeviceCollector, LabelGuard, LedgerCollector, Metrics
from proxy.recorder import Recorder
from proxy.records import RECORDS_KEPT, RECORDS_KEPT_WITH_LEDGER, RecordStore
from proxy.sampler import Sampler

log = logging.getLogger("joulegate")

RECORDER = web.AppKey("recorder", Recorder)
FORWARDER = web.AppKey("forwarder", Forwarder)
CONFIG = web.AppKey("config", Config)
SAMPLER = web.AppKey("sampler", Sampler)
BUDGETS = web.AppKey("budgets", Budgets)
ACCESS = web.AppKey("access", AccessControl)
# How often the budget state file is rewritten (when something changed), besides at shutdown.
BUDGET_STATE_SAVE_SECONDS = 10.0
# Allocations between two young-generation collections (Python's default: 700).
GC_THRESHOLD = 10_000
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
    """One finished record. A tenant's key reads its own tenant's records only; another
    tenant's answers exactly as an unknown id does, so ids reveal nothing."""
    reader = request.app[ACCESS].reader(request.headers)
    if isinstance(reader, web.Response):
        return reader
    request_id = request.match_info["id"]
    if not is_sane_request_id(request_id):  # never a request id: no store is asked
        return error_response(
            400,
            "A request id is 1-128 letters, digits, '.', '_', ':' or '-'.",
            "invalid_request_error",
            "invalid_request_id",
            param="id",
        )
    record = request.app[RECORDER].store.get(request_id)
    if record is not None:
        if reader.may_read(record.tenant):
            return web.json_response(record.to_json())
        return _request_not_found(request_id)
    ledger = request.app[RECORDER].ledger
    document = None
    if ledger is not None:
        try:
            document = await ledger.get(request_id)
        except LedgerError as error:
            return error_response(
                503, f"The ledger cannot be read now: {error}", "server_error", "ledger_unavailable"
            )
    if document is None or not reader.may_read(document["tenant"]):
        return _request_not_found(request_id)
    return web.json_response(document)


@web.middleware
async def _failures_in_openai_format(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A bug in one of joulegate's own endpoints is answered 500 in the OpenAI format (and
    logged), never as aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("error handling %s %s", request.method, request.path)
        return error_response(
            500, "joulegate failed while handling the request.", "server_error", "internal_error"
        )


async def _no_such_endpoint(request: web.Request) -> web.Response:
    """A path under joulegate's own prefix that names none of its endpoints (those paths are
    never forwarded upstream), or one of them with the wrong method."""
    return error_response(
        404,
        f"joulegate has no endpoint {request.method} {request.path}.",
        "not_found_error",
        "unknown_endpoint",
    )


def _request_not_found(request_id: str) -> web.Response:
    return error_response(
        404,
        f"No finished request with id {request_id!r} is known.",
        "not_found_error",
        "request_not_found",
        param="id",
    )


async def budget_states(request: web.Request) -> web.Response:
    """The configured budgets and where they stand now (the metrics' figures, with the window's
    bounds). A tenant's key sees the budgets named for its tenant only: a budget shared by
    every tenant (`*`) would tell it what the others spend."""
    reader = request.app[ACCESS].reader(request.headers)
    if isinstance(reader, web.Response):
        return reader
    budgets = request.app.get(BUDGETS)
    if budgets is None:
        return web.json_response({"budgets": []})
    now = time.time()
    documents = []
    for status in budgets.status(now):
        if reader.tenant is not None and status.tenant != reader.tenant:
            continue
        spec = status.spec
        documents.append(
            {
                "name": status.name,
                "scope": {"tenant": spec.tenant, "model": spec.model, "task": spec.task},
                "window": spec.window,
                "window_start": status.window_start,
                "window_end": status.window_end,
                "limit_joules": status.limit_joules,
                "used_joules": status.used_joules,
                "remaining_joules": max(0.0, status.limit_joules - status.used_joules),
                "action": status.action,
                "exceeded": status.used_joules >= status.limit_joules,
                "rejected_requests": status.rejected,
                "degraded_requests": status.degraded,
            }
        )
    return web.json_response({"budgets": documents})


async def metrics(request: web.Request) -> web.Response:
    refusal = request.app[ACCESS].metrics_refusal(request.headers)
    if refusal is not None:
        return refusal
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
    """The whole proxy: an aiohttp application for joulegate's own endpoints, holding the
    `Forwarder` for everything else; `serving` puts the front before both.

    The meter named by `config.meter` is opened at start-up; `meter` replaces it (tests hand
    in meters over a fake NVML)."""
    guard = LabelGuard(config.tenants, config.models, config.max_models)
    budgets = _budgets(config)
    ledger = open_ledger(
        config.ledger,
        config.data_dir,
        instance=config.instance,
        flush_interval=config.ledger_flush_interval_seconds,
        max_pending=config.ledger_max_pending,
    )
    store = RecordStore(RECORDS_KEPT if ledger is None else RECORDS_KEPT_WITH_LEDGER)
    recorder = Recorder(Metrics(guard), store, carbon=_carbon_model(config), budgets=budgets)
    classifier = Classifier(
        config.routes, config.api_keys, teams=config.teams, tenant_header=config.tenant_header
    )
    forwarder = Forwarder(config, classifier, recorder, budgets)
    if config.api_keys and config.admin_token is None:
        log.warning(
            "api_keys are configured but admin_token is not: every caller can read every"
            " tenant's records and budgets; set admin_token (JOULEGATE_ADMIN_TOKEN)"
        )

    given_meter = meter
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[_failures_in_openai_format]
    )
    app[CONFIG] = config
    app[RECORDER] = recorder
    app[FORWARDER] = forwarder
    app[ACCESS] = AccessControl(config.admin_token, config.metrics_token, classifier.key_tenant)
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
    # `.*`: an empty id or one with slashes is answered 400 here, not forwarded upstream.
    app.router.add_get("/joulegate/requests/{id:.*}", request_record)
    app.router.add_get("/joulegate/budgets", budget_states)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", _no_such_endpoint)
    return app


def front_limits(config: Config) -> Limits:
    """What joulegate's configuration says a client's request head may be."""
    return Limits(
        max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=config.max_header_bytes,
        max_headers=config.max_headers,
        header_timeout=config.client_header_timeout_seconds,
        keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS,
    )


def _own_socket_path() -> tuple[str, tempfile.TemporaryDirectory[str] | None]:
    """Where joulegate's own application listens for the front: on Linux an abstract Unix
    socket (no file, so a read-only root file system is no obstacle), elsewhere a file in a
    temporary directory."""
    if sys.platform.startswith("linux"):
        return f"\0joulegate-{os.getpid()}-{secrets.token_hex(8)}", None
    scratch = tempfile.TemporaryDirectory(prefix="joulegate-")
    return os.path.join(scratch.name, "own.sock"), scratch


@asynccontextmanager
async def serving(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `app` inside a running loop (tests, benchmarks, the demo); yields its base URL.

    joulegate's own application (one from `create_app`) is served through the front
    (`proxy.front`): forwarded requests go straight to its `Forwarder`, its own paths to the
    application on an internal Unix socket. On the way out the front stops accepting, lets
    requests in flight finish for up to `shutdown_timeout_seconds`, and only then is the
    application cleaned up (upstream pool, meter, ledger's last flush). Any other application
    (a test's upstream) is served by aiohttp as it comes. Handlers are cancelled when their
    client disconnects, in both."""
    config = app.get(CONFIG)
    if config is None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        try:
            yield f"http://{bound_host}:{bound_port}"
        finally:
            await runner.cleanup()
        return
    socket_path, scratch = _own_socket_path()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    front = None
    try:
        await web.SockSite(runner, listening_unix_socket(socket_path)).start()
        front = Front(
            app[FORWARDER].handle,
            partial(
                relay_to_unix_socket,
                path=socket_path,
                max_body=config.max_body_bytes,
                body_timeout=config.client_body_timeout_seconds,
            ),
            front_limits(config),
            asyncio.get_running_loop(),
        )
        bound_host, bound_port = await front.start(host, port)
        yield f"http://{bound_host}:{bound_port}"
    finally:
        if front is not None:
            await front.shutdown(config.shutdown_timeout_seconds)
        await runner.cleanup()
        if scratch is not None:
            scratch.cleanup()


def _access_summary(config: Config) -> str:
    """What guards joulegate's own endpoints, for the start banner; never a token itself."""
    records = (
        "open to anyone (no admin_token)"
        if config.admin_token is None
        else "need the admin token or a tenant's key"
    )
    metrics = "open" if config.metrics_token is None else "needs the metrics or admin token"
    return f"{records}; /metrics {metrics}"


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit, as systemd advises services that
    need many descriptors to do (and as Go programs do at start).

    Each proxied stream holds two sockets (client and upstream), so 1,000 concurrent SSE
    streams need over 2,000 descriptors, and the soft limit is often 1,024: past it, accept()
    fails and clients see refused connections.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard
        if hard == resource.RLIM_INFINITY:  # a soft limit of infinity is refused for NOFILE
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open files limit raised from %d to %d", soft, target)
    except (ImportError, OSError, ValueError) as error:  # no resource module, or not allowed
        log.debug("open files limit left as it is: %s", error)


async def _settle_garbage_collector(app: web.Application) -> None:
    """Move what start-up built (modules, configuration, the application) out of the cyclic
    garbage collector's sight, and let it run less often: each request makes a few hundred
    short-lived objects, nearly all freed by reference counting, and with the default
    threshold (700 allocations) collections cost about 5 % of joulegate's CPU under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are drained on the way out."""
    raise_open_files_limit()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = create_app(config)

    def announce(bound: str) -> None:
        """The banner, once joulegate listens (so it names the port it really has)."""
        port = bound.rsplit(":", 1)[1]
        host = "127.0.0.1" if config.listen_host in ("0.0.0.0", "::") else config.listen_host
        base = f"http://{host}:{port}"
        meter = app[SAMPLER].meter if SAMPLER in app else None
        print(
            f"joulegate {__version__} listening on {base}, forwarding to {config.upstream}\n"
            f"  meter:   {meter.name if meter else '-'} {list(meter.devices) if meter else ''}"
            f"{' (estimate)' if meter and meter.estimate else ''}\n"
            f"  metrics: {base}/metrics\n"
            f"  health:  {base}/joulegate/health\n"
            f"  records: {base}/joulegate/requests/<X-Request-Id>\n"
            f"  budgets: {base}/joulegate/budgets\n"
            f"  access:  records and budgets {_access_summary(config)}",
            file=sys.stderr,
            flush=True,
        )

    app.on_startup.append(_settle_garbage_collector)

    async def serve_until_signalled() -> None:
        # `web.run_app` cannot serve through the front; this is its loop, short.
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with serving(app, config.listen_host, config.listen_port) as bound:
            announce(bound)
            await stop.wait()

    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve_until_signalled())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
