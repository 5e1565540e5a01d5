"""Ranged GETs of one object version, signed with botocore's SigV4 signer but sent without
botocore's per-call machinery (and, in `s3_list`, listings the same way).

Why: `client.get_object` spends ~4 ms of CPU per call here (parameter handling, endpoint
rules, event hooks, response parsing) against ~1.7 ms for the same signed GET sent directly
(bench/get_cost.py; bench/RESULTS.md, "Cost of one store GET"). A training epoch over small
files is one GET per file, and the daemon's single Python thread shares the GIL with these
calls, so that difference is the files/s of a first epoch.

What stays botocore's: the URL of an object (endpoint resolution, addressing style and region,
taken once from a presigned URL of a probe key), the credentials (the session's chain, refreshed
as they expire), the signature (`S3SigV4Auth`) and the HTTP session of the client (its connection
pool, CA bundle, proxies and timeouts). Anything this module does not expect — a redirect, a 400
or another status outside the table below — raises `UseSdk`, and the caller repeats the request
through `client.get_object`, which knows every S3 corner (region redirects, for one).
"""

import logging
import re
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import urllib3.exceptions
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from . import etags
from .errors import (AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, StoreError,
                     TransientError)
from .s3_sign import FastSigner

log = logging.getLogger(__name__)

_PROBE_KEY = 'cachefs-url-probe'
_ERROR_CODE = re.compile(rb'<Code>([^<]{1,128})</Code>')
_ERROR_MESSAGE = re.compile(rb'<Message>([^<]{0,512})</Message>')
#: statuses whose meaning does not depend on S3's corners; any other one goes to the SDK
HANDLED = {200, 206, 403, 404, 412, 429, 500, 502, 503, 504}



class ErrorCodes(NamedTuple):
    """A store's error codes, by what `classify` makes of them."""
    not_found: frozenset[str]
    denied: frozenset[str]
    changed: frozenset[str]
    transient: frozenset[str]
    #: a 404 is a missing object whatever its code (OSS); else only with a `not_found` code
    #: (S3: a 404 of another code, NoSuchVersion say, is another error)
    not_found_status: bool = False


S3_CODES = ErrorCodes(
    not_found=frozenset({'NoSuchKey', '404', 'NotFound'}),
    denied=frozenset({'AccessDenied', '403', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                      'ExpiredToken', 'InvalidToken', 'AllAccessDisabled', 'AccountProblem',
                      'TokenRefreshRequired'}),
    changed=frozenset({'PreconditionFailed', '412'}),
    transient=frozenset({'SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout',
                         'InternalError', 'ServiceUnavailable', 'RequestTimeTooSkewed', '500',
                         '502', '503', '504'}))


_DIGITS = re.compile(r'[0-9]{1,19}')
#: bytes of an error answer's body read for its <Code> (an S3 error XML is far smaller), and
#: the seconds it may take (it comes with the answer's head, or soon after)
MAX_ERROR_BODY = 64 * 1024
ERROR_BODY_SECONDS = 1.0


def range_headers(etag, offset, length):
    """The headers of a ranged GET of one object version (an ETag that is not a valid header
    value fails the read here, before anything is sent)."""
    return {'Range': f'bytes={offset}-{offset + length - 1}', 'If-Match': etags.if_match(etag)}


def content_length(values, transfer_encodings):
    """The body length an answer announces, or None when it announces none.

    `values` are its Content-Length header values, `transfer_encodings` its Transfer-Encoding
    ones. Conflicting lengths (two headers, or "5, 7"), a length that is not digits, and a
    length together with a Transfer-Encoding are refused (RFC 9112 6.3: such framing is the
    stuff of request smuggling, and the bytes after it cannot be trusted); identical duplicates
    are accepted, as the RFC allows.
    """
    lengths = {part.strip() for value in values for part in value.split(',')}
    if not lengths:
        return None
    if transfer_encodings:
        raise TransientError('an answer with both Content-Length and Transfer-Encoding')
    if len(lengths) > 1 or not all(_DIGITS.fullmatch(part) for part in lengths):
        raise TransientError(f'an answer with an invalid Content-Length {sorted(lengths)!r}')
    return int(lengths.pop())


def header_values(headers):
    """`check_ranged_answer`'s `header_values` over a mapping of one value per header (an
    HTTP client's case-insensitive headers, or botocore's lower-cased ones)."""
    return lambda name: [headers[name]] if name in headers else []


def check_ranged_answer(status, header_values, etag, offset, length):
    """Check a success answer's status line and headers before any of its body is read; return
    its Content-Length (None: chunked).

    `header_values(name)` is the list of the values of header `name`. The answer must be for
    exactly the range asked: a store (or a cache in between) that answered another range would
    hand us the wrong bytes with the right length. A store or proxy that ignores Range answers
    200 with the whole object: refused at once, without reading it, and not retried (it would
    ignore Range again, and each try makes it send the whole object). The answer must be of the
    listed version where it says which (`etags.check_answer`).
    """
    size = content_length(header_values('content-length'), header_values('transfer-encoding'))
    if status == 200 and (offset != 0 or (size is not None and size != length)):
        raise StoreError(f'the store ignored the Range header (HTTP 200 of {size} bytes for '
                         f'bytes {offset}-{offset + length - 1})')
    if status == 206:
        expected = f'bytes {offset}-{offset + length - 1}/'
        content_range = header_values('content-range')
        if len(content_range) != 1 or not content_range[0].startswith(expected):
            raise TransientError(f'asked for {expected[6:-1]}, got Content-Range '
                                 f'{content_range!r}')
    if size is not None and size != length:
        raise TransientError(f'the store announced {size} bytes of {length}')
    for answered in header_values('etag'):
        etags.check_answer(etag, answered)
    return size


def classify(code, status, message, codes=S3_CODES):
    """The `StoreError` for an error answer of a store whose codes are `codes` (S3's, or OSS's
    in `oss_errors`): its error code, else its HTTP status (negative: oss2's own client-side
    failures)."""
    if code == 'NoSuchBucket':
        return BucketNotFound(message)
    if code in codes.not_found or (codes.not_found_status and status == 404):
        return ObjectNotFound(message)
    if code in codes.denied or status in (401, 403):
        return AccessDenied(message)
    if code in codes.changed or status == 412:
        return ObjectChanged(message)
    if code in codes.transient or status >= 500 or status == 429 or status < 0:
        return TransientError(message)
    return StoreError(message)


def error_answer(status, body, codes=S3_CODES):
    """The `StoreError` of an error answer (`classify` with the store's `codes`) from the
    <Code> and <Message> of its XML `body`."""
    code_match = _ERROR_CODE.search(body)
    message_match = _ERROR_MESSAGE.search(body)
    code = code_match.group(1).decode('ascii', 'replace') if code_match else ''
    message = message_match.group(1).decode('utf-8', 'replace') if message_match else ''
    return classify(code, status, f'{code or status} {message}'.rstrip(), codes)


class UseSdk(Exception):
    """This request needs botocore's full handling (a redirect, an unexpected answer)."""


def object_url_prefix(client, bucket):
    """The URL of the bucket's objects up to the key, as botocore would send it."""
    presigned = client.generate_presigned_url(
        'get_object', Params={'Bucket': bucket, 'Key': _PROBE_KEY}, ExpiresIn=60)
    parts = urlsplit(presigned)
    if not parts.path.endswith('/' + _PROBE_KEY):
        raise UseSdk(f'unexpected object URL shape {parts.scheme}://{parts.netloc}{parts.path}')
    path = parts.path[:-len(_PROBE_KEY)]
    return urlunsplit((parts.scheme, parts.netloc, path, '', ''))


class LeanRequests:
    """Signed GETs through the HTTP session of a boto3 S3 client (shared with `s3_list`)."""

    def __init__(self, client, bucket, credentials, http_session):
        self._prefix = object_url_prefix(client, bucket)
        self._region = client.meta.region_name or 'us-east-1'
        self._credentials = credentials      # None: unsigned requests (public buckets)
        self._http = http_session
        self._signer = None                  # botocore's signer, unless ours signs the same
        if credentials is not None:
            self._signer = FastSigner.matching(self._prefix, self._region, credentials)
            if self._signer is None:
                log.info('object GETs are signed by botocore (its signature differs from '
                         'cachefs\'s for a probe request)')

    def _url(self, key):
        # botocore percent-encodes keys with '/' and '~' left as they are; so do we.
        return self._prefix + quote(key.encode('utf-8', 'surrogateescape'), safe='/~')

    def _signed_headers(self, url, headers):
        """`headers` and SigV4's for a GET of `url` (unchanged for unsigned requests)."""
        if self._credentials is None:
            return headers
        frozen = self._credentials.get_frozen_credentials()
        parts = urlsplit(url)
        if self._signer is not None and not parts.query:
            return self._signer.sign(parts.path, headers, frozen)
        request = AWSRequest(method='GET', url=url, headers=headers)
        S3SigV4Auth(frozen, 's3', self._region).add_auth(request)
        return dict(request.headers.items())

    def _prepare(self, url, headers):
        """The signed GET, prepared (URL and headers final)."""
        return AWSRequest(method='GET', url=url,
                          headers=self._signed_headers(url, headers)).prepare()

    def _send(self, url, headers):
        """Sign and send one GET; the caller reads `response.raw` and releases it."""
        prepared = self._prepare(url, headers)
        prepared.stream_output = True
        return self._http.send(prepared)

    @staticmethod
    def _error(status, body):
        raise error_answer(status, body)


class RangedGetter(LeanRequests):
    """Signed ranged GETs of object versions."""

    def get(self, key, etag, offset, length):
        """Exactly `length` bytes of `key` from `offset`, only if its ETag is still `etag`.

        Raises `StoreError` subclasses for the store's answers and `UseSdk` for what this path
        does not handle; connection errors come up as botocore/urllib3 exceptions.
        """
        response = self._send(self._url(key), range_headers(etag, offset, length))
        body = response.raw
        reusable = False
        try:
            status = response.status_code
            if status not in HANDLED:
                raise UseSdk(f'HTTP {status}')
            values = body.headers.getlist
            if status not in (200, 206):
                return self._error(status, self._error_body(body))
            size = check_ranged_answer(status, values, etag, offset, length)
            data = body.read(length)        # never more than the block, whatever comes after
            if len(data) != length:
                raise TransientError(f'got {len(data)} bytes of {length}')
            if size is None and body.read(1):
                raise TransientError('the store sent bytes past the end of the answer')
            reusable = True
            return data
        finally:
            if not reusable:
                body.close()                # unread bytes must not reach the next request
            body.release_conn()

    @staticmethod
    def _error_body(body):
        """Up to 64 KiB of an error answer's body, each socket read waiting at most a second
        (a body trickled faster than that is ended by the attempt's request_timeout; the trio
        path bounds the whole body to a second); nothing when only the close would end it (those
        waits would be the socket timeout's, in a thread that holds a store slot). The
        connection is closed after it."""
        values = body.headers.getlist
        framed = 'chunked' in ','.join(values('transfer-encoding')).lower()
        if not framed and content_length(values('content-length'), ()) is None:
            return b''
        sock = getattr(getattr(body, 'connection', None), 'sock', None)
        if sock is not None:
            sock.settimeout(ERROR_BODY_SECONDS)
        try:
            return body.read(MAX_ERROR_BODY)
        except (OSError, urllib3.exceptions.HTTPError):
            return b''                  # the status alone classifies the error
