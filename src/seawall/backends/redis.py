"""Rate-limit buckets and circuit breaker state in Redis, shared between processes and hosts.

:class:`RedisBackend` implements :class:`~seawall.backends.RateLimitBackend`
and :class:`~seawall.backends.BreakerBackend`: every decision is one
``EVALSHA`` of a Lua script (``_redis_scripts.py``, ``_redis_breaker.py``)
that reads the server's clock, decides and writes atomically on the server.
So limiters and breakers in any number of processes that share a Redis and a
rule share their state, and their clocks never need to agree.

Decisions are *pipelined automatically*: a decision asked for while another
is on the wire waits for it and then goes out with every other decision
that queued meanwhile, as one write and one read on one connection. A lone
caller pays one round trip; a hundred concurrent callers pay about two
between them instead of a hundred (each still one ``EVALSHA``, so the server
runs exactly one script per decision). A lone caller sends its own decision
(no task hop); queued ones are sent by a task of the backend, so a caller
cancelled while queued is simply never sent, and one cancelled on the wire
only costs its own connection (redis-py drops it; the next decision opens
another). A decision that was sent may have been taken.

When Redis fails (refused connection, socket timeout, any Redis error) the
policy decides: ``on_error="allow"`` admits the hit (fail open) and
``"deny"`` raises :class:`~seawall.RateLimiterError` from the Redis error.
Both emit the ``("seawall", "rate_limiter", "rate_limiter_exception")``
event and log a warning (at most one a second). No decision waits longer
than the client's socket timeout: the replies of a batch share one deadline
of that length, and :meth:`RedisBackend.from_url` builds its client without
retries.

redis-py's asyncio client runs on asyncio only: under trio, building a
backend (the constructor, :meth:`RedisBackend.from_url`) and its first
decision fail at once with a :class:`~seawall.ConfigurationError` that says
so, never deep inside redis-py.
"""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from seawall._clock import in_trio_task
from seawall._errors import CircuitOpenError, ConfigurationError, RateLimiterError
from seawall._logging import logger
from seawall._telemetry import LIMITER_EXCEPTION
from seawall.backends import _redis_breaker as breaker_wire
from seawall.backends._breaker_protocol import (
    Admission,
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    Outcome,
    Ticket,
    Transition,
)
from seawall.backends._limiter_memory import GcraTable
from seawall.backends._limiter_protocol import RateLimitDecision, RateLimitRule, check_rule, tolerance
from seawall.backends._redis_scripts import FIXED_WINDOW, GCRA

__all__ = ["RedisBackend"]

OnError = Literal["allow", "deny"]

#: Decisions sent in one write at most; a larger queue goes out in several.
_MAX_BATCH: Final = 1024
#: Seconds between two warnings about a failing Redis (telemetry sees every failure).
_WARN_EVERY: Final = 1.0
#: The errors that mean "Redis failed" (redis-py wraps socket errors in its own).
_BACKEND_ERRORS: Final = (RedisError, OSError)

_Command = bytes  # one command, already in the wire format (RESP)


def _key(text: str) -> bytes:
    r"""A key's bytes on the wire: UTF-8, with lone surrogates passed through.

    Redis keys are binary-safe, and any ``str`` is a valid bucket or breaker
    name (``json.loads('"\ud800"')`` makes one). ``surrogatepass`` keeps the
    encoding one-to-one: strict UTF-8 never contains an encoded surrogate, so
    no two names share a key.
    """
    return text.encode("utf-8", "surrogatepass")


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _pack(*args: bytes) -> bytes:
    """One command in the wire format: packed here, since redis-py's packer is a quarter of the client's work."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


_COST_ONE: Final = _bulk(b"1.0")
_TAKE: Final = _bulk(b"1")
_LOOK: Final = _bulk(b"0")


class _Wire:
    """What every decision under one rule sends, packed once: all but the key and the cost."""

    __slots__ = ("head", "name", "rule", "table", "tail")

    def __init__(self, rule: RateLimitRule, name: str) -> None:
        self.rule = rule
        self.name = name
        script = GCRA if rule.algorithm == "gcra" else FIXED_WINDOW
        # EVALSHA <sha> 1 <key> <horizon | window> <interval | ceiling> <cost> <take>
        self.head = b"*8\r\n" + _bulk(b"EVALSHA") + _bulk(script.sha.encode()) + _bulk(b"1")
        slack = 1.0 + tolerance(rule.limit)
        if script is GCRA:
            first, second = rule.window * slack, rule.window / rule.limit
        else:
            first, second = float(rule.window), rule.limit * slack
        self.tail = _bulk(repr(first).encode()) + _bulk(repr(second).encode())
        # GCRA decisions are described by the memory table's own arithmetic (it is pure in the backlog).
        self.table = GcraTable(rule) if script is GCRA else None

    def command(self, key: str, cost: float, take: bytes) -> bytes:
        cost_bulk = _COST_ONE if cost == 1 else _bulk(repr(float(cost)).encode())
        return self.head + _bulk(_key(self.name + key)) + self.tail + cost_bulk + take


class RedisBackend:
    """Rate-limit buckets and breaker state in Redis: one atomic script per decision, on the server's clock.

    Use :meth:`from_url` to let the backend own its client, or pass an
    existing ``redis.asyncio.Redis`` (which the backend then only borrows:
    :meth:`aclose` leaves it open). The backend holds one connection of the
    client's pool while it has decisions to send.

    Args:
        client: A ``redis.asyncio.Redis`` client (not a cluster client).
        prefix: The namespace of every key the backend writes
            (``<prefix>:rl:<rule>:<key>`` for buckets, ``<prefix>:cb:<name>`` for breakers).
        on_error: What a decision does when Redis fails: ``"allow"`` admits
            the hit (or the call), ``"deny"`` raises :class:`~seawall.RateLimiterError`
            (:class:`~seawall.CircuitOpenError` for a breaker).

    Raises:
        TypeError: ``client`` is not a ``redis.asyncio.Redis`` or ``prefix`` not a str.
        ValueError: ``on_error`` is neither ``"allow"`` nor ``"deny"``
            (a :class:`~seawall.ConfigurationError`).
        ConfigurationError: Built under trio (redis-py runs on asyncio only);
            a backend built outside any loop raises it at its first decision under trio.
    """

    __slots__ = (
        "_closed",
        "_connection",
        "_failures",
        "_flusher",
        "_idle",
        "_owns_client",
        "_pool",
        "_queue",
        "_rules",
        "_sending",
        "_warned_at",
        "client",
        "on_error",
        "prefix",
    )

    def __init__(self, client: aioredis.Redis, *, prefix: str = "seawall", on_error: OnError = "allow") -> None:
        _require_asyncio("RedisBackend()")
        if not isinstance(client, aioredis.Redis):
            raise TypeError(f"client must be a redis.asyncio.Redis, got {client!r}")
        _check_options(prefix, on_error)
        self.client: Final = client
        self.prefix: Final = prefix
        self.on_error: Final[OnError] = on_error
        self._owns_client = False
        self._pool: ConnectionPool = client.connection_pool
        self._connection: AbstractConnection | None = None
        self._queue: list[tuple[_Command, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sending = False  # a caller or the flusher is sending: only one at a time uses the connection
        self._idle = asyncio.Event()  # set while nobody is sending (aclose waits for it)
        self._idle.set()
        self._rules: dict[RateLimitRule, _Wire] = {}
        self._closed = False
        self._failures = 0
        self._warned_at = -math.inf

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "seawall",
        on_error: OnError = "allow",
        socket_timeout: float = 0.5,
        **client_options: Any,
    ) -> RedisBackend:
        """A backend that owns a new client for ``url`` (closed by :meth:`aclose`).

        Args:
            url: A Redis URL, e.g. ``redis://localhost:6379/0``.
            prefix: The namespace of every key the backend writes.
            on_error: ``"allow"`` (admit when Redis fails) or ``"deny"``
                (raise :class:`~seawall.RateLimiterError`).
            socket_timeout: Seconds a connect, write or read may take; a
                decision never waits longer for Redis (the client does not retry).
            **client_options: Passed on to ``redis.asyncio.Redis.from_url``.

        Raises:
            ValueError: ``socket_timeout`` is not finite and positive, or ``on_error`` is unknown.
            ConfigurationError: Called under trio (redis-py runs on asyncio only).
        """
        _require_asyncio("RedisBackend.from_url()")
        if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, int | float):
            raise TypeError(f"socket_timeout must be a finite positive number, got {socket_timeout!r}")
        if not (math.isfinite(socket_timeout) and socket_timeout > 0):
            raise ConfigurationError(
                f"socket_timeout must be a finite positive number, got {socket_timeout!r}", path="socket_timeout"
            )
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # A retry would multiply the time a decision can take when Redis is down.
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(client_options)
        _check_options(prefix, on_error)  # before a client exists that would need closing
        backend = cls(aioredis.Redis.from_url(url, **options), prefix=prefix, on_error=on_error)
        backend._owns_client = True
        return backend

    # -- the RateLimitBackend protocol ----------------------------------------

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        """Take ``cost`` from bucket ``key`` if it fits now on the server's clock; one round trip."""
        wire = self._rule(rule)
        try:
            reply = await self._call(wire.command(key, cost, _TAKE))
        except _BACKEND_ERRORS as exc:
            return self._failed(key, cost, rule, exc, "take")
        return _decision(reply, cost, rule, wire.table, peek=False)

    async def peek(self, key: str, rule: RateLimitRule) -> RateLimitDecision:
        """Report bucket ``key`` as a hit of cost 1 would find it now, taking nothing."""
        wire = self._rule(rule)
        try:
            reply = await self._call(wire.command(key, 1, _LOOK))
        except _BACKEND_ERRORS as exc:
            return self._failed(key, 1, rule, exc, "peek")
        return _decision(reply, 1, rule, wire.table, peek=True)

    async def reset(self, key: str, rule: RateLimitRule) -> None:
        """Forget bucket ``key``.

        Raises:
            RateLimiterError: Redis failed, whatever the policy (a reset must not pass silently).
        """
        name = self._rule(rule).name
        try:
            await self._call(_pack(b"DEL", _key(name + key)))
        except _BACKEND_ERRORS as exc:
            self._report(key, 1, rule, exc, "reset")
            raise RateLimiterError(key=key) from exc

    # -- the BreakerBackend protocol ------------------------------------------
    # ``now`` (the breaker's clock) is not used: the script reads the server's clock.

    async def breaker_admit(self, name: str, policy: BreakerPolicy, now: float) -> Admission:
        """Admit a call or reject it, in one round trip.

        When Redis fails, ``on_error="allow"`` admits the call as if the breaker
        were closed, and ``"deny"`` rejects it with :class:`~seawall.CircuitOpenError`.
        """
        try:
            reply = await self._call(self._breaker_command(name, policy, b"admit"))
        except _BACKEND_ERRORS as exc:
            self._warn("circuit_breaker_backend_failed", exc, name=name, operation="admit")
            if self.on_error == "deny":
                raise CircuitOpenError(name=name) from exc
            # A plain call of no generation: its failure is reported to Redis when it answers again.
            return Admission(Ticket(-1, None), 0.0, BreakerState.CLOSED, None)
        return breaker_wire.admission(reply)

    async def breaker_settle(
        self, name: str, policy: BreakerPolicy, now: float, ticket: Ticket | None, outcome: Outcome
    ) -> Transition | None:
        """Record how an admitted call ended; a Redis failure is logged, never raised over the call's result."""
        try:
            reply = await self._call(
                self._breaker_command(name, policy, b"settle", *breaker_wire.settle_arguments(ticket, outcome))
            )
        except _BACKEND_ERRORS as exc:
            self._warn("circuit_breaker_backend_failed", exc, name=name, operation="settle")
            return None
        return breaker_wire.transition(reply)

    async def breaker_force(
        self, name: str, policy: BreakerPolicy, now: float, state: BreakerState
    ) -> Transition | None:
        """Force the state to CLOSED (failures cleared) or OPEN (for a fresh ``recovery_time``).

        Raises:
            ValueError: ``state`` is HALF_OPEN.
            redis.exceptions.RedisError: Redis failed (an explicit command must not pass silently).
        """
        if state is BreakerState.HALF_OPEN:
            raise ValueError(f"a breaker can be forced to closed or open, not {state!r}")
        return breaker_wire.transition(
            await self._call(self._breaker_command(name, policy, b"force", state.value.encode()))
        )

    async def breaker_snapshot(self, name: str, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        """Report the state without changing it.

        Raises:
            redis.exceptions.RedisError: Redis failed.
        """
        return breaker_wire.snapshot(await self._call(self._breaker_command(name, policy, b"snapshot")))

    def _breaker_command(self, name: str, policy: BreakerPolicy, operation: bytes, *extra: bytes) -> bytes:
        key = _key(f"{self.prefix}:cb:{name}")
        return _pack(
            b"EVALSHA", breaker_wire.BREAKER.sha.encode(), b"1", key, operation, *breaker_wire.arguments(policy), *extra
        )

    # -- lifetime ---------------------------------------------------------

    async def aclose(self) -> None:
        """Finish the decisions in flight, return the connection, and close the client if it is ours."""
        if self._closed:
            return
        self._closed = True
        # Decisions on the wire (and those queued behind them) finish first; bounded by the socket timeout.
        await self._idle.wait()
        await self._drop_connection()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"queued={len(self._queue)}"
        return f"RedisBackend(prefix={self.prefix!r}, on_error={self.on_error!r}, rules={len(self._rules)}, {state})"

    # -- internals --------------------------------------------------------

    def _rule(self, rule: RateLimitRule) -> _Wire:
        found = self._rules.get(rule)
        if found is None:
            check_rule(rule)
            # The whole rule is in the name, so limiters with different rules never share a bucket.
            # The name is length-prefixed: a ``:`` in it cannot make two rules collide.
            named = "-" if rule.name is None else f"{len(rule.name)}:{rule.name}"
            name = f"{self.prefix}:rl:{rule.algorithm}:{float(rule.limit)!r}:{float(rule.window)!r}:{named}:"
            found = self._rules[rule] = _Wire(rule, name)
        return found

    async def _call(self, command: _Command) -> Any:
        """Queue ``command`` for the next batch and wait for its reply."""
        if self._closed:
            raise RuntimeError("RedisBackend is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (only the first decision of a backend built outside any loop gets here)
            _require_asyncio("a decision")
            raise
        future: asyncio.Future[Any] = loop.create_future()
        item = (command, future)
        if self._sending:
            # Someone is on the wire: go out with the next batch.
            self._queue.append(item)
            return await future
        # Nobody is talking to Redis: send this one decision from this task (no task hop,
        # the common case of a lone caller). Callers arriving meanwhile queue up, and
        # a task sends them once this round trip is over.
        self._sending = True
        self._idle.clear()
        try:
            await self._send([item], retry_scripts=True)
        finally:
            if self._queue:
                self._flusher = loop.create_task(self._flush())
            else:
                self._sending = False
                self._idle.set()
        return future.result()

    async def _flush(self) -> None:
        """Send the queue in batches until it is empty (the one task that talks to Redis)."""
        try:
            while self._queue:
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:_MAX_BATCH]
                # A caller cancelled before its turn: its decision is never sent.
                batch = [item for item in batch if not item[1].done()]
                if batch:
                    await self._send(batch, retry_scripts=True)
        finally:
            self._flusher = None
            self._sending = False
            self._idle.set()

    async def _send(self, batch: list[tuple[_Command, asyncio.Future[Any]]], *, retry_scripts: bool) -> None:
        missing: list[tuple[_Command, asyncio.Future[Any]]] = []
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call] # redis-py leaves it untyped
            await connection.send_packed_command(b"".join([command for command, _ in batch]))
            # One deadline for the batch's replies instead of one timer per reply (a third of
            # the client's work under load); expiry raises TimeoutError, a backend error.
            async with asyncio.timeout(connection.socket_timeout):
                await _read_replies(connection, batch, missing if retry_scripts else None)
                if missing:
                    for script in (GCRA, FIXED_WINDOW, breaker_wire.BREAKER):
                        await connection.send_packed_command(_pack(b"SCRIPT", b"LOAD", script.source.encode()))
                        await connection.read_response(timeout=math.inf)
        except BaseException as exc:
            # The connection is in an unknown state: drop it, fail everything still waiting.
            for _, future in (*batch, *missing):
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            await asyncio.shield(self._drop_connection())
            if not isinstance(exc, Exception):
                raise
            return
        if missing:
            await self._send(missing, retry_scripts=False)

    async def _drop_connection(self) -> None:
        connection = self._connection
        if connection is not None:
            self._connection = None
            await self._pool.release(connection)

    def _failed(
        self, key: str, cost: float, rule: RateLimitRule, exc: BaseException, operation: str
    ) -> RateLimitDecision:
        self._report(key, cost, rule, exc, operation)
        if self.on_error == "deny":
            raise RateLimiterError(key=key) from exc
        # Fail open: the hit is admitted as if the bucket were empty.
        limit = math.floor(rule.limit)
        return RateLimitDecision(True, 0.0, 0.0, limit, 0.0, 0.0)

    def _report(self, key: str, cost: float, rule: RateLimitRule, exc: BaseException, operation: str) -> None:
        if LIMITER_EXCEPTION.handlers:
            LIMITER_EXCEPTION.emit(
                {"cost": cost},
                {
                    "key": key,
                    "limit": rule.limit,
                    "window": rule.window,
                    "algorithm": rule.algorithm,
                    "name": rule.name,
                    "operation": operation,
                    "policy": self.on_error,
                    "error": exc,
                },
            )
        self._warn("rate_limiter_backend_failed", exc, key=key, operation=operation)

    def _warn(self, event: str, exc: BaseException, **context: Any) -> None:
        # One warning a second at most: a Redis outage must not turn every request into a log line.
        self._failures += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            logger.warning(
                event,
                backend="redis",
                policy=self.on_error,
                error=f"{type(exc).__name__}: {exc}",
                failures=self._failures,
                **context,
            )
            self._warned_at = now
            self._failures = 0


def _require_asyncio(operation: str) -> None:
    """Fail at once under trio: redis-py's asyncio client would fail deep inside, on asyncio's missing loop."""
    if in_trio_task():
        raise ConfigurationError(
            f"backend: RedisBackend runs on asyncio only (redis-py's asyncio client), and {operation} was "
            "called under trio; under trio use the in-memory backend (backend=None)",
            path="backend",
        ) from None


def _check_options(prefix: object, on_error: object) -> None:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r}")
    if on_error not in ("allow", "deny"):
        raise ConfigurationError(f"on_error must be 'allow' or 'deny', got {on_error!r}", path="on_error")


def _decision(
    reply: Any, cost: float, rule: RateLimitRule, table: GcraTable | None, *, peek: bool
) -> RateLimitDecision:
    """Turn a script's reply into the decision the memory backend would have made."""
    parts = reply.split()  # bytes, or str from a client with decode_responses=True
    admitted = int(parts[0]) == 1
    state = float(parts[1])
    if table is not None:
        count, remaining, next_after, reset_after = table.describe(state, 0.0)
        retry_after = 0.0
        if not (admitted or peek):
            wait = state + cost * rule.window / rule.limit - rule.window
            retry_after = wait if wait > 0.0 else 0.0
    else:
        left = float(parts[2])
        count = state
        remaining = max(math.floor(rule.limit * (1.0 + tolerance(rule.limit)) - count), 0)
        next_after = 0.0 if remaining >= 1 else left
        reset_after = left if count > 0 else 0.0
        retry_after = 0.0 if admitted or peek else left
    if peek:
        admitted = next_after == 0.0
    return RateLimitDecision(admitted, retry_after, count, remaining, reset_after, next_after)


async def _read_replies(
    connection: AbstractConnection,
    batch: list[tuple[_Command, asyncio.Future[Any]]],
    missing: list[tuple[_Command, asyncio.Future[Any]]] | None,
) -> None:
    """Read one reply per command of ``batch`` into its future.

    A ``NOSCRIPT`` reply (the server lost its scripts: a restart, ``SCRIPT
    FLUSH``) puts the command in ``missing`` to be sent again once the scripts
    are loaded; with ``missing`` ``None`` (that second try) it is an error.
    """
    for item in batch:
        future = item[1]
        try:
            reply = await connection.read_response(timeout=math.inf)
        except NoScriptError as exc:
            if missing is not None:
                missing.append(item)
            elif not future.done():
                future.set_exception(exc)
            continue
        except ResponseError as exc:
            if not future.done():
                future.set_exception(exc)
            continue
        if not future.done():
            future.set_result(reply)
