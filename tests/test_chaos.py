"""Fault injection (the ``"chaos"`` section): latency and faults where a real dependency would show them."""

from __future__ import annotations

import anyio
import pytest

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    ChaosConfig,
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    ProtectionConfig,
    ProtectionKeyNotFound,
    ProtectionTimeout,
)
from seawall.testing import advance, capture_events

pytestmark = pytest.mark.anyio


async def ok() -> str:
    return "ok"


async def outcomes(infra: AsyncInfrastructure, key: str, calls: int) -> list[str]:
    """Run ``calls`` calls of ``key`` one after the other; name how each ended."""
    seen: list[str] = []
    for _ in range(calls):
        try:
            seen.append(await infra.execute_protected(key, ok))
        except Exception as exc:
            seen.append(type(exc).__name__)
    return seen


async def test_faults_are_deterministic_under_a_seed_and_count_as_breaker_failures() -> None:
    """The same seed injects the same faults into the same calls; the breaker counts them as real ones."""
    config = {
        "chaos": {"fault_rate": 0.5, "fault": "builtins:ConnectionError", "seed": 7},
        "circuit_breaker": {"failure_threshold": 1000},
    }
    runs = []
    for _ in range(2):
        async with AsyncInfrastructure(clock=FakeClock()) as infra:
            await infra.configure_protection("api", config)
            with capture_events([("seawall", "chaos", "injected")]) as events:
                runs.append(await outcomes(infra, "api", 40))
            failures = (await infra.circuit_breaker.get_status("api")).failure_count
            assert failures == runs[-1].count("ConnectionError")
            assert [e.metadata["kind"] for e in events] == ["fault"] * failures
    assert runs[0] == runs[1]
    assert 5 < runs[0].count("ConnectionError") < 35


async def test_injected_latency_runs_into_the_timeout_and_opens_the_breaker() -> None:
    """Latency sleeps on the infrastructure's clock inside the call's scope: longer than the timeout, it times out."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "slow",
            {
                "chaos": {"latency": 2.0, "latency_rate": 1.0, "seed": 1},
                "circuit_breaker": {"failure_threshold": 1},
                "connection_pool": {"size": 1},
                "timeout": 1.0,
            },
        )

        async def call() -> None:
            with pytest.raises(ProtectionTimeout):
                async with infra.protect("slow"):
                    pytest.fail("the block runs after the injected latency, which outlasts the timeout")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await advance(clock, 1.0)
        assert (await infra.circuit_breaker.get_status("slow")).state is BreakerState.OPEN
        assert infra.connection_manager.get("slow").status().in_use == 0  # the worker came back
        with pytest.raises(CircuitOpenError):
            await infra.execute_protected("slow", ok)


async def test_set_chaos_switches_injection_at_run_time() -> None:
    """set_chaos(key, enabled=False) stops the faults at once; True brings them back; bad calls are named."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("api", {"chaos": {"fault_rate": 1.0, "enabled": False}})
        assert await outcomes(infra, "api", 3) == ["ok"] * 3
        await infra.set_chaos("api", enabled=True)
        assert await outcomes(infra, "api", 3) == ["ConnectionError"] * 3
        await infra.set_chaos("api", enabled=False)
        assert await outcomes(infra, "api", 2) == ["ok"] * 2
        await infra.configure_protection("plain", {"timeout": 1.0})
        with pytest.raises(ConfigurationError) as info:
            await infra.set_chaos("plain", enabled=True)
        assert info.value.path == "plain.chaos"
        with pytest.raises(ProtectionKeyNotFound):
            await infra.set_chaos("unknown", enabled=True)
        with pytest.raises(ConfigurationError):
            await infra.set_chaos("api", enabled="yes")  # type: ignore[arg-type]


async def test_entity_calls_share_the_keys_injector() -> None:
    """Calls that name their entity (a kept plan per entity) are injected, and switched, with their key."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection(
            "api", {"rate_limiter": {"limit": 100, "window": 60}, "chaos": {"fault_rate": 1.0}}
        )
        with pytest.raises(ConnectionError):
            await infra.execute_protected("api", ok, rate_limiter="alice")
        await infra.set_chaos("api", enabled=False)
        assert await infra.execute_protected("api", ok, rate_limiter="alice") == "ok"


@pytest.mark.parametrize(
    ("chaos", "path"),
    [
        ({"fault_rate": 1.5}, "api.chaos.fault_rate"),
        ({"latency_rate": -0.1}, "api.chaos.latency_rate"),
        ({"latency": float("nan")}, "api.chaos.latency"),
        ({"latency": 10**400}, "api.chaos.latency"),
        ({"enabled": 1}, "api.chaos.enabled"),
        ({"fault": "builtins:KeyboardInterrupt"}, "api.chaos.fault[0]"),
        ({"fault": "no.such.module:Error"}, "api.chaos.fault[0]"),
        ({"seed": 1.5}, "api.chaos.seed"),
        ({"fault_rat": 0.1}, "api.chaos.fault_rat"),
    ],
)
def test_bad_chaos_options_name_their_path(chaos: dict[str, object], path: str) -> None:
    """Every bad chaos option is a ConfigurationError naming its full path."""
    with pytest.raises(ConfigurationError) as info:
        ProtectionConfig.from_mapping({"chaos": chaos}, "api")
    assert info.value.path == path


def test_chaos_config_defaults_inject_nothing() -> None:
    """An empty chaos section is valid and injects nothing until its rates are set."""
    config = ChaosConfig()
    assert (config.enabled, config.latency_rate, config.fault_rate, config.fault) == (True, 0.0, 0.0, ConnectionError)
