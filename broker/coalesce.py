"""Group commit: many requests' database work done in one transaction.

A busy endpoint pays, per request, for a connection check-out, BEGIN, its
statements, COMMIT and a hand-off to a worker thread and back; the statements
themselves are the smaller part. A ``Coalescer`` queues the requests' items on
the event loop and hands them to a worker thread in batches: each batch is
everything that arrived while the previous one ran. So one request alone is
served at once (a batch of one, no waiting for company), and under load the
fixed costs are shared by all the requests of a batch. A request is answered
only after its batch committed: nothing is acknowledged that is not stored.

The flush function decides what a failure means: it returns one result per
item, an exception object for an item that failed alone; an exception it
raises fails every item of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from weakref import WeakKeyDictionary

import anyio.to_thread

from broker.config import get_settings

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Queue(Generic[Item, Result]):
    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    draining: asyncio.Task[None] | None = None  # the task writing batches, while one is


class Coalescer(Generic[Item, Result]):
    """Run ``flush(target, items)`` in a worker thread for batches of items.

    ``target`` (an engine, say) is what a batch shares: items for different
    targets never share a batch. Queues are per event loop, since a future
    belongs to its loop (the test client runs apps in loops of their own).
    """

    def __init__(
        self,
        flush: Callable[[Any, Sequence[Item]], Sequence[Result | BaseException]],
        *,
        max_batch: int = 500,
        linger: float | Callable[[], float] = 0.003,
    ) -> None:
        """``linger``: seconds a batch that follows another waits for company (or a
        function that tells, asked for each such batch)."""
        self._flush = flush
        self._max_batch = max_batch
        self._linger = linger
        self._queues: WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, _Queue[Item, Result]]
        ] = WeakKeyDictionary()

    async def submit(self, target: Hashable, item: Item) -> Result:
        """``item``'s result once its batch is done (an item's exception is raised).

        A caller that is cancelled meanwhile leaves its item in the batch: the
        work is done and kept (an idempotency key makes a retry find it)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(loop, {}).setdefault(target, _Queue())
        future: asyncio.Future[Result] = loop.create_future()
        queue.waiting.append((item, future))
        if queue.draining is None:
            queue.draining = loop.create_task(self._drain(target, queue))
        return await future  # cancelled, it is skipped when its batch is done

    async def _drain(self, target: Hashable, queue: _Queue[Item, Result]) -> None:
        try:
            first = True
            while queue.waiting:
                if not first and len(queue.waiting) < self._max_batch:
                    # Under load (items came while the last batch ran): wait a moment
                    # for more, as PostgreSQL's commit_delay does; fewer, fuller batches
                    # leave the CPU more room. A lone request never waits.
                    await asyncio.sleep(self._linger() if callable(self._linger) else self._linger)
                first = False
                batch = queue.waiting[: self._max_batch]
                del queue.waiting[: len(batch)]
                await self._run(target, batch)
        finally:
            queue.draining = None

    async def _run(self, target: Any, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await anyio.to_thread.run_sync(self._flush, target, items)
            if len(results) != len(items):
                raise RuntimeError(f"flush gave {len(results)} results for {len(items)} items")
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        except BaseException:  # this task was cancelled (the loop is closing)
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


Payload = TypeVar("Payload")
Answer = TypeVar("Answer")


class Batched(Generic[Payload, Answer]):
    """A kind of database work done in batches shared with every other kind.

    ``handler(session, payloads)`` does the work for a batch's payloads of this
    kind, in the batch's one transaction, and gives one answer per payload: an
    exception object for a payload refused on its own (it must leave the
    transaction usable). All kinds share one queue per database, so under load a
    request's key check and an earlier request's insert go in the same
    transaction. If a batch fails, its items are done again in one transaction,
    each in a savepoint of its own, so that one bad item fails alone and the
    others wait for its failure once, not once each.

    A batch whose COMMIT failed may have committed all the same (the connection
    dropped after the server committed): its items are then done again by
    ``again`` (default: ``handler``), which must find work already done rather
    than do it twice.
    """

    def __init__(
        self,
        handler: Callable[[Any, Sequence[Payload]], Sequence[Answer | BaseException]],
        *,
        write: bool,
        again: Callable[[Any, Sequence[Payload]], Sequence[Answer | BaseException]] | None = None,
    ) -> None:
        self.handler = handler
        self.write = write
        self.again = again or handler

    async def submit(self, transactions: Hashable, payload: Payload) -> Answer:
        """``payload``'s answer, once its batch has committed; ``transactions`` (a
        ``broker.db.Transactions``) is the database. A refusal is raised."""
        answer: Answer = await _shared.submit(transactions, (self, payload))
        return answer


def _flush_shared(transactions: Any, items: Sequence[tuple[Batched[Any, Any], Any]]) -> list[Any]:
    write = any(kind.write for kind, _ in items)
    handled = False
    try:
        with transactions(write=write) as session:
            answers = _handle(session, items)
            handled = True
        return answers
    except Exception as e:
        if len(items) == 1 and not handled:
            return [e]  # the item failed on its own: no other waits for it
    # Again, in one transaction, each item in a savepoint: a failing item rolls back
    # alone and costs the others one wait for its failure, not one each. After a
    # failed COMMIT (``handled``), by the kinds' ``again``, which find what committed.
    try:
        with transactions(write=write) as session:
            answers = []
            for item in items:
                try:
                    with session.begin_nested():
                        answers.extend(_handle(session, [item], again=handled))
                except Exception as e:
                    answers.append(e)
            return answers
    except Exception as e:
        return [e] * len(items)


def _handle(
    session: Any, items: Sequence[tuple[Batched[Any, Any], Any]], *, again: bool = False
) -> list[Any]:
    answers: list[Any] = [None] * len(items)
    by_kind: dict[Batched[Any, Any], list[int]] = {}
    for i, (kind, _) in enumerate(items):
        by_kind.setdefault(kind, []).append(i)
    for kind, indexes in by_kind.items():
        handler = kind.again if again else kind.handler
        given = handler(session, [items[i][1] for i in indexes])
        for i, answer in zip(indexes, given, strict=True):
            answers[i] = answer
    return answers


def _linger() -> float:
    return get_settings().group_commit_linger_ms / 1000


_shared: Coalescer[tuple[Batched[Any, Any], Any], Any] = Coalescer(_flush_shared, linger=_linger)
