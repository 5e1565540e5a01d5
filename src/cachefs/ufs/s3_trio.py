"""Ranged GETs on the trio thread: the `s3_get` request, sent over trio sockets instead of a
worker thread and urllib3.

Why: a store read through a worker thread pays the thread hand-off, the GIL ping-pong with the
FUSE loop and urllib3's per-request machinery. Reading 1,500 small objects from the bench's
SeaweedFS with 16 requests in flight: 396 files/s and 2.2 ms of CPU per file through threads
and urllib3, 758 files/s and 0.9 ms per file with the same signed requests on trio sockets
(bench/RESULTS.md). The first epoch over small files is that cost, once per file.

What stays botocore's, as in `s3_get`: the object URL, the credentials, the SigV4 signature and
the TLS trust settings (the client's CA bundle, or no verification where the client has none).
Where the client talks through a proxy or with a client certificate, this path is not used.
The answer is HTTP/1.1 with a Content-Length, read exactly: a short body, a connection closed
early, a header block over 64 KiB, anything but one complete answer fails the attempt (and the
connection is dropped, never reused after an error or a cancellation). An answer this path
does not handle (a redirect, a chunked success body) raises `UseSdk`, as in `s3_get`.

The parser is strict, because a pooled connection is only as good as the framing of the last
answer on it: a status line or header line that is not RFC 9112's (folded lines, a space
before the colon, control characters) fails the attempt; so do conflicting Content-Lengths and
a Content-Length with a Transfer-Encoding (`s3_get.content_length`). The request's own header
values are checked before sending (no CR, LF, NUL or other control character: a listed ETag
with CR LF in it would otherwise write a second request onto the connection). An error
answer's body is read for at most 64 KiB and one second, never until a close. A pooled
connection is used for at most 1,000 requests and 5 minutes, and not after 15 s idle: servers
and load balancers close idle connections (nginx after 1,000 requests, many after 5 to 60 s
idle), and new connections follow DNS to the store's current front ends.

The pool, the parser and the GET are `PooledGetter`'s, with no S3 in them: `TrioGetter` adds S3's
URL, signature and error codes, `oss_trio.OssTrioGetter` OSS's.
"""

from __future__ import annotations

import os
import re
import select
import ssl
import time
from urllib.parse import urlsplit

import trio
from botocore.auth import _host_from_url
from botocore.httpsession import get_cert_path

from .block_buffers import new_block_buffer
from .errors import EndpointUnreachable, StoreError, TransientError
from .s3_get import (ERROR_BODY_SECONDS, HANDLED, MAX_ERROR_BODY, LeanRequests, UseSdk,
                     check_ranged_answer, content_length, range_headers)

_MAX_HEAD = 64 * 1024         # bytes of status line and headers
_RECEIVE = 256 * 1024
_IDLE_CONNECTIONS = 64
_MAX_IDLE_SECONDS = 15.0      # a pooled connection idle for longer is closed, not reused
_MAX_AGE_SECONDS = 300.0      # nor is one opened longer ago
_MAX_REQUESTS = 1000          # nor one that carried this many requests
# a plain TCP connection, or TLS over one
_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_STATUS_LINE = re.compile(r'HTTP/1\.([01]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?')
_HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)"
                          r'[ \t]*')
_REQUEST_VALUE = re.compile(r'[\x20-\x7e\t]*')   # what a header value we send may hold


class _Connection:
    """One HTTP/1.1 connection: a trio stream and the bytes received past the last answer."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        # Plain TCP: receive straight into the caller's buffer (no intermediate copy).
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.pending = b''
        self.opened = self.idle_since = time.monotonic()
        self.requests = 0

    async def send(self, data):
        try:
            await self.stream.send_all(data)
        except _BROKEN as exc:
            raise TransientError(f'sending to the store failed ({_reason(exc)})') from None

    async def receive(self):
        try:
            data = await self.stream.receive_some(_RECEIVE)
        except _BROKEN as exc:
            raise TransientError(f'receiving from the store failed ({_reason(exc)})') from None
        if not data:
            raise TransientError('the store closed the connection')
        return data

    async def receive_into(self, view):
        if self.pending:
            count = min(len(self.pending), len(view))
            view[:count] = self.pending[:count]
            self.pending = self.pending[count:]
            return count
        try:
            if self.socket is not None:
                count = await self.socket.recv_into(view)
            else:
                data = await self.stream.receive_some(len(view))
                count = len(data)
                view[:count] = data
        except _BROKEN as exc:
            raise TransientError(f'receiving from the store failed ({_reason(exc)})') from None
        if not count:
            raise TransientError('the store closed the connection')
        return count

    def _socket(self) -> trio.socket.SocketType:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):      # an SSLStream over a SocketStream
            return stream.transport_stream.socket
        return stream.socket

    def close(self):
        """Drop the connection at once (no await: callable while being cancelled)."""
        self._socket().close()

    def readable(self):
        """Whether an idle connection has something to read: bytes the store sent after its
        last answer (which must never be taken for the next answer) or its close. poll, not
        select: select refuses a descriptor over 1023, which a busy daemon reaches."""
        if self.pending:
            return True
        poller = select.poll()
        poller.register(self._socket(), select.POLLIN)
        return bool(poller.poll(0))


def verifying_context(bundle):
    """A TLS context that trusts the certificates in `bundle` (None: the system's): a file, or
    a folder of them, as botocore and requests take either."""
    if bundle is not None and os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _reason(exc):
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    return type(cause or exc).__name__


def _parse_head(head):
    """(status, HTTP minor version, {lower-case header: [values]}) of an answer's status line
    and header lines (`head`: the bytes before the blank line). Raises `TransientError` for
    anything RFC 9112 does not allow there."""
    lines = head.decode('latin-1').split('\r\n')
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise TransientError(f'not an HTTP/1.x answer: {lines[0][:80]!r}')
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise TransientError(f'a malformed header line {line[:80]!r}')
        headers.setdefault(header.group(1).lower(), []).append(header.group(2))
    return int(status.group(2)), int(status.group(1)), headers


def _keep_alive(version, headers):
    """Whether the connection may carry another request after this answer."""
    tokens = {token.strip().lower() for value in headers.get('connection', ())
              for token in value.split(',')}
    return 'close' not in tokens and (version == 1 or 'keep-alive' in tokens)


class PooledGetter:
    """Ranged GETs of object versions over pooled trio connections, for any store whose
    object GET is one signed HTTP/1.1 request (S3 here, OSS in `oss_trio`). A subclass calls
    `_open_pool` and gives `_signed(key, headers)` (the request's bytes), `_error(status, body)`
    (raises the `StoreError` of an error answer) and, where its store needs more headers than
    `s3_get.range_headers`, `_range_headers`."""

    def _open_pool(self, url_prefix, ssl_context):
        """Connect to the host of `url_prefix`; `ssl_context` (None: the default one) is used
        for https."""
        url = urlsplit(url_prefix)
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == 'https' else 80)
        self._ssl = None
        if url.scheme == 'https':
            self._ssl = ssl_context or ssl.create_default_context()
        self._idle = []

    def _range_headers(self, etag, offset, length):
        return range_headers(etag, offset, length)

    def _signed(self, key, headers):
        raise NotImplementedError

    def _error(self, status, body):
        raise NotImplementedError

    @staticmethod
    def _request_bytes(target, host_header, headers):
        """A GET's bytes: request line, Host, `headers` (but Host), identity encoding; a
        header value with a control character is refused before anything is sent."""
        lines = [f'GET {target} HTTP/1.1', f'Host: {host_header}']
        lines += [f'{name}: {value}' for name, value in headers.items()
                  if name.lower() != 'host']
        lines.append('Accept-Encoding: identity')
        for line in lines[1:]:
            if not _REQUEST_VALUE.fullmatch(line):
                raise StoreError(f'refusing to send a header with a control character: '
                                 f'{line[:80]!r}')
        return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')

    async def get(self, key, etag, offset, length):
        """Exactly `length` bytes of `key` from `offset`, only if its ETag is still `etag`.

        Raises `StoreError` subclasses for the store's answers and broken connections, and
        `UseSdk` for what this path does not handle.
        """
        request = self._signed(key, self._range_headers(etag, offset, length))
        connection, reused = await self._connection()
        keep = False
        try:
            try:
                await connection.send(request)
                head = await self._read_head(connection)
            except TransientError:
                if not reused:
                    raise
                # The store closed this idle connection before our request reached it: say it
                # again on a new one, once (a GET has no side effect).
                connection.close()
                connection, reused = await self._connection(new=True)
                await connection.send(request)
                head = await self._read_head(connection)
            status, version, headers = _parse_head(head)
            if status not in HANDLED:
                raise UseSdk(f'HTTP {status}')
            if status not in (200, 206):
                return self._error(status, await self._error_body(connection, headers))
            # Status, length, range and version are checked before any of the body is read.
            size = check_ranged_answer(status, lambda name: headers.get(name, []), etag,
                                       offset, length)
            if size is None:
                raise UseSdk('a success answer without a Content-Length')
            data = new_block_buffer(length)
            view = memoryview(data)
            received = 0
            while received < length:
                received += await connection.receive_into(view[received:])
            if connection.pending:
                raise TransientError('the store sent bytes past the end of the answer')
            keep = _keep_alive(version, headers)
            return data
        finally:
            now = time.monotonic()
            if keep and len(self._idle) < _IDLE_CONNECTIONS and \
                    connection.requests < _MAX_REQUESTS and \
                    now - connection.opened < _MAX_AGE_SECONDS:
                connection.idle_since = now
                self._idle.append(connection)
            else:
                connection.close()

    async def _connection(self, new=False):
        """(connection, reused): an idle pooled connection, else a new one."""
        # The pool is in the order connections went idle: the stale ones are at its start.
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since > _MAX_IDLE_SECONDS:
            self._idle.pop(0).close()
        while self._idle and not new:
            connection = self._idle.pop()
            if connection.readable():
                connection.close()
                continue
            connection.requests += 1
            return connection, True
        try:
            tcp = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise EndpointUnreachable(f'cannot connect to {self._host}:{self._port} '
                                      f'({exc.strerror or exc})') from None
        stream: _Stream = tcp
        if self._ssl is not None:
            stream = trio.SSLStream(tcp, self._ssl, server_hostname=self._host,
                                    https_compatible=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                tcp.socket.close()
                raise EndpointUnreachable(f'TLS with {self._host}:{self._port} failed: '
                                          f'{exc}') from None
        connection = _Connection(stream)
        connection.requests = 1
        return connection, False

    @staticmethod
    async def _read_head(connection):
        received = bytearray()
        while True:
            searched = max(0, len(received) - 3)
            received += await connection.receive()
            end = received.find(b'\r\n\r\n', searched)
            if end >= 0:
                connection.pending = bytes(received[end + 4:])
                return bytes(received[:end])
            if len(received) > _MAX_HEAD:
                raise TransientError('an answer with over 64 KiB of headers')

    @staticmethod
    async def _error_body(connection, headers):
        """Up to 64 KiB of an error answer's body, for at most a second (the connection is not
        reused after it). A body that only a close would end is not waited for."""
        body = bytearray(connection.pending[:MAX_ERROR_BODY])
        connection.pending = b''
        size = content_length(headers.get('content-length', ()),
                              headers.get('transfer-encoding', ()))
        if size is None and not headers.get('transfer-encoding'):
            return bytes(body)
        wanted = min(size, MAX_ERROR_BODY) if size is not None else MAX_ERROR_BODY
        with trio.move_on_after(ERROR_BODY_SECONDS):
            while len(body) < wanted and b'</Error>' not in body:
                try:
                    body += await connection.receive()
                except TransientError:
                    break
        return bytes(body[:MAX_ERROR_BODY])


class TrioGetter(LeanRequests, PooledGetter):
    """Signed ranged GETs of S3 object versions over pooled trio connections."""

    def __init__(self, client, bucket, credentials, http_session):
        super().__init__(client, bucket, credentials, http_session)
        https = urlsplit(self._prefix).scheme == 'https'
        self._open_pool(self._prefix, self._ssl_context(http_session) if https else None)
        # lower-case, without the scheme's default port, IPv6 in brackets: as SigV4 signs it
        self._host_header = _host_from_url(self._prefix)

    @staticmethod
    def _ssl_context(http_session):
        verify = getattr(http_session, '_verify', True)
        context = verifying_context(get_cert_path(verify) if verify else None)
        if verify is False:           # the client was made with verify=False (--no-verify-ssl)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    @staticmethod
    def usable_with(http_session, url):
        """Why this path cannot replace `http_session` for `url`, or None when it can."""
        proxies = getattr(http_session, '_proxy_config', None)
        if proxies is None or not hasattr(http_session, '_verify'):
            return 'this botocore keeps its proxy and TLS settings elsewhere'
        if proxies.proxy_url_for(url):
            return 'requests go through a proxy'
        if getattr(http_session, '_client_cert', None):
            return 'the client sends a TLS client certificate'
        return None

    def _signed(self, key, headers):
        """The request's bytes: request line, Host as SigV4 signs it, the signed headers."""
        url = self._url(key)
        return self._request_bytes(urlsplit(url).path, self._host_header,
                                   self._signed_headers(url, headers))
