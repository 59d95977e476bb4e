"""MicroBatcher: concurrent requests share calls, in order, bounded by max_batch; errors and timeouts."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cliplab.errors import UsageError
from cliplab.serve.batching import MicroBatcher, Overloaded


def _run(coro):
    return asyncio.run(coro)


async def _with_batcher(fn, body, **kw):
    with ThreadPoolExecutor(max_workers=1) as ex:
        b = MicroBatcher(fn, ex, **kw)
        b.start()
        try:
            return await body(b)
        finally:
            await b.stop()


def test_concurrent_requests_share_calls_in_order():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * x for x in items]

    async def body(b):
        return await asyncio.gather(*(b.submit(i) for i in range(20)))

    out = _run(_with_batcher(double, body, max_batch=8, max_wait_ms=1000))
    assert out == [2 * i for i in range(20)]
    assert [len(c) for c in calls] == [8, 8, 4]                 # all 20 queued before the first call
    assert [x for c in calls for x in c] == list(range(20))


def test_max_batch_one_is_one_request_per_call():
    calls = []

    async def body(b):
        out = await asyncio.gather(*(b.submit(i) for i in range(6)))
        return out, b.stats()

    out, stats = _run(_with_batcher(lambda xs: calls.append(xs) or xs, body, max_batch=1, max_wait_ms=50))
    assert out == list(range(6)) and all(len(c) == 1 for c in calls)
    assert stats["sizes"] == {"1": 6} and stats["calls"] == 6 and stats["mean_batch"] == 1.0


def test_a_lone_request_waits_at_most_the_window():
    async def body(b):
        loop = asyncio.get_running_loop()
        t = loop.time()
        await b.submit(1)
        return loop.time() - t

    # the window is 0: the request is served without waiting for others (bounded, not timed: < 10 s)
    assert _run(_with_batcher(lambda xs: xs, body, max_batch=64, max_wait_ms=0)) < 10


def test_a_failing_call_fails_its_requests_only():
    def fn(items):
        if 0 in items:
            raise RuntimeError("boom")
        return items

    async def body(b):
        first = await asyncio.gather(b.submit(0), b.submit(1), return_exceptions=True)
        second = await b.submit(2)
        return first, second

    first, second = _run(_with_batcher(fn, body, max_batch=4, max_wait_ms=1000))
    assert all(isinstance(e, RuntimeError) for e in first) and second == 2


def test_timeout_and_full_queue():
    gate = threading.Event()

    def slow(items):
        gate.wait(10)
        return items

    async def body(b):
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)                                # the first call is running
        with pytest.raises(TimeoutError):
            await b.submit(2, timeout=0.05)                     # dropped before its call
        extra = [asyncio.ensure_future(b.submit(i)) for i in (3, 4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.submit(5)                                   # max_queue = 2 waiting
        gate.set()
        return await first, await asyncio.gather(*extra), b.stats()

    first, rest, stats = _run(_with_batcher(slow, body, max_batch=4, max_wait_ms=0, max_queue=2))
    assert first == 1 and rest == [3, 4]
    assert stats["requests"] == 3                               # the timed-out request never ran


def test_not_running_and_bad_settings():
    async def body():
        with ThreadPoolExecutor(1) as ex:
            with pytest.raises(Overloaded):
                await MicroBatcher(lambda x: x, ex).submit(1)
            with pytest.raises(UsageError):
                MicroBatcher(lambda x: x, ex, max_batch=0)

    _run(body())
