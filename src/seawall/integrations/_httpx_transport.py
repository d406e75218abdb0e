"""``ProtectedTransport``: every request of an ``httpx.AsyncClient`` through ``infra.protect(key)``.

Re-exported by :mod:`seawall.integrations.httpx`; import it from there.
"""

from __future__ import annotations

import email.utils
import inspect
import math
from collections.abc import Awaitable, Callable, Container, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from seawall._extras import missing_extra

try:
    import httpx
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall._clock import Clock, current_clock
from seawall._errors import RateLimitExceeded
from seawall._logging import logger

if TYPE_CHECKING:
    from seawall._infrastructure import AsyncInfrastructure

__all__ = ["ProtectedTransport", "parse_retry_after"]

#: A function of the outgoing request that names its rate-limit bucket.
RequestEntity = Callable[[httpx.Request], str | Awaitable[str]]

#: Upper bound on how long an upstream's ``Retry-After`` can silence a bucket,
#: so a misconfigured upstream cannot switch a client off for a day.
MAX_RETRY_AFTER = 300.0


class _FailureStatus(Exception):
    """Raised inside the protected block so the breaker counts a failure status.

    It never leaves the transport: the response it carries is returned.
    """

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"upstream answered {response.status_code}")
        self.response = response


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value.

    Args:
        value: The header: delay-seconds (``"120"``) or an HTTP date.
        now: The current wall-clock time, for HTTP dates (default: now).

    Returns:
        Non-negative seconds, or ``None`` when the value is missing or invalid.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # An HTTP date is wall-clock time by definition; it is converted to a
        # delay once, here, and from then on only the monotonic clock is used.
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class ProtectedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends every request through ``infra.protect(key)``.

    Each request passes the key's rate limiter (bucket ``entity``), breaker,
    pool checkout and timeout, in that order, before it reaches the wrapped
    transport. The response body is read inside the protected block, so the
    timeout and the pool slot cover the whole exchange.

    * A response whose status is in ``failure_statuses`` counts as a breaker
      failure, and is still returned to the caller, not raised.
    * A transport error (``httpx.ConnectError``, ``httpx.TimeoutException``...)
      counts as a failure and propagates unchanged.
    * seawall's own refusals propagate as seawall errors
      (``RateLimitExceeded``, ``CircuitOpenError``, ``PoolTimeout``,
      ``ProtectionTimeout``), each with ``retry_after`` when known.
    * A key with a ``"retry"`` or ``"hedge"`` section re-sends the request
      for each attempt and hedge (a failure status is a failed attempt, and
      its response is returned when the retries run out), unless the
      request's body is a stream, which cannot be read twice: such a
      request makes one attempt.
    * An upstream ``429`` with ``Retry-After`` holds the request's bucket
      shut: until that time passes (at most ``max_retry_after``), requests
      for the same entity are denied locally with ``RateLimitExceeded`` and
      reach neither the limiter nor the upstream.

    Args:
        infra: The :class:`~seawall.AsyncInfrastructure`.
        key: The protection key configured on ``infra``.
        transport: The transport that sends (default ``httpx.AsyncHTTPTransport()``).
        failure_statuses: Statuses that count as breaker failures.
        entity: The rate-limit bucket: a ``str``, or a function of the
            ``httpx.Request`` returning one; ``None`` uses the key's shared bucket.
        max_retry_after: Cap on an upstream ``Retry-After``, in seconds.
        clock: Time source for the ``Retry-After`` holds (tests inject a fake);
            by default the running loop's, found when the transport is built.
        **protect_options: Passed to ``infra.protect()`` (``circuit_breaker``,
            ``connection_pool``, ``timeout``).
    """

    __slots__ = (
        "_clock",
        "_entity",
        "_failure_statuses",
        "_holds",
        "_infra",
        "_key",
        "_max_retry_after",
        "_options",
        "_transport",
    )

    def __init__(
        self,
        infra: AsyncInfrastructure,
        key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        failure_statuses: Container[int] = range(500, 600),
        entity: str | RequestEntity | None = None,
        max_retry_after: float = MAX_RETRY_AFTER,
        clock: Clock | None = None,
        **protect_options: Any,
    ) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {key!r}")
        if entity is not None and not (isinstance(entity, str) or callable(entity)):
            raise TypeError(f"entity must be a str or a function of the request, got {entity!r}")
        if entity is not None and "rate_limiter" in protect_options:
            raise TypeError("ProtectedTransport takes either entity= or rate_limiter=, not both")
        if not (isinstance(max_retry_after, int | float) and math.isfinite(max_retry_after) and max_retry_after >= 0):
            raise ValueError(f"max_retry_after must be a finite number >= 0, got {max_retry_after!r}")
        self._infra = infra
        self._key = key
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._failure_statuses = failure_statuses
        self._entity = entity
        self._max_retry_after = float(max_retry_after)
        self._clock = clock if clock is not None else current_clock()
        self._options: Mapping[str, Any] = protect_options
        # bucket -> monotonic time until which the upstream asked us to stop.
        self._holds: dict[str, float] = {}

    async def _bucket(self, request: httpx.Request) -> str | None:
        if self._entity is None or isinstance(self._entity, str):
            return self._entity
        result = self._entity(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str):
            raise TypeError(f"ProtectedTransport(entity=...) must return a str, got {result!r}")
        return result

    def _check_hold(self, bucket: str) -> None:
        until = self._holds.get(bucket)
        if until is None:
            return
        left = until - self._clock.now()
        if left <= 0:
            del self._holds[bucket]
            return
        raise RateLimitExceeded(
            f"upstream of {self._key!r} asked bucket {bucket!r} to wait; retry after {left:.3f}s",
            key=bucket,
            retry_after=left,
        )

    def _hold(self, bucket: str, response: httpx.Response) -> None:
        delay = parse_retry_after(response.headers.get("retry-after"))
        if delay is None or delay <= 0:
            return
        delay = min(delay, self._max_retry_after)
        now = self._clock.now()
        # Forget expired holds first: one entry per bucket that is still
        # silenced, never one per bucket ever seen.
        for expired in [name for name, until in self._holds.items() if until <= now]:
            del self._holds[expired]
        self._holds[bucket] = max(self._holds.get(bucket, now), now + delay)
        logger.warning("upstream_rate_limited", key=self._key, bucket=bucket, retry_after=delay)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the key's protection; see the class docs."""
        entity = await self._bucket(request)
        bucket = entity if entity is not None else "global"
        self._check_hold(bucket)
        options = dict(self._options)
        if entity is not None:
            options["rate_limiter"] = entity

        async def send() -> httpx.Response:
            # One attempt (or hedge): the request is sent afresh each time this runs.
            response = await _read_fully(await self._transport.handle_async_request(request), request)
            if response.status_code in self._failure_statuses:
                raise _FailureStatus(response)
            return response

        response: httpx.Response
        try:
            if _replayable(request):
                response = await self._infra.execute_protected(self._key, send, **options)
            else:
                async with self._infra.protect(self._key, **options):  # a streamed body is read once: one attempt
                    response = await send()
        except _FailureStatus as failure:
            return failure.response
        if response.status_code == 429:
            self._hold(bucket, response)
        return response

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._transport.aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"ProtectedTransport(key={self._key!r}, entity={self._entity!r}, held_buckets={len(self._holds)})"


def _replayable(request: httpx.Request) -> bool:
    """Whether ``request`` can be sent again: its body is in memory (a streamed body can be read once)."""
    try:
        request.content  # noqa: B018 - only asks whether the body is in memory
    except httpx.RequestNotRead:
        return False
    return True


async def _read_fully(response: httpx.Response, request: httpx.Request) -> httpx.Response:
    """Read the raw body inside the protected block and rebuild the response around it.

    The raw (still encoded) bytes are kept, so the client decodes them exactly
    as it would have decoded the stream.
    """
    try:
        response.content  # noqa: B018 - only asks whether the body is in memory already
    except httpx.ResponseNotRead:
        pass
    else:
        return response  # built in memory (httpx.MockTransport, a cache): nothing left to read
    try:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(body),
        extensions=response.extensions,
        request=request,
    )
