"""Amazon S3 and S3-compatible stores (SeaweedFS, MinIO, Ceph) through boto3.

Credentials come from boto3's standard chain (environment, ~/.aws, instance or pod roles); the
endpoint from `--endpoint-url` or AWS_ENDPOINT_URL. botocore's own retries are off: the retry
policy lives in `async_store` so that it is the same for every store and bounded in total time.
"""

import logging
import os
import stat
from collections.abc import Iterator, Mapping
from typing import Any

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from .base import ObjectInfo, Store
from .errors import CredentialsMissing, EndpointUnreachable, StoreError, TransientError
from . import etags
from .s3_get import RangedGetter, UseSdk, check_ranged_answer, classify, header_values
from .s3_credentials import CredentialKeeper
from .s3_detour import Detour
from .s3_list import Lister
from .s3_trio import TrioGetter

log = logging.getLogger(__name__)


def translate(exc: BaseException, what: str) -> StoreError:
    """Map a boto3/botocore exception to a `StoreError`; secrets never reach the message."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get('Error', {})
        code = str(error.get('Code', ''))
        status = exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode', 0)
        message = f'{what}: {code or status} {error.get("Message", "")}'.rstrip()
        return classify(code, status, message)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return CredentialsMissing(f'{what}: no AWS credentials found')
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectTimeoutError)):
        return EndpointUnreachable(f'{what}: cannot connect to the endpoint ({type(exc).__name__})')
    # Read timeouts, dropped connections, truncated streams: botocore, urllib3 and OS errors.
    return TransientError(f'{what}: {type(exc).__name__}: {exc}')


_SDK_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError,
               urllib3.exceptions.HTTPError)


def warn_about_loose_credentials_files(environ: Mapping[str, str] = os.environ) -> None:
    """One warning per AWS file holding secrets that group or others may read: the shared
    credentials file, and the config file when it holds a secret key too."""
    files = [(environ.get('AWS_SHARED_CREDENTIALS_FILE') or '~/.aws/credentials', False),
             (environ.get('AWS_CONFIG_FILE') or '~/.aws/config', True)]
    for path, only_with_secret in files:
        path = os.path.expanduser(path)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
                continue        # /dev/null and the like, or private: nothing to say
            if only_with_secret:
                with open(path, encoding='utf-8', errors='replace') as f:
                    if 'aws_secret_access_key' not in f.read().lower():
                        continue
        except OSError:
            continue
        log.warning('AWS credentials file %s is readable by group or others (mode %04o); '
                    'chmod 600 it', path, stat.S_IMODE(st.st_mode))


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None,
                 region: str | None = None, path_style: bool = False,
                 request_timeout: float = 30.0, no_sign_request: bool = False,
                 max_connections: int = 64) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.request_timeout = request_timeout
        warn_about_loose_credentials_files()
        session = boto3.session.Session()
        if not no_sign_request and session.get_credentials() is None:
            raise CredentialsMissing(
                'no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, '
                'AWS_PROFILE or ~/.aws/credentials, or use --no-sign-request for public buckets)')
        config = Config(
            connect_timeout=request_timeout, read_timeout=request_timeout,
            # 'max_attempts' would mean retries (1 = two tries); botocore must try exactly once.
            retries={'total_max_attempts': 1, 'mode': 'standard'},
            max_pool_connections=max_connections, tcp_keepalive=True,
            s3={'addressing_style': 'path' if path_style else 'auto'},
            signature_version=UNSIGNED if no_sign_request else None,
            # Without this, newer botocore asks for checksums some S3-compatible stores lack.
            response_checksum_validation='when_required',
            request_checksum_calculation='when_required')
        self.client = session.client('s3', endpoint_url=endpoint_url, region_name=region,
                                     config=config)
        self.source = f's3://{bucket}/{prefix}'.rstrip('/')
        # The lean paths sign with credentials refreshed ahead of expiry in a thread of their
        # own (s3_credentials); the client keeps botocore's own refresh, in worker threads.
        self._credentials = None
        if not no_sign_request:
            try:
                self._credentials = CredentialKeeper(session.get_credentials())
            except _SDK_ERRORS as exc:
                raise CredentialsMissing(f'cannot get AWS credentials ({type(exc).__name__}: '
                                         f'{exc})') from None
        credentials = self._credentials
        # After an answer a lean path does not handle, the path below takes over for a while.
        self._sdk_reads = Detour('object reads', 'lean GETs', 'get_object')
        self._sdk_lists = Detour('listings', 'lean pages', 'list_objects_v2')
        self._threaded_reads = Detour('object reads', 'the trio path', 'worker threads')
        self._getter = self._lean_path(RangedGetter, credentials, 'object reads', 'get_object')
        self._lister = self._lean_path(Lister, credentials, 'listings', 'list_objects_v2')
        self._trio_getter = None
        if self._getter is not None:
            why_not = TrioGetter.usable_with(self._getter._http, self._getter._prefix)
            if why_not is None:
                self._trio_getter = self._lean_path(TrioGetter, credentials, 'object reads',
                                                    'worker threads')
            else:
                log.info('object reads go through worker threads: %s', why_not)

    def _lean_path(self, kind, credentials, what, sdk_call):
        """A lean request path (`s3_get`, `s3_list`), or None where this botocore does not
        allow it."""
        http_session = getattr(getattr(self.client, '_endpoint', None), 'http_session', None)
        if http_session is None:
            log.info('botocore has no client HTTP session to share; %s go through %s', what,
                     sdk_call)
            return None
        try:
            return kind(self.client, self.bucket, credentials, http_session)
        except (UseSdk, *_SDK_ERRORS) as exc:
            log.info('%s go through %s: %s', what, sdk_call, exc)
            return None

    def list_objects(self) -> Iterator[ObjectInfo]:
        start = len(self.prefix)
        what = f'listing {self.source}'
        token = None
        while True:
            try:
                objects, token = self._list_page(token)
            except StoreError as exc:
                raise type(exc)(f'{what}: {exc}') from None
            except _SDK_ERRORS as exc:
                raise translate(exc, what) from None
            for key, size, etag, mtime_ns in objects:
                yield ObjectInfo(key[start:], size, etag, mtime_ns)
            if token is None:
                return

    def _list_page(self, token: str | None) -> tuple[Any, str | None]:
        """(objects as (key, size, etag, mtime_ns), next page's token or None)."""
        lister = self._lister
        if lister is not None and not self._sdk_lists.active():
            try:
                page = lister.page(self.prefix, token)
                self._sdk_lists.succeeded()
                return page
            except UseSdk as exc:
                self._sdk_lists.refused(f'listing {self.source}', exc)
        arguments = {'Bucket': self.bucket, 'Prefix': self.prefix}
        if token is not None:
            arguments['ContinuationToken'] = token
        page = self.client.list_objects_v2(**arguments)
        objects = [(item['Key'], item['Size'], item['ETag'].strip('"'),
                    int(item['LastModified'].timestamp() * 1e9))
                   for item in page.get('Contents', ())]
        return objects, page.get('NextContinuationToken') if page.get('IsTruncated') else None

    def _reading(self, key: str) -> str:
        return f'reading {self.bucket}/{self.prefix}{key}'

    def read_paths(self) -> tuple[str, ...]:
        """The ways this store can read an object, by name: 'get_object' (botocore, always),
        'lean' (`s3_get`, in worker threads) and 'trio' (`s3_trio`, `read_async`) where this
        botocore and endpoint allow them. For measuring one against another (bench/get_cost.py);
        the daemon calls `read` and `read_async` without a path and lets them choose."""
        paths = ['get_object']
        if self._getter is not None:
            paths.append('lean')
        if self._trio_getter is not None:
            paths.append('trio')
        return tuple(paths)

    def read(self, key: str, etag: str, offset: int, length: int,
             path: str | None = None) -> bytes:
        """`length` bytes of `key` at `offset`, of the version `etag`. `path` ('get_object' or
        'lean', from `read_paths()`) reads the way `read` would if that path were the only one
        (a lean read still hands an answer it does not handle to get_object); None chooses."""
        what = self._reading(key)
        getter = self._getter if path is None else self._getter_for(path)
        if getter is not None and not self._sdk_reads.active():
            try:
                data = getter.get(self.prefix + key, etag, offset, length)
                self._sdk_reads.succeeded()
                return data
            except StoreError as exc:
                raise type(exc)(f'{what}: {exc}') from None
            except UseSdk as exc:
                # A redirect or an answer the lean path does not know: botocore handles it
                # (it follows region redirects and remembers them), for a while (s3_detour).
                self._sdk_reads.refused(what, exc)
            except _SDK_ERRORS as exc:
                raise translate(exc, what) from None
        body = None
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key, IfMatch=etags.if_match(etag),
                Range=f'bytes={offset}-{offset + length - 1}')
            body = response['Body']
            # The same checks as the lean paths', before any of the body is read.
            metadata = response['ResponseMetadata']
            headers = metadata.get('HTTPHeaders', {})
            size = check_ranged_answer(metadata.get('HTTPStatusCode', 0), header_values(headers),
                                       etag, offset, length)
            data = body.read(length)
            if size is None and body.read(1):
                raise TransientError('the store sent bytes past the end of the answer')
            body = None
        except StoreError as exc:
            raise type(exc)(f'{what}: {exc}') from None
        except _SDK_ERRORS as exc:
            raise translate(exc, what) from None
        finally:
            if body is not None:
                body.close()        # unread bytes must not reach the next request
        if len(data) != length:
            raise TransientError(f'{what}: got {len(data)} bytes of {length}')
        return data

    def _getter_for(self, path: str) -> RangedGetter | None:
        if path == 'get_object':
            return None
        if path == 'lean' and self._getter is not None:
            return self._getter
        raise ValueError(f'no read path {path!r} for read(); this store has {self.read_paths()}')

    async def read_async(self, key: str, etag: str, offset: int,
                         length: int) -> bytearray | None:
        """`read` on the trio thread (`s3_trio`); None when this read must go through `read` in
        a worker thread instead (no trio path, or an answer it does not handle)."""
        getter = self._trio_getter
        if getter is None or self._threaded_reads.active():
            return None
        try:
            data = await getter.get(self.prefix + key, etag, offset, length)
            self._threaded_reads.succeeded()
            return data
        except StoreError as exc:
            raise type(exc)(f'{self._reading(key)}: {exc}') from None
        except UseSdk as exc:
            self._threaded_reads.refused(self._reading(key), exc)
            return None

    def stat(self, key: str) -> ObjectInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except _SDK_ERRORS as exc:
            raise translate(exc, f'stat {self.bucket}/{self.prefix}{key}') from None
        return ObjectInfo(key, head['ContentLength'], head['ETag'].strip('"'),
                          int(head['LastModified'].timestamp() * 1e9))

    def check_access(self) -> bool:
        try:
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _SDK_ERRORS as exc:
            raise translate(exc, f'listing {self.source}') from None
        return bool(page.get('KeyCount') or page.get('Contents'))

    def close(self) -> None:
        if self._credentials is not None:
            self._credentials.close()
        self.client.close()
