"""Temporary fallbacks from a lean S3 request path to the one below it.

When a lean path (`s3_trio` on the trio thread, `s3_get`'s GETs in worker threads, `s3_list`'s
pages) meets an answer it does not handle (`UseSdk`: a redirect, a status outside its table, a
success body without a length), the request is repeated through the path below it (worker
threads, then botocore's `get_object` / `list_objects_v2`) and the next requests take that path
too, but only for a while: one odd answer from a proxy, or a store's redirects during a
failover, must not cost the lean path's speed (bench/RESULTS.md: half the CPU per GET) for the
life of the mount.

A `Detour` sends the next 16 requests the long way, then lets one try the lean path again. Each
time that try is refused too, the detour doubles, up to 4,096 requests: a store that always needs
the SDK (a bucket that keeps redirecting) costs one refused request in 4,096. A success on the
lean path ends the doubling. Counts are updated from worker threads without a lock: a request
more or less on a detour does not matter.
"""

import logging

from .errors import StoreError
from .s3_get import UseSdk

log = logging.getLogger(__name__)

FIRST_LENGTH = 16
MAX_LENGTH = 4096


class Detour:
    __slots__ = ('what', 'lean', 'instead', 'taken', '_left', '_length', '_trying')

    def __init__(self, what, lean, instead):
        self.what = what            # 'object reads'
        self.lean = lean            # 'the trio path'
        self.instead = instead      # 'worker threads'
        self.taken = 0              # detours started (for tests and logs)
        self._left = 0              # requests still to send the long way
        self._length = 0            # the current detour's length (0: none since a success)
        self._trying = False        # the lean path is being tried again after a detour

    def active(self):
        """True when this request must take the long way (and counts it)."""
        if self._left <= 0:
            return False
        self._left -= 1
        if self._left == 0:
            self._trying = True
        return True

    def refused(self, where, why):
        """The lean path could not handle a request (`why`): start or lengthen a detour."""
        self._length = min(self._length * 2, MAX_LENGTH) if self._length else FIRST_LENGTH
        self._left = self._length
        self._trying = False
        self.taken += 1
        log.info('%s: %s; %s go through %s for the next %d', where, why, self.what,
                 self.instead, self._length)

    def succeeded(self):
        """The lean path answered: a later refusal starts a short detour again."""
        if self._trying:
            self._trying = False
            log.info('%s go through %s again', self.what, self.lean)
        self._length = 0

    async def lean_read(self, getter, path, what, etag, offset, length):
        """`getter.get(path, ...)` on the lean path (S3's and OSS's `read_async`), or None
        when this read must take the long way: no lean getter, a detour under way, or an answer
        the lean path does not handle (which starts one). Store errors name `what`."""
        if getter is None or self.active():
            return None
        try:
            data = await getter.get(path, etag, offset, length)
        except StoreError as exc:
            raise type(exc)(f'{what}: {exc}') from None
        except UseSdk as exc:
            self.refused(what, exc)
            return None
        self.succeeded()
        return data
