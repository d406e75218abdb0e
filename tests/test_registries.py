"""The seed-style registries: rate limiter registry rules and argument checks."""

from __future__ import annotations

import pytest

from seawall import AsyncInfrastructure, ConfigurationError, RateLimitExceeded

pytestmark = pytest.mark.anyio


async def ok() -> str:
    return "ok"


async def test_check_rate_cannot_change_a_configured_keys_rule() -> None:
    """check_rate with another rule on a configured key is refused; the key keeps its own limit."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 3, "window": 60}})
        with pytest.raises(ConfigurationError, match="configured protection key") as info:
            await infra.rate_limiter.check_rate("someone", "api", 1, 60)
        assert info.value.path == "api.rate_limiter"
        for _ in range(3):
            assert await infra.execute_protected("api", ok, rate_limiter=("api", "alice")) == "ok"
        with pytest.raises(RateLimitExceeded) as denied:
            await infra.execute_protected("api", ok, rate_limiter=("api", "alice"))
        assert denied.value.limit == 3
        assert (await infra.rate_limiter.get_status("alice", "api")).limit == 3


async def test_check_rate_with_the_configured_rule_counts_in_the_keys_buckets() -> None:
    """The same rule as the key's is accepted and shares the key's per-entity bucket."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 2, "window": 60}})
        await infra.rate_limiter.check_rate("bob", "api", 2, 60)
        await infra.execute_protected("api", ok, rate_limiter=("api", "bob"))
        with pytest.raises(RateLimitExceeded):
            await infra.rate_limiter.check_rate("bob", "api", 2, 60)


async def test_ad_hoc_operations_may_change_their_rule() -> None:
    """An operation no key configured follows the rule check_rate passes (the seed's usage)."""
    async with AsyncInfrastructure() as infra:
        await infra.rate_limiter.check_rate("carol", "search", 1, 60)
        with pytest.raises(RateLimitExceeded):
            await infra.rate_limiter.check_rate("carol", "search", 1, 60)
        status = await infra.rate_limiter.check_rate("carol", "search", 5, 60)
        assert status.limit == 5


async def test_removed_key_frees_its_operation_for_check_rate() -> None:
    """Once a key is removed, its name is an ordinary operation again."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 3, "window": 60}})
        await infra.remove_protection("api")
        assert (await infra.rate_limiter.check_rate("dan", "api", 1, 60)).limit == 1


@pytest.mark.parametrize(("entity_id", "operation"), [(123, "op"), ("e", None), (b"e", "op")])
async def test_check_rate_needs_str_entity_and_operation(entity_id: object, operation: object) -> None:
    """A non-str entity or operation is refused (123 and "123" must not share a bucket)."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ValueError, match="must be a str"):
            await infra.rate_limiter.check_rate(entity_id, operation, 1, 60)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be a str"):
            await infra.rate_limiter.check_rate(entity_id, operation, 1, 60)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [123, None, b"api"])
async def test_unknown_non_str_keys_are_refused(key: object) -> None:
    """execute_protected and protect refuse a key that is not a str instead of inventing a key for it."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError, match="must be a str"):
            await infra.execute_protected(key, ok)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be a str"):
            async with infra.protect(key):  # type: ignore[arg-type]
                pass  # pragma: no cover
        assert infra.list_protection_keys() == []


async def test_sync_callable_factory_fails_with_a_clear_error_and_leaks_nothing() -> None:
    """A plain function returning a non-awaitable is named in the error; the pool stays usable to close."""
    from seawall import ConnectionPool

    pool = ConnectionPool(lambda: 1, size=1)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigurationError, match="not an awaitable"):
        await pool.start()
    assert pool.status().idle == 0
    await pool.close()


async def test_sync_function_returning_an_awaitable_is_a_factory() -> None:
    """`lambda: connect()` - a plain function returning a coroutine - is accepted, as asyncpg users write."""
    from seawall import ConnectionPool

    async def connect() -> str:
        return "conn"

    async with ConnectionPool(lambda: connect(), size=1) as pool, pool.checkout() as conn:
        assert conn == "conn"


async def test_configured_exclude_must_hold_exception_subclasses() -> None:
    """An `exclude` naming a BaseException that is no Exception is a ConfigurationError with its path."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError) as info:
            await infra.configure_protection("k", {"circuit_breaker": {"exclude": ["builtins.KeyboardInterrupt"]}})
        assert info.value.path == "k.circuit_breaker.exclude[0]"
        assert "Exception subclass" in info.value.message
        assert infra.list_protection_keys() == []
