"""A key's ``"retry"`` section and ``fallback=``: each attempt through the whole chain, all under one timeout."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    ProtectionConfig,
    ProtectionTimeout,
    RateLimitExceeded,
    RetryConfig,
)
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio

EXACT = {"jitter": 0.0}  # waits are the plain backoff: exact times on the fake clock
LAYER_EVENTS = [
    ("seawall", "rate_limiter", "request_allowed"),
    ("seawall", "circuit_breaker", "call_executed"),
    ("seawall", "connection_pool", "checkout"),
]
RETRY_EVENTS = [("seawall", "retry", name) for name in ("attempt", "gave_up", "budget_exhausted")]


class Flaky:
    """An async callable that fails its first ``failures`` calls with fresh exceptions, then returns ``"ok"``."""

    def __init__(self, failures: int, error: Callable[[int], Exception] = lambda n: ConnectionError(n)) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.raised: list[Exception] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            exc = self.error(self.calls)
            self.raised.append(exc)
            raise exc
        return "ok"


async def drive(clock: FakeClock, fn: Callable[[], Awaitable[Any]], *, step: float = 1 / 64, steps: int = 4000) -> Any:
    """Run ``fn()`` in a task, moving ``clock`` by ``step`` whenever every task is blocked; its result or exception.

    The step and the tests' times are binary fractions, so the clock lands on each deadline exactly.
    """
    outcome: list[Any] = []

    async def runner() -> None:
        try:
            outcome.append(await fn())
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(runner)
        for _ in range(steps):
            await anyio.wait_all_tasks_blocked()
            if outcome:
                break
            clock.advance(step)
        else:  # pragma: no cover - a hung test
            group.cancel_scope.cancel()
            raise AssertionError("the call did not finish")
    return outcome[0]


def chain(retry: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A key with every layer (a fixed-window limiter that never denies here) and ``retry``."""
    return {
        "rate_limiter": {"limit": 1000, "window": 60, "algorithm": "fixed_window"},
        "circuit_breaker": {"failure_threshold": 100},
        "connection_pool": {"size": 2},
        "retry": {**EXACT, **retry},
        **extra,
    }


async def test_each_attempt_runs_the_whole_chain() -> None:
    """Two failures then a success: three rate-limit hits, three breaker outcomes, three checkouts, slots all back."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 3, "initial": 0.1}))
        flaky = Flaky(2)
        with capture_events(LAYER_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", flaky)) == "ok"
        names = [e.name for e in events]
        assert names.count("request_allowed") == names.count("call_executed") == names.count("checkout") == 3
        status = await infra.get_protection_status("api")
        assert status["rate_limiter"]["current_count"] == 3
        assert status["circuit_breaker"]["failure_count"] == 2
        assert status["connection_pool"]["in_use"] == 0
        assert status["retry"]["budget"]["retries"] == 2
        assert status["retry"]["budget"]["first_attempts"] == 1


async def test_the_last_attempts_own_exception_propagates_unchanged() -> None:
    """Attempts used up: the last attempt's exception is raised as itself, with no chained earlier attempt."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 4, "initial": 0.05}))
        down = Flaky(100)
        raised = await drive(clock, lambda: infra.execute_protected("api", down))
        assert down.calls == 4
        assert raised is down.raised[-1]
        assert raised.__context__ is None
        assert raised.__cause__ is None


async def test_attempts_and_waits_share_the_keys_one_timeout() -> None:
    """timeout=1: waits of 0.25 and 0.5 s end at 0.75 s; the next (1 s) would pass the deadline, so it gives up."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = chain({"attempts": 10, "initial": 0.25, "multiplier": 2.0}, timeout=1.0)
        await infra.configure_protection("api", config)
        down = Flaky(100)
        with capture_events(RETRY_EVENTS) as events:
            raised = await drive(clock, lambda: infra.execute_protected("api", down))
        assert raised is down.raised[-1]
        assert down.calls == 3
        assert clock.now() == 0.75
        assert events[-1].name == "gave_up"
        assert events[-1].metadata["limit"] == "deadline"
        assert events[-1].metadata["key"] == "api"


async def test_an_attempt_that_hangs_uses_up_the_timeout_and_is_not_retried_past_it() -> None:
    """A hanging attempt times out at the key's deadline: ProtectionTimeout, counted by the breaker, no wait after."""
    clock = FakeClock()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await clock.sleep(100.0)

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 5, "initial": 0.1}, timeout=1.0))
        raised = await drive(clock, lambda: infra.execute_protected("api", hangs))
        assert isinstance(raised, ProtectionTimeout)
        assert calls == 1
        assert clock.now() == pytest.approx(1.0)
        assert (await infra.circuit_breaker.get_status("api")).failure_count == 1


async def test_attempt_timeout_cuts_each_attempt_and_the_last_one_ends_at_the_deadline() -> None:
    """attempt_timeout=5/16 s within timeout=1: two attempts time out after it; the third gets only the 1/8 s left."""
    clock = FakeClock()
    calls: list[float] = []

    async def hangs() -> None:
        calls.append(clock.now())
        await clock.sleep(100.0)

    async with AsyncInfrastructure(clock=clock) as infra:
        retry = {"attempts": 5, "initial": 0.125, "multiplier": 1.0, "attempt_timeout": 0.3125}
        await infra.configure_protection("api", chain(retry, timeout=1.0))
        raised = await drive(clock, lambda: infra.execute_protected("api", hangs))
        assert isinstance(raised, ProtectionTimeout)
        assert calls == [0.0, 0.4375, 0.875]
        assert clock.now() == 1.0
        assert (await infra.circuit_breaker.get_status("api")).failure_count == 3  # each timeout counted


async def test_a_rate_limit_denials_retry_after_is_waited() -> None:
    """A full bucket (1 per 2 s) denies the attempt with retry_after=2: the call waits exactly that, then runs."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = {"rate_limiter": {"limit": 1, "window": 2.0}, "retry": {**EXACT, "initial": 0.1}, "timeout": 5.0}
        await infra.configure_protection("api", config)
        assert await infra.execute_protected("api", Flaky(0)) == "ok"  # the bucket is full now
        flaky = Flaky(0)
        assert await drive(clock, lambda: infra.execute_protected("api", flaky)) == "ok"
        assert clock.now() == pytest.approx(2.0)
        assert flaky.calls == 1  # the denied attempt never ran fn


async def test_a_retry_after_past_the_deadline_gives_up_at_once() -> None:
    """A denial whose retry_after (10 s) passes the key's timeout (1 s) is raised at once, without waiting."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = {"rate_limiter": {"limit": 1, "window": 10.0}, "retry": {"initial": 0.1}, "timeout": 1.0}
        await infra.configure_protection("api", config)
        await infra.execute_protected("api", Flaky(0))
        with pytest.raises(RateLimitExceeded) as caught:
            await infra.execute_protected("api", Flaky(0))
        assert caught.value.retry_after == pytest.approx(10.0)
        assert clock.now() == 0.0


async def test_a_rejection_of_the_last_attempt_is_what_propagates() -> None:
    """Attempt 1 fails and opens the breaker; attempt 2, the last, is rejected: its CircuitOpenError is raised."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = {
            "circuit_breaker": {"failure_threshold": 1, "recovery_time": 1.0},
            "retry": {**EXACT, "attempts": 2, "initial": 0.125},
            "timeout": 5.0,
        }
        await infra.configure_protection("api", config)
        down = Flaky(100)
        raised = await drive(clock, lambda: infra.execute_protected("api", down))
        assert isinstance(raised, CircuitOpenError)
        assert raised.retry_after == 0.875
        assert down.calls == 1
        assert infra.circuit_breaker.get("api").state is BreakerState.OPEN


async def test_what_the_breaker_excludes_is_not_retried_by_default() -> None:
    """A business error the breaker excludes is no failure, so no reason to retry: one attempt."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = {"circuit_breaker": {"exclude": ["builtins:KeyError"]}, "retry": {"initial": 0.1}}
        await infra.configure_protection("api", config)
        lookup = Flaky(100, lambda n: KeyError(n))
        assert isinstance(await drive(clock, lambda: infra.execute_protected("api", lookup)), KeyError)
        assert lookup.calls == 1


async def test_exclude_wins_over_retry_on_in_a_key() -> None:
    """retry_on and exclude from import strings: the excluded subclass is not retried, its base is."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        retry = {**EXACT, "retry_on": ["builtins:OSError"], "exclude": ["builtins:ConnectionRefusedError"]}
        await infra.configure_protection("api", {"retry": retry})
        refused = Flaky(100, lambda n: ConnectionRefusedError(n))
        assert isinstance(await drive(clock, lambda: infra.execute_protected("api", refused)), ConnectionRefusedError)
        assert refused.calls == 1
        assert await drive(clock, lambda: infra.execute_protected("api", Flaky(1, lambda n: OSError(n)))) == "ok"


async def test_the_keys_budget_holds_under_a_full_outage() -> None:
    """Every call fails: total attempts stay within (1 + budget_ratio) x first attempts + the floor."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        retry = {"attempts": 3, "initial": 0.0, "budget_ratio": 0.1, "budget_min_per_second": 0.3}
        await infra.configure_protection("api", {"circuit_breaker": {"failure_threshold": 10**6}, "retry": retry})
        down = Flaky(10**9)
        firsts = 300
        with capture_events(RETRY_EVENTS) as events:
            for _ in range(firsts):
                with pytest.raises(ConnectionError):
                    await infra.execute_protected("api", down)
        assert down.calls <= (1 + 0.1) * firsts + 0.3 * 10
        assert down.calls == firsts + 33
        assert any(e.name == "budget_exhausted" and e.metadata["key"] == "api" for e in events)


async def test_cancellation_is_never_retried() -> None:
    """Cancelling the caller during an attempt ends the call: one attempt, nothing held, nothing counted."""
    clock = FakeClock()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 5}))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(infra.execute_protected, "api", hangs)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
        assert calls == 1
        status = await infra.get_protection_status("api")
        assert status["connection_pool"]["in_use"] == 0
        assert status["circuit_breaker"]["failure_count"] == 0
        assert status["retry"]["budget"]["retries"] == 0


async def test_protect_makes_one_attempt() -> None:
    """protect() cannot run a block again: a key with retries makes one attempt through it."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("api", chain({"attempts": 5}))
        entered = 0

        async def block() -> None:
            nonlocal entered
            async with infra.protect("api"):
                entered += 1
                raise ConnectionError

        with pytest.raises(ConnectionError):
            await block()
        assert entered == 1


async def test_call_options_keep_the_retries_of_the_key() -> None:
    """A call naming its entity (its own bucket) or its own timeout still retries with the key's policy."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 3, "initial": 0.1, "attempt_timeout": 2.0}))
        flaky = Flaky(2)
        assert await drive(clock, lambda: infra.execute_protected("api", flaky, rate_limiter="user-1")) == "ok"
        assert flaky.calls == 3
        flaky = Flaky(2)
        assert await drive(clock, lambda: infra.execute_protected("api", flaky, timeout=3.0)) == "ok"
        assert flaky.calls == 3


async def test_a_key_without_retry_is_not_retried_when_others_are() -> None:
    """Retries are per key: another key's retry section changes nothing for this one."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("retrying", {"retry": {}})
        await infra.configure_protection("plain", {"timeout": 1.0})
        down = Flaky(100)
        with pytest.raises(ConnectionError):
            await infra.execute_protected("plain", down)
        assert down.calls == 1


async def test_reconfiguring_keeps_an_unchanged_policy_and_drops_a_removed_one() -> None:
    """The same retry section keeps its budget's counts; a config without one stops the retries."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", {"retry": {**EXACT, "initial": 0.0}})
        await drive(clock, lambda: infra.execute_protected("api", Flaky(1)))
        await infra.configure_protection("api", {"retry": {**EXACT, "initial": 0.0}, "timeout": 2.0})
        assert (await infra.get_protection_status("api"))["retry"]["budget"]["retries"] == 1
        await infra.configure_protection("api", {"timeout": 2.0})
        assert "retry" not in await infra.get_protection_status("api")
        down = Flaky(100)
        with pytest.raises(ConnectionError):
            await infra.execute_protected("api", down)
        assert down.calls == 1
        await infra.configure_protection("api", {"retry": {}})
        await infra.remove_protection("api")
        with pytest.raises(ConnectionError):
            await infra.execute_protected("api", down)
        assert down.calls == 2


# -- fallback ----------------------------------------------------------------------------


async def test_fallback_answers_a_rejection_a_timeout_and_a_failure() -> None:
    """fallback(exc) replaces the result of a denied, timed-out or failed call, and sees the exception."""
    clock = FakeClock()
    seen: list[Exception] = []

    async def fallback(exc: Exception) -> str:
        seen.append(exc)
        return "cached"

    async def hangs() -> str:
        await clock.sleep(100.0)
        return "late"

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 1, "window": 60}, "timeout": 1.0})
        assert await drive(clock, lambda: infra.execute_protected("api", hangs, fallback=fallback)) == "cached"
        assert await infra.execute_protected("api", Flaky(0), fallback=fallback) == "cached"
        await infra.configure_protection("other", {})
        assert await infra.execute_protected("other", Flaky(1), fallback=fallback) == "cached"
        assert [type(exc) for exc in seen] == [ProtectionTimeout, RateLimitExceeded, ConnectionError]
        assert await infra.execute_protected("other", Flaky(0), fallback=fallback) == "ok"


async def test_fallback_runs_after_the_retries_with_the_last_exception() -> None:
    """With retries, the fallback gets the last attempt's exception once they are used up."""
    clock = FakeClock()
    seen: list[Exception] = []

    async def fallback(exc: Exception) -> str:
        seen.append(exc)
        return "fallback"

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"attempts": 3, "initial": 0.1}))
        down = Flaky(100)
        assert await drive(clock, lambda: infra.execute_protected("api", down, fallback=fallback)) == "fallback"
        assert down.calls == 3
        assert seen == [down.raised[-1]]


async def test_fallback_does_not_hide_business_errors_or_misconfiguration() -> None:
    """An exception the breaker excludes, and a seawall error that is no rejection, propagate past the fallback."""
    calls = 0

    async def fallback(exc: Exception) -> str:
        nonlocal calls
        calls += 1
        return "fallback"

    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("api", {"circuit_breaker": {"exclude": ["builtins:KeyError"]}})
        with pytest.raises(KeyError):
            await infra.execute_protected("api", Flaky(1, lambda n: KeyError(n)), fallback=fallback)
        with pytest.raises(ConfigurationError):
            await infra.execute_protected("api", Flaky(1, lambda n: ConfigurationError("bad")), fallback=fallback)
        assert calls == 0


async def test_fallback_is_not_run_on_cancellation() -> None:
    """A cancelled call is cancelled, not answered by the fallback."""
    calls = 0

    async def fallback(exc: Exception) -> None:
        nonlocal calls
        calls += 1

    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: infra.execute_protected("api", anyio.sleep_forever, fallback=fallback))
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
        assert calls == 0


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "path"),
    [
        ({"atempts": 3}, "api.retry.atempts"),
        ({"attempts": 0}, "api.retry.attempts"),
        ({"initial": "fast"}, "api.retry.initial"),
        ({"initial": 2.0, "maximum": 1.0}, "api.retry.maximum"),
        ({"jitter": -0.5}, "api.retry.jitter"),
        ({"multiplier": 0}, "api.retry.multiplier"),
        ({"budget_ratio": None}, "api.retry.budget_ratio"),
        ({"budget_min_per_second": -1}, "api.retry.budget_min_per_second"),
        ({"attempt_timeout": 0}, "api.retry.attempt_timeout"),
        ({"retry_on": ["no.such.module:Error"]}, "api.retry.retry_on[0]"),
        ({"retry_on": [1]}, "api.retry.retry_on[0]"),
        ({"exclude": ["builtins:KeyboardInterrupt"]}, "api.retry.exclude[0]"),
        ("three", "api.retry"),
    ],
)
async def test_a_bad_retry_section_names_its_path_and_keeps_the_old_config(retry: Any, path: str) -> None:
    """Each invalid retry option raises ConfigurationError with its full path; the key's config stays as it was."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"timeout": 2.0})
        with pytest.raises(ConfigurationError) as caught:
            await infra.configure_protection("api", {"retry": retry})
        assert caught.value.path == path
        assert (await infra.get_protection_status("api"))["timeout"] == 2.0
        assert "retry" not in await infra.get_protection_status("api")


def test_a_misspelt_option_suggests_the_right_one() -> None:
    """An unknown option's message suggests the closest valid name."""
    with pytest.raises(ConfigurationError, match="did you mean 'attempts'"):
        ProtectionConfig.from_mapping({"retry": {"atempts": 3}}, "api")


def test_the_section_has_the_contracts_defaults() -> None:
    """An empty section: 3 attempts, 0.1 s doubling up to 5 s, full jitter, budget 0.2 + 1/s, no attempt timeout."""
    config = ProtectionConfig.from_mapping({"retry": {}}, "api").retry
    assert config == RetryConfig(
        attempts=3,
        initial=0.1,
        maximum=5.0,
        multiplier=2.0,
        jitter=1.0,
        retry_on=None,
        exclude=(),
        budget_ratio=0.2,
        budget_min_per_second=1.0,
        attempt_timeout=None,
    )
    with pytest.raises(ConfigurationError) as caught:
        RetryConfig(attempts=-1)
    assert caught.value.path == "retry.attempts"


async def test_a_toml_retry_table_configures_the_key(tmp_path: Path) -> None:
    """[api.retry] in a TOML file is read, its import strings resolved."""
    file = tmp_path / "seawall.toml"
    file.write_text('[api]\ntimeout = 2.0\n[api.retry]\nattempts = 4\nretry_on = ["builtins:ConnectionError"]\n')
    clock = FakeClock()
    async with AsyncInfrastructure.from_toml(file, clock=clock) as infra:
        down = Flaky(100)
        assert isinstance(await drive(clock, lambda: infra.execute_protected("api", down)), ConnectionError)
        assert down.calls == 4
        assert isinstance(await drive(clock, lambda: infra.execute_protected("api", Flaky(5, TypeError))), TypeError)


async def test_open_breaker_rejection_is_retried_when_its_wait_fits() -> None:
    """A CircuitOpenError whose retry_after fits before the deadline is waited out within the same call."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        config = {
            "circuit_breaker": {"failure_threshold": 1, "recovery_time": 1.0},
            "retry": {**EXACT, "attempts": 3, "initial": 0.125},
            "timeout": 5.0,
        }
        await infra.configure_protection("api", config)
        flaky = Flaky(1)
        with capture_events(RETRY_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", flaky)) == "ok"
        # attempt 1 failed and opened the breaker, attempt 2 was rejected (CircuitOpenError), attempt 3 was the trial
        assert flaky.calls == 2
        assert [e.metadata["kind"] for e in events] == ["ConnectionError", "CircuitOpenError"]
        assert events[1].measurements["wait"] == 0.875
        assert clock.now() == 1.0
        assert infra.circuit_breaker.get("api").state is BreakerState.CLOSED
        assert not isinstance(flaky.raised[0], CircuitOpenError)
