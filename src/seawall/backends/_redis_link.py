"""One pipelined connection to one Redis server, every caller bounded by its own deadline.

A :class:`Link` owns (at most) one connection of a pool and the queue of
commands waiting for it. A command asked for while another batch is on the
wire waits for that batch and then goes out with every other command that
queued meanwhile, as one write and one read. A lone caller sends its own
command (no task hop); queued ones are sent by a task of the link, so a
caller cancelled while queued is never sent.

The deadline. Each command carries the deadline of its caller, taken when
the caller asked (``loop.time() + timeout``), and a batch goes out under the
*earliest* deadline among its commands, covering everything the batch needs:
taking a connection from the pool, connecting (redis-py's handshake, a
``HELLO`` under RESP3, reads a reply too), the write and every read. A
command whose deadline passed while it queued is failed without being sent.
So a caller waits at most its own ``timeout`` however long the queue ahead of
it was, and however many reconnects the server's hang costs: the failure of
a batch on the wire never adds a timeout of its own to the callers behind it
(that was the doubled wait of a frozen server: each batch timed its reads
from when *it* was sent, and its reconnect was not timed at all). Only one
timer runs per link (see ``Link._watch_until``).

A ``NOSCRIPT`` reply (the server lost its scripts: a restart, ``SCRIPT
FLUSH``) loads the scripts on that connection and sends the command once more.

``call(..., asking=True)`` sends ``ASKING`` right before the command, in the
same write on the same connection (the permission lasts one command): how a
cluster client follows an ``ASK`` redirect to the node importing a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["Link", "pack"]

#: Commands sent in one write at most; a larger queue goes out in several.
_MAX_BATCH: Final = 1024

#: A queued command: its wire bytes, the caller's future, the caller's deadline (loop time, or inf) and
#: whether its bytes start with an ``ASKING`` (whose reply is read and dropped before the command's).
Item = tuple[bytes, "asyncio.Future[Any]", float, bool]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack(*args: bytes) -> bytes:
    """One command in the wire format: packed here, since redis-py's packer is a quarter of the client's work."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


_ASKING: Final = pack(b"ASKING")


class Link:
    """A queue of commands and the one connection that sends them, in batches.

    Args:
        acquire: Returns a connected connection (the pool's, or a cluster node's).
        release: Gives a connection back; ``broken`` is true when its state is unknown.
        scripts: The Lua sources loaded after a ``NOSCRIPT`` reply.
        timeout: Seconds a caller waits at most, from its call to its reply (``None``: no bound).
    """

    __slots__ = (
        "_acquire",
        "_connection",
        "_due",
        "_expired",
        "_flusher",
        "_idle",
        "_queue",
        "_release",
        "_scripts",
        "_sender",
        "_sending",
        "_socket_timeout",
        "_watch",
        "timeout",
    )

    def __init__(
        self,
        acquire: Callable[[], Awaitable[AbstractConnection]],
        release: Callable[[AbstractConnection, bool], Awaitable[None]],
        scripts: Sequence[str],
        timeout: float | None,
    ) -> None:
        self._acquire = acquire
        self._release = release
        self._scripts = tuple(pack(b"SCRIPT", b"LOAD", source.encode()) for source in scripts)
        self.timeout: Final = timeout
        self._connection: AbstractConnection | None = None
        self._socket_timeout: float | None = None  # the connection's own, while this link holds it
        self._queue: list[Item] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sending = False  # a caller or the flusher is sending: one at a time uses the connection
        self._idle = asyncio.Event()  # set while nobody is sending (aclose waits for it)
        self._idle.set()
        # The watchdog (see _watch_until): the task sending a batch, that batch's deadline, the timer, and the
        # sender it cancelled.
        self._sender: asyncio.Task[Any] | None = None
        self._due = math.inf
        self._watch: asyncio.TimerHandle | None = None
        self._expired: asyncio.Task[Any] | None = None

    @property
    def queued(self) -> int:
        """Commands waiting for the batch on the wire."""
        return len(self._queue)

    def deadline(self, loop: asyncio.AbstractEventLoop) -> float:
        """The deadline of a caller asking now."""
        return math.inf if self.timeout is None else loop.time() + self.timeout

    async def call(
        self, command: bytes, deadline: float, loop: asyncio.AbstractEventLoop, *, asking: bool = False
    ) -> Any:
        """Queue ``command`` for the next batch and wait for its reply (an error reply is raised).

        With ``asking``, an ``ASKING`` goes just before it (a slot being imported by this node).
        """
        future: asyncio.Future[Any] = loop.create_future()
        item = (_ASKING + command, future, deadline, True) if asking else (command, future, deadline, False)
        if self._sending:
            # Someone is on the wire: go out with the next batch (its deadline bounds this wait).
            self._queue.append(item)
            return await future
        # Nobody is talking to Redis: send this one command from this task (no task hop,
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
                now = asyncio.get_running_loop().time()
                kept: list[Item] = []
                for item in batch:
                    future = item[1]
                    if future.done():
                        continue  # a caller cancelled before its turn: never sent
                    if item[2] <= now:  # its caller's time ran out while it queued
                        future.set_exception(TimeoutError("Redis did not answer within the socket timeout"))
                        continue
                    kept.append(item)
                if kept:
                    await self._send(kept, retry_scripts=True)
        finally:
            self._flusher = None
            self._sending = False
            self._idle.set()

    async def _send(self, batch: list[Item], *, retry_scripts: bool) -> None:
        missing: list[Item] = []
        try:
            await self._exchange(batch, missing if retry_scripts else None)
        except BaseException as exc:
            # The connection is in an unknown state: drop it, fail everything still waiting.
            for item in (*batch, *missing):
                future = item[1]
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            await asyncio.shield(self.drop(broken=True))
            if not isinstance(exc, Exception):
                raise
            return
        if missing:
            await self._send(missing, retry_scripts=False)

    async def _exchange(self, batch: list[Item], missing: list[Item] | None) -> None:
        """Write ``batch`` and read its replies (loading the scripts for ``missing``), by the batch's deadline."""
        # Items queue in arrival order: the first one's deadline is the earliest.
        deadline = batch[0][2]
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._sender, self._due = task, deadline
        if deadline != math.inf:
            self._watch_until(deadline)
        expired = False
        try:
            connection = self._connection
            if connection is None:
                connection = await self._acquire()
                # This deadline bounds the writes: redis-py's own write timeout would start a task
                # per write (asyncio.wait_for), a fifth of a lone decision's client time. Given back on release.
                self._socket_timeout = connection.socket_timeout
                connection.socket_timeout = None
                self._connection = connection
            await connection.send_packed_command(b"".join([item[0] for item in batch]), check_health=False)
            await _read_replies(connection, batch, missing)
            if missing:
                await connection.send_packed_command(b"".join(self._scripts))
                for _ in self._scripts:
                    await connection.read_response(timeout=math.inf)
        except asyncio.CancelledError:
            # asyncio.timeout's rule: our cancellation becomes a TimeoutError unless the task is cancelled too.
            if self._expired is task:
                expired = True
                if task.uncancel() <= cancelling:
                    raise TimeoutError("Redis did not answer within the socket timeout") from None
            raise
        finally:
            if self._expired is task and not expired:
                task.uncancel()  # (our cancellation was swallowed on the way: no trace of it may stay)
            self._sender = self._expired = None

    def _watch_until(self, deadline: float) -> None:
        """Have the watchdog fire by ``deadline``.

        One timer per link, not one per batch: a batch only moves the time it
        checks (``_due``), and the timer, when it fires before that time, sets
        itself again for it. Sequential callers, each with a deadline a
        ``timeout`` after the last one's, so cost one timer a ``timeout``
        instead of an ``asyncio.timeout`` each (a sixth of a lone decision's
        client time).
        """
        watch = self._watch
        if watch is None or watch.when() > deadline:
            if watch is not None:
                watch.cancel()
            self._watch = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        """The watchdog: cancel the sender whose batch's deadline passed (a TimeoutError in ``_exchange``)."""
        self._watch = None
        task = self._sender
        if task is None:
            return  # nothing on the wire: the next batch sets the timer again
        loop = asyncio.get_running_loop()
        if self._due > loop.time():
            self._watch = loop.call_at(self._due, self._expire)
            return
        self._expired = task
        task.cancel()

    async def drop(self, *, broken: bool = False) -> None:
        """Give the connection back (closed first when ``broken``)."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.socket_timeout = self._socket_timeout
            with contextlib.suppress(Exception):  # a connection already gone has nothing to close
                await self._release(connection, broken)

    async def aclose(self) -> None:
        """Wait for the batch on the wire (and those queued behind it), then give the connection back."""
        await self._idle.wait()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self.drop()


async def _read_replies(connection: AbstractConnection, batch: list[Item], missing: list[Item] | None) -> None:
    """Read one reply per command of ``batch`` into its future.

    A ``NOSCRIPT`` reply puts the command in ``missing`` to be sent again once
    the scripts are loaded; with ``missing`` ``None`` (that second try) it is an error.
    """
    for item in batch:
        future = item[1]
        try:
            if item[3]:
                # ASKING's +OK. (Were it refused, the command's own reply says what became of it: MOVED back.)
                with contextlib.suppress(ResponseError):
                    await connection.read_response(timeout=math.inf)
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
