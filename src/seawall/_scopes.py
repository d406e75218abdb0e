"""The cancel scope of a protected call, built at the least cost the running backend allows.

Every protected call enters an anyio cancel scope. While an
``AsyncInfrastructure`` runs, the backend's own class is called directly
(``anyio.CancelScope()`` dispatches on the backend at every construction).
Calling even that class costs two calls from C into Python: its ``__new__``
(which anyio's backends define only to skip the base class's dispatch, and
which then does nothing but allocate) and its ``__init__``. Allocating with
``object.__new__`` and calling ``__init__`` as a method runs the same code
with neither transition: about 1,600 instructions fewer per call on CPython
3.11, a tenth of what the whole scope costs.

The shortcut is taken only for a class whose ``__new__`` is shown, when the
infrastructure starts, to set nothing that ``__init__`` does not: an instance
built each way must have the same attributes set, with values of the same
types (:func:`allocates_plainly`); the host then says so in ``scope_bare``. A
backend whose ``__new__`` does more (a future anyio, say) has its class
called, as before. (Outside ``async with infra`` the class is
``anyio.CancelScope`` itself, whose ``__new__`` is the dispatch: it is called.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["allocates_plainly"]

_UNSET = object()


def allocates_plainly(cls: type[Any]) -> bool:
    """Whether ``object.__new__(cls)`` and then ``__init__()`` builds what ``cls()`` builds.

    ``__new__`` runs before ``__init__``, so whatever both set, ``__init__``
    decides; the hazard is only what ``__new__`` alone would set. So an
    instance built each way must have the same attributes set, each of the
    same type (values may differ: each ``__init__`` makes its own sets, and
    on trio its own ``trio.CancelScope``).
    """
    try:
        called = cls()
        allocated = object.__new__(cls)
        allocated.__init__()
    except Exception:  # (a class that cannot be built without arguments: call it as it asks)
        return False
    return type(called) is cls and _shape(called) == _shape(allocated)


def _shape(obj: object) -> dict[str, type[Any] | None]:
    """The type held by each slot of ``obj``'s classes and each ``__dict__`` entry (``None``: unset)."""
    shape: dict[str, type[Any] | None] = {}
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            private = name.startswith("__") and not name.endswith("__")
            attr = f"_{klass.__name__.lstrip('_')}{name}" if private else name  # (name mangling)
            value = getattr(obj, attr, _UNSET)
            shape[f"{klass.__qualname__}.{attr}"] = None if value is _UNSET else type(value)
    shape.update((name, type(value)) for name, value in getattr(obj, "__dict__", {}).items())
    return shape
