"""Aliyun OSS through oss2, with OSS's own signatures (not its S3-compatible API).

Object reads take the lean path on the trio thread (`oss_trio`, signed by `oss_sign`) where
cachefs signs exactly as oss2 does and no proxy is in the way; else, and for any answer that
path does not handle (for a while after it, `s3_detour`), oss2's `get_object` in a worker
thread. Listings, stat and the access check are oss2's.

Credentials come from OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET and, for STS, OSS_SESSION_TOKEN.
The endpoint is required (`--endpoint-url oss-cn-hangzhou.aliyuncs.com`, https is assumed when
no scheme is given). oss2's own retries are off: `async_store` owns the retry policy.
"""

import logging
import os
from collections.abc import Iterator
from typing import Any

import oss2
import oss2.defaults
import oss2.exceptions
import requests.exceptions

from . import etags
from .base import ObjectInfo, Store
from .errors import CredentialsMissing, EndpointUnreachable, StoreError, TransientError
from .oss_errors import OSS_CODES
from .oss_sign import OssSigner
from .oss_trio import OssTrioGetter
from .s3_detour import Detour
from .s3_get import UseSdk, check_ranged_answer, classify, header_values

log = logging.getLogger(__name__)


def translate(exc: BaseException, what: str) -> StoreError:
    """Map an oss2 exception to a `StoreError`; secrets never reach the message."""
    if isinstance(exc, oss2.exceptions.RequestError):
        cause = exc.exception
        if isinstance(cause, (requests.exceptions.ConnectionError,
                              requests.exceptions.ConnectTimeout)) and not isinstance(
                                  cause, requests.exceptions.ReadTimeout):
            return EndpointUnreachable(f'{what}: cannot connect to the endpoint')
        return TransientError(f'{what}: {type(cause).__name__}')
    if isinstance(exc, oss2.exceptions.OssError):
        message = f'{what}: {exc.code or exc.status} {exc.message or ""}'.rstrip()
        return classify(exc.code or '', exc.status, message, OSS_CODES)
    return TransientError(f'{what}: {type(exc).__name__}: {exc}')


_SDK_ERRORS = (oss2.exceptions.OssError, OSError, requests.exceptions.RequestException)


class OssStore(Store):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str,
                 request_timeout: float = 30.0, path_style: bool = False) -> None:
        key_id = os.environ.get('OSS_ACCESS_KEY_ID')
        secret = os.environ.get('OSS_ACCESS_KEY_SECRET')
        token = os.environ.get('OSS_SESSION_TOKEN')
        if not key_id or not secret:
            raise CredentialsMissing(
                'no OSS credentials found (set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, '
                'and OSS_SESSION_TOKEN for STS)')
        auth = oss2.StsAuth(key_id, secret, token) if token else oss2.Auth(key_id, secret)
        if '://' not in endpoint_url:
            endpoint_url = 'https://' + endpoint_url
        # oss2 keeps one requests session per Bucket; its pool must cover our worker threads.
        oss2.defaults.connection_pool_size = max(oss2.defaults.connection_pool_size, 64)
        self.bucket_name = bucket
        self.prefix = prefix
        self.request_timeout = request_timeout
        self.bucket = oss2.Bucket(auth, endpoint_url, bucket, connect_timeout=request_timeout,
                                  enable_crc=False, app_name='cachefs', is_path_style=path_style)
        self.source = f'oss://{bucket}/{prefix}'.rstrip('/')
        # After an answer the trio path does not handle, reads go through oss2 for a while.
        self._threaded_reads = Detour('object reads', 'the trio path', 'oss2')
        self._trio_getter: OssTrioGetter | None = None
        signer = OssSigner.matching(auth, bucket, key_id, secret, token)
        why_not = OssTrioGetter.usable_with(self.bucket)
        if signer is None:
            log.info('object reads go through oss2 (its signature differs from cachefs\'s for '
                     'a probe request)')
        elif why_not is not None:
            log.info('object reads go through oss2: %s', why_not)
        else:
            try:
                self._trio_getter = OssTrioGetter(self.bucket, signer)
            except UseSdk as exc:
                log.info('object reads go through oss2: %s', exc)

    def list_objects(self) -> Iterator[ObjectInfo]:
        start = len(self.prefix)
        try:
            for item in oss2.ObjectIteratorV2(self.bucket, prefix=self.prefix, max_keys=1000,
                                              max_retries=1):
                yield ObjectInfo(item.key[start:], item.size, item.etag.strip('"'),
                                 int(item.last_modified) * 1_000_000_000)
        except _SDK_ERRORS as exc:
            raise translate(exc, f'listing {self.source}') from None

    def _reading(self, key: str) -> str:
        return f'reading {self.bucket_name}/{self.prefix}{key}'

    def read_paths(self) -> tuple[str, ...]:
        """The ways this store can read an object, by name: 'oss2' (`read`, always) and
        'trio' (`oss_trio`, `read_async`) where the signature and endpoint allow it. For
        measuring one against the other (bench/oss_cost.py)."""
        return ('oss2', 'trio') if self._trio_getter is not None else ('oss2',)

    async def read_async(self, key: str, etag: str, offset: int,
                         length: int) -> bytearray | None:
        """`read` on the trio thread (`oss_trio`); None when this read must go through oss2
        in a worker thread instead (no trio path, or an answer it does not handle)."""
        return await self._threaded_reads.lean_read(self._trio_getter, self.prefix + key,
                                                    self._reading(key), etag, offset, length)

    def read(self, key: str, etag: str, offset: int, length: int) -> bytes:
        """`length` bytes of `key` at `offset`, of the version `etag`, through oss2."""
        what = self._reading(key)
        result: Any = None
        try:
            # 'standard' makes an unsatisfiable range an error instead of a silent whole-object
            # reply.
            headers = {'If-Match': etags.if_match(etag), 'x-oss-range-behavior': 'standard'}
            result = self.bucket.get_object(self.prefix + key,
                                            byte_range=(offset, offset + length - 1),
                                            headers=headers)
            # The lean S3 paths' checks, before any of the body is read: a whole-object 200,
            # another range or length, another version (the store ignored If-Match).
            size = check_ranged_answer(result.status, header_values(result.headers), etag,
                                       offset, length)
            pieces: list[bytes] = []
            received = 0
            while received < length:    # never more than the block, whatever comes after it
                piece = result.read(length - received)
                if not piece:
                    break
                pieces.append(piece)
                received += len(piece)
            data = pieces[0] if len(pieces) == 1 else b''.join(pieces)
            if size is None and result.read(1):
                raise TransientError('the store sent bytes past the end of the answer')
            result = None
        except StoreError as exc:
            raise type(exc)(f'{what}: {exc}') from None
        except _SDK_ERRORS as exc:
            raise translate(exc, what) from None
        finally:
            if result is not None:
                result.resp.response.close()    # unread bytes must not reach the next request
        if len(data) != length:
            raise TransientError(f'{what}: got {len(data)} bytes of {length}')
        return data

    def stat(self, key: str) -> ObjectInfo:
        try:
            head = self.bucket.head_object(self.prefix + key)
        except _SDK_ERRORS as exc:
            raise translate(exc, f'stat {self.bucket_name}/{self.prefix}{key}') from None
        return ObjectInfo(key, head.content_length, head.etag.strip('"'),
                          int(head.last_modified) * 1_000_000_000)

    def check_access(self) -> bool:
        try:
            result = self.bucket.list_objects_v2(prefix=self.prefix, max_keys=1)
        except _SDK_ERRORS as exc:
            raise translate(exc, f'listing {self.source}') from None
        return bool(result.object_list)
