"""The group-commit queue: batches form while a flush runs, and each caller gets its own result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from broker.coalesce import Coalescer


class Recorder:
    """A flush that records its batches; the first one waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, target: str, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.release.wait(5)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


def test_requests_that_arrive_during_a_flush_share_the_next_one() -> None:
    flush = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(flush)

    async def scenario() -> list[int | BaseException]:
        first = asyncio.ensure_future(coalescer.submit("db", 0))
        while not flush.batches:  # the first flush is running (and held)
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(coalescer.submit("db", i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        flush.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert flush.batches == [[0], [1, 2, 3, 4, 5]]
    assert results[0::2] == [0, 20, 40]
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3", "odd 5"]


def test_targets_never_share_a_batch_and_batches_are_capped() -> None:
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def flush(target: str, items: Sequence[int]) -> list[int]:
        seen.append((target, list(items)))
        gate.wait(5)
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, max_batch=3)

    async def scenario() -> list[int]:
        calls = [coalescer.submit("a" if i < 7 else "b", i) for i in range(10)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == list(range(10))
    assert sorted(seen) == [
        ("a", [0, 1, 2]),
        ("a", [3, 4, 5]),
        ("a", [6]),
        ("b", [7, 8, 9]),
    ]


def test_a_flush_that_raises_fails_its_whole_batch_and_the_queue_goes_on() -> None:
    calls = 0

    def flush(target: str, items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database gone")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush)

    async def scenario() -> int:
        with pytest.raises(RuntimeError, match="database gone"):
            await coalescer.submit("db", 1)
        return await coalescer.submit("db", 2)

    assert asyncio.run(scenario()) == 2


def test_a_cancelled_caller_leaves_its_item_to_be_done() -> None:
    done: list[int] = []
    gate = threading.Event()

    def flush(target: str, items: Sequence[int]) -> list[int]:
        gate.wait(5)
        done.extend(items)
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush)

    async def scenario() -> int:
        caller = asyncio.ensure_future(coalescer.submit("db", 1))
        await asyncio.sleep(0.01)
        caller.cancel()
        await asyncio.sleep(0)
        gate.set()
        return await coalescer.submit("db", 2)

    assert asyncio.run(scenario()) == 2
    assert done == [1, 2]
