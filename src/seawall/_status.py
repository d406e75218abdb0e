"""``python -m seawall status``: a configuration's keys, layers and rules, and with Redis the fleet's state.

Without ``--redis`` the command reads the TOML file only: what each key's
layers are and their rules. With ``--redis URL`` it also reads, from that
server, the state every process of the fleet shares: each key's breaker
(state, failures, retry time) and rate-limit bucket levels (the key's default
bucket, and those of ``--entity`` names). It never writes to Redis, creates no
pool and opens no connection a pool's factory would open.

Exit status: 0, or 1 when any breaker is open (a shell or a deploy script can
gate on it), 2 for a bad command line or configuration, or 3 when the Redis
server cannot be read (unreachable, refused, timed out): never 1 for that, so a
script gating on "a breaker is open" is not misled by a store that is down.
The Redis URL is shown without its password.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from seawall._config import ProtectionConfig, load_toml
from seawall._errors import ConfigurationError

__all__ = ["collect_status", "render_table", "run_status"]

#: Exit statuses of the command.
OK, BREAKER_OPEN, USAGE, UNREACHABLE = 0, 1, 2, 3


def redact(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (a report must not show credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: classes by their import path, other objects by repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type):
        return f"{value.__module__}:{value.__qualname__}"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # an enum
        return value.value
    return repr(value)


def _rules(config: ProtectionConfig) -> dict[str, Any]:
    """Each configured section of ``config`` with its options (the layers, in config order)."""
    layers: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        section = getattr(config, field.name)
        if section is None or field.name == "timeout":
            continue
        if dataclasses.is_dataclass(section) and not isinstance(section, type):
            layers[field.name] = {
                f.name: _plain(getattr(section, f.name))
                for f in dataclasses.fields(section)
                if not f.name.startswith("_") and f.name != "factory_options"
            }
        else:
            layers[field.name] = _plain(section)  # e.g. a limiter registered by name
    return layers


def _for_fleet(config: ProtectionConfig) -> ProtectionConfig:
    """The parts of ``config`` whose state lives in the shared store (no pool, no chaos, no retry)."""
    keep = {"rate_limiter", "circuit_breaker", "timeout"}
    cleared = {f.name: None for f in dataclasses.fields(config) if f.name not in keep}
    limiter = config.rate_limiter
    if isinstance(limiter, str):  # a limiter registered in a process by name: not in the file
        cleared["rate_limiter"] = None
    return dataclasses.replace(config, **cleared)


async def collect_status(
    configs: Mapping[str, ProtectionConfig],
    *,
    redis: str | None = None,
    prefix: str = "seawall",
    entities: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of ``status``: every key's timeout and layers, and with ``redis`` their shared state."""
    keys: dict[str, Any] = {
        key: {"timeout": config.timeout, "layers": _rules(config)} for key, config in configs.items()
    }
    report: dict[str, Any] = {
        "redis": None if redis is None else redact(redis),
        "prefix": prefix if redis else None,
        "keys": keys,
    }
    if redis is None:
        return report
    from seawall._infrastructure import AsyncInfrastructure
    from seawall._registries import jsonable
    from seawall.backends import RedisBackend

    try:
        backend = RedisBackend.from_url(redis, prefix=prefix, on_error="deny")
    except ValueError as exc:  # redis-py's word for a malformed URL
        raise ConfigurationError(f"--redis: {exc}", path="redis") from exc
    try:
        async with AsyncInfrastructure(backend=backend) as infra:
            for key, config in configs.items():
                fleet = _for_fleet(config)
                await infra.configure_protection(key, fleet)
                state: dict[str, Any] = {}
                if fleet.circuit_breaker is not None:
                    status = await infra.circuit_breaker.get(key).status()
                    if not status.reachable:  # (a process's own view, which this command has none of)
                        raise ConnectionError(f"the state of circuit breaker {key!r} could not be read")
                    state["circuit_breaker"] = jsonable(status.to_dict())
                if fleet.rate_limiter is not None:
                    buckets = {}
                    for entity in ("global", *entities):
                        bucket = await infra.rate_limiter.get_status(entity, key)
                        buckets[entity] = jsonable(bucket.to_dict())
                    state["rate_limiter"] = buckets
                keys[key]["fleet"] = state
    finally:
        await backend.aclose()
    return report


def _open_breakers(report: Mapping[str, Any]) -> list[str]:
    return [
        key
        for key, entry in report["keys"].items()
        if entry.get("fleet", {}).get("circuit_breaker", {}).get("state") == "open"
    ]


def _layer_summary(name: str, options: Any) -> str:
    if not isinstance(options, dict):
        return f"{name}={options}"
    shown = ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, (), []))
    return f"{name}({shown})"


def _fleet_summary(fleet: Mapping[str, Any]) -> tuple[str, str]:
    breaker = fleet.get("circuit_breaker")
    breaker_text = "-"
    if breaker is not None:
        breaker_text = f"{breaker['state']} ({breaker['failure_count']}/{breaker['failure_threshold']} failures)"
        if breaker.get("retry_after"):
            breaker_text += f", retry in {breaker['retry_after']:.1f}s"
    buckets = fleet.get("rate_limiter")
    bucket_text = "-"
    if buckets:
        bucket_text = "; ".join(
            f"{entity}: {status['current_count']:g}/{status['limit']:g}" for entity, status in buckets.items()
        )
    return breaker_text, bucket_text


def render_table(report: Mapping[str, Any], stream: TextIO) -> None:
    """Print ``report`` as a table: with rich when it is installed (extra ``demo``), else as plain columns."""
    with_fleet = report["redis"] is not None
    headers = ["key", "timeout", "layers"] + (["breaker (fleet)", "buckets (fleet)"] if with_fleet else [])
    rows = []
    for key, entry in report["keys"].items():
        layers = "\n".join(_layer_summary(name, options) for name, options in entry["layers"].items()) or "-"
        timeout = "default" if entry["timeout"] is None else f"{entry['timeout']:g}s"
        row = [key, timeout, layers]
        if with_fleet:
            row.extend(_fleet_summary(entry.get("fleet", {})))
        rows.append(row)
    try:
        from rich.console import Console
        from rich.table import Table
    except ModuleNotFoundError:
        stream.write("\t".join(headers) + "\n")
        for row in rows:
            stream.write("\t".join(cell.replace("\n", " ") for cell in row) + "\n")
        return
    title = f"seawall status (Redis {report['redis']}, prefix {report['prefix']!r})" if with_fleet else "seawall status"
    table = Table(*headers, title=title)
    for row in rows:
        style = "bold red" if with_fleet and row[3].startswith("open") else None
        table.add_row(*row, style=style)
    # A terminal's own width (rich wraps the cells to fit); piped, wide enough for one line per rule.
    Console(file=stream, width=None if stream.isatty() else 160).print(table)


def run_status(
    config: str,
    *,
    redis: str | None = None,
    prefix: str = "seawall",
    entities: Sequence[str] = (),
    as_json: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Run ``status`` and return the exit status (1: a breaker is open, 2: a bad configuration, 3: Redis unreadable)."""
    import anyio

    out = stream if stream is not None else sys.stdout
    try:
        configs = load_toml(config)
        report = anyio.run(lambda: collect_status(configs, redis=redis, prefix=prefix, entities=entities))
    except ConfigurationError as exc:
        sys.stderr.write(f"seawall status: {exc}\n")
        return USAGE
    except Exception as exc:  # the store's failure, whatever its client raises: reported, never a traceback
        if redis is None:
            raise  # no store was read: a bug, not an outage
        message = f"cannot read the fleet's state from Redis {redact(redis)}: {type(exc).__name__}: {exc}"
        sys.stderr.write(f"seawall status: {message}\n")
        return UNREACHABLE
    report["open_breakers"] = _open_breakers(report)
    if as_json:
        json.dump(report, out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        render_table(report, out)
    return BREAKER_OPEN if report["open_breakers"] else OK
