"""OSS's error codes, by what they mean (`s3_get.classify` reads them): one table for both OSS
read paths (oss2's exceptions in `oss.translate`, the lean path's error XML in `oss_trio`)."""

import logging

from .s3_get import ErrorCodes

log = logging.getLogger(__name__)

OSS_CODES = ErrorCodes(
    not_found=frozenset({'NoSuchKey'}),
    denied=frozenset({'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                      'SecurityTokenExpired', 'InvalidSecurityToken', 'UserDisable'}),
    changed=frozenset({'PreconditionFailed'}),
    transient=frozenset({'RequestTimeTooSkewed', 'RequestTimeout', 'InternalError',
                         'ServiceUnavailable', 'Throttling', 'QpsLimitExceeded',
                         'TooManyRequests'}),
    not_found_status=True)
