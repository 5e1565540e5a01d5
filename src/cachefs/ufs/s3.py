"""Amazon S3 and S3-compatible stores (SeaweedFS, MinIO, Ceph) through boto3.

Credentials come from boto3's standard chain (environment, ~/.aws, instance or pod roles); the
endpoint from `--endpoint-url` or AWS_ENDPOINT_URL. botocore's own retries are off: the retry
policy lives in `async_store` so that it is the same for every store and bounded in total time.

Listing. cachefs lists the whole prefix before the mount answers, and keeps that listing (saved
for remounts): after it, the read path sends no metadata request. One stream of ListObjectsV2
pages costs a round trip per 1,000 keys, minutes for ImageNet's 1.28 million keys on a real
store, so `list_objects` fans out instead: the first level is listed with Delimiter='/' (the keys
directly under the prefix, and its folders, e.g. ImageNet's class folders), then every folder is
listed without delimiter, one page after the other inside it, with at most `list_fan_out` (16, and
no more than the store concurrency) list requests in flight, in a pool of threads of its own (the
listing already runs in a worker thread). The result is the same objects in the same order as a
sequential listing (S3's key order): a folder's keys are contiguous in that order. Each page is
retried on transient errors (`list_retry_timeout`); the first page that still fails stops the
other folders at their next page and fails the listing with that error, as the sequential listing
would. Listing each folder only when a lookup first reaches it would let the mount answer at once,
but then the read path would wait on metadata requests, and there would be no complete listing to
save; and a job that indexes its dataset first (ImageFolder, `find`) waits for every folder
anyway (bench metadata-objects at 1.28M keys: rclone, which lists lazily, answers its first `ls`
at once but takes 75 s for `find`; cachefs mounts in 32 s, then `find` takes 11 s). With the
fan-out the mount answers once the listing is complete: 1.28M keys in 26.7 s instead of 34.5 s
on loopback SeaweedFS (bound by the parsing CPU, ~13 us a key), 22.7 s instead of 58 s with
20 ms added per request; the gain grows with the store's latency per page.
Limits: a prefix with a single folder (or none) gains nothing (it is listed sequentially inside
the folder); each folder costs at least one request, so a prefix of very many tiny folders costs
more requests than a sequential listing would (splitting the key range with StartAfter would fix
that). `list_fan_out = 1` lists as before, one page after the other without delimiter.
"""

import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from .async_store import RetryBudget
from .base import ObjectInfo, Store
from .errors import CredentialsMissing, EndpointUnreachable, StoreError, TransientError
from . import etags
from .s3_get import RangedGetter, UseSdk, check_ranged_answer, classify, header_values
from .s3_credentials import CredentialKeeper
from .s3_detour import Detour
from .s3_list import Lister
from .s3_trio import TrioGetter

log = logging.getLogger(__name__)

LIST_FAN_OUT = 16               # list requests in flight during a listing, at most
LIST_RETRY_TIMEOUT = 10.0       # seconds one listing page is retried for, at most


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


_MAX_SIZE = 1 << 63


def _sizes_checked(page: tuple[Any, list[str], str | None]) -> tuple[Any, list[str], str | None]:
    """`page`, unless it lists a size that no object can have: negative, or beyond int64 (the
    tree takes a negative size for a folder, the saved listing packs sizes as int64). A store
    that answers one is broken or hostile: the listing fails (a refresh keeps the tree it has)."""
    for key, size, _, _ in page[0]:
        if not 0 <= size < _MAX_SIZE:
            raise StoreError(f'the store listed {key!r} with size {size}')
    return page


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None,
                 region: str | None = None, path_style: bool = False,
                 request_timeout: float = 30.0, no_sign_request: bool = False,
                 max_connections: int = 64) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.request_timeout = request_timeout
        # list requests in flight at most (1: one page after the other, as before)
        self.list_fan_out = max(1, min(LIST_FAN_OUT, max_connections))
        self.list_retry_timeout = LIST_RETRY_TIMEOUT
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
        """Every object under the prefix, in the store's key order; with `list_fan_out` above 1
        the folders are listed in parallel (the module docstring says how)."""
        start = len(self.prefix)
        if self.list_fan_out > 1:
            keys = self._list_in_parallel(self.list_fan_out)
        else:
            keys = self._list_folder(self.prefix, threading.Event())
        for key, size, etag, mtime_ns in keys:
            yield ObjectInfo(key[start:], size, etag, mtime_ns)

    def _list_in_parallel(self, fan_out: int) -> list[Any]:
        # The first level by delimiter: the keys directly under the prefix, and its folders.
        contents: list[Any] = []
        folders: list[str] = []
        token = None
        while True:
            objects, prefixes, token = self._page(self.prefix, token, '/')
            contents += objects
            folders += prefixes
            if token is None:
                break
        if not folders:
            return contents
        # The folders come from the store's answer: each is listed on its own, and its keys are
        # spliced in by its name, so one outside the prefix, the prefix itself or a folder named
        # twice would list keys of another prefix, or the same keys twice.
        for folder in folders:
            if not (folder.startswith(self.prefix) and folder.endswith('/')
                    and len(folder) > len(self.prefix)):
                raise StoreError(f'listing {self.source}: the store named {folder!r} as a '
                                 'folder of the prefix')
        if len(set(folders)) != len(folders):
            raise StoreError(f'listing {self.source}: the store named a folder twice')
        stop = threading.Event()
        listings: dict[str, list[Any]] = {}
        pool = ThreadPoolExecutor(min(fan_out, len(folders)), thread_name_prefix='cachefs-list')
        try:
            futures = {pool.submit(self._list_folder, folder, stop): folder for folder in folders}
            for future in as_completed(futures):
                listings[futures[future]] = future.result()
        except BaseException:
            stop.set()          # the other folders stop at their next page
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        # A folder's keys are contiguous in key order and sort where its prefix does among the
        # keys directly under the prefix (those hold no '/': none starts with a folder's name
        # and its '/'), so sorting the blocks by their first string sorts the keys.
        blocks: list[tuple[str, Sequence[Any]]] = [(item[0], (item,)) for item in contents]
        blocks += [(folder, listings[folder]) for folder in folders]
        blocks.sort(key=lambda block: block[0])
        return [item for _, block in blocks for item in block]

    def _list_folder(self, prefix: str, stop: threading.Event) -> list[Any]:
        """Every key under `prefix`, one page after the other."""
        keys: list[Any] = []
        token = None
        while not stop.is_set():
            objects, _, token = self._page(prefix, token, None)
            keys += objects
            if token is None:
                return keys
        raise TransientError(f'listing {self.source}: stopped')    # another folder failed

    def _page(self, prefix: str, token: str | None,
              delimiter: str | None) -> tuple[Any, list[str], str | None]:
        """One page, retried on transient errors for up to `list_retry_timeout` seconds."""
        what = f'listing {self.source}'
        budget = RetryBudget(self.list_retry_timeout)
        while True:
            try:
                try:
                    return _sizes_checked(self._list_page(prefix, token, delimiter))
                except StoreError as exc:
                    raise type(exc)(f'{what}: {exc}') from None
                except _SDK_ERRORS as exc:
                    raise translate(exc, what) from None
            except StoreError as exc:
                delay = budget.delay_after(exc)
                if delay is None:
                    raise
                log.info('retrying a page of %s after %s (in %.2fs)', what, exc, delay)
                time.sleep(delay)

    def _list_page(self, prefix: str, token: str | None,
                   delimiter: str | None) -> tuple[Any, list[str], str | None]:
        """(objects as (key, size, etag, mtime_ns), common prefixes, next page's token or
        None)."""
        lister = self._lister
        if lister is not None and not self._sdk_lists.active():
            try:
                page = lister.listing_page(prefix, token, delimiter)
                self._sdk_lists.succeeded()
                return page
            except UseSdk as exc:
                self._sdk_lists.refused(f'listing {self.source}', exc)
        arguments = {'Bucket': self.bucket, 'Prefix': prefix}
        if token is not None:
            arguments['ContinuationToken'] = token
        if delimiter is not None:
            arguments['Delimiter'] = delimiter
        page = self.client.list_objects_v2(**arguments)
        objects = [(item['Key'], item['Size'], item['ETag'].strip('"'),
                    int(item['LastModified'].timestamp() * 1e9))
                   for item in page.get('Contents', ())]
        prefixes = [item['Prefix'] for item in page.get('CommonPrefixes', ())]
        token = page.get('NextContinuationToken') if page.get('IsTruncated') else None
        return objects, prefixes, token

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
        return await self._threaded_reads.lean_read(self._trio_getter, self.prefix + key,
                                                    self._reading(key), etag, offset, length)

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
