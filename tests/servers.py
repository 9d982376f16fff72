"""Start real aiohttp servers on loopback for end-to-end tests: upstreams and joulegate itself."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from proxy.config import load_config
from proxy.meter import Meter
from proxy.server import create_app, serving

serve = serving


@asynccontextmanager
async def joulegate(
    upstream: str, meter_instance: Meter | None = None, **settings: Any
) -> AsyncIterator[tuple[str, web.Application]]:
    """joulegate in front of `upstream`, configured like `serve --config` with `settings`
    (the synthetic meter at 100 W unless `meter_instance` or a `meter` spec is given)."""
    settings.setdefault("meter", "synthetic:100")
    settings.setdefault("ledger", "off")  # tests that keep records durably ask for one
    config = load_config(environ={}, overrides={"upstream": upstream, **settings})
    app = create_app(config, meter=meter_instance)
    async with serve(app) as url:
        yield url, app


async def settled(app: web.Application, timeout: float = 5.0) -> None:
    """Wait until every request joulegate saw is published: the meter read past its end."""
    import asyncio

    from proxy.server import RECORDER

    recorder = app[RECORDER]
    deadline = asyncio.get_running_loop().time() + timeout
    while recorder.pending or recorder.in_flight:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{len(recorder.pending)} records never settled")
        await asyncio.sleep(0.01)


def metric_series(exposition: str, name: str) -> dict[str, float]:
    """Every sample of metric `name` in a Prometheus text exposition, by its label string."""
    found = {}
    for line in exposition.splitlines():
        match = re.fullmatch(rf"{name}(\{{[^}}]*\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def free_port() -> int:
    """A loopback port nothing listens on (it was bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"
