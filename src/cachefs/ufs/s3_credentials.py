"""AWS credentials for the lean S3 paths, refreshed ahead of expiry in a thread of their own.

Why: temporary credentials (instance roles, IRSA, STS, container roles) expire, and botocore
refreshes them inside `get_frozen_credentials()`: network I/O and a lock, on whatever thread
asks. The trio read path (`s3_trio`) signs on the trio thread, which serves every FUSE request:
a refresh there stalled the whole mount for as long as the credentials endpoint took, and a
failed refresh failed the read at once (EIO, no retry). With credentials that last less than
botocore's refresh windows (15 min advisory, 10 min mandatory) every signature refreshed.

`CredentialKeeper` hands out the latest frozen set without blocking and without I/O. A daemon
thread refreshes it ahead of expiry: when the time left falls under min(15 min, half the
lifetime the set had when fetched), so that a one-hour role is refreshed 15 minutes early, as
botocore would, and credentials lasting seconds (tests) halfway. A failed refresh is transient:
the set in hand is used while it is still valid, and the thread tries again after 0.25 s,
doubling up to 30 s but never sleeping past the point where the set stops being usable. A set
within `slack` of its expiry (min(60 s, a tenth of its lifetime): a request signed then could
reach the store expired) is not handed out: signing raises `TransientError`, which the read's
retry loop waits out, and which fails the read (EIO) only when no refresh succeeds within the
read's retry time.

The botocore client (listings and reads through the SDK, HEADs) keeps botocore's own refresh:
it runs in worker threads, where waiting on the credentials endpoint stalls only that request.
Static credentials (keys in the environment or a file) never expire: no thread.
"""

import logging
import threading
import time
from typing import Any

from botocore.credentials import RefreshableCredentials

from .errors import TransientError

log = logging.getLogger(__name__)

MAX_MARGIN = 15 * 60.0      # refresh this long before expiry at the latest (botocore's advisory)
MAX_SLACK = 60.0            # a set this close to its expiry is not used for new signatures
FIRST_RETRY = 0.25
MAX_RETRY = 30.0


def _expiry_of(credentials: Any) -> float | None:
    """Seconds since the epoch when `credentials` expire, or None (no expiry known)."""
    expiry = getattr(credentials, '_expiry_time', None)
    return expiry.timestamp() if expiry is not None else None


class CredentialKeeper:
    """The latest frozen credentials, refreshed off the caller's thread; see the module doc."""

    def __init__(self, credentials: Any) -> None:
        self._source = credentials
        self._refreshable = isinstance(credentials, RefreshableCredentials)
        # (frozen, expiry, refresh at, usable until): the last three are None for a set that
        # never expires
        self._current: tuple[Any, float | None, float | None, float | None]
        self._closed = threading.Event()
        self.refreshes = 0
        self.failed_refreshes = 0
        self._take(credentials.get_frozen_credentials())     # at start: may block, may raise
        self._thread: threading.Thread | None = None
        if self._refreshable and self._current[1] is not None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name='cachefs-credentials')
            self._thread.start()

    def _take(self, frozen: Any) -> None:
        expiry = _expiry_of(self._source) if self._refreshable else None
        if expiry is None:
            self._current = (frozen, None, None, None)
            return
        lifetime = max(expiry - time.time(), 0.0)
        self._current = (frozen, expiry, expiry - min(MAX_MARGIN, lifetime / 2),
                         expiry - min(MAX_SLACK, lifetime / 10))

    def get_frozen_credentials(self) -> Any:
        """The set to sign with now; never blocks. Raises `TransientError` when the set in hand
        is (about to be) expired and no refresh has succeeded yet."""
        frozen, expiry, _, usable_until = self._current
        if expiry is not None and usable_until is not None and time.time() >= usable_until:
            raise TransientError('the AWS credentials expire at %s and their refresh has not '
                                 'succeeded yet' % time.strftime('%H:%M:%S',
                                                                 time.localtime(expiry)))
        return frozen

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        delay = FIRST_RETRY
        while True:
            _, expiry, refresh_at, usable_until = self._current
            if refresh_at is None or usable_until is None:
                # a refresh handed out a set that never expires: nothing left to refresh (the
                # next line would raise TypeError and end this thread with a traceback)
                log.debug('the AWS credentials no longer expire; refresh thread ends')
                return
            if self._closed.wait(max(refresh_at - time.time(), 0.0)):
                return
            started = time.monotonic()
            left = usable_until - time.time()
            try:
                # botocore refreshes here (the time left is inside its refresh windows)
                frozen = self._source.get_frozen_credentials()
            except Exception as exc:        # noqa: BLE001 - any failure is worth a retry
                self.failed_refreshes += 1
                log.warning('refreshing the AWS credentials failed (%s: %s); %s, retrying in '
                            '%.2fs', type(exc).__name__, exc,
                            'the current ones stay in use for %.0fs' % left if left > 0
                            else 'signed reads wait for new ones', delay)
            else:
                if _expiry_of(self._source) != expiry:
                    self._take(frozen)
                    self.refreshes += 1
                    delay = FIRST_RETRY
                    new_expiry = self._current[1]
                    log.debug('refreshed the AWS credentials in %.2fs; they expire in %s',
                              time.monotonic() - started, 'never' if new_expiry is None
                              else '%.0fs' % (new_expiry - time.time()))
                    continue
                # not rotated yet (instance metadata hands out a new set only minutes before
                # the old one expires), or another thread's refresh held botocore's lock
                log.debug('the AWS credentials were not renewed yet; retrying in %.2fs', delay)
            if self._closed.wait(delay if left <= 0 else min(delay, max(left / 2, 0.05))):
                return
            delay = min(delay * 2, MAX_RETRY)
