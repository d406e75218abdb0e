"""What the reliability tests share: hypothesis profiles, a loop for state machines, real servers.

* Hypothesis profiles ``seawall-fast`` (the normal suite: modest example
  counts) and ``seawall-stress`` (``nox -s stress``); :func:`fast` and
  :func:`heavy` build a test's settings on them.
* :class:`LoopMachine`: a ``RuleBasedStateMachine`` that owns an asyncio loop
  in debug mode. Rules are synchronous; they start tasks on the loop and
  :meth:`~LoopMachine.settle` runs it until every task is blocked
  (``anyio.wait_all_tasks_blocked()``), so a model can be compared with the
  real thing between any two steps, without sleeping.
* :class:`RedisServer`: a throwaway ``redis-server`` on a free port that a test
  may freeze (SIGSTOP), kill and restart; nothing destructive ever touches the
  shared server.
* Local HTTP upstreams that misbehave (never answer, reset, trickle bytes).
* PostgreSQL sessions counted and terminated by ``application_name`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine

import redis_servers

T = TypeVar("T")

# -- hypothesis --------------------------------------------------------------------

# No "explain" phase: on Python 3.11 it traces every line of a failing run, which
# takes minutes for a state machine and hides the failure behind pytest's timeout.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)

settings.register_profile(
    "seawall-fast",
    deadline=None,
    phases=_PHASES,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "seawall-stress",
    deadline=None,
    phases=_PHASES,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


def fast(max_examples: int, **options: Any) -> settings:
    """Settings of a fast variant (the normal suite): ``max_examples`` on the ``seawall-fast`` profile."""
    return settings(settings.get_profile("seawall-fast"), max_examples=max_examples, **options)


def heavy(max_examples: int, **options: Any) -> settings:
    """Settings of a stress variant: ``max_examples`` on the ``seawall-stress`` profile."""
    return settings(settings.get_profile("seawall-stress"), max_examples=max_examples, **options)


# -- state machines on an owned loop -----------------------------------------------


def _blocked(task: asyncio.Task[Any]) -> bool:
    # What anyio.wait_all_tasks_blocked() tests on asyncio (a task waits on a pending future),
    # without its 0.1 s real sleep whenever one is not: a state machine settles thousands of times.
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return task.done() or (waiter is not None and not waiter.done())


async def all_tasks_blocked(rounds: int = 100_000) -> None:
    """Return once every other task of the loop is blocked and no callback is ready to run."""
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    for _ in range(rounds):
        await asyncio.sleep(0)
        if not loop._ready and all(task is this or _blocked(task) for task in asyncio.all_tasks(loop)):  # type: ignore[attr-defined]
            return
    raise AssertionError(f"the loop did not settle in {rounds} rounds")


class LoopMachine(RuleBasedStateMachine):
    """A state machine whose rules drive tasks on an asyncio loop it owns (debug mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = 5.0  # as the suite's loops (see conftest.py)
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.tasks: list[asyncio.Task[Any]] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to its end on the machine's loop (other tasks run meanwhile)."""
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        """Run the loop until every task is blocked (or done) and no callback is due."""
        self.run(all_tasks_blocked())

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task of the machine (cancelled at teardown if still running)."""
        task = self.loop.create_task(coro)
        self.tasks.append(task)
        return task

    def teardown(self) -> None:
        try:
            self.release()
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                self.run(asyncio.wait(self.tasks, timeout=5))
            self.close_machine()
            self.run(self.loop.shutdown_asyncgens())
            # Exceptions of tasks nobody awaited are retrieved here, so they are not logged at GC.
            for task in self.tasks:
                if task.done() and not task.cancelled():
                    task.exception()
        finally:
            self.loop.close()
        assert not self.loop_errors, f"the loop reported: {self.loop_errors!r}"

    def release(self) -> None:
        """Let every task the machine holds up go on (override; the first step of teardown)."""

    def close_machine(self) -> None:
        """Close what the machine opened (override; runs after its tasks ended, before the loop closes)."""


# -- processes and ports ----------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.02)


class RedisServer:
    """A throwaway ``redis-server`` owned by one test: started, frozen, killed, restarted by its PID only."""

    def __init__(self, directory: Path) -> None:
        self._binary = redis_servers.binary("redis7")  # the system's server (skips, or fails in CI, without one)
        self._directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (again) on the same port."""
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [self._binary, *arguments, "--dir", str(self._directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.process)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections open and answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop it for good (thawed first, so SIGTERM is heard)."""
        process = self.process
        if process is not None and process.poll() is None:
            self.thaw()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a server that ignores SIGTERM
                process.kill()
                process.wait(timeout=10)


# -- misbehaving HTTP upstreams ------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request_head(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await reader.readuntil(b"\r\n\r\n")


def never_answers(accepted: list[int]) -> Handler:
    """Accept, read the request, never write a byte (the connection stays open)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await _read_request_head(reader)
        try:
            await asyncio.Event().wait()
        finally:
            writer.transport.abort()

    return handle


def resets(accepted: list[int]) -> Handler:
    """Accept, read the request, then reset the connection (RST, SO_LINGER 0)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await _read_request_head(reader)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    return handle


def trickles(accepted: list[int], every: float) -> Handler:
    """Slow loris: answer a status line and headers, then one body byte every ``every`` seconds, forever."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await _read_request_head(reader)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            while True:
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(every)
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()

    return handle


@contextlib.asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) for the block; yield its base URL."""
    connections: set[asyncio.Task[Any]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            connections.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        if connections:
            await asyncio.wait(list(connections), timeout=5)
        await server.wait_closed()


# -- PostgreSQL sessions of one test -------------------------------------------------


def application_name(prefix: str = "seawall-reliability") -> str:
    """A unique ``application_name`` to find this test's own sessions in ``pg_stat_activity``."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def pg_sessions(dsn: str, name: str) -> int:
    """How many server sessions carry ``application_name`` ``name`` (another connection asks)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name))
    finally:
        await conn.close()


async def pg_terminate(dsn: str, name: str) -> int:
    """Terminate the sessions named ``name`` (only this test's own); return how many."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            name,
        )
        return sum(1 for row in rows if row["done"])
    finally:
        await conn.close()


async def wait_until(predicate: Callable[[], Awaitable[bool]], seconds: float, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass (only where the server's own time is the point)."""
    with anyio.move_on_after(seconds):
        while not await predicate():  # noqa: ASYNC110 - the state polled is another process's
            await anyio.sleep(every)
        return True
    return False
