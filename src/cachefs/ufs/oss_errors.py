"""What an OSS error answer means, as a `StoreError`: one table for both OSS read paths (oss2's
exceptions in `oss.translate`, the lean path's error XML in `oss_trio`)."""

import logging

from .errors import (AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, StoreError,
                     TransientError)

log = logging.getLogger(__name__)

_DENIED = {'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'SecurityTokenExpired',
           'InvalidSecurityToken', 'UserDisable'}
_TRANSIENT = {'RequestTimeTooSkewed', 'RequestTimeout', 'InternalError', 'ServiceUnavailable',
              'Throttling', 'QpsLimitExceeded', 'TooManyRequests'}


def classify(code: str, status: int, message: str) -> StoreError:
    """The `StoreError` for an OSS error answer: its <Code>, else its HTTP status (negative:
    oss2's own client-side failures)."""
    if code == 'NoSuchBucket':
        return BucketNotFound(message)
    if code == 'NoSuchKey' or status == 404:
        return ObjectNotFound(message)
    if code in _DENIED or status in (401, 403):
        return AccessDenied(message)
    if code == 'PreconditionFailed' or status == 412:
        return ObjectChanged(message)
    if code in _TRANSIENT or status >= 500 or status == 429 or status < 0:
        return TransientError(message)
    return StoreError(message)
