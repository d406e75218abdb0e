"""Property tests of RateLimiter: the rate bounds hold for any sequence of hits and clock advances."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from functools import partial

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seawall import FakeClock, RateLimiter, RateLimitExceeded, RateLimitStatus

# A step: advance the clock by ``eighths / 8`` seconds, then hit ``key`` with ``cost``;
# ``retry`` says whether a denial is followed by waiting exactly its retry_after and hitting again.
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=24),
        st.sampled_from(["a", "b"]),
        st.integers(min_value=1, max_value=4),
        st.booleans(),
    ),
    max_size=60,
)
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


async def attempt(limiter: RateLimiter, key: str, cost: int) -> tuple[RateLimitStatus | None, float | None]:
    """Hit ``key``: ``(status, None)`` when admitted, ``(None, retry_after)`` when denied."""
    try:
        return await limiter.hit(key, cost), None
    except RateLimitExceeded as error:
        return None, error.retry_after


def run_sequence(
    limit: int, window: int, algorithm: str, start: int, sequence: list[tuple[int, str, int, bool]]
) -> dict[str, list[tuple[Fraction, int, float | None]]]:
    """Play ``sequence``; return per key the (time, cost, status count) of every admitted hit."""
    admitted: dict[str, list[tuple[Fraction, int, float | None]]] = defaultdict(list)

    async def main() -> None:
        clock = FakeClock(start)
        now = Fraction(start)
        limiter = RateLimiter(limit, window, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
        for eighths, key, raw_cost, retry in sequence:
            cost = min(raw_cost, limit)
            clock.advance(eighths / 8)
            now += Fraction(eighths, 8)
            status, retry_after = await attempt(limiter, key, cost)
            if status is None:
                assert retry_after is not None
                assert retry_after > 0
                if not retry:
                    continue
                # Waiting exactly retry_after admits the same hit.
                clock.advance(retry_after)
                now += Fraction(retry_after)
                status = await limiter.hit(key, cost)
            admitted[key].append((now, cost, status.current_count))
            assert status == await limiter.status(key)

    anyio.run(main)
    return admitted


@PROPERTY_SETTINGS
@given(
    limit=st.integers(min_value=1, max_value=8),
    window=st.integers(min_value=1, max_value=5),
    start=st.integers(min_value=0, max_value=10**6),
    sequence=steps,
)
def test_gcra_never_admits_more_than_limit_plus_the_drain(
    limit: int, window: int, start: int, sequence: list[tuple[int, str, int, bool]]
) -> None:
    """GCRA: in any interval of length t, at most limit + (t / window) * limit is admitted per key."""
    for hits in run_sequence(limit, window, "gcra", start, sequence).values():
        for i, (t_first, _, _) in enumerate(hits):
            total = 0
            for t_last, cost, _ in hits[i:]:
                total += cost
                allowance = limit + (t_last - t_first) / window * limit
                assert total <= allowance + Fraction(1, 10**6)


@PROPERTY_SETTINGS
@given(
    limit=st.integers(min_value=1, max_value=8),
    window=st.integers(min_value=1, max_value=5),
    start=st.integers(min_value=0, max_value=10**6),
    sequence=steps,
)
def test_fixed_window_never_admits_more_than_limit_per_window(
    limit: int, window: int, start: int, sequence: list[tuple[int, str, int, bool]]
) -> None:
    """fixed_window: per key and aligned window, the admitted costs add up to at most limit."""
    for hits in run_sequence(limit, window, "fixed_window", start, sequence).values():
        per_window: dict[int, int] = defaultdict(int)
        for t, cost, count in hits:
            per_window[int(t // window)] += cost
            assert count == per_window[int(t // window)]
        assert all(total <= limit for total in per_window.values())


@PROPERTY_SETTINGS
@given(
    limit=st.integers(min_value=1, max_value=8),
    window=st.integers(min_value=1, max_value=5),
    start=st.integers(min_value=0, max_value=10**6),
    sequence=st.lists(
        st.tuples(st.integers(min_value=0, max_value=24), st.integers(min_value=1, max_value=4)), max_size=60
    ),
)
def test_gcra_decides_like_an_exact_leaky_bucket(
    limit: int, window: int, start: int, sequence: list[tuple[int, int]]
) -> None:
    """Every GCRA decision matches a leaky bucket computed in exact fractions (away from float ties)."""

    async def main() -> None:
        clock = FakeClock(start)
        limiter = RateLimiter(limit, window, clock=clock)
        now = Fraction(start)
        tat = now  # the exact bucket: empty at ``tat``
        interval = Fraction(window, limit)
        for eighths, raw_cost in sequence:
            cost = min(raw_cost, limit)
            clock.advance(eighths / 8)
            now += Fraction(eighths, 8)
            candidate = max(tat, now) + cost * interval
            fits = candidate - now <= window
            status, retry_after = await attempt(limiter, "k", cost)
            if status is not None:
                assert fits
                tat = candidate
            else:
                assert not fits
                assert retry_after == pytest.approx(float(candidate - now - window), abs=1e-6)

    anyio.run(main)


@PROPERTY_SETTINGS
@given(
    algorithm=st.sampled_from(["gcra", "fixed_window"]),
    limit=st.integers(min_value=1, max_value=8),
    window=st.integers(min_value=1, max_value=5),
    start=st.integers(min_value=0, max_value=10**6),
    sequence=st.lists(
        st.tuples(st.integers(min_value=0, max_value=48), st.sampled_from(["a", "b"]), st.integers(1, 4)),
        max_size=60,
    ),
)
def test_a_bucket_handle_decides_like_acquire_nowait(
    algorithm: str, limit: int, window: int, start: int, sequence: list[tuple[int, str, int]]
) -> None:
    """limiter.bucket(key, cost).acquire_nowait() (one fused function) admits and denies as acquire_nowait()."""
    clock = FakeClock(start)
    handles = RateLimiter(limit, window, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    plain = RateLimiter(limit, window, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    for eighths, key, raw_cost in sequence:
        cost = min(raw_cost, limit)
        clock.advance(eighths / 8)  # up to 6 s: generations roll over and go idle
        outcomes = []
        for decide in (handles.bucket(key, cost).acquire_nowait, partial(plain.acquire_nowait, key, cost)):
            try:
                decide()
                outcomes.append(None)
            except RateLimitExceeded as error:
                outcomes.append(error.retry_after)
        assert outcomes[0] == outcomes[1]
    assert len(handles._table) == len(plain._table)  # type: ignore[arg-type]
