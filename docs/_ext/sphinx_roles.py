"""A griffe extension: Sphinx roles in docstrings become cross-references of the API reference.

seawall's docstrings name other objects the Sphinx way (``:meth:`~seawall.RateLimiter.hit```,
``:class:`FakeClock```), which mkdocstrings would show as literal text. Each role is
rewritten, before rendering, into an autorefs link: the target resolved in the
docstring's own scope (as Sphinx resolves it), the title the target as written (its
last part with the ``~`` prefix). The links are *optional*: a target the reference
does not render (a private helper, the standard library) stays code, without a
warning that would fail the strict build.

Loaded by mkdocstrings from ``mkdocs.yml`` (``extensions: [docs/_ext/sphinx_roles.py]``);
``tests/test_docs.py`` checks the rewriting.
"""

from __future__ import annotations

import html
import re
from typing import Any

try:
    import griffe
except ModuleNotFoundError:  # the test suite checks rewrite() without the docs toolchain installed
    griffe = None

__all__ = ["SphinxRoles", "rewrite"]

ROLE = re.compile(r":(?:py:)?(?P<role>meth|class|func|attr|mod|data|exc|obj|const):`(?P<target>[^`]+)`")


def _resolve(target: str, scope: Any) -> str:
    """The full path of ``target`` seen from ``scope`` (a griffe object), or ``target`` itself."""
    if scope is None or target.startswith("seawall."):
        return target
    head, _, rest = target.partition(".")
    try:
        resolved = scope.resolve(head)
        found = scope.modules_collection[resolved]
        if found.is_alias:  # an imported name: where it comes from (``anyio``, not ``seawall.testing.anyio``)
            resolved = found.target_path
    except (griffe.NameResolutionError, griffe.AliasResolutionError, AttributeError, KeyError):
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _public(identifier: str, public: dict[str, str]) -> str:
    """``identifier`` under its public name (``seawall._breaker.BreakerPermit`` -> ``seawall.BreakerPermit``)."""
    if "._" not in identifier:
        return identifier  # public already
    head, rest = identifier, ""
    while head:
        if head in public:
            return public[head] + rest
        head, dot, tail = head.rpartition(".")
        rest = f"{dot}{tail}{rest}"
    return identifier


def rewrite(text: str, scope: Any = None, public: dict[str, str] | None = None) -> str:
    """``text`` with every Sphinx role turned into an optional autorefs link.

    ``public`` maps a canonical path (``seawall._limiter.RateLimiter``) to the
    public one the reference renders (``seawall.RateLimiter``).
    """

    def link(match: re.Match[str]) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        title = target.rsplit(".", 1)[-1] if short else target
        if match["role"] in ("meth", "func"):
            title += "()"
        identifier = _public(_resolve(target, scope), public or {})
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'

    return ROLE.sub(link, text)


class SphinxRoles(griffe.Extension if griffe is not None else object):  # type: ignore[misc]
    """Rewrite the roles of every docstring once the package is loaded (so names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk the package and rewrite each object's docstring."""
        del kwargs
        public: dict[str, str] = {}
        self._public_names(pkg, public)
        self._walk(pkg, set(), public)

    def _public_names(self, module: Any, public: dict[str, str]) -> None:
        """Map each re-exported object's canonical path to its path in a public module."""
        for name, member in module.members.items():
            if name.startswith("_"):
                continue
            if member.is_alias:
                try:
                    public.setdefault(member.target_path, member.path)
                except griffe.AliasResolutionError:  # pragma: no cover - an import the loader cannot follow
                    continue
            elif member.is_module:
                self._public_names(member, public)

    def _walk(self, obj: Any, seen: set[str], public: dict[str, str]) -> None:
        if obj.is_alias or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, obj, public)
        for member in obj.members.values():
            self._walk(member, seen, public)
