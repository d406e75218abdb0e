"""The public surface: `__all__` matches what the package defines, sorted."""

from __future__ import annotations

import seawall
from seawall import errors, telemetry, testing


def test_all_is_sorted_and_complete() -> None:
    """Every public name of seawall is in __all__, __all__ is sorted, and each name resolves."""
    public = {name for name in vars(seawall) if not name.startswith("_")} - {
        # submodules are reachable as attributes once imported, but are not names of the API
        "errors",
        "telemetry",
        "testing",
        "backends",
        "integrations",
    }
    exported = set(seawall.__all__) - {"__version__"}
    assert public == exported
    assert seawall.__all__ == sorted(seawall.__all__, key=str.lower) or seawall.__all__ == sorted(seawall.__all__)
    for module in (seawall, errors, telemetry, testing):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_exported_classes_claim_the_public_module() -> None:
    """Exported classes live in seawall's private modules (no third-party leaks in the API)."""
    for name in seawall.__all__:
        obj = getattr(seawall, name)
        module = getattr(obj, "__module__", "seawall")
        assert module.startswith("seawall"), (name, module)


def test_version_is_a_string() -> None:
    """seawall.__version__ is set from the package metadata source."""
    assert isinstance(seawall.__version__, str)
    assert seawall.__version__.count(".") >= 2
