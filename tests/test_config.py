from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from seawall import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ConfigurationError,
    FakeClock,
    PoolConfig,
    ProtectionConfig,
    RateLimitConfig,
)
from seawall._config import load_toml, resolve_factory
from seawall.integrations.asyncpg import AsyncpgFactory


class BusinessError(Exception):
    pass


class DummyFactory:
    """A pool factory with keyword options, named by import string in the tests."""

    def __init__(self, prefix: str = "conn") -> None:
        self.prefix = prefix

    async def create(self) -> str:
        return self.prefix

    async def close(self, conn: str) -> None:
        pass


async def make_conn() -> str:
    return "conn"


def error_of(config: object, key: str = "external_api") -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        ProtectionConfig.from_mapping(config, key)
    return info.value


def test_full_mapping_is_typed_and_frozen() -> None:
    """A complete mapping becomes frozen dataclasses with seconds as floats."""
    config = ProtectionConfig.from_mapping(
        {
            "rate_limiter": {"limit": 100, "window": 60},
            "circuit_breaker": {"failure_threshold": 5, "recovery_time": timedelta(seconds=30)},
            "connection_pool": {"size": 10, "max_overflow": 5},
            "timeout": 2,
        },
        "api",
    )
    assert config.rate_limiter == RateLimitConfig(limit=100, window=60.0)
    assert config.circuit_breaker == BreakerConfig(failure_threshold=5, recovery_time=30.0)
    assert config.connection_pool == PoolConfig(size=10, max_overflow=5)
    assert config.timeout == 2.0
    assert isinstance(config.rate_limiter.window, float)
    with pytest.raises(AttributeError):
        config.timeout = 3.0  # type: ignore[misc]


def test_every_section_is_optional() -> None:
    """An empty mapping is a valid protection with no layers and the default timeout."""
    assert ProtectionConfig.from_mapping({}, "k") == ProtectionConfig()


def test_misspelt_option_names_full_path_and_suggestion() -> None:
    """A misspelt option is reported by its full path with the closest valid name."""
    error = error_of({"circuit_breaker": {"failure_treshold": 3}})
    assert error.path == "external_api.circuit_breaker.failure_treshold"
    assert "did you mean 'failure_threshold'" in error.message
    assert isinstance(error, ValueError)


def test_misspelt_section_is_suggested() -> None:
    """A misspelt section name gets the closest section as a suggestion."""
    error = error_of({"rate_limit": {"limit": 1, "window": 1}})
    assert error.path == "external_api.rate_limit"
    assert "did you mean 'rate_limiter'" in error.message


def test_unknown_option_without_close_match_lists_valid_names() -> None:
    """An unknown option with no close match lists the valid options."""
    error = error_of({"rate_limiter": {"limit": 1, "window": 1, "zzz": 1}})
    assert error.path == "external_api.rate_limiter.zzz"
    assert "valid options are limit, window, algorithm" in error.message


@pytest.mark.parametrize(
    ("config", "path", "fragment"),
    [
        ({"rate_limiter": {"limit": 0, "window": 1}}, "external_api.rate_limiter.limit", "at least 1"),
        ({"rate_limiter": {"limit": True, "window": 1}}, "external_api.rate_limiter.limit", "integer"),
        ({"rate_limiter": {"limit": "5", "window": 1}}, "external_api.rate_limiter.limit", "integer"),
        ({"rate_limiter": {"limit": 5, "window": -1}}, "external_api.rate_limiter.window", "at least 0.001"),
        ({"rate_limiter": {"limit": 5, "window": float("inf")}}, "external_api.rate_limiter.window", "at most 1e"),
        ({"rate_limiter": {"limit": 5, "window": "1s"}}, "external_api.rate_limiter.window", "number of seconds"),
        ({"rate_limiter": {"window": 1}}, "external_api.rate_limiter.limit", "required"),
        (
            {"rate_limiter": {"limit": 5, "window": 1, "algorithm": "sliding"}},
            "external_api.rate_limiter.algorithm",
            "gcra",
        ),
        (
            {"circuit_breaker": {"half_open_max_calls": 0}},
            "external_api.circuit_breaker.half_open_max_calls",
            "at least",
        ),
        ({"circuit_breaker": {"recovery_time": 0}}, "external_api.circuit_breaker.recovery_time", "above 0"),
        ({"circuit_breaker": {"exclude": [42]}}, "external_api.circuit_breaker.exclude[0]", "Exception subclass"),
        ({"circuit_breaker": {"exclude": 42}}, "external_api.circuit_breaker.exclude", "list of exception"),
        ({"connection_pool": {"size": 0}}, "external_api.connection_pool.size", "at least 1"),
        ({"connection_pool": {"max_overflow": -1}}, "external_api.connection_pool.max_overflow", "at least 0"),
        ({"connection_pool": {"timeout": 0}}, "external_api.connection_pool.timeout", "above 0"),
        ({"connection_pool": {"max_waiting": -1}}, "external_api.connection_pool.max_waiting", "at least 0"),
        ({"connection_pool": {"max_waiting": 1.5}}, "external_api.connection_pool.max_waiting", "integer"),
        ({"connection_pool": {"factory": 42}}, "external_api.connection_pool.factory", "expected a factory"),
        ({"connection_pool": 5}, "external_api.connection_pool", "mapping"),
        ({"timeout": 0}, "external_api.timeout", "above 0"),
    ],
)
def test_invalid_values_name_their_path(config: dict[str, object], path: str, fragment: str) -> None:
    """Wrong types and out-of-range numbers raise ConfigurationError naming the option."""
    error = error_of(config)
    assert error.path == path
    assert fragment in error.message
    assert error.message.startswith(path)


def test_non_mapping_config_is_rejected() -> None:
    """A config that is not a mapping is rejected with the key as its path."""
    assert error_of(5).path == "external_api"


def test_non_string_option_name_is_rejected() -> None:
    """Option names must be strings."""
    assert "strings" in error_of({1: 2}).message


def test_exclude_accepts_classes_and_import_strings() -> None:
    """Breaker exclusions may be classes or import strings of exception classes."""
    config = BreakerConfig.from_mapping({"exclude": [BusinessError, "builtins:KeyError"]}, "b")
    assert config.exclude == (BusinessError, KeyError)
    assert BreakerConfig(exclude=ValueError).exclude == (ValueError,)  # type: ignore[arg-type]


def test_bad_import_strings_are_reported() -> None:
    """Import strings that cannot be resolved name the option and the problem."""
    with pytest.raises(ConfigurationError, match="cannot import module"):
        BreakerConfig.from_mapping({"exclude": ["no_such_module_xyz:Error"]}, "b")
    with pytest.raises(ConfigurationError, match="has no attribute"):
        BreakerConfig.from_mapping({"exclude": ["builtins:NoSuchError"]}, "b")
    with pytest.raises(ConfigurationError, match="import string like"):
        BreakerConfig.from_mapping({"exclude": ["nodots"]}, "b")


def test_dataclasses_validate_on_construction() -> None:
    """Configs built in code are held to the same rules as mappings."""
    with pytest.raises(ConfigurationError) as info:
        RateLimitConfig(limit=-1, window=1)
    assert info.value.path == "rate_limiter.limit"
    with pytest.raises(ConfigurationError):
        ProtectionConfig(rate_limiter={"limit": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ProtectionConfig(timeout=-2)


def test_sections_may_be_config_objects() -> None:
    """A mapping may hold already-built section objects, and a ProtectionConfig passes through."""
    section = RateLimitConfig(limit=3, window=1)
    config = ProtectionConfig.from_mapping({"rate_limiter": section})
    assert config.rate_limiter is section
    assert ProtectionConfig.from_mapping(config) is config


def test_factory_import_string_with_options() -> None:
    """A pool factory named by import string is created with factory_options as keyword arguments."""
    config = PoolConfig.from_mapping(
        {"factory": "seawall.integrations.asyncpg:AsyncpgFactory", "factory_options": {"dsn": "postgresql://db/x"}},
        "api.connection_pool",
    )
    assert isinstance(config.factory, AsyncpgFactory)
    assert config.factory.dsn == "postgresql://db/x"
    assert config.factory_options is None


def test_factory_import_string_without_options_instantiates_classes() -> None:
    """A class named without options is instantiated; an async function is the factory itself."""
    assert isinstance(PoolConfig(factory="seawall.integrations.asyncpg:AsyncpgFactory").factory, AsyncpgFactory)
    assert PoolConfig(factory="asyncio.sleep").factory is asyncio.sleep
    assert PoolConfig(factory=make_conn).factory is make_conn


def test_factory_option_errors() -> None:
    """Bad factory options are reported under factory_options."""
    with pytest.raises(ConfigurationError) as info:
        PoolConfig.from_mapping({"factory_options": {"x": 1}}, "p")
    assert info.value.path == "p.factory_options"
    with pytest.raises(ConfigurationError, match="cannot create the factory"):
        PoolConfig(factory=DummyFactory, factory_options={"nope": 1})
    with pytest.raises(ConfigurationError, match="not a class or function"):
        PoolConfig(factory=make_conn, factory_options={"x": 1})
    with pytest.raises(ConfigurationError, match="cannot create"):
        resolve_factory(BusinessError.__init__.__class__, None, "p")


def test_load_toml(tmp_path: Path) -> None:
    """A TOML file yields one validated config per table, factories resolved."""
    file = tmp_path / "seawall.toml"
    file.write_text(
        """
[external_api]
timeout = 2.5
[external_api.rate_limiter]
limit = 100
window = 60
[external_api.circuit_breaker]
failure_threshold = 3
[db.connection_pool]
size = 2
factory = "seawall.integrations.asyncpg:AsyncpgFactory"
factory_options = { dsn = "postgresql://pg/db" }
"""
    )
    configs = load_toml(file)
    assert list(configs) == ["external_api", "db"]
    assert configs["external_api"].timeout == 2.5
    assert configs["external_api"].circuit_breaker == BreakerConfig(failure_threshold=3)
    pool = configs["db"].connection_pool
    assert pool is not None
    assert isinstance(pool.factory, AsyncpgFactory)
    assert pool.factory.dsn == "postgresql://pg/db"


def test_toml_failure_threshold_false_leaves_only_the_rate(tmp_path: Path) -> None:
    """``failure_threshold = false`` (TOML has no null) is None: 20 failures in 100 calls keep a 0.5 rate closed."""
    file = tmp_path / "seawall.toml"
    file.write_text("[api.circuit_breaker]\nfailure_threshold = false\nfailure_rate = 0.5\n")
    breaker = load_toml(file)["api"].circuit_breaker
    assert breaker is not None
    assert breaker.failure_threshold is None
    circuit = CircuitBreaker("api", **breaker.options(), clock=FakeClock())

    async def fail() -> None:
        raise BusinessError

    async def succeed() -> None:
        pass

    async def calls() -> None:
        for index in range(100):
            with contextlib.suppress(BusinessError):
                await circuit.call(fail if index % 5 == 0 else succeed)

    anyio.run(calls)
    assert circuit.state is BreakerState.CLOSED  # a count of 5 would have opened at the 21st call
    file.write_text("[api.circuit_breaker]\nfailure_threshold = true\nfailure_rate = 0.5\n")
    with pytest.raises(ConfigurationError) as info:
        load_toml(file)
    assert info.value.path == "api.circuit_breaker.failure_threshold"


def test_load_toml_protection_table(tmp_path: Path) -> None:
    """Keys may sit under a top-level [protection] table; errors then carry that prefix."""
    file = tmp_path / "app.toml"
    file.write_text("[protection.api.circuit_breaker]\nfailure_treshold = 2\n")
    with pytest.raises(ConfigurationError) as info:
        load_toml(file)
    assert info.value.path == "protection.api.circuit_breaker.failure_treshold"
    assert str(file) in info.value.message
    assert "did you mean 'failure_threshold'" in info.value.message


def test_load_toml_errors_name_the_file(tmp_path: Path) -> None:
    """Invalid values, bad TOML and missing files are reported with the file name."""
    file = tmp_path / "bad.toml"
    file.write_text("[api.rate_limiter]\nlimit = 0\nwindow = 1\n")
    with pytest.raises(ConfigurationError) as info:
        load_toml(file)
    assert info.value.message.startswith(f"{file}: api.rate_limiter.limit")
    assert info.value.path == "api.rate_limiter.limit"
    file.write_text("[api\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_toml(file)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_toml(tmp_path / "missing.toml")


HUGE_INT = 10**400  # what TOML and JSON produce for a long run of digits; no float holds it


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"rate_limiter": {"limit": HUGE_INT, "window": 1}}, "external_api.rate_limiter.limit"),
        ({"rate_limiter": {"limit": 5, "window": HUGE_INT}}, "external_api.rate_limiter.window"),
        (
            {"rate_limiter": {"limit": 5, "window": 1e-310, "algorithm": "fixed_window"}},
            "external_api.rate_limiter.window",
        ),
        ({"circuit_breaker": {"failure_threshold": HUGE_INT}}, "external_api.circuit_breaker.failure_threshold"),
        ({"circuit_breaker": {"window": HUGE_INT}}, "external_api.circuit_breaker.window"),
        ({"circuit_breaker": {"recovery_time": -HUGE_INT}}, "external_api.circuit_breaker.recovery_time"),
        ({"connection_pool": {"size": HUGE_INT}}, "external_api.connection_pool.size"),
        ({"connection_pool": {"timeout": HUGE_INT}}, "external_api.connection_pool.timeout"),
        ({"timeout": HUGE_INT}, "external_api.timeout"),
        ({"timeout": 1e308}, "external_api.timeout"),
        ({"connection_pool": {"factory": ".db:Factory"}}, "external_api.connection_pool.factory"),
        ({"connection_pool": {"factory": "..:X"}}, "external_api.connection_pool.factory"),
        ({"circuit_breaker": {"exclude": [".errors:Business"]}}, "external_api.circuit_breaker.exclude[0]"),
    ],
)
def test_out_of_range_numbers_and_relative_imports_name_their_path(config: dict[str, object], path: str) -> None:
    """Numbers beyond float range and relative import strings are ConfigurationErrors naming the option.

    Never an OverflowError or a TypeError from deep inside.
    """
    error = error_of(config)
    assert error.path == path
    assert not isinstance(error.__cause__, OverflowError | TypeError)


def test_toml_with_numbers_beyond_float_range_fails_at_load(tmp_path: Path) -> None:
    """A TOML file with a 400-digit integer fails in load_toml, naming the file and the option."""
    file = tmp_path / "huge.toml"
    file.write_text(f"[api]\ntimeout = {HUGE_INT}\n\n[api.rate_limiter]\nlimit = 5\nwindow = 1\n")
    with pytest.raises(ConfigurationError) as info:
        load_toml(file)
    assert info.value.path == "api.timeout"
    assert str(file) in info.value.message
