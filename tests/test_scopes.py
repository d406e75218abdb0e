"""The cancel scope of a protected call: built without its class's ``__new__`` only where that is proved the same."""

from __future__ import annotations

import anyio
import pytest

from seawall import AsyncInfrastructure, ProtectionTimeout
from seawall._scopes import allocates_plainly

pytestmark = pytest.mark.anyio


async def test_the_running_backends_scope_class_is_allocated_plainly() -> None:
    # Both anyio backends define __new__ only to skip the base class's dispatch.
    assert allocates_plainly(type(anyio.CancelScope()))


async def test_a_plainly_allocated_scope_still_times_out_and_shields() -> None:
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"timeout": 0.05})
        with pytest.raises(ProtectionTimeout):
            async with infra.protect("k"):
                await anyio.sleep(5)
        # A shield inside the block still holds against the call's own deadline.
        async with infra.protect("k"):
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1)
            finished = True
        assert finished is True


class _SetsInNew:
    __slots__ = ("counted", "seen")

    def __new__(cls) -> _SetsInNew:
        made = object.__new__(cls)
        made.counted = 1  # state only __new__ sets: allocating plainly would leave it unset
        return made

    def __init__(self) -> None:
        self.seen = False


class _NeedsArguments:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline


class _DictState:
    def __new__(cls) -> _DictState:
        made = object.__new__(cls)
        made.__dict__["registry"] = []
        return made


def test_a_class_whose_new_sets_state_is_called_as_it_is() -> None:
    assert not allocates_plainly(_SetsInNew)
    assert not allocates_plainly(_DictState)


def test_a_class_that_needs_arguments_is_called_as_it_is() -> None:
    assert not allocates_plainly(_NeedsArguments)


def test_a_class_with_a_trivial_new_is_allocated_plainly() -> None:
    class Plain:
        __slots__ = ("__hidden", "items")

        def __new__(cls) -> Plain:
            return object.__new__(cls)

        def __init__(self) -> None:
            self.items: list[int] = []
            self.__hidden = object()

    assert allocates_plainly(Plain)
