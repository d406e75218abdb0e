"""The demo's upstream: a tiny HTTP/1.1 service on 127.0.0.1 that changes its mood.

It answers ``GET /quote`` according to the plan's phase: quickly with 200
while healthy or recovered, with 500 during the outage, and only after
``slow_delay`` during the slow spell. It is deliberately minimal (keep-alive,
``Content-Length`` bodies, no chunking) so the demo needs no web server
package for its upstream, and it binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import anyio.abc

__all__ = ["Upstream"]

_MAX_HEAD = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


class Upstream:
    """The local upstream service.

    Args:
        phase: Returns the current phase name (``healthy``, ``failing``,
            ``slow``, ``recovered``).
        slow_delay: Seconds a response takes during the ``slow`` phase.
    """

    __slots__ = ("_phase", "_slow_delay", "port", "served")

    def __init__(self, phase: Callable[[], str], *, slow_delay: float) -> None:
        self._phase = phase
        self._slow_delay = slow_delay
        self.port = 0
        self.served = 0

    @property
    def url(self) -> str:
        """The base URL, once :meth:`serve` has started."""
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free port of 127.0.0.1 and serve until cancelled; reports the port."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._connection)

    def _answer(self, method: str, path: str) -> tuple[int, dict[str, object], float]:
        if method != "GET" or path.split("?", 1)[0] != "/quote":
            return 404, {"error": "not_found"}, 0.0
        phase = self._phase()
        if phase == "failing":
            return 500, {"error": "outage"}, 0.0
        delay = self._slow_delay if phase == "slow" else 0.0
        return 200, {"quote": "the sea is calm", "phase": phase}, delay

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        buffer = b""
        try:
            async with stream:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        if len(buffer) > _MAX_HEAD:
                            return
                        buffer += await stream.receive()
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    parts = lines[0].split(" ")
                    headers = {
                        name.strip().lower(): value.strip()
                        for name, _, value in (line.partition(":") for line in lines[1:])
                    }
                    length = int(headers.get("content-length", "0") or 0)
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    buffer = buffer[length:]
                    body: dict[str, object]
                    if len(parts) != 3:
                        status, body, delay = 400, {"error": "bad_request"}, 0.0
                    else:
                        status, body, delay = self._answer(parts[0], parts[1])
                    if delay:
                        await anyio.sleep(delay)
                    payload = json.dumps(body).encode()
                    await stream.send(
                        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                        + payload
                    )
                    self.served += 1
                    if headers.get("connection", "").lower() == "close":
                        return
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ValueError):
            # The client went away (a timed-out request closes its connection)
            # or sent garbage: either way this connection is done.
            return
