"""Forward one request to the upstream and stream its answer back, chunk by chunk.

The proxy must never be in the way of the traffic: bytes go to the client as they arrive,
failures come back in the OpenAI error format, and a client that leaves cancels the
upstream request so the GPU stops working for nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import time
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.budgets import Admission, Budgets, degrade_body
from proxy.classify import KEY_HEADERS, Classification, Classifier, parse_json_object
from proxy.config import Config
from proxy.front import BodyRefused, ClientRequest, read_body, received_body
from proxy.recorder import Recorder
from proxy.records import STATUS_ABORTED, STATUS_ERROR, STATUS_OK, RequestRecord
from proxy.upstream import (
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamRefused,
    UpstreamResponse,
    UpstreamTimeout,
)
from proxy.usage import SSEUsageReader, Usage, image_count, usage_from_json
from proxy.weights import POLICIES

log = logging.getLogger("joulegate")


REQUEST_ID_HEADER = "X-Request-Id"
# `X-Joulegate-Energy: inline` asks for the request's energy in its answer: a header on a
# whole answer, a last `joulegate.energy` event on an SSE stream. It costs up to one sampling
# interval of latency, so it is off by default.
INLINE_ENERGY_HEADER = "X-Joulegate-Energy"
ENERGY_HEADER = "X-Energy-Joules"
_ENERGY_HEADER_KEY = ENERGY_HEADER.lower()
_INLINE_ENERGY_WAIT_SECONDS = 5.0
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization"}
    | {"te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"}
)
# Host and Content-Length are set again for the upstream connection; Expect is answered here;
# the X-Forwarded-* and X-Request-Id headers are joulegate's to set (the client's chain is
# extended).
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", "x-request-id"}
_REQUEST_DROP |= {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
# The front writes its own Date and Server, as nginx does; length is set below when known;
# the request id is joulegate's.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server", "x-request-id"}
# A JSON answer is kept for reading its usage up to this size; larger ones pass uncounted.
_MAX_JSON_USAGE_BYTES = 64 * 1024 * 1024
# Answers of known length up to this size are read whole and sent in one write.
_WHOLE_ANSWER_BYTES = 1024 * 1024
# Client disconnects before the answer started are logged as nginx does.
CLIENT_CLOSED_REQUEST = 499


Headers = list[tuple[str, str]]


def _forwardable(
    headers: CIMultiDict[str] | CIMultiDictProxy[str], drop: frozenset[str]
) -> Headers:
    """The headers, in order, minus those `drop` names (lower case) and any the Connection
    header names. A list of pairs, not a multidict: it is only written out, once."""
    if "Connection" in headers:
        drop = drop | {
            token.strip().lower()
            for value in headers.getall("Connection")
            for token in value.split(",")
        }
    return [item for item in headers.items() if item[0].lower() not in drop]


def _wants_usage_injection(path: str, classification: Classification) -> bool:
    """An OpenAI-style stream that did not ask for usage: ask for it on the client's behalf."""
    body = classification.body
    if body is None or not classification.streaming or not path.endswith("/completions"):
        return False
    options = body.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True


def _with_usage_requested(body: dict[str, Any]) -> bytes | None:
    options = body.get("stream_options") or {}
    return _json_bytes(body | {"stream_options": options | {"include_usage": True}})


def _json_bytes(document: dict[str, Any]) -> bytes | None:
    """`document` as JSON; None for one nested too deeply to write back (parsed right at
    Python's recursion limit): that body then goes upstream as the client sent it."""
    try:
        return json.dumps(document).encode()
    except (RecursionError, ValueError):
        return None


def _apply_usage(record: RequestRecord, usage: Usage | None) -> None:
    if usage is None:
        return
    record.input_tokens = usage.input_tokens
    record.output_tokens = usage.output_tokens
    record.images = usage.images if usage.images is not None else record.images
    record.pixels = usage.pixels
    record.steps = usage.steps


class Forwarder:
    def __init__(
        self,
        config: Config,
        classifier: Classifier,
        recorder: Recorder,
        budgets: Budgets | None = None,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.recorder = recorder
        self.budgets = budgets
        self.pool: UpstreamPool | None = None
        self.weigh = POLICIES[config.weights]
        # With joulegate's own upstream key, the client's credentials (which identified its
        # tenant here) stay here: the upstream gets joulegate's key instead. Decided once, so
        # each request pays for one header set, not for a copy.
        self._request_drop = _REQUEST_DROP
        self._upstream_authorization: str | None = None
        if config.upstream_api_key is not None:
            self._request_drop = _REQUEST_DROP | {"authorization", *KEY_HEADERS}
            self._upstream_authorization = f"Bearer {config.upstream_api_key}"

    async def open(self) -> None:
        """The upstream connection pool: keep-alive, bytes passed on as they come."""
        self.pool = UpstreamPool(
            self.config.upstream,
            limit=self.config.upstream_connections,
            connect_timeout=self.config.connect_timeout_seconds,
            read_timeout=self.config.read_timeout_seconds,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def _request_id(self, request: ClientRequest) -> str:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        if is_sane_request_id(offered) and not self.recorder.knows(offered):
            return offered
        return new_request_id()

    def _upstream_headers(self, request: ClientRequest, request_id: str) -> Headers:
        headers = _forwardable(request.headers, self._request_drop)
        if self._upstream_authorization is not None:
            headers.append(("Authorization", self._upstream_authorization))
        chain = request.headers.get("X-Forwarded-For")
        remote = request.remote
        headers += (
            ("X-Forwarded-For", f"{chain}, {remote}" if chain else remote),
            ("X-Forwarded-Proto", request.scheme),
            ("X-Forwarded-Host", request.host),
            (REQUEST_ID_HEADER, request_id),
        )
        return headers

    async def handle(self, request: ClientRequest) -> None:
        start, started_at = time.monotonic(), time.time()
        request_id = self._request_id(request)
        id_header = {REQUEST_ID_HEADER: request_id}
        body = received_body(request, self.config.max_body_bytes)
        refusal = None
        if body is None:
            body, refusal = await self._read_body(request)
        classification = self.classifier.classify(request.path, request.headers, body)
        admission, degraded = None, None
        if self.budgets is not None and not (
            refusal or (self.config.require_api_key and not classification.identified)
        ):  # energy budgets: not for requests refused below anyway
            admission, body, classification, degraded = self._admit(
                self.budgets, body, classification, started_at
            )
        record = RequestRecord(
            id=request_id,
            task=classification.task,
            model=classification.model,
            tenant=classification.tenant,
            team=classification.team,
            streaming=classification.streaming,
            method=request.method,
            # As sent (percent-encoded, so always ASCII): a decoded %00 or %FF is text no
            # ledger could store.
            path=request.raw_path,
            upstream=self.config.upstream,
            started_at=started_at,
            start=start,
            degraded=degraded,
        )
        self.recorder.started(record, self.weigh(classification))
        if admission is not None:
            self.recorder.admitted(record.id, admission)
        try:
            if refusal is not None:
                self._refuse_body(request, record, refusal, id_header)
            elif self.config.require_api_key and not classification.identified:
                self._failed(
                    request,
                    record,
                    "no valid API key",
                    401,
                    "A valid API key is required.",
                    "invalid_request_error",
                    "invalid_api_key",
                    id_header,
                )
            elif admission is not None and admission.rejected:
                self._over_budget(request, record, admission, classification.tenant, id_header)
            else:
                await self._exchange(request, record, body, classification, id_header)
        except Exception:  # a bug here: the client still gets an answer, the record is kept
            log.exception("error forwarding %s %s", request.method, request.raw_path)
            if request.connection.answered:
                request.connection.abort()
            else:
                self._failed(
                    request,
                    record,
                    "proxy error",
                    500,
                    "joulegate failed while handling the request.",
                    "server_error",
                    "internal_error",
                    id_header,
                    close=True,
                )
        except asyncio.CancelledError:
            if record.status not in (STATUS_OK, STATUS_ABORTED, STATUS_ERROR):
                record.finish(
                    time.monotonic(),
                    STATUS_ABORTED,
                    record.code or CLIENT_CLOSED_REQUEST,
                    "client disconnected",
                )
            raise
        finally:
            if record.end is None:  # an unexpected exception: still recorded, never lost
                record.finish(time.monotonic(), STATUS_ERROR, record.code or 500, "proxy error")
            self.recorder.ended(record)

    async def _read_body(self, request: ClientRequest) -> tuple[bytes, BodyRefused | None]:
        """The whole request body (see `read_body`), or why it is refused."""
        try:
            body = await read_body(
                request, self.config.max_body_bytes, self.config.client_body_timeout_seconds
            )
        except BodyRefused as refusal:
            return b"", refusal
        return body, None

    def _refuse_body(
        self,
        request: ClientRequest,
        record: RequestRecord,
        refusal: BodyRefused,
        id_header: dict[str, str],
    ) -> None:
        """413 for a body over the limit, 400 for broken framing, 408 for a client too slow to
        send it. The connection is closed after any: the rest of the body is not read
        (reading on would give a slowloris what it wants), so where the next request starts
        is unknown."""
        self._failed(
            request,
            record,
            refusal.reason,
            refusal.status,
            refusal.message,
            "invalid_request_error",
            refusal.code,
            id_header,
            close=True,
        )

    # ---- energy budgets ----

    @staticmethod
    def _admit(
        budgets: Budgets, body: bytes, classification: Classification, now: float
    ) -> tuple[Admission, bytes, Classification, str | None]:
        """Admission against the energy budgets; a spent `degrade` budget rewrites the body
        (and so the model the request is recorded under and its weight)."""
        c = classification
        admission = budgets.admit(c.tenant, c.task, c.model, now)
        if admission.degrade is None or c.body is None:
            return admission, body, c, None
        rewritten, changes = degrade_body(c.body, c.task, admission.degrade)
        encoded = _json_bytes(rewritten) if changes else None
        if encoded is None:
            return admission, body, c, None
        model = rewritten.get("model")
        c = dataclasses.replace(
            c, body=rewritten, model=model if isinstance(model, str) and model else c.model
        )
        return admission, encoded, c, ", ".join(changes)

    def _over_budget(
        self,
        request: ClientRequest,
        record: RequestRecord,
        admission: Admission,
        tenant: str,
        id_header: dict[str, str],
    ) -> None:
        """429 in the OpenAI error format, with Retry-After until the budget has room again."""
        retry = admission.retry_after_seconds or 1
        names = ", ".join(admission.exceeded)
        message = (
            f"The energy budget {names} of tenant {tenant} is spent for this request"
            f" (about {admission.estimate_joules:.3g} J). Retry after {retry} s."
        )
        self._failed(
            request,
            record,
            f"energy budget {admission.exceeded[0]} spent",
            429,
            message,
            "energy_budget_exceeded",
            "energy_budget_exceeded",
            {**id_header, "Retry-After": str(retry)},
        )

    def _failed(
        self,
        request: ClientRequest,
        record: RequestRecord,
        reason: str,
        status: int,
        message: str,
        error_type: str,
        code: str,
        headers: dict[str, str],
        *,
        close: bool = False,
    ) -> None:
        """joulegate's own error answer (the OpenAI format); the record says why."""
        record.finish(time.monotonic(), STATUS_ERROR, status, reason)
        request.connection.send_error(status, message, error_type, code, headers, close=close)

    async def _exchange(
        self,
        request: ClientRequest,
        record: RequestRecord,
        body: bytes,
        classification: Classification,
        id_header: dict[str, str],
    ) -> None:
        assert self.pool is not None, "Forwarder.open() was not awaited"
        strip_usage_chunk = False
        if self.config.inject_stream_usage and _wants_usage_injection(request.path, classification):
            assert classification.body is not None
            requested = _with_usage_requested(classification.body)
            if requested is not None:
                body, strip_usage_chunk = requested, True
        upstream = None
        try:
            upstream = await self.pool.request(
                request.method, request.target, self._upstream_headers(request, record.id), body
            )
            await self._relay(request, upstream, record, strip_usage_chunk)
        except UpstreamRefused:
            self.recorder.metrics.upstream_errors["refused"].inc()
            self.recorder.release(record.id)  # never reached the upstream: no energy budgeted
            message = f"The upstream at {self.config.upstream} refused the connection."
            self._failed(
                request,
                record,
                "upstream refused connection",
                502,
                message,
                "upstream_error",
                "upstream_unavailable",
                id_header,
            )
        except UpstreamTimeout:
            self.recorder.metrics.upstream_errors["timeout"].inc()
            self._failed(
                request,
                record,
                "upstream timeout",
                504,
                f"The upstream at {self.config.upstream} did not answer in time.",
                "upstream_error",
                "upstream_timeout",
                id_header,
            )
        except UpstreamError as error:
            cause = "closed_mid_answer" if isinstance(error, UpstreamClosed) else "invalid_response"
            self.recorder.metrics.upstream_errors[cause].inc()
            self._failed(
                request,
                record,
                "bad upstream response",
                502,
                f"The upstream answered with an invalid response: {error}",
                "upstream_error",
                "bad_upstream_response",
                id_header,
            )
        finally:
            if upstream is not None:
                upstream.release()

    async def _energy_of(self, record: RequestRecord) -> RequestRecord:
        """End the record now and wait for its energy, for answers that carry it inline."""
        self.recorder.ended(record)
        return await self.recorder.settled(record, _INLINE_ENERGY_WAIT_SECONDS)

    async def _whole_answer(
        self,
        request: ClientRequest,
        upstream: UpstreamResponse,
        body: bytes,
        record: RequestRecord,
        keep_json: bool,
        headers: Headers,
        inline_energy: bool,
    ) -> None:
        """A small answer of known length, read whole: one write to the client, and an upstream
        failure while reading it can still be answered with a proper 502 or 504."""
        if keep_json:
            _read_usage(record, body)
        record.finish(time.monotonic(), STATUS_OK, upstream.status)
        if inline_energy:
            settled = await self._energy_of(record)
            headers = [item for item in headers if item[0].lower() != _ENERGY_HEADER_KEY]
            headers.append((ENERGY_HEADER, _joules(settled.energy_joules)))
        request.connection.send(upstream.status, headers, body, reason=upstream.reason)

    async def _relay(
        self,
        request: ClientRequest,
        upstream: UpstreamResponse,
        record: RequestRecord,
        strip_usage_chunk: bool,
    ) -> None:
        inline_energy = request.headers.get(INLINE_ENERGY_HEADER, "").lower() == "inline"
        content_type = upstream.headers.get("Content-Type", "").lower()
        encoded = upstream.headers.get("Content-Encoding", "identity").lower() != "identity"
        sse = None
        if content_type.startswith("text/event-stream") and not encoded:
            sse = SSEUsageReader(strip_usage_chunk)
        keep_json = (
            sse is None and not encoded and "json" in content_type and record.task != "other"
        )
        headers = _forwardable(upstream.headers, _RESPONSE_DROP)
        headers.append((REQUEST_ID_HEADER, record.id))
        length = upstream.content_length
        head_only = request.method == "HEAD"
        whole = sse is None and length is not None and length <= _WHOLE_ANSWER_BYTES
        if whole and not head_only:
            body = await upstream.read()
            await self._whole_answer(
                request, upstream, body, record, keep_json, headers, inline_energy
            )
            return
        connection = request.connection
        promised = length if not strip_usage_chunk else None
        record.code = upstream.status
        await connection.start(
            upstream.status, headers, promised, reason=upstream.reason, head_only=head_only
        )
        collected: bytearray | None = bytearray() if keep_json else None
        status, reason = STATUS_OK, None
        try:
            async for chunk in upstream.iter_chunks():
                if collected is not None:
                    collected += chunk
                    if len(collected) > _MAX_JSON_USAGE_BYTES:
                        collected = None
                out = sse.feed(chunk) if sse is not None else chunk
                if out:
                    await connection.write(out)
            if sse is not None and (tail := sse.flush()):
                await connection.write(tail)
        except UpstreamTimeout:
            self.recorder.metrics.upstream_errors["timeout"].inc()
            status, reason = STATUS_ABORTED, "upstream timed out mid-answer"
        except UpstreamError:
            self.recorder.metrics.upstream_errors["closed_mid_answer"].inc()
            status, reason = STATUS_ABORTED, "upstream closed mid-answer"
        except ConnectionResetError:
            status, reason = STATUS_ABORTED, "client disconnected"
        if sse is not None:
            _apply_usage(record, sse.usage)
        elif collected:
            _read_usage(record, bytes(collected))
        record.finish(time.monotonic(), status, upstream.status, reason)
        if reason == "client disconnected":
            return
        if status == STATUS_OK:
            tail = b""
            if inline_energy and sse is not None:
                settled = await self._energy_of(record)
                tail = _energy_event(settled)
            await connection.end(tail)
        elif promised is not None:
            connection.abort()  # a promised length cannot be kept: closing says it is short
        else:
            await connection.end()  # a chunked stream ends cleanly


def is_sane_request_id(value: str) -> bool:
    """Whether `value` could be a request id: one joulegate made, or a client's it kept."""
    return _SANE_REQUEST_ID.fullmatch(value) is not None


class _RandomHex:
    """Random hex digits from the operating system's generator, fetched 4 KiB at a time: one
    getrandom() call per 400 request ids instead of one each."""

    def __init__(self, batch: int = 4096) -> None:
        self._batch = batch
        self._hex = ""
        self._at = 0

    def take(self, digits: int) -> str:
        if self._at + digits > len(self._hex):
            self._hex, self._at = secrets.token_hex(self._batch), 0
        start = self._at
        self._at += digits
        return self._hex[start : self._at]


_random_hex = _RandomHex()


def new_request_id() -> str:
    """32 hex digits: milliseconds since 1970, then 80 random bits (the UUIDv7 layout).
    Time-ordered ids keep the ledger's index appends local: random ids cost a page each."""
    return f"{time.time_ns() // 1_000_000:012x}{_random_hex.take(20)}"


def _joules(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6f}"


def _energy_event(record: RequestRecord) -> bytes:
    """The last SSE event of a stream whose client asked for its energy inline."""
    document = {
        "id": record.id,
        "energy_joules": record.energy_joules,
        "dynamic_energy_joules": record.dynamic_energy_joules,
        "devices": record.devices,
        "meter": record.meter,
        "estimate": record.estimate,
    }
    return b"event: joulegate.energy\ndata: " + json.dumps(document).encode() + b"\n\n"


def _read_usage(record: RequestRecord, body: bytes) -> None:
    document = parse_json_object(body)
    if document is None:
        return
    _apply_usage(record, usage_from_json(document))
    if record.task == "image-generation" and record.images is None:
        record.images = image_count(document)
