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
from urllib.parse import quote, urlsplit, urlunsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from .errors import (AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, StoreError,
                     TransientError)
from .s3_sign import FastSigner

log = logging.getLogger(__name__)

_PROBE_KEY = 'cachefs-url-probe'
_ERROR_CODE = re.compile(rb'<Code>([^<]{1,128})</Code>')
_ERROR_MESSAGE = re.compile(rb'<Message>([^<]{0,512})</Message>')
#: statuses whose meaning does not depend on S3's corners; any other one goes to the SDK
HANDLED = {200, 206, 403, 404, 412, 429, 500, 502, 503, 504}

_NOT_FOUND = {'NoSuchKey', '404', 'NotFound'}
_DENIED = {'AccessDenied', '403', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'ExpiredToken',
           'InvalidToken', 'AllAccessDisabled', 'AccountProblem', 'TokenRefreshRequired'}
_CHANGED = {'PreconditionFailed', '412'}
_TRANSIENT = {'SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout', 'InternalError',
              'ServiceUnavailable', 'RequestTimeTooSkewed', '500', '502', '503', '504'}


def range_headers(etag, offset, length):
    """The headers of a ranged GET of one object version."""
    return {'Range': f'bytes={offset}-{offset + length - 1}', 'If-Match': f'"{etag}"'}


def check_ranged_answer(status, content_range, offset, length):
    """A success answer must be for exactly the range asked: a store (or a cache in between)
    that ignored the Range header, or answered another range, would otherwise hand us the wrong
    bytes with the right length."""
    if status == 200 and offset != 0:
        raise TransientError('the store ignored the Range header')
    if status == 206:
        expected = f'bytes {offset}-{offset + length - 1}/'
        if content_range is None or not content_range.startswith(expected):
            raise TransientError(f'asked for {expected[6:-1]}, got Content-Range '
                                 f'{content_range!r}')


def classify(code, status, message):
    """The `StoreError` for an S3 error answer: its error code, else its HTTP status."""
    if code == 'NoSuchBucket':
        return BucketNotFound(message)
    if code in _NOT_FOUND:
        return ObjectNotFound(message)
    if code in _DENIED or status in (401, 403):
        return AccessDenied(message)
    if code in _CHANGED or status == 412:
        return ObjectChanged(message)
    if code in _TRANSIENT or status >= 500 or status == 429:
        return TransientError(message)
    return StoreError(message)


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
        code = _ERROR_CODE.search(body)
        message = _ERROR_MESSAGE.search(body)
        code = code.group(1).decode('ascii', 'replace') if code else ''
        message = message.group(1).decode('utf-8', 'replace') if message else ''
        raise classify(code, status, f'{code or status} {message}'.rstrip())


class RangedGetter(LeanRequests):
    """Signed ranged GETs of object versions."""

    def get(self, key, etag, offset, length):
        """Exactly `length` bytes of `key` from `offset`, only if its ETag is still `etag`.

        Raises `StoreError` subclasses for the store's answers and `UseSdk` for what this path
        does not handle; connection errors come up as botocore/urllib3 exceptions.
        """
        response = self._send(self._url(key), range_headers(etag, offset, length))
        body = response.raw
        try:
            status = response.status_code
            if status not in HANDLED:
                raise UseSdk(f'HTTP {status}')
            if status in (200, 206):
                data = body.read()
                if len(data) != length:
                    raise TransientError(f'got {len(data)} bytes of {length}')
                check_ranged_answer(status, response.headers.get('Content-Range'), offset,
                                    length)
                return data
            return self._error(status, body.read(65536))
        finally:
            body.release_conn()
