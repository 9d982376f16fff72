"""Read what a response says it processed (tokens, images) without holding the stream back.

OpenAI-style servers put `usage` in JSON answers and, for streams, in a final chunk that is
only sent when the request asked for `stream_options.include_usage`. TGI puts
`details.generated_tokens` in its last event. Our model server adds `images`, `pixels` and
`steps` to `usage`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DETAILS_OBJECT = re.compile(rb'"details"\s*:\s*\{')
# An event that never ends (a server that sends no blank lines) must not be held back forever.
_MAX_PENDING_BYTES = 64 * 1024


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    images: int | None = None
    pixels: int | None = None
    steps: int | None = None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_from_json(document: Any) -> Usage | None:
    """The usage a JSON answer or stream chunk reports, or None if it reports none."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if isinstance(usage, dict):
        return Usage(
            input_tokens=_count(usage.get("prompt_tokens", usage.get("input_tokens"))),
            output_tokens=_count(usage.get("completion_tokens", usage.get("output_tokens"))),
            images=_count(usage.get("images")),
            pixels=_count(usage.get("pixels")),
            steps=_count(usage.get("steps")),
        )
    details = document.get("details")
    if isinstance(details, dict) and "generated_tokens" in details:
        return Usage(output_tokens=_count(details.get("generated_tokens")))
    return None


def image_count(document: Any) -> int | None:
    """Images in an OpenAI images answer (`data` holds one entry per image)."""
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return len(document["data"])
    return None


def _last_boundary(buffer: bytes) -> int:
    """Index just past the last blank line (end of a complete event), or 0 when there is none."""
    return max(
        buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0,
        buffer.rfind(b"\n\r\n") + 3 if b"\n\r\n" in buffer else 0,
        buffer.rfind(b"\r\r") + 2 if b"\r\r" in buffer else 0,
    )


def _event_data(event: bytes) -> bytes:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\n".join(
        line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")
    ).strip()


class SSEUsageReader:
    """Scans a server-sent-event stream for usage; optionally drops the usage-only chunk.

    In pass-through mode (`strip_usage_chunk=False`) every byte is forwarded the moment it
    arrives and a copy of the incomplete trailing event is kept for scanning. When joulegate
    itself asked for usage, the usage-only chunk (`choices: []` with `usage`) must not reach
    the client, so bytes are forwarded per complete event instead.
    """

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from upstream; return the bytes to send to the client now."""
        buffer = self._pending + chunk if self._pending else chunk
        end = _last_boundary(buffer)
        complete, self._pending = buffer[:end], buffer[end:]
        if len(self._pending) > _MAX_PENDING_BYTES:
            complete, self._pending = buffer, b""
        forward = self._scan(complete) if complete else b""
        return chunk if not self.strip_usage_chunk else forward

    def flush(self) -> bytes:
        """The end of the stream: what is still held back, scanned as a last event."""
        rest, self._pending = self._pending, b""
        forward = self._scan(rest) if rest.strip() else rest
        return forward if self.strip_usage_chunk else b""

    def _scan(self, complete: bytes) -> bytes:
        if not (_USAGE_OBJECT.search(complete) or _DETAILS_OBJECT.search(complete)):
            return complete
        kept = []
        for event in re.split(rb"(?<=\n\n)|(?<=\n\r\n)|(?<=\r\r)", complete):
            if not event:
                continue
            if _USAGE_OBJECT.search(event) or _DETAILS_OBJECT.search(event):
                try:
                    document = json.loads(_event_data(event))
                except (ValueError, RecursionError):
                    document = None
                found = usage_from_json(document)
                if found is not None:
                    self.usage = found
                    if self.strip_usage_chunk and document.get("choices") == []:
                        continue
            kept.append(event)
        return b"".join(kept)
