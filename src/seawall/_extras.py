"""The optional extras: which one each integration needs, and the error when it is missing.

Every module that imports a third-party package of an extra does so under
``try`` and turns the :class:`ModuleNotFoundError` into one that says what to
install, written here once::

    try:
        import httpx
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, __name__) from exc

seawall is not on PyPI yet, so the hint installs the extra from a clone
(``pip install '.[http]'``), never ``pip install 'seawall[http]'``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXTRAS", "install_hint", "missing_extra"]

#: The extra (``[project.optional-dependencies]`` in ``pyproject.toml``) that each module needs.
EXTRAS: Final[dict[str, str]] = {
    "seawall.backends.redis": "redis",
    "seawall.integrations._httpx_transport": "http",
    "seawall.integrations.aiobreaker": "aiobreaker",
    "seawall.integrations.aiolimiter": "aiolimiter",
    "seawall.integrations.asyncpg": "postgres",
    "seawall.integrations.fastapi": "fastapi",
    "seawall.integrations.httpx": "http",
    "seawall.integrations.opentelemetry": "otel",
    "seawall.integrations.prometheus": "prometheus",
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: from a clone of seawall, which is not on PyPI yet."""
    return f"pip install '.[{extra}]' (from a clone of seawall, in your virtualenv)"


def missing_extra(exc: ModuleNotFoundError, module: str, extra: str | None = None) -> ModuleNotFoundError:
    """A :class:`ModuleNotFoundError` naming the missing package, the extra that provides it and how to install it.

    Args:
        exc: The error of the failed import (its ``name`` is the missing package).
        module: The seawall module that needs it (``__name__``).
        extra: The extra to name; by default ``EXTRAS[module]``.

    Returns:
        The error to raise ``from exc``; its ``name`` is the missing package's,
        so code that checks ``exc.name`` still sees what is missing.
    """
    extra = extra or EXTRAS[module]
    missing = exc.name or "a package"
    return ModuleNotFoundError(
        f"{module} needs {missing!r}, from seawall's {extra!r} extra: {install_hint(extra)}", name=exc.name
    )
