"""The trio face of a blocking `Store`: worker threads, a concurrency bound, retries, counters.

Every SDK call runs in a worker thread under one `CapacityLimiter`, never on the trio thread
(pyfuse3 runs all FUSE requests on that one thread: a blocking call there stalls the mount).
A store may also offer `read_async`, a read native to trio (S3's, `s3_trio`): it runs on the
trio thread under the same limiter, retries and deadline, and returns None for a read it hands
back to the threaded `read`.
Retries use exponential backoff with full jitter and stop once `retry_timeout` would be exceeded.

Each attempt of a read or stat is also bounded as a whole by the store's `request_timeout`. The
SDKs' own timeouts bound each socket operation, not the request: a store (or a middlebox) that
trickles a few bytes every second never trips them, and the FUSE read would wait for as long as
it trickles. An attempt past its deadline is abandoned (its worker thread finishes in the
background, keeping its place under the concurrency bound until then) and counts as a transient
failure, so a read ends, with its bytes or EIO, within about retry_timeout + request_timeout.
"""

import logging
import random
import time

import trio

from .errors import StoreError, TransientError

log = logging.getLogger(__name__)

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 5.0


class RetryBudget:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    __slots__ = ('_deadline', '_backoff')

    def __init__(self, retry_timeout):
        self._deadline = time.monotonic() + retry_timeout
        self._backoff = _FIRST_BACKOFF

    def delay_after(self, exc):
        """Seconds to wait before retrying after `exc`, or None when it must be raised."""
        delay = random.uniform(0, self._backoff)
        if not exc.retryable or time.monotonic() + delay >= self._deadline:
            return None
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
        return delay


class StoreCounters:
    __slots__ = ('requests', 'bytes', 'retries', 'errors', 'in_flight')

    def __init__(self):
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        self.errors = 0
        self.in_flight = 0


class AsyncStore:
    def __init__(self, store, max_concurrency=32, retry_timeout=60.0):
        self.store = store
        self.source = store.source
        self.retry_timeout = retry_timeout
        self.counters = StoreCounters()
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self.request_timeout = getattr(store, 'request_timeout', None)   # None: no bound

    async def read(self, key, etag, offset, length):
        data = None
        native = getattr(self.store, 'read_async', None)
        if native is not None:
            data = await self._call(native, key, etag, offset, length, native=True)
        if data is None:
            data = await self._call(self.store.read, key, etag, offset, length)
        self.counters.bytes += len(data)
        return data

    async def stat(self, key):
        return await self._call(self.store.stat, key)

    async def list_objects(self):
        # One thread call for the whole listing: pagination is sequential anyway. A listing of
        # many pages may rightly take longer than one request, so it has no overall deadline.
        return await self._call(lambda: list(self.store.list_objects()), bounded=False)

    async def _call(self, fn, *args, bounded=True, native=False):
        """`fn(*args)` with retries; `in_flight` counts the calls under way, backoffs included."""
        self.counters.in_flight += 1
        try:
            return await self._attempts(fn, args, bounded, native)
        finally:
            self.counters.in_flight -= 1

    async def _attempts(self, fn, args, bounded, native):
        budget = RetryBudget(self.retry_timeout)
        timeout = self.request_timeout if bounded else None
        while True:
            self.counters.requests += 1
            try:
                if native:
                    # The deadline starts once the request has its slot: waiting behind other
                    # requests (stalled ones hold theirs up to their own deadline) is not the
                    # store being slow, and must not use up this request's time.
                    async with self._limiter:
                        with trio.move_on_after(timeout if timeout is not None else
                                                float('inf')):
                            data = await fn(*args)
                            if data is None:        # handed back: not a request of its own
                                self.counters.requests -= 1
                            return data
                elif timeout is None:
                    return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
                else:
                    with trio.move_on_after(timeout):
                        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                             abandon_on_cancel=True)
                raise TransientError(f'{getattr(fn, "__name__", "request")} {args[0]!r}: no '
                                     f'complete answer within the request timeout ({timeout:g}s)')
            except StoreError as exc:
                self.counters.errors += 1
                delay = budget.delay_after(exc)
                if delay is None:
                    raise
                self.counters.retries += 1
                log.info('retrying %s after %s (in %.2fs)', getattr(fn, '__name__', 'request'), exc, delay)
                await trio.sleep(delay)


def call_with_retries(fn, *args, retry_timeout=60.0):
    """The same retry policy for blocking callers outside trio (the mount's initial listing)."""
    budget = RetryBudget(retry_timeout)
    while True:
        try:
            return fn(*args)
        except StoreError as exc:
            delay = budget.delay_after(exc)
            if delay is None:
                raise
            log.info('retrying after %s (in %.2fs)', exc, delay)
            time.sleep(delay)
