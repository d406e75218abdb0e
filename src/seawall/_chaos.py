"""Fault injection for game days: latency and faults inside a protected call.

A key's ``"chaos"`` section (:class:`~seawall.ChaosConfig`) makes its calls,
after the pool checkout and before the protected code runs, sleep for
``latency`` seconds with probability ``latency_rate`` and raise ``fault`` with
probability ``fault_rate``. They happen where a real slow or failing
dependency would show, so the breaker counts an injected fault as a failure,
injected latency runs into the call's timeout, and a retry sees both as it
would see real ones.

Deterministic: the draws come from one ``random.Random(seed)`` per key, in
call order, and latency sleeps on the infrastructure's clock (a
:class:`~seawall.FakeClock` in tests), so a game day replays exactly. Every
injection emits ``("seawall", "chaos", "injected")`` with its ``kind``
(``"latency"`` or ``"fault"``) and the key; ``await infra.set_chaos(key,
enabled=False)`` stops injecting at once.
"""

from __future__ import annotations

import random

from seawall._clock import Clock
from seawall._config import ChaosConfig
from seawall._telemetry import CHAOS_INJECTED

__all__ = ["Chaos"]


class Chaos:
    """The fault injector of one key, built from its :class:`~seawall.ChaosConfig`.

    Attributes:
        config: The section it was built from.
        enabled: Whether calls are injected now (``infra.set_chaos`` flips it).
        injected: How many injections it made (latency and faults).
    """

    __slots__ = ("_clock", "_random", "config", "enabled", "injected")

    def __init__(self, config: ChaosConfig, clock: Clock) -> None:
        self.config = config
        self.enabled = config.enabled
        self.injected = 0
        self._clock = clock
        self._random = random.Random(config.seed)  # (fault injection, not cryptography)

    async def inject(self, key: str) -> None:
        """Maybe sleep, then maybe raise the configured fault (one draw each, in this order)."""
        config = self.config
        delay = config.latency if self._random.random() < config.latency_rate else 0.0
        fault = self._random.random() < config.fault_rate
        if delay > 0.0:
            self._report("latency", key, delay)
            await self._clock.sleep(delay)
        if fault:
            self._report("fault", key, 0.0)
            raise config.fault(f"chaos: fault injected into a call of {key!r}")

    def _report(self, kind: str, key: str, delay: float) -> None:
        self.injected += 1
        if CHAOS_INJECTED.handlers:
            CHAOS_INJECTED.emit({"latency": delay}, {"key": key, "kind": kind})

    def __repr__(self) -> str:
        return f"<Chaos enabled={self.enabled} injected={self.injected} {self.config!r}>"
