"""Store errors, and the one place where they become errno values.

Each backend translates its SDK's exceptions into these classes; nothing above `ufs/` ever sees a
boto3 or oss2 exception. `retryable` tells the retry loop which failures are worth another try
(throttling, 5xx, broken connections, short bodies); the rest fail at once.
"""

import errno
import logging

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A request to the store failed. `errno` is what a FUSE read reports for it."""

    errno = errno.EIO
    retryable = False


class ObjectNotFound(StoreError):
    errno = errno.ENOENT


class BucketNotFound(StoreError):
    errno = errno.ENOENT


class AccessDenied(StoreError):
    errno = errno.EACCES


class CredentialsMissing(AccessDenied):
    pass


class ObjectChanged(StoreError):
    """The object no longer has the ETag we listed: its bytes must not be mixed with the old
    ones."""

    errno = errno.EIO


class TransientError(StoreError):
    """Throttling, server errors, timeouts, dropped connections, truncated bodies: retry."""

    retryable = True


class EndpointUnreachable(TransientError):
    pass


def errno_for(exc):
    """The errno a FUSE request reports when the store failed with `exc`."""
    if isinstance(exc, StoreError):
        return exc.errno
    return errno.EIO
