"""Argument checks shared by every constructor, config section and per-call option.

One rule for the whole public API: a bad argument raises
:class:`~seawall.ConfigurationError` (a ``ValueError``), or
:class:`~seawall.ConfigurationTypeError` (also a ``TypeError``) for a value of
the wrong type, and its ``path`` names the argument (``"window"``) or the
config option (``"api.rate_limiter.window"``). Never an ``OverflowError``:
numbers are judged as the floats every backend computes with, so an integer
beyond float range (``10**400``, which TOML and JSON readily produce) is out of
range like ``inf``, not a crash.

A ``bool`` is never a number here (``True`` is an ``int`` to Python, but
``limit=True`` is a mistake, not a limit of one).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Final

from seawall._errors import ConfigurationError, ConfigurationTypeError

__all__ = ["MAX_COUNT", "MAX_SECONDS", "count", "describe", "number", "seconds"]

#: The largest count accepted anywhere (thresholds, sizes): every backend holds
#: it exactly (a Lua number on Redis is a double, exact up to 2**53).
MAX_COUNT: Final = 2**53
#: The longest duration accepted (about 31 years): deadlines and expiries
#: computed from it stay exact floats and inside Redis's millisecond range.
MAX_SECONDS: Final = 1e9


def describe(value: object) -> str:
    """``value`` as error messages show it: its repr (shortened) and its type."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable>"
    if len(text) > 60:
        text = f"{text[:40]}...{text[-12:]}"
    return f"{text} ({type(value).__name__})"


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf if value > 0 else -math.inf


def number(
    value: object,
    path: str,
    *,
    what: str = "a number",
    minimum: float = 0.0,
    inclusive: bool = False,
    maximum: float = math.inf,
) -> float:
    """A finite real number above ``minimum`` (or at it, with ``inclusive``) and at most ``maximum``.

    Raises:
        ConfigurationTypeError: ``value`` is not an ``int`` or ``float`` (or is a ``bool``).
        ConfigurationError: It is out of range (``nan``, ``inf``, ``10**400`` included).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationTypeError(f"{path}: expected {what}, got {describe(value)}", path=path)
    result = _as_float(value)
    low_ok = result >= minimum if inclusive else result > minimum
    if not (math.isfinite(result) and low_ok and result <= maximum):
        low = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"
        high = "" if maximum == math.inf else f" and at most {maximum:g}"
        raise ConfigurationError(f"{path}: must be {what} {low}{high}, got {describe(value)}", path=path)
    return result


def seconds(
    value: object, path: str, *, minimum: float = 0.0, inclusive: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """Finite seconds above ``minimum`` (or at it), at most ``maximum``; a ``timedelta`` is converted once."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return number(value, path, what="a number of seconds", minimum=minimum, inclusive=inclusive, maximum=maximum)


def count(value: object, path: str, *, minimum: int, maximum: int = MAX_COUNT) -> int:
    """An ``int`` (never a ``bool``) from ``minimum`` to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationTypeError(f"{path}: expected an integer, got {describe(value)}", path=path)
    if value < minimum:
        raise ConfigurationError(f"{path}: must be at least {minimum}, got {describe(value)}", path=path)
    if value > maximum:
        raise ConfigurationError(f"{path}: must be at most {maximum}, got {describe(value)}", path=path)
    return value
