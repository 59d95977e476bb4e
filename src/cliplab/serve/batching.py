"""Dynamic micro-batching: concurrent requests share one model call.

A :class:`MicroBatcher` holds a queue of pending requests.  Its collector task takes the
oldest one, then keeps collecting until it has ``max_batch`` requests or ``max_wait_ms``
have passed since the oldest arrived, and hands the whole batch to ``fn`` in the model's
worker thread.  While the model runs, new requests wait in the queue, so under load the next
batch fills up at once: the batch size follows the load, and a lone request waits at
most ``max_wait_ms``.  All batchers of a service share one single-thread executor, so
the model is called from one thread only.

This is the scheme of TorchServe's and Triton's dynamic batchers (a maximum batch size
and a maximum queue delay); ``max_batch=1`` gives one request per model call.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

from ..validation import check_positive_int

logger = logging.getLogger("cliplab.serve")

__all__ = ["MicroBatcher", "Overloaded"]


class Overloaded(RuntimeError):
    """The batcher's queue is full: the service answers 503 and the client retries later."""


class MicroBatcher:
    """Collect concurrent requests into batches for one call of ``fn``.

    Parameters
    ----------
    fn : callable
        ``fn(items) -> results``: a list of B request items in, a sequence of B results
        out, in the same order.  Runs in ``executor``.  An exception fails every
        request of that batch.
    executor : concurrent.futures.Executor
        Where ``fn`` runs (the service's single model thread).
    max_batch : int, default 32
        Most requests per call; 1 turns batching off.
    max_wait_ms : float, default 5.0
        Longest time the oldest request of a batch waits for others (counted from its
        arrival: a request that queued while the model was busy does not wait again).
    max_queue : int, default 1024
        Most requests waiting; one more raises :class:`Overloaded`.
    name : str
        Name in the log and in :meth:`stats`.

    Attributes
    ----------
    sizes : collections.Counter
        Number of ``fn`` calls per batch size (requests in the call).
    """

    def __init__(self, fn: Callable[[list], Sequence[Any]], executor: Executor, *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, name: str = "batch"):
        self.fn = fn
        self.executor = executor
        self.max_batch = check_positive_int("max_batch", max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = check_positive_int("max_queue", max_queue)
        self.name = name
        self.sizes: collections.Counter = collections.Counter()
        self._pending: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop collecting; requests still waiting fail with :class:`Overloaded`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            _, fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(Overloaded("the service is shutting down"))

    async def submit(self, item, *, timeout: float | None = None):
        """Queue ``item`` and wait for its result.

        Raises
        ------
        Overloaded
            The queue is full, or the batcher is not running.
        TimeoutError
            No result within ``timeout`` seconds (the request is dropped from its batch
            if the batch has not started).
        """
        if not self.running:
            raise Overloaded(f"the {self.name} batcher is not running")
        if len(self._pending) >= self.max_queue:  # requests that timed out do not count
            self._pending = collections.deque(p for p in self._pending if not p[1].done())
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} {self.name} requests are waiting; retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut, loop.time()))
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:  # not yet the built-in TimeoutError on Python 3.10
            raise TimeoutError(f"no result within {timeout} s") from None

    def stats(self) -> dict:
        """Calls, requests and the number of calls per batch size."""
        calls = sum(self.sizes.values())
        requests = sum(b * n for b, n in self.sizes.items())
        return {"calls": calls, "requests": requests, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0, "queued": len(self._pending),
                "mean_batch": requests / calls if calls else 0.0,
                "sizes": {str(b): n for b, n in sorted(self.sizes.items())}}

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._pending[0][2] + self.max_wait
            while len(self._pending) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._pending and len(batch) < self.max_batch:
                item, fut, _ = self._pending.popleft()
                if not fut.done():  # a request that timed out or whose client left is dropped
                    batch.append((item, fut))
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop, batch: list) -> None:
        self.sizes[len(batch)] += 1
        try:
            results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
        except Exception as exc:  # the batch's failure goes to each of its requests
            logger.exception("%s batch of %d failed", self.name, len(batch))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)
