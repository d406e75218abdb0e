"""Fuzzing with hypothesis: hostile configurations, any Unicode as ids and names, spoofed client addresses.

* Configuration mappings and TOML files full of wrong types, unknown and
  misspelt options, NaN, ±inf, -0.0, 1e308, 10**400, bools for numbers,
  non-str keys and nested junk give ``ConfigurationError`` (its path naming the
  key) or a config that is valid: every value in range, and accepted as it is
  by ``configure_protection``. A rejected reconfiguration leaves the key as it
  was.
* Any ``str`` - lone surrogates, NUL, a megabyte - is a bucket (entity id) and a
  breaker name of its own, in memory and on Redis.
* ``X-Forwarded-For``, ``Forwarded`` and ``X-Real-IP`` headers written by the
  client never move it to another bucket: not without trusted proxies, and not
  past the last trusted proxy with them.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from hypothesis import example, given
from hypothesis import strategies as st
from reliability_support import fast, heavy
from starlette.requests import Request

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitBreaker,
    ConfigurationError,
    ProtectionConfig,
    RateLimiter,
    RateLimitExceeded,
)
from seawall._config import load_toml
from seawall.backends import MemoryBreakerBackend, RedisBackend
from seawall.integrations.fastapi import ClientAddress, client_address, protect, setup

pytestmark = pytest.mark.anyio

KEY = "svc"

# -- values a hostile or careless configuration holds ----------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([0, 1, 2**53, 2**53 + 1, 2**63, 10**12, 10**12 + 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e-310, 1e-3, 1e9, 1e9 + 1]),
    st.booleans(),
    st.timedeltas(min_value=timedelta(seconds=-5), max_value=timedelta(days=3)),
)
SCALARS = st.one_of(NUMBERS, st.none(), st.text(max_size=6), st.binary(max_size=3), st.just(complex(1, 1)))
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()), inner, max_size=3),
    ),
    max_leaves=6,
)
NAMES = {
    "rate_limiter": ["limit", "window", "algorithm", "limt", "windw", "burst"],
    "circuit_breaker": [
        "failure_threshold",
        "window",
        "recovery_time",
        "half_open_max_calls",
        "exclude",
        "failure_treshold",
        "recovery",
    ],
    "connection_pool": ["size", "max_overflow", "timeout", "factory", "factory_options", "sise", "max_idle"],
}
OPTION_VALUES = {
    "algorithm": st.sampled_from(["gcra", "fixed_window", "leaky", "", "GCRA"]),
    "exclude": st.one_of(
        st.sampled_from(["builtins:KeyError", "builtins:BaseException", "nope:Nope", ".relative:X", "builtins:int"]),
        st.lists(st.sampled_from(["builtins:ValueError", "builtins:KeyboardInterrupt", "x"]), max_size=2),
    ),
    "factory": st.sampled_from([None, "nope.module:Factory", "builtins:len", ".relative:Factory", "seawall:Nope"]),
}


def _section(name: str) -> st.SearchStrategy[Any]:
    options = st.sampled_from(NAMES[name]).flatmap(
        lambda option: st.tuples(st.just(option), st.one_of(OPTION_VALUES.get(option, NUMBERS), NUMBERS, JUNK))
    )
    keys = st.one_of(st.integers(), st.none(), st.tuples(st.text(max_size=2)), st.text(max_size=6))
    return st.one_of(
        st.lists(options, max_size=5).map(dict),
        st.dictionaries(keys, JUNK, max_size=2),
        JUNK,
    )


CONFIGS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "rate_limiter": _section("rate_limiter"),
            "circuit_breaker": _section("circuit_breaker"),
            "connection_pool": _section("connection_pool"),
            "timeout": st.one_of(NUMBERS, JUNK),
            "rate_limitr": JUNK,
            "retries": JUNK,
        },
    ),
    st.dictionaries(st.one_of(st.integers(), st.none(), st.text(max_size=8)), JUNK, max_size=3),
    JUNK,
)


def _assert_valid(config: ProtectionConfig) -> None:
    """Every value of an accepted config is in the range the contract promises."""

    def finite_positive(value: object) -> None:
        assert isinstance(value, float), value
        assert math.isfinite(value), value
        assert value > 0, value

    if config.timeout is not None:
        finite_positive(config.timeout)
    limiter = config.rate_limiter
    if isinstance(limiter, str):
        assert limiter, "a registered limiter is named by a non-empty str"
    elif limiter is not None:
        assert type(limiter.limit) is int
        assert 1 <= limiter.limit <= 10**12
        finite_positive(limiter.window)
        assert 1e-3 <= limiter.window <= 1e9
        assert limiter.algorithm in ("gcra", "fixed_window")
    breaker = config.circuit_breaker
    if breaker is not None:
        assert type(breaker.failure_threshold) is int
        assert breaker.failure_threshold >= 1
        assert type(breaker.half_open_max_calls) is int
        assert breaker.half_open_max_calls >= 1
        finite_positive(breaker.window)
        finite_positive(breaker.recovery_time)
        assert all(isinstance(kind, type) and issubclass(kind, Exception) for kind in breaker.exclude)
    pool = config.connection_pool
    if pool is not None:
        assert type(pool.size) is int
        assert pool.size >= 1
        assert type(pool.max_overflow) is int
        assert pool.max_overflow >= 0
        finite_positive(pool.timeout)


def _from_mapping(data: object) -> ProtectionConfig | None:
    try:
        config = ProtectionConfig.from_mapping(data, KEY)
    except ConfigurationError as exc:
        refused: ConfigurationError | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.path is None or str(refused.path).startswith(KEY), refused.path
        assert refused.error_type == "invalid_config"
        return None
    _assert_valid(config)
    return config


@given(data=CONFIGS)
@fast(400)
@example(data={"rate_limiter": {"limit": True, "window": 1}})
@example(data={"rate_limiter": {"limit": 10**400, "window": 1}})
@example(data={"circuit_breaker": {"recovery_time": math.nan}})
@example(data={"timeout": -0.0})
@example(data={"connection_pool": {"size": 1e308}})
@example(data={1: {"limit": 1}})
def test_config_mappings_are_valid_or_refused(data: object) -> None:
    """ProtectionConfig.from_mapping gives a config in range, or ConfigurationError naming the key; nothing else."""
    _from_mapping(data)


GOOD = {"rate_limiter": {"limit": 5, "window": 60}, "circuit_breaker": {"failure_threshold": 2}, "timeout": 1.5}


@given(key=st.one_of(st.just(KEY), st.text(max_size=4), JUNK), data=CONFIGS)
@fast(150)
@example(key=KEY, data={"rate_limiter": "not-registered"})
@example(key="", data={})
async def test_configure_protection_applies_a_valid_config_or_changes_nothing(key: Any, data: object) -> None:
    """configure_protection accepts exactly what validates, and a refusal leaves the key's configuration in force."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(KEY, GOOD)
        before = await infra.get_protection_status(KEY)
        try:
            config = await infra.configure_protection(key, data)  # type: ignore[arg-type]
        except ConfigurationError:
            assert infra.list_protection_keys() == [KEY]
            assert await infra.get_protection_status(KEY) == before
            return
        _assert_valid(config)
        assert key in infra.list_protection_keys()


# -- TOML files ------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    """A TOML basic string: printable ASCII as it is, everything else as a unicode escape."""
    out = []
    for char in key:
        if char in '"\\':
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(f"\\U{ord(char):08X}")
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str | None:
    """``value`` in TOML, or ``None`` where TOML has no such value (the option is then left out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_key(value)
    if isinstance(value, list | tuple):
        items = [_toml_value(item) for item in value]
        return "[" + ", ".join(item for item in items if item is not None) + "]"
    if isinstance(value, Mapping):
        pairs = [(str(k), _toml_value(v)) for k, v in value.items()]
        return "{" + ", ".join(f"{_toml_key(k)} = {v}" for k, v in pairs if v is not None) + "}"
    return None


def _toml(document: Mapping[str, Any]) -> str:
    lines = []
    for key, table in document.items():
        if isinstance(table, Mapping):
            lines.append(f"[{_toml_key(str(key))}]")
            for option, value in table.items():
                text = _toml_value(value)
                if text is not None:
                    lines.append(f"{_toml_key(str(option))} = {text}")
        else:
            text = _toml_value(table)
            if text is not None:
                lines.insert(0, f"{_toml_key(str(key))} = {text}")
    return "\n".join(lines) + "\n"


# Keys are non-empty and a top-level `protection` is a table: the two known defects of load_toml
# (test_an_empty_key_... and test_a_protection_value_...) are pinned on their own; widen these
# (min_size=0, `protection = <junk>`) once they are fixed.
TOML_DOCUMENTS = st.one_of(
    st.dictionaries(st.one_of(st.just(KEY), st.text(min_size=1, max_size=5)), CONFIGS, max_size=3).map(_toml),
    st.dictionaries(st.just("protection"), st.dictionaries(st.just(KEY), CONFIGS), max_size=1).map(_toml),
    st.text(max_size=60).filter(lambda text: not text.lstrip().startswith(("protection", '[""]', "['']"))),
)


@given(text=TOML_DOCUMENTS)
@fast(300)
@example(text="[svc.rate_limiter]\nlimit = 99999999999999999999999999\nwindow = 1\n")
def test_toml_files_are_valid_or_refused(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """load_toml gives configs that validate (and that configure_protection would accept), or ConfigurationError."""
    _check_toml(tmp_path_factory, text)


def _check_toml(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("toml") / "seawall.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        configs = load_toml(path)
    except ConfigurationError as exc:
        refused: ConfigurationError | None = exc
    else:
        refused = None
    if refused is not None:
        assert str(path) in refused.message
        return
    for key, config in configs.items():
        assert isinstance(key, str)
        assert key, "a key configure_protection would refuse was accepted from the file"
        _assert_valid(config)


def test_a_protection_value_that_is_no_table_is_a_configuration_error(tmp_path: Path) -> None:
    """``protection = 5`` in a TOML file is a ConfigurationError naming the file."""
    path = tmp_path / "seawall.toml"
    path.write_text("protection = 5\n")
    with pytest.raises(ConfigurationError, match=r"seawall\.toml"):
        load_toml(path)


def test_an_empty_key_in_a_toml_file_is_refused_when_read(tmp_path: Path) -> None:
    """A table named by the empty string is refused by load_toml, as configure_protection refuses the key."""
    path = tmp_path / "seawall.toml"
    path.write_text('[""]\ntimeout = 1\n')
    with pytest.raises(ConfigurationError):
        load_toml(path)


@pytest.mark.stress
@pytest.mark.timeout(1800)
@given(data=CONFIGS)
@heavy(10_000)
def test_config_mappings_are_valid_or_refused_at_length(data: object) -> None:
    """The mapping fuzzer with many more inputs (stress run)."""
    _from_mapping(data)


@pytest.mark.stress
@pytest.mark.timeout(1800)
@given(text=TOML_DOCUMENTS)
@heavy(5_000)
def test_toml_files_are_valid_or_refused_at_length(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """The TOML fuzzer with many more inputs (stress run)."""
    _check_toml(tmp_path_factory, text)


# -- any str is an id of its own ------------------------------------------------------------

ANY_STR = st.text(
    st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]), st.just("\x00")),
    max_size=24,
)
MEGABYTE = "\udcff\x00" + "é" * (2**19)


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    """A backend on the shared server under a prefix of its own; every key under it is deleted afterwards."""
    prefix = f"seawall-fuzz-{uuid.uuid4().hex}"
    async with RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as backend:
        yield backend
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _buckets_of_their_own(limiter: RateLimiter, first: str, second: str) -> None:
    await limiter.reset(first)
    await limiter.reset(second)
    await limiter.hit(first)
    await limiter.hit(first)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit(first)
    assert (await limiter.status(first)).current_count == pytest.approx(2, abs=1e-3)
    await limiter.hit(second)  # another id: another bucket
    assert (await limiter.status(second)).current_count == pytest.approx(1, abs=1e-3)


async def _breakers_of_their_own(backend: Any, first: str, second: str) -> None:
    one = CircuitBreaker(first, failure_threshold=1, recovery_time=600.0, backend=backend)
    other = CircuitBreaker(second, failure_threshold=1, recovery_time=600.0, backend=backend)
    await one.reset()
    await other.reset()
    await one.trip()
    assert (await one.status()).state is BreakerState.OPEN
    assert (await other.status()).state is BreakerState.CLOSED


def _two_ids(text: str) -> tuple[str, str]:
    return text or "\x00", (text or "\x00") + "\udcff"


@given(text=ANY_STR)
@fast(150)
@example(text=MEGABYTE)
@example(text="a:b\\")
async def test_any_str_is_a_bucket_and_a_breaker_of_its_own_in_memory(text: str) -> None:
    """In memory, any str (surrogates, NUL, 1 MB) keys its own bucket and names its own breaker."""
    first, second = _two_ids(text)
    await _buckets_of_their_own(RateLimiter(2, 3600.0), first, second)
    await _breakers_of_their_own(MemoryBreakerBackend(), first, second)


@pytest.mark.redis
@given(text=ANY_STR)
@fast(60)
@example(text=MEGABYTE)
@example(text="a:b\\")
async def test_any_str_is_a_bucket_and_a_breaker_of_its_own_on_redis(redis_backend: RedisBackend, text: str) -> None:
    """On Redis, any str (surrogates, NUL, 1 MB) keys its own bucket and names its own breaker."""
    first, second = _two_ids(text)
    for algorithm in ("gcra", "fixed_window"):
        limiter = RateLimiter(2, 10**6, algorithm=algorithm, backend=redis_backend)  # type: ignore[arg-type]
        await _buckets_of_their_own(limiter, first, second)
    await _breakers_of_their_own(redis_backend, first, second)


@pytest.mark.redis
@given(entity=ANY_STR)
@fast(40)
@example(entity=MEGABYTE)
async def test_any_entity_is_a_bucket_of_its_own_through_the_coordinator(redis_url: str, entity: str) -> None:
    """execute_protected(rate_limiter=entity) keeps any entity's bucket apart, in memory and on Redis."""

    async def fn() -> str:
        return "ok"

    prefix = f"seawall-fuzz-{uuid.uuid4().hex}"
    async with RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as backend:
        for store in (None, backend):
            async with AsyncInfrastructure(backend=store) as infra:
                await infra.configure_protection(KEY, {"rate_limiter": {"limit": 1, "window": 3600}})
                assert await infra.execute_protected(KEY, fn, rate_limiter=entity) == "ok"
                with pytest.raises(RateLimitExceeded):
                    await infra.execute_protected(KEY, fn, rate_limiter=entity)
                assert await infra.execute_protected(KEY, fn, rate_limiter=entity + "\x00") == "ok"
        client = backend.client
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)


# -- client addresses no client can choose -----------------------------------------------------

PEER = "198.51.100.7"  # a client connecting directly
PROXY = "10.1.2.3"  # our reverse proxy
CLIENT = "203.0.113.9"  # the client behind it, as the proxy wrote it
ADDRESSES = st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "::ffff:10.0.0.7", "203.0.113.1", "unknown", ""])
HEADER_TEXT = st.one_of(
    ADDRESSES,
    st.lists(ADDRESSES, min_size=1, max_size=6).map(", ".join),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.sampled_from(['for="[::1]:80";proto=https', "for=10.0.0.1, for=127.0.0.1", "by=10.0.0.1;for=_hidden"]),
    st.just("1.1.1.1," * 2000),
)
HOSTILE_HEADERS = st.lists(
    st.tuples(st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip", "X-Forwarded-For"]), HEADER_TEXT),
    max_size=5,
)
TRUSTING = ClientAddress(trusted_proxies=["10.0.0.0/8", "::1/128"])


def _request(peer: str, headers: list[tuple[str, str]]) -> Request:
    raw = [(name.lower().encode(), value.encode("latin-1")) for name, value in headers]
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""}
    scope["client"] = (peer, 40000)
    return Request(scope)


@given(headers=HOSTILE_HEADERS)
@fast(300)
def test_spoofed_headers_never_move_a_client_to_another_bucket(headers: list[tuple[str, str]]) -> None:
    """A direct client is its socket peer whatever it sends; behind our proxy, the client the proxy wrote."""
    direct = _request(PEER, headers)
    assert client_address(direct) == PEER
    assert TRUSTING(direct) == PEER
    # Our proxy appends the address it saw to whatever X-Forwarded-For the client sent.
    proxied = _request(PROXY, [*headers, ("x-forwarded-for", CLIENT)])
    assert TRUSTING(proxied) == CLIENT
    assert client_address(proxied) == PROXY


@given(headers=st.lists(HOSTILE_HEADERS, min_size=3, max_size=3))
@fast(25)
async def test_spoofed_headers_buy_no_extra_requests_through_an_app(headers: list[list[tuple[str, str]]]) -> None:
    """Through a real app, a client sending a different spoof on every request still meets its own limit of 2."""
    app = FastAPI()
    infra = AsyncInfrastructure()
    setup(app, infra, lifespan=False)

    @app.get("/", dependencies=[Depends(protect("api", entity=TRUSTING))])
    async def index() -> dict[str, str]:
        return {"ok": "yes"}

    async with infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 2, "window": 3600}})
        transport = httpx.ASGITransport(app=app, client=(PEER, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            statuses = []
            for spoof in headers:
                sent = [(name, value) for name, value in spoof if len(value) < 4000]
                statuses.append((await client.get("/", headers=sent)).status_code)
            assert statuses == [200, 200, 429]
        honest = httpx.ASGITransport(app=app, client=("192.0.2.44", 40000))
        async with httpx.AsyncClient(transport=honest, base_url="http://testserver") as client:
            assert (await client.get("/")).status_code == 200
