"""The trio face of a blocking `Store`: worker threads, a concurrency bound, retries, counters.

Every SDK call runs in a worker thread, never on the trio thread (pyfuse3 runs all FUSE requests
on that one thread: a blocking call there stalls the mount). A store may also offer `read_async`,
a read native to trio (S3's, `s3_trio`): it runs on the trio thread under the same slots,
retries and deadline, and returns None for a read it hands back to the threaded `read`.
Retries use exponential backoff with full jitter and stop once `retry_timeout` would be exceeded.

Deadlines. A call (a read with all its retries) ends, with its answer or a `StoreError`, within
about retry_timeout + request_timeout:
- each attempt is bounded as a whole by the store's `request_timeout`. The SDKs' own timeouts
  bound each socket operation, not the request: a store (or a middlebox) that trickles a few
  bytes every second never trips them, and the FUSE read would wait for as long as it trickles.
  An attempt past its deadline counts as a transient failure;
- the wait for a store slot is part of the call's retry budget: a call that gets no slot before
  its retry time is spent fails (queueing behind stalled requests must not make a read wait for
  the sum of their deadlines). The attempt's own request_timeout starts once it has its slot.

Slots and threads. `max_concurrency` slots bound the attempts under way (native and threaded).
A threaded attempt past its deadline is abandoned: its worker thread cannot be stopped and
finishes in the background, but its slot is released at once, so a stalled store does not take
the mount's slots away for as long as its sockets stay open. What bounds the threads is a second
limiter: at most 2 x max_concurrency worker threads run (attempts under way plus abandoned ones);
when abandoned threads fill it, new threaded attempts wait for one of them to end, inside their
request_timeout. The SDK's socket timeouts (request_timeout per operation) end most abandoned
threads soon; a store that trickles bytes keeps them for as long as it trickles.

Shutdown. `shut_down` (unmount, SIGTERM) cancels every call under way, and fails every later one,
with a `StoreError`: FUSE reads waiting on the store answer EIO at once, so the daemon can exit
instead of waiting out their retries.
"""

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .base import ObjectInfo, Store
from .errors import StoreError, TransientError

log = logging.getLogger(__name__)

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 5.0

T = TypeVar('T')


class RetryBudget:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    __slots__ = ('deadline', '_backoff')

    def __init__(self, retry_timeout: float) -> None:
        self.deadline = time.monotonic() + retry_timeout
        self._backoff = _FIRST_BACKOFF

    def delay_after(self, exc: StoreError) -> float | None:
        """Seconds to wait before retrying after `exc`, or None when it must be raised."""
        delay = random.uniform(0, self._backoff)
        if not exc.retryable or time.monotonic() + delay >= self.deadline:
            return None
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
        return delay


class StoreCounters:
    __slots__ = ('requests', 'bytes', 'retries', 'errors', 'in_flight')

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        self.errors = 0
        self.in_flight = 0


def _what(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """A call, for messages: its name and its key (quoted: a key may hold any character)."""
    name = getattr(fn, '__name__', 'request')
    return f'{name} {args[0]!r}' if args else name


class ShuttingDown(StoreError):
    """The mount is going away: store calls under way and later ones fail (EIO)."""


class AsyncStore:
    def __init__(self, store: Store, max_concurrency: int = 32,
                 retry_timeout: float = 60.0) -> None:
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            # zero slots would make every uncached read wait forever
            raise ValueError(f'the store concurrency must be at least 1, not {max_concurrency!r}')
        self.store = store
        self.source = store.source
        self.retry_timeout = retry_timeout
        self.counters = StoreCounters()
        self._slots = trio.CapacityLimiter(max_concurrency)
        # worker threads alive: those of attempts under way and abandoned ones still running
        self._threads = trio.CapacityLimiter(2 * max_concurrency)
        # None: no bound
        self.request_timeout: float | None = getattr(store, 'request_timeout', None)
        self._calls: set[trio.CancelScope] = set()     # cancel scopes of the calls under way
        self._closing = False

    def shut_down(self) -> None:
        """Fail every store call under way, and every later one, with `ShuttingDown`."""
        self._closing = True
        for scope in list(self._calls):
            scope.cancel()

    async def read(self, key: str, etag: str, offset: int, length: int) -> bytes | bytearray:
        """`length` bytes of `key` at `offset` of version `etag` (`Store.read`); the trio path
        answers with a bytearray it filled in place."""
        data = None
        native = getattr(self.store, 'read_async', None)
        if native is not None:
            data = await self._call(native, key, etag, offset, length, native=True)
        if data is None:
            data = await self._call(self.store.read, key, etag, offset, length)
        self.counters.bytes += len(data)
        return data

    async def stat(self, key: str) -> ObjectInfo:
        return await self._call(self.store.stat, key)

    async def list_objects(self) -> list[ObjectInfo]:
        # One thread call for the whole listing: pagination is sequential anyway. A listing of
        # many pages may rightly take longer than one request, so it has no overall deadline.
        def listing() -> list[ObjectInfo]:
            return list(self.store.list_objects())
        return await self._call(listing, bounded=False)

    async def _call(self, fn: Callable[..., Any], *args: Any, bounded: bool = True,
                    native: bool = False) -> Any:
        """`fn(*args)` with retries; `in_flight` counts the calls under way, backoffs included."""
        if self._closing:
            raise ShuttingDown(f'{_what(fn, args)}: the mount is shutting down')
        self.counters.in_flight += 1
        scope = trio.CancelScope()
        self._calls.add(scope)
        try:
            with scope:
                return await self._attempts(fn, args, bounded, native)
            # only reached when `shut_down` cancelled this call
            raise ShuttingDown(f'{_what(fn, args)}: the mount is shutting down')
        finally:
            self._calls.discard(scope)
            self.counters.in_flight -= 1

    async def _attempts(self, fn: Callable[..., Any], args: tuple[Any, ...], bounded: bool,
                        native: bool) -> Any:
        budget = RetryBudget(self.retry_timeout)
        timeout = self.request_timeout if bounded and self.request_timeout else math.inf
        while True:
            try:
                with trio.move_on_after(max(budget.deadline - time.monotonic(), 0)) as waiting:
                    await self._slots.acquire()
                if waiting.cancelled_caught:
                    raise TransientError(f'{_what(fn, args)}: no store slot came free within '
                                         f'the retry timeout ({self.retry_timeout:g}s)')
                self.counters.requests += 1
                try:
                    with trio.move_on_after(timeout):
                        if not native:
                            return await trio.to_thread.run_sync(
                                fn, *args, limiter=self._threads, abandon_on_cancel=True)
                        data = await fn(*args)
                        if data is None:        # handed back: not a request of its own
                            self.counters.requests -= 1
                        return data
                finally:
                    self._slots.release()
                raise TransientError(f'{_what(fn, args)}: no complete answer within the request '
                                     f'timeout ({timeout:g}s)')
            except StoreError as exc:
                self.counters.errors += 1
                delay = budget.delay_after(exc)
                if delay is None:
                    raise
                self.counters.retries += 1
                log.info('retrying %s after %s (in %.2fs)', _what(fn, args), exc, delay)
                await trio.sleep(delay)


def call_with_retries(fn: Callable[..., T], *args: Any, retry_timeout: float = 60.0) -> T:
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
