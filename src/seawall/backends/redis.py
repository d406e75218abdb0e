"""Rate-limit buckets and circuit breaker state in Redis, shared between processes and hosts.

:class:`RedisBackend` implements :class:`~seawall.backends.RateLimitBackend`
and :class:`~seawall.backends.BreakerBackend`: every decision is one
``EVALSHA`` of a Lua script (``_redis_scripts.py``, ``_redis_breaker.py``)
that reads the server's clock, decides and writes atomically on the server.
So limiters and breakers in any number of processes that share a Redis and a
rule share their state, and their clocks never need to agree.

Decisions are *pipelined automatically*, per server (``_redis_link.py``): a
decision asked for while another is on the wire goes out with every other
decision that queued meanwhile, as one write and one read on one connection.
With a ``redis.asyncio.RedisCluster`` each primary gets its own pipeline;
every bucket and every breaker is one key, so one hash slot. During a
resharding a decision follows ``ASK`` (with ``ASKING``, that decision only),
``TRYAGAIN`` (sent again shortly) and ``MOVED`` (a new slot map), within its
deadline: see :meth:`RedisBackend._cluster_call`.

Outage or misconfiguration. :meth:`RedisBackend.verify` (run by
``AsyncInfrastructure.__aenter__`` and before the first decision) checks that
the server accepts the scripts, is writable (not a replica), matches the
client's mode (cluster or not) and speaks the client's protocol, and raises
:class:`~seawall.ConfigurationError` naming the reason otherwise. A server
that does not answer is an outage: decisions follow ``on_error`` and the
check runs again when it answers. At run time, an outage (refused
connection, timeout, a server loading its data) logs a warning at most once
a second, and an *error reply* (``READONLY`` after a failover, ``MOVED`` to a plain client,
``WRONGTYPE``, ``OOM``...) logs at error level, each reason at most once a
second with the count of the others; both follow ``on_error`` and emit the
``("seawall", "backend", "error")`` event with their ``reason`` every time.

``on_error="allow"`` admits the hit (fail open), ``"deny"`` raises
:class:`~seawall.RateLimiterError` from the Redis error, and ``"local"``
decides on a bucket in this process holding ``local_share`` of the rule's
limit (the memory backend's arithmetic); every decision asks Redis first, so
the first one it answers is Redis's again. Every caller,
queued or not, waits at most the socket timeout for Redis, from its call to
its answer, reconnects included.

Breakers keep a view of each breaker in the process, fed by the replies and
by a pub/sub subscription to the prefix's channel: a closed breaker's
successes cost no round trip, a failure one (see ``_redis_breaker.py``).
In the rate modes a success is counted in the process, per time bucket, and
reaches Redis with the breaker's next round trip or the backend's flush, at
most :data:`~seawall.backends._redis_breaker.FLUSH_INTERVAL` later.

redis-py's asyncio client runs on asyncio only: under trio, building a
backend (the constructor, :meth:`RedisBackend.from_url`) and its first
decision fail at once with a :class:`~seawall.ConfigurationError` that says
so, never deep inside redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from seawall._extras import missing_extra

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import AbstractConnection, Connection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.cluster import PRIMARY
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        AuthenticationError,
        BusyLoadingError,
        ClusterDownError,
        MovedError,
        NoPermissionError,
        OutOfMemoryError,
        ReadOnlyError,
        RedisClusterException,
        RedisError,
        ResponseError,
        TryAgainError,
    )
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall._checks import number
from seawall._clock import Clock, default_clock, require_asyncio
from seawall._errors import CircuitOpenError, ConfigurationError, RateLimiterError
from seawall._logging import Throttle
from seawall._telemetry import BACKEND_ERROR, LIMITER_EXCEPTION
from seawall.backends import _redis_breaker as breaker_wire
from seawall.backends._breaker_memory import BreakerRecord
from seawall.backends._breaker_protocol import (
    Admission,
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    Outcome,
    Ticket,
    Transition,
)
from seawall.backends._limiter_memory import GcraTable, MemoryRateLimitBackend
from seawall.backends._limiter_protocol import RateLimitDecision, RateLimitRule, check_rule, tolerance
from seawall.backends._redis_link import Link, pack
from seawall.backends._redis_scripts import FIXED_WINDOW, GCRA, MULTI, PROBE

__all__ = ["KEY_FORMAT", "RedisBackend"]

OnError = Literal["allow", "deny", "local"]

#: The format version in every key and channel name (``<prefix>:v2:...``). Processes of another
#: format count apart from these (see docs/redis.md, "Rolling upgrades").
KEY_FORMAT: Final = "v2"
#: The errors that mean "Redis failed" (redis-py wraps socket errors in its own).
_BACKEND_ERRORS: Final = (RedisError, OSError)
_SCRIPTS: Final = (GCRA.source, FIXED_WINDOW.source, MULTI.source, breaker_wire.BREAKER.source, PROBE.source)
#: Seconds verify() may take when the client sets no socket timeout.
_VERIFY_TIMEOUT: Final = 5.0
#: ASK and MOVED redirects one cluster decision may follow (redis-py's cluster client allows 16 too).
_REDIRECTS: Final = 16
#: A decision answered TRYAGAIN (its keys split by a migration) is sent again after a pause, in seconds:
#: the first, the longest (doubling), and the most paused in all (within the deadline too).
_TRY_AGAIN: Final = (0.002, 0.1, 5.0)
#: Slots verify() probes on one cluster node at most while the probed ones are being migrated.
_PROBES: Final = 4
#: Seconds between two attempts to subscribe to the breaker channel again (doubling, at most the second value).
_RESUBSCRIBE: Final = (0.05, 1.0)


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


_COST_ONE: Final = _bulk(b"1.0")
_TAKE: Final = _bulk(b"1")
_LOOK: Final = _bulk(b"0")


class _Wire:
    """What every decision under one rule sends, packed once: all but the key and the cost."""

    __slots__ = ("arguments", "head", "name", "rule", "table", "tail")

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
        self.arguments = (repr(first).encode(), repr(second).encode())
        self.tail = _bulk(self.arguments[0]) + _bulk(self.arguments[1])
        # GCRA decisions are described by the memory table's own arithmetic (it is pure in the backlog).
        self.table = GcraTable(rule) if script is GCRA else None

    def key(self, key: str) -> bytes:
        return _key(self.name + key)

    def command(self, key: bytes, cost: float, take: bytes) -> bytes:
        cost_bulk = _COST_ONE if cost == 1 else _bulk(repr(float(cost)).encode())
        return self.head + _bulk(key) + self.tail + cost_bulk + take


def classify(exc: BaseException) -> tuple[str, bool]:
    """Why Redis failed: ``(reason, misconfigured)``.

    A misconfiguration (a replica, a cluster behind a plain client, a protocol
    the server does not speak, scripts refused or replicated verbatim, missing
    rights) will not go away by waiting; anything else is an outage or an
    error of one key.
    """
    if isinstance(exc, AuthenticationError):
        return "authentication", True
    if isinstance(exc, BusyLoadingError):
        return "loading", False
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return "timeout", False
    if isinstance(exc, ResponseError):
        return _reply_reason(exc)
    if isinstance(exc, RedisClusterException) and "cluster mode is not enabled" in str(exc).lower():
        return "cluster", True
    return "connection", False


_REPLY_REASONS: Final = (
    # (words in the error reply, reason, misconfigured): the first match wins
    ("READONLY", "replica", True),
    ("MASTERDOWN", "cluster_down", False),
    ("CLUSTERDOWN", "cluster_down", False),
    ("TRYAGAIN", "cluster_down", False),
    ("MOVED", "cluster", True),
    ("ASK", "cluster", True),
    ("HELLO", "protocol", True),
    ("NON DETERMINISTIC", "script_replication", True),
    ("NOPERM", "permission", True),
    ("UNKNOWN COMMAND", "scripts", True),
    ("NOSCRIPT", "scripts", True),
    ("WRONGTYPE", "wrong_type", False),
    ("OOM", "out_of_memory", False),
    ("BUSY", "busy", False),
)


def _reply_reason(exc: ResponseError) -> tuple[str, bool]:
    if isinstance(exc, ReadOnlyError):
        return "replica", True
    if isinstance(exc, ClusterDownError | TryAgainError):
        return "cluster_down", False
    if isinstance(exc, AskError):  # MovedError too
        # A cluster client follows redirects (RedisBackend._cluster_call): one that reaches here is a plain
        # client on a cluster node, or a cluster decision past its redirect bound.
        return "cluster", True
    if isinstance(exc, NoPermissionError):
        return "permission", True
    if isinstance(exc, OutOfMemoryError):
        return "out_of_memory", False
    text = str(exc).upper()
    for words, reason, misconfigured in _REPLY_REASONS:
        if words in text:
            return reason, misconfigured
    return "error_reply", False


_ADVICE: Final = {
    "replica": "the server is a read-only replica: point the backend at the primary",
    "cluster": "the client's mode does not match the server's (a cluster node behind a plain client, or the "
    "reverse): use RedisBackend.from_url(url, cluster=True) or RedisBackend(RedisCluster(...)) for a cluster",
    "protocol": "the server does not speak the client's protocol (HELLO: RESP3 needs Redis >= 6); "
    "pass protocol=2 to the client",
    "script_replication": "the server replicates scripts verbatim (lua-replicate-commands no) and refuses "
    "the scripts' effects replication; Redis >= 6.2 is required",
    "permission": "the Redis user lacks a command the backend needs (EVALSHA, SCRIPT LOAD, INFO, PUBLISH, "
    "SUBSCRIBE, and the keys under the prefix)",
    "scripts": "the server refuses Lua scripts (EVALSHA/SCRIPT LOAD disabled or renamed)",
    "authentication": "the server refused the credentials",
}


def _misconfigured(reason: str, exc: BaseException | None, where: str) -> ConfigurationError:
    detail = "" if exc is None else f" ({type(exc).__name__}: {exc})"
    return ConfigurationError(
        f"backend: Redis misconfigured at {where}, reason {reason!r}: {_ADVICE.get(reason, reason)}{detail}",
        path="backend",
    )


class RedisBackend:
    """Rate-limit buckets and breaker state in Redis: one atomic script per decision, on the server's clock.

    Use :meth:`from_url` to let the backend own its client, or pass an
    existing ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``
    (which the backend then only borrows: :meth:`aclose` leaves it open).
    The backend holds one connection per server while it has decisions to
    send, and one more for the breakers' subscription once a breaker is used.

    Args:
        client: A ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` client.
        prefix: The namespace of every key the backend writes
            (``<prefix>:v2:rl:<rule>:<key>`` for buckets, ``<prefix>:v2:cb:<name>`` for breakers).
        on_error: What a decision does when Redis fails: ``"allow"`` admits
            the hit (or the call), ``"deny"`` raises :class:`~seawall.RateLimiterError`
            (:class:`~seawall.CircuitOpenError` for a breaker), ``"local"``
            decides the hit on this process's own bucket of ``local_share``
            times the limit (a breaker decides as under ``"allow"``).
        local_share: Under ``on_error="local"``, the share of each rule's limit
            a process's own bucket holds while Redis fails, in ``(0, 1]``
            (at least one hit's worth, or the whole limit when it is below 1).
            A fleet of N processes admits up to N times ``local_share`` times
            the limit during an outage: ``1 / N`` keeps the fleet's total.
        socket_timeout: Seconds a decision waits for Redis at most, queueing and
            reconnecting included; ``None`` takes the client's ``socket_timeout``.
        clock: ``None`` (the default): breakers are timed by the server's clock,
            so the hosts' clocks need not agree. A :class:`~seawall.Clock`
            (such as :class:`~seawall.FakeClock`): breaker operations are timed
            by its ``now()`` instead, for tests on virtual time; every process
            sharing the breakers must then read the same clock.

    Raises:
        TypeError: ``client`` is not a redis-py asyncio client or ``prefix`` not a str.
        ValueError: ``on_error`` is not ``"allow"``, ``"deny"`` or ``"local"``, or
            ``local_share`` is not a number in ``(0, 1]`` (or is set under another
            policy) (a :class:`~seawall.ConfigurationError` naming the option).
        ConfigurationError: Built under trio (redis-py runs on asyncio only);
            a backend built outside any loop raises it at its first decision under trio.
    """

    __slots__ = (
        "_channel",
        "_closed",
        "_cluster",
        "_down",
        "_flush_handle",
        "_flushing",
        "_links",
        "_listener",
        "_live",
        "_local",
        "_local_rules",
        "_log",
        "_now",
        "_outage_failures",
        "_outage_records",
        "_owns_client",
        "_policies",
        "_pubsub",
        "_rules",
        "_server_clock",
        "_single",
        "_successes",
        "_timeout",
        "_verified",
        "_verifying",
        "_views",
        "client",
        "local_share",
        "on_error",
        "prefix",
    )

    #: Breakers on Redis implement the rate modes (see ``_redis_breaker.py``).
    supports_rate_modes = True

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str = "seawall",
        on_error: OnError = "allow",
        local_share: float = 1.0,
        socket_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        _require_asyncio("RedisBackend()")
        if not isinstance(client, aioredis.Redis | RedisCluster):
            raise TypeError(f"client must be a redis.asyncio.Redis or redis.asyncio.RedisCluster, got {client!r}")
        share = _check_options(prefix, on_error, local_share)
        if socket_timeout is not None:
            _check_timeout(socket_timeout)
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationError(f"clock must provide now() and sleep(), got {clock!r}", path="clock")
        self.client: Final = client
        self.prefix: Final = prefix
        self.on_error: Final[OnError] = on_error
        self.local_share: Final = share
        # on_error="local": the process's own buckets, on its monotonic clock (the memory backend's arithmetic).
        self._local = MemoryRateLimitBackend(clock=default_clock) if on_error == "local" else None
        self._local_rules: dict[RateLimitRule, RateLimitRule] = {}  # a rule -> its local share
        self._owns_client = False
        self._cluster = client if isinstance(client, RedisCluster) else None
        if isinstance(client, RedisCluster):
            timeout = client.get_connection_kwargs().get("socket_timeout")
        else:
            timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._timeout: float | None = socket_timeout if socket_timeout is not None else timeout
        self._links: dict[str, Link] = {}
        self._single = None if self._cluster is not None else self._plain_link()
        self._rules: dict[RateLimitRule, _Wire] = {}
        self._closed = False
        self._verified = False
        self._verifying: asyncio.Task[None] | None = None
        self._log = Throttle(1.0)
        self._views: dict[str, breaker_wire.View] = {}
        # Failures Redis could not hear, per breaker: loop times within the window (see _fail_locally).
        self._outage_failures: dict[str, deque[float]] = {}
        self._policies: dict[str, BreakerPolicy] = {}
        self._channel = _key(f"{prefix}:{KEY_FORMAT}:cb")
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None  # the subscription's redis-py PubSub while listening
        self._live = False
        self._down = False  # a breaker round trip met an outage, and none has answered since
        # The breakers' clock: the views' times, and (a caller's clock only) the scripts' "now".
        self._now = time.monotonic if clock is None else clock.now
        self._server_clock = b"-" if clock is None else None  # the script's "now": "-" reads TIME
        # Rate modes: plain successes Redis has not counted yet, per breaker, and the flush that sends them.
        self._successes: dict[str, breaker_wire.Successes] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        # Rate modes during an outage: the outcomes Redis could not hear, judged in the process (memory's rules).
        self._outage_records: dict[str, BreakerRecord] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        prefix: str = "seawall",
        on_error: OnError = "allow",
        local_share: float = 1.0,
        socket_timeout: float = 0.5,
        clock: Clock | None = None,
        **client_options: Any,
    ) -> RedisBackend:
        """A backend that owns a new client for ``url`` (closed by :meth:`aclose`).

        Args:
            url: A Redis URL, e.g. ``redis://localhost:6379/0``; ``?cluster=true``
                in it means ``cluster=True``.
            cluster: Build a ``redis.asyncio.RedisCluster`` (``url`` names any node).
            prefix: The namespace of every key the backend writes.
            on_error: ``"allow"`` (admit when Redis fails), ``"deny"``
                (raise :class:`~seawall.RateLimiterError`) or ``"local"`` (decide
                on this process's bucket of ``local_share`` times the limit).
            local_share: The share of the limit in ``(0, 1]`` a process decides
                on under ``on_error="local"`` (see the class).
            socket_timeout: Seconds a connect, write or read may take; a
                decision never waits longer for Redis (the client does not retry).
            clock: The breakers' clock (see the class); ``None``: the server's.
            **client_options: Passed on to ``Redis.from_url`` (``RedisCluster.from_url``).

        Raises:
            ValueError: ``socket_timeout`` is not finite and positive, ``on_error`` is unknown,
                or ``local_share`` is not in ``(0, 1]``.
            ConfigurationError: Called under trio (redis-py runs on asyncio only).
        """
        _require_asyncio("RedisBackend.from_url()")
        _check_timeout(socket_timeout)
        url, in_url = _cluster_from_url(url)
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # A retry would multiply the time a decision can take when Redis is down.
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(client_options)
        _check_options(prefix, on_error, local_share)  # before a client exists that would need closing
        wanted = cluster or in_url
        client = RedisCluster.from_url(url, **options) if wanted else aioredis.Redis.from_url(url, **options)
        backend = cls(client, prefix=prefix, on_error=on_error, local_share=local_share, clock=clock)
        backend._owns_client = True
        return backend

    # -- the RateLimitBackend protocol ----------------------------------------

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        """Take ``cost`` from bucket ``key`` if it fits now on the server's clock; one round trip."""
        wire = self._rule(rule)
        name = wire.key(key)
        try:
            reply = await self._call(name, wire.command(name, cost, _TAKE))
        except _BACKEND_ERRORS as exc:
            return await self._failed(key, cost, rule, exc, "take")
        return _decision(reply, cost, rule, wire.table, peek=False)

    async def take_all(
        self, key: str, cost: float, rules: tuple[RateLimitRule, ...]
    ) -> tuple[bool, tuple[RateLimitDecision, ...]]:
        """Take ``cost`` from bucket ``key`` under every rule or none, in one script (one round trip).

        The rules' keys must share a cluster slot: :class:`~seawall.MultiRateLimiter`
        passes a ``key`` that starts with a hash tag of its own.
        """
        wires = [self._rule(rule) for rule in rules]
        names = [wire.key(key) for wire in wires]
        arguments = [repr(float(cost)).encode(), b"1"]
        for wire in wires:
            arguments += [b"g" if wire.table is not None else b"f", *wire.arguments]
        command = pack(b"EVALSHA", MULTI.sha.encode(), str(len(names)).encode(), *names, *arguments)
        try:
            reply = await self._call(names[0], command)
        except _BACKEND_ERRORS as exc:
            return await self._all_failed(key, cost, rules, exc)
        parts = reply.split()
        decisions = tuple(
            _decision(
                b" ".join(_ascii(part) for part in parts[1 + 3 * i : 4 + 3 * i]), cost, rule, wire.table, peek=False
            )
            for i, (rule, wire) in enumerate(zip(rules, wires, strict=True))
        )
        return int(parts[0]) == 1, decisions

    async def peek(self, key: str, rule: RateLimitRule) -> RateLimitDecision:
        """Report bucket ``key`` as a hit of cost 1 would find it now, taking nothing."""
        wire = self._rule(rule)
        name = wire.key(key)
        try:
            reply = await self._call(name, wire.command(name, 1, _LOOK))
        except _BACKEND_ERRORS as exc:
            return await self._failed(key, 1, rule, exc, "peek")
        return _decision(reply, 1, rule, wire.table, peek=True)

    async def reset(self, key: str, rule: RateLimitRule) -> None:
        """Forget bucket ``key``.

        Raises:
            RateLimiterError: Redis failed, whatever the policy (a reset must not pass silently).
        """
        name = self._rule(rule).key(key)
        if self._local is not None and rule in self._local_rules:
            # The process's own bucket too: the next outage must not start from a bucket reset since.
            await self._local.reset(key, self._local_rules[rule])
        try:
            await self._call(name, pack(b"DEL", name))
        except _BACKEND_ERRORS as exc:
            self._report(key, 1, rule, exc, "reset")
            raise RateLimiterError(key=key) from exc

    # -- the BreakerBackend protocol ------------------------------------------
    # ``now`` (the breaker's clock) is not used: the script reads the server's clock.

    def breaker_admit_local(self, name: str, policy: BreakerPolicy) -> Ticket | None:
        """The plain ticket of a call admitted from the process's closed view, or ``None`` (ask :meth:`breaker_admit`).

        The same closed-state decision as :meth:`breaker_admit` makes first,
        without a coroutine; a plain call's success costs nothing afterwards
        (see :meth:`breaker_settle`).
        """
        view = self._views.get(name)
        if view is None or (self._down and self.on_error == "deny"):
            return None
        admitted = view.admission
        return None if admitted is None else admitted.ticket

    async def breaker_admit(self, name: str, policy: BreakerPolicy, now: float) -> Admission:
        """Admit a call or reject it: from the process's view while closed or open, else in one round trip.

        When Redis fails, ``on_error="allow"`` (and ``"local"``) decides on the process's own
        view (an open breaker it knows of stays open; else the call is admitted
        as if closed), and ``"deny"`` rejects it with :class:`~seawall.CircuitOpenError`.
        """
        view = self._views.get(name)
        if view is not None and not (self._down and self.on_error == "deny"):
            # Closed: admitted here. A change made elsewhere arrives by pub/sub, or with the reply to
            # this process's next failure at the latest (so a lost subscription delays it, no more).
            admitted = view.admission
            if admitted is not None:
                return admitted
            # Open: rejected here while the view is confirmed (a reset elsewhere would have been heard).
            if view.state is BreakerState.OPEN and view.confirmed and self._live:
                left = view.open_until - self._now()
                if left > 0.0:
                    return Admission(None, left, BreakerState.OPEN, None)
        key = self._breaker_key(name)
        try:
            reply = await self._call(key, self._breaker_command(key, name, policy, b"admit"))
        except _BACKEND_ERRORS as exc:
            self._breaker_failed(exc, name, "admit")
            if self.on_error == "deny":
                raise CircuitOpenError(name=name) from exc
            if view is not None and view.state is BreakerState.OPEN:
                left = view.open_until - self._now()
                if left > 0.0:
                    return Admission(None, left, BreakerState.OPEN, None)
            # A plain call of no generation: judged as current when it settles.
            return Admission(Ticket(-1, None), 0.0, BreakerState.CLOSED, None)
        found, facts = breaker_wire.admission(reply)
        self._learn(name, facts)
        return found

    def breaker_succeed_local(self, name: str, policy: BreakerPolicy, ticket: Ticket | None) -> None:
        """Count a plain call's success (not slow) under a rated policy, without a round trip.

        The success waits in the process, in its time bucket, for the
        breaker's next round trip or the flush at most
        :data:`~seawall.backends._redis_breaker.FLUSH_INTERVAL` later (see
        :class:`~seawall.backends._breaker_protocol.LocalSuccess`). During an outage it is
        judged with the process's other outcomes instead.
        """
        if self._down:
            self._count_locally(name, policy, failed=False, slow=False)
            return
        generation = -1 if ticket is None else ticket.generation
        successes = self._successes.get(name)
        if successes is None or successes.generation != generation:
            # (Successes of another period would decide nothing on the server: they are dropped.)
            successes = self._successes[name] = breaker_wire.Successes(generation, policy.window / 10)
            self._policies[name] = policy
            if self._flush_handle is None and not self._closed:
                loop = asyncio.get_running_loop()
                self._flush_handle = loop.call_later(breaker_wire.FLUSH_INTERVAL, self._flush_soon)
        successes.add(self._now())

    async def breaker_settle(
        self,
        name: str,
        policy: BreakerPolicy,
        now: float,
        ticket: Ticket | None,
        outcome: Outcome,
        *,
        slow: bool = False,
    ) -> Transition | None:
        """Record how an admitted call ended; a plain call's success costs nothing, a failure one round trip.

        In the rate modes a plain success is counted in the process (see
        :meth:`breaker_succeed_local`) unless it was slow: a slow call, like
        a failure, is judged at once. A Redis failure is logged, never
        raised over the call's result.
        """
        plain = ticket is None or ticket.trial is None
        if plain and outcome != "failure":
            if outcome == "success" and policy.rated:
                if not slow:
                    self.breaker_succeed_local(name, policy, ticket)
                    return None
            else:
                return None  # a plain call that did not fail never changes the state (count mode)
        key = self._breaker_key(name)
        settled = breaker_wire.settle_arguments(ticket, outcome, slow and policy.rated)
        command = self._breaker_command(key, name, policy, b"settle", *settled)
        try:
            reply = await self._call(key, command)
        except _BACKEND_ERRORS as exc:
            self._breaker_failed(exc, name, "settle")
            if self.on_error == "deny" or not plain:
                return None  # ("deny" rejects every call of an outage: nothing to count.)
            if policy.rated:
                return self._count_locally(name, policy, failed=outcome == "failure", slow=slow)
            return self._fail_locally(name, policy)
        found, facts = breaker_wire.transition(reply)
        self._learn(name, facts)
        return found

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
        key = self._breaker_key(name)
        self._successes.pop(name, None)  # a new period: they would decide nothing
        reply = await self._call(key, self._breaker_command(key, name, policy, b"force", state.value.encode()))
        found, facts = breaker_wire.transition(reply)
        self._learn(name, facts)
        return found

    async def breaker_snapshot(self, name: str, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        """Report the state without changing it.

        When Redis fails (logged and emitted as for a call) the answer is the
        process's own view, marked ``reachable=False``: an open breaker it knows
        of, with the recovery time it has left, else closed; the counts live in
        Redis and are reported as ``0``. A status read must answer during an
        outage, whatever ``on_error`` (a health check reads it).
        """
        key = self._breaker_key(name)
        try:
            reply = await self._call(key, self._breaker_command(key, name, policy, b"snapshot"))
        except _BACKEND_ERRORS as exc:
            self._breaker_failed(exc, name, "snapshot")
            view = self._views.get(name)
            left = -math.inf if view is None or view.state is not BreakerState.OPEN else view.open_until
            left -= self._now()
            if left > 0.0:
                return BreakerSnapshot(BreakerState.OPEN, 0, left, 0, reachable=False)
            return BreakerSnapshot(BreakerState.CLOSED, 0, 0.0, 0, reachable=False)
        found, facts = breaker_wire.snapshot(reply, policy)
        self._learn(name, facts)
        return found

    def _breaker_key(self, name: str) -> bytes:
        return _key(f"{self.prefix}:{KEY_FORMAT}:cb:{name}")

    def _breaker_command(self, key: bytes, name: str, policy: BreakerPolicy, operation: bytes, *extra: bytes) -> bytes:
        """One run of the breaker script; the breaker's waiting successes go with it (and leave the process)."""
        self._policies[name] = policy
        clock = self._server_clock
        now = clock if clock is not None else repr(self._now()).encode()
        successes = b""
        if policy.rated and operation not in (b"force", b"restore"):
            waiting = self._successes.pop(name, None)
            if waiting is not None:
                # (Lost with the round trip if Redis fails: an outage judges from its own outcomes.)
                successes = waiting.argument(self._now())
        return pack(
            b"EVALSHA",
            breaker_wire.BREAKER.sha.encode(),
            b"1",
            key,
            operation,
            *breaker_wire.arguments(policy),
            self._channel,
            _key(name),
            now,
            breaker_wire.rate_argument(policy),
            successes,
            *extra,
        )

    def _fail_locally(self, name: str, policy: BreakerPolicy) -> Transition | None:
        """Count a failure Redis could not hear in the process's own window; open the process's view at the threshold.

        So a process keeps its breaker during an outage (``"allow"``/``"local"``):
        ``failure_threshold`` failures within ``window`` on this process open
        its view for ``recovery_time``, after which calls run again (each one
        first tries Redis). Redis's answer, when it comes, replaces all of it.
        """
        failures = self._outage_failures.get(name)
        if failures is None:
            failures = self._outage_failures[name] = deque()
        now = self._now()
        failures.append(now)
        while failures and failures[0] <= now - policy.window:
            failures.popleft()
        if len(failures) < policy.failure_threshold:
            return None
        failures.clear()
        return self._open_locally(name, policy, now)

    def _count_locally(self, name: str, policy: BreakerPolicy, *, failed: bool, slow: bool) -> Transition | None:
        """A rated breaker's plain outcome Redis could not hear, judged by memory's rules on the process's own calls.

        As :meth:`_fail_locally` in count mode: the process's view opens when
        its own calls of the outage reach a rate (or ``failure_threshold``),
        and Redis's answer, when it comes, replaces all of it.
        """
        if self.on_error == "deny":
            return None  # every call of the outage is rejected: nothing to count
        record = self._outage_records.get(name)
        if record is None:
            record = self._outage_records[name] = BreakerRecord()
        now = self._now()
        transition = record.count(policy, now, failed, slow)
        if transition is None:
            return None
        del self._outage_records[name]  # the next period of the outage starts afresh
        return self._open_locally(name, policy, now)

    def _open_locally(self, name: str, policy: BreakerPolicy, now: float) -> Transition | None:
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = breaker_wire.View(BreakerState.CLOSED, 0, -math.inf, False)
        old = view.state
        view.learn(BreakerState.OPEN, view.generation, policy.recovery_time, now, reply=False)
        view.confirmed = False  # (an OPEN view of this process alone: admissions still try Redis first)
        return Transition(old, BreakerState.OPEN) if old is not BreakerState.OPEN else None

    # -- rate modes: the successes the process counted, sent in batches --------

    def _flush_soon(self) -> None:
        self._flush_handle = None
        if not self._closed and self._successes and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send every breaker's waiting successes, one ``add`` each (pipelined together)."""
        try:
            names = list(self._successes)
            # (An error other than Redis's own, such as a failed verify(), is the next call's to raise.)
            await asyncio.gather(*(self._add(name) for name in names), return_exceptions=True)
        finally:
            self._flushing = None
        if self._successes and not self._closed and self._flush_handle is None:
            # (Successes counted while this flush was on the wire.)
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(breaker_wire.FLUSH_INTERVAL, self._flush_soon)

    async def _add(self, name: str) -> None:
        policy = self._policies.get(name)
        if policy is None or name not in self._successes:
            return
        key = self._breaker_key(name)
        try:
            reply = await self._call(key, self._breaker_command(key, name, policy, b"add"))
        except _BACKEND_ERRORS as exc:
            self._breaker_failed(exc, name, "add")
            return
        except RuntimeError:
            return  # closed meanwhile
        self._learn(name, breaker_wire.transition(reply)[1])

    def _learn(self, name: str, facts: breaker_wire.Facts) -> None:
        """Take in what a reply says of breaker ``name`` (and start listening for changes made elsewhere)."""
        state, generation, left = facts
        self._down = False
        self._outage_failures.pop(name, None)  # Redis answers: its count is the one
        self._outage_records.pop(name, None)
        now = self._now()
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = breaker_wire.View(state, generation, -math.inf, self._live)
        view.learn(state, generation, left, now, reply=True)
        view.confirmed = self._live
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    # -- the subscription: state changes made by other processes ---------------

    async def _listen(self) -> None:
        """Follow the prefix's breaker channel; re-publish what this process knows open when it comes back."""
        delay = _RESUBSCRIBE[0]
        while not self._closed:
            pubsub = self._pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                confirmation = await pubsub.get_message(timeout=self._timeout or _VERIFY_TIMEOUT)
                if confirmation is None:
                    raise RedisTimeoutError("no subscription confirmation")
                self._live = True
                delay = _RESUBSCRIBE[0]
                await self._republish()
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") in ("message", b"message"):
                        self._on_message(message["data"])
            except _BACKEND_ERRORS as exc:
                self._lost_subscription(exc)
            finally:
                self._live = False
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call] # redis-py leaves it untyped
            if not self._closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESUBSCRIBE[1])

    def _lost_subscription(self, exc: BaseException) -> None:
        self._live = False
        for view in self._views.values():
            view.confirmed = False  # changes may be missed from now on: ask the server again
        self._log.warning(
            "circuit_breaker_subscription_lost", ("subscription", self.prefix), backend="redis", error=_text(exc)
        )

    def _on_message(self, data: bytes | str) -> None:
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
        name_bytes, (state, generation, left) = breaker_wire.message(raw)
        view = self._views.get(name_bytes.decode("utf-8", "surrogatepass"))
        if view is not None:
            view.learn(state, generation, left, self._now(), reply=False)
            view.confirmed = True

    async def _republish(self) -> None:
        """Write the OPEN states this process knows back to a server that lost them (a restart without persistence)."""
        now = self._now()
        for name, view in list(self._views.items()):
            left = view.open_until - now
            policy = self._policies.get(name)
            if view.state is not BreakerState.OPEN or left <= 0.0 or policy is None:
                continue
            key = self._breaker_key(name)
            extra = (repr(left).encode(), str(view.generation).encode())
            command = self._breaker_command(key, name, policy, b"restore", *extra)
            try:
                reply = await self._call(key, command)
            except _BACKEND_ERRORS:
                # The first command after a restart may meet the old connection: one more on a new one.
                reply = await self._call(key, command)
            self._learn(name, breaker_wire.transition(reply)[1])

    # -- checking the server -------------------------------------------------

    async def verify(self) -> bool:
        """Check that the server can serve this backend; ``False`` when it does not answer (an outage).

        The checks, on every primary: the server answers in the client's
        protocol (``HELLO`` for RESP3), it is not a replica, its cluster mode
        matches the client's, it loads the scripts, and a script may read the
        server clock and then write (scripts replicated by their effects). A
        server that does not answer is not a misconfiguration: the check runs
        again before the next decision.

        Returns:
            ``True`` when verified, ``False`` when Redis did not answer in time.

        Raises:
            ConfigurationError: A misconfiguration; the message names the reason
                (``replica``, ``cluster``, ``protocol``, ``scripts``,
                ``script_replication``, ``permission``, ``authentication``).
        """
        _require_asyncio("RedisBackend.verify()")
        loop = asyncio.get_running_loop()
        try:
            await self._verify_until(loop.time() + (self._timeout or _VERIFY_TIMEOUT))
        except _BACKEND_ERRORS as exc:
            self._outage(exc, "verify", {})
            return False
        return True

    async def _verify_until(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                if self._cluster is None:
                    await self._verify_plain()
                else:
                    await self._verify_cluster(self._cluster)
        except _BACKEND_ERRORS as exc:
            reason, misconfigured = classify(exc)
            if misconfigured:
                raise _misconfigured(reason, exc, "connect") from exc
            raise
        self._verified = True

    async def _verify_plain(self) -> None:
        client = self.client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        try:
            await _probe(connection, _key(f"{self.prefix}:{KEY_FORMAT}:probe"), cluster=False)
        finally:
            await pool.release(connection)

    async def _verify_cluster(self, cluster: RedisCluster) -> None:
        try:
            await cluster.initialize()
        except RedisClusterException as exc:
            raise _misconfigured("cluster", exc, "connect") from exc
        for node in cluster.get_primaries():
            for probe_key in itertools.islice(self._probe_keys(cluster, node), _PROBES):
                connection = await _node_connection(node)
                broken = True
                try:
                    await _probe(connection, probe_key, cluster=True)
                    broken = False
                except (AskError, TryAgainError):
                    # The probe key's slot is being migrated (or has just moved): its script ran nowhere,
                    # every other check passed. Probe another slot of this node.
                    broken = False
                    continue
                finally:
                    await _release_node(node, connection, broken)
                break
            # (A node whose every probed slot is moving - being drained - has passed the other checks.)

    def _probe_keys(self, cluster: RedisCluster, node: ClusterNode) -> Iterator[bytes]:
        """Probe keys of this prefix, each in another slot that ``node`` serves."""
        seen: set[int] = set()
        for attempt in range(100_000):
            key = _key(f"{self.prefix}:{KEY_FORMAT}:probe:{attempt}")
            slot = key_slot(key)
            if slot not in seen and cluster.nodes_manager.get_node_from_slot(slot).name == node.name:
                seen.add(slot)
                yield key
        if not seen:  # pragma: no cover - a node serving no slot
            raise _misconfigured("cluster", None, node.name)

    # -- lifetime ---------------------------------------------------------

    async def aclose(self) -> None:
        """Finish the decisions in flight, return the connections, and close the client if it is ours."""
        if self._closed:
            return
        # Successes the process counted and Redis has not: sent now, so a closing process loses none.
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        if self._successes:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(self._add(name) for name in list(self._successes)))
        self._closed = True
        # redis-py's pub/sub read may swallow a cancellation: closing its connection ends it for sure.
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            with contextlib.suppress(Exception):
                await pubsub.connection.disconnect(nowait=True)
        for task in (self._listener, self._verifying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        # Decisions on the wire (and those queued behind them) finish first; bounded by the socket timeout.
        for link in self._all_links():
            await link.aclose()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        mode = "cluster" if self._cluster is not None else "single"
        state = "closed" if self._closed else f"queued={sum(link.queued for link in self._all_links())}"
        share = f", local_share={self.local_share!r}" if self._local is not None else ""
        return (
            f"RedisBackend({mode}, prefix={self.prefix!r}, on_error={self.on_error!r}{share}, "
            f"rules={len(self._rules)}, verified={self._verified}, {state})"
        )

    # -- internals --------------------------------------------------------

    def _rule(self, rule: RateLimitRule) -> _Wire:
        found = self._rules.get(rule)
        if found is None:
            check_rule(rule)
            # The whole rule is in the name, so limiters with different rules never share a bucket.
            # The name is length-prefixed: a ``:`` in it cannot make two rules collide.
            named = "-" if rule.name is None else f"{len(rule.name)}:{rule.name}"
            name = (
                f"{self.prefix}:{KEY_FORMAT}:rl:{rule.algorithm}:{float(rule.limit)!r}:{float(rule.window)!r}:{named}:"
            )
            found = self._rules[rule] = _Wire(rule, name)
        return found

    def _all_links(self) -> Iterator[Link]:
        if self._single is not None:
            yield self._single
        yield from self._links.values()

    def _plain_link(self) -> Link:
        client = self.client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool

        async def acquire() -> AbstractConnection:
            connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call] # redis-py leaves it untyped
            return connection

        async def release(connection: AbstractConnection, broken: bool) -> None:
            if broken:
                await connection.disconnect(nowait=True)
            await pool.release(connection)

        return Link(acquire, release, _SCRIPTS, self._timeout)

    def _node_link(self, node: ClusterNode) -> Link:
        found = self._links.get(node.name)
        if found is None:

            async def acquire() -> AbstractConnection:
                return await _node_connection(node)

            async def release(connection: AbstractConnection, broken: bool) -> None:
                assert isinstance(connection, Connection)
                await _release_node(node, connection, broken)

            found = self._links[node.name] = Link(acquire, release, _SCRIPTS, self._timeout)
        return found

    async def _call(self, key: bytes, command: bytes) -> Any:
        """Send ``command`` (for ``key``) with the next batch of its server and wait for the reply."""
        if self._closed:
            raise RuntimeError("RedisBackend is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (only the first decision of a backend built outside any loop gets here)
            _require_asyncio("a decision")
            raise
        link = self._single
        if link is not None and self._verified:
            return await link.call(command, link.deadline(loop), loop)
        deadline = math.inf if self._timeout is None else loop.time() + self._timeout
        if not self._verified:
            await self._first_use(deadline, loop)
        if link is not None:
            return await link.call(command, deadline, loop)
        return await self._cluster_call(key, command, deadline, loop)

    async def _cluster_call(self, key: bytes, command: bytes, deadline: float, loop: asyncio.AbstractEventLoop) -> Any:
        """Send ``command`` to the primary of ``key``'s slot, following the cluster's redirects within ``deadline``.

        A resharding moves a slot in steps: while its keys are being migrated
        the old primary answers ``ASK`` for a key it no longer holds (this
        command only goes to the importing node, after ``ASKING``; the slot
        map stays as it is), and ``TRYAGAIN`` to a script whose keys are split
        between the two (the rest of them are on their way: wait a little and
        start over). Once the slot is handed over, ``MOVED`` refreshes the
        slot map. At most ``_REDIRECTS`` redirects, ``TRYAGAIN`` for at most
        ``_TRY_AGAIN[2]`` seconds of pauses, and never past the deadline.
        """
        cluster = self._cluster
        assert cluster is not None
        manager = cluster.nodes_manager
        slot = key_slot(key)
        node = manager.get_node_from_slot(slot)
        asking = False
        redirects = 0
        pause, waited = _TRY_AGAIN[0], 0.0
        while True:
            try:
                return await self._node_link(node).call(command, deadline, loop, asking=asking)
            except MovedError:  # (before AskError: redis-py's MovedError is one)
                redirects += 1
                if redirects >= _REDIRECTS:
                    raise
                async with asyncio.timeout_at(None if deadline == math.inf else deadline):
                    await manager.initialize()
            except AskError as exc:
                redirects += 1
                if redirects >= _REDIRECTS:
                    raise
                node, asking = self._asked_node(cluster, exc), True
                continue
            except TryAgainError:
                # (Its own bound: a MIGRATE of many keys may take longer than sixteen quick tries.)
                if waited + pause > _TRY_AGAIN[2] or loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                waited += pause
                pause = min(pause * 2, _TRY_AGAIN[1])
            node, asking = manager.get_node_from_slot(slot), False

    def _asked_node(self, cluster: RedisCluster, exc: AskError) -> ClusterNode:
        """The node an ``ASK`` names: a known one, or (a node joining the cluster to take slots) a new one."""
        manager = cluster.nodes_manager
        found = manager.get_node(host=exc.host, port=int(exc.port))
        if found is None:
            # Added to the client's nodes, so the client's aclose() closes its connections.
            found = ClusterNode(exc.host, int(exc.port), PRIMARY, **manager.connection_kwargs)
            manager.set_nodes(manager.nodes_cache, {found.name: found})
        return found

    async def _first_use(self, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """Verify the server before the first decision; concurrent first callers share one check."""
        task = self._verifying
        if task is None:
            task = self._verifying = loop.create_task(self._verify_until(deadline))
            task.add_done_callback(self._verified_done)
        await asyncio.shield(task)

    def _verified_done(self, task: asyncio.Task[None]) -> None:
        if self._verifying is task:
            self._verifying = None
        if not task.cancelled():
            task.exception()  # retrieved: each caller raises it itself

    # -- failures -------------------------------------------------------

    async def _failed(
        self, key: str, cost: float, rule: RateLimitRule, exc: BaseException, operation: str
    ) -> RateLimitDecision:
        """The decision of ``operation`` (``"take"`` or ``"peek"``) that Redis failed to make, by ``on_error``."""
        self._report(key, cost, rule, exc, operation)
        if self.on_error == "deny":
            raise RateLimiterError(key=key) from exc
        local = self._local
        if local is not None:
            share = self._local_rule(rule)
            return await (local.take(key, cost, share) if operation == "take" else local.peek(key, share))
        # Fail open: the hit is admitted as if the bucket were empty.
        limit = math.floor(rule.limit)
        return RateLimitDecision(True, 0.0, 0.0, limit, 0.0, 0.0)

    async def _all_failed(
        self, key: str, cost: float, rules: tuple[RateLimitRule, ...], exc: BaseException
    ) -> tuple[bool, tuple[RateLimitDecision, ...]]:
        """The decision of :meth:`take_all` that Redis failed to make: every rule reported, then ``on_error``."""
        local = self._local
        if local is None:
            return True, tuple([await self._failed(key, cost, rule, exc, "take") for rule in rules])
        for rule in rules:
            self._report(key, cost, rule, exc, "take")
        # All or none on the process's own buckets, as the script does on the server's.
        return await local.take_all(key, cost, tuple(self._local_rule(rule) for rule in rules))

    def _local_rule(self, rule: RateLimitRule) -> RateLimitRule:
        """The rule of the process's own bucket under ``on_error="local"``: ``local_share`` of the limit."""
        found = self._local_rules.get(rule)
        if found is None:
            # At least one hit's worth (a smaller bucket would deny every hit of cost 1), never above the rule.
            limit = max(rule.limit * self.local_share, min(rule.limit, 1.0))
            found = self._local_rules[rule] = dataclasses.replace(rule, limit=limit)
        return found

    def _report(self, key: str, cost: float, rule: RateLimitRule, exc: BaseException, operation: str) -> None:
        reason = self._failure(exc, operation, {"key": key, "name": rule.name})
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
                    "reason": reason,
                    "error": exc,
                },
            )

    def _breaker_failed(self, exc: BaseException, name: str, operation: str) -> None:
        self._failure(exc, f"breaker_{operation}", {"name": name})
        # Under "deny", admissions ask the server again (and are rejected) until a breaker reply comes back.
        self._down = not isinstance(exc, ResponseError)

    def _failure(self, exc: BaseException, operation: str, context: dict[str, Any]) -> str:
        """Emit and log one failure of Redis; return its reason."""
        reason, _ = classify(exc)
        error_reply = isinstance(exc, ResponseError)
        if BACKEND_ERROR.handlers:
            BACKEND_ERROR.emit(
                {},
                {
                    "backend": "redis",
                    "reason": reason,
                    "error_reply": error_reply,
                    "operation": operation,
                    "policy": self.on_error,
                    "error": exc,
                    **context,
                },
            )
        if error_reply:
            # The server answered, and said no: never silent, one line a second per reason with a count.
            self._log.error(
                "redis_error_reply",
                ("reply", reason),
                backend="redis",
                reason=reason,
                policy=self.on_error,
                operation=operation,
                error=_text(exc),
                **context,
            )
        else:
            self._outage(exc, operation, context, reason=reason)
        return reason

    def _outage(self, exc: BaseException, operation: str, context: dict[str, Any], *, reason: str = "") -> None:
        # One warning a second at most: a Redis outage must not turn every request into a log line.
        event = "circuit_breaker_backend_failed" if operation.startswith("breaker_") else "rate_limiter_backend_failed"
        self._log.warning(
            event,
            ("outage", event),
            backend="redis",
            reason=reason or classify(exc)[0],
            policy=self.on_error,
            operation=operation,
            error=_text(exc),
            **context,
        )


async def _node_connection(node: ClusterNode) -> Connection:
    connection = node.acquire_connection()
    if not connection.is_connected:
        try:
            await connection.connect()  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        except BaseException:
            node.release(connection)
            raise
    return connection


async def _release_node(node: ClusterNode, connection: Connection, broken: bool) -> None:
    if broken:
        await connection.disconnect(nowait=True)
    node.release(connection)


async def _probe(connection: AbstractConnection, probe_key: bytes, *, cluster: bool) -> None:
    """Run the checks of :meth:`RedisBackend.verify` on one connection: one write, one read of every reply."""
    commands = [
        pack(b"INFO", b"replication"),
        pack(b"INFO", b"cluster"),
        *(pack(b"SCRIPT", b"LOAD", source.encode()) for source in _SCRIPTS),
        pack(b"EVALSHA", PROBE.sha.encode(), b"1", probe_key),
    ]
    await connection.send_packed_command(b"".join(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response(timeout=math.inf))
        except ResponseError as exc:
            replies.append(exc)
    where = f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"
    replication, cluster_info, *loads, probe = replies
    if "role:slave" in _text(replication):
        raise _misconfigured("replica", None, where)
    if isinstance(cluster_info, ResponseError) or ("cluster_enabled:1" in _text(cluster_info)) != cluster:
        raise _misconfigured("cluster", None, where)
    for loaded in (replication, *loads):
        if isinstance(loaded, ResponseError):
            reason, misconfigured = classify(loaded)
            raise _misconfigured(reason if misconfigured else "scripts", loaded, where)
    if isinstance(probe, ResponseError):
        if cluster and isinstance(probe, AskError | TryAgainError):  # (MovedError is an AskError)
            raise probe  # the probe key's slot is moving: the caller probes another
        reason, misconfigured = classify(probe)
        if misconfigured:
            raise _misconfigured(reason, probe, where)
        raise probe  # an error of the moment (OOM, BUSY): an outage, checked again later


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


def _cluster_from_url(url: str) -> tuple[str, bool]:
    """``url`` without a ``cluster`` query option, and whether it asked for a cluster."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    found = [value for name, value in query if name == "cluster"]
    if not found:
        return url, False
    if found[-1].lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ConfigurationError(f"cluster in the URL must be true or false, got {found[-1]!r}", path="cluster")
    kept = urlencode([(name, value) for name, value in query if name != "cluster"])
    return urlunsplit(parts._replace(query=kept)), found[-1].lower() in ("true", "1", "yes")


def _check_timeout(socket_timeout: object) -> None:
    if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, int | float):
        raise TypeError(f"socket_timeout must be a finite positive number, got {socket_timeout!r}")
    if not (math.isfinite(socket_timeout) and socket_timeout > 0):
        raise ConfigurationError(
            f"socket_timeout must be a finite positive number, got {socket_timeout!r}", path="socket_timeout"
        )


def _require_asyncio(operation: str) -> None:
    require_asyncio(
        "RedisBackend",
        operation,
        path="backend",
        instead="redis-py's asyncio client needs asyncio's loop: under trio use the in-memory backend (backend=None)",
    )


def _check_options(prefix: object, on_error: object, local_share: object) -> float:
    """Check the policy options; return ``local_share`` as a float."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r}")
    if on_error not in ("allow", "deny", "local"):
        raise ConfigurationError(f"on_error must be 'allow', 'deny' or 'local', got {on_error!r}", path="on_error")
    share = number(local_share, "local_share", what="a share of the limit", maximum=1.0)
    if share != 1.0 and on_error != "local":
        # A share the policy would ignore is a policy left at its default by mistake.
        raise ConfigurationError(
            f"local_share: applies under on_error='local' only, got {local_share!r} with on_error={on_error!r}",
            path="local_share",
        )
    return share


def _ascii(part: bytes | str) -> bytes:
    return part if isinstance(part, bytes) else part.encode()


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
