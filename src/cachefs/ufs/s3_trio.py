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
"""

import ssl
from urllib.parse import urlsplit

import trio
from botocore.auth import _host_from_url
from botocore.httpsession import get_cert_path

from .errors import EndpointUnreachable, TransientError
from .s3_get import HANDLED, LeanRequests, UseSdk, check_ranged_answer, range_headers

_MAX_HEAD = 64 * 1024         # bytes of status line and headers
_MAX_ERROR_BODY = 64 * 1024   # an error answer's XML is far smaller
_RECEIVE = 256 * 1024
_IDLE_CONNECTIONS = 64
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Connection:
    """One HTTP/1.1 connection: a trio stream and the bytes received past the last answer."""

    def __init__(self, stream):
        self.stream = stream
        # Plain TCP: receive straight into the caller's buffer (no intermediate copy).
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.pending = b''

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

    def close(self):
        """Drop the connection at once (no await: callable while being cancelled)."""
        stream = self.stream
        while not isinstance(stream, trio.SocketStream):
            stream = stream.transport_stream     # an SSLStream over a SocketStream
        stream.socket.close()


def _reason(exc):
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    return type(cause or exc).__name__


def _parse_head(head):
    """(status, {lower-case header: value}) of a response's status line and headers."""
    lines = head.decode('latin-1').split('\r\n')
    parts = lines[0].split(' ', 2)
    if len(parts) < 2 or not parts[0].startswith('HTTP/1.') or not parts[1].isdigit():
        raise TransientError(f'not an HTTP/1.x answer: {lines[0][:80]!r}')
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(':')
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class TrioGetter(LeanRequests):
    """Signed ranged GETs of object versions over pooled trio connections."""

    def __init__(self, client, bucket, credentials, http_session):
        super().__init__(client, bucket, credentials, http_session)
        url = urlsplit(self._prefix)
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == 'https' else 80)
        self._ssl = self._ssl_context(http_session) if url.scheme == 'https' else None
        # lower-case, without the scheme's default port, IPv6 in brackets: as SigV4 signs it
        self._host_header = _host_from_url(self._prefix)
        self._idle = []

    @staticmethod
    def _ssl_context(http_session):
        verify = getattr(http_session, '_verify', True)
        context = ssl.create_default_context(cafile=get_cert_path(verify) if verify else None)
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

    async def get(self, key, etag, offset, length):
        """Exactly `length` bytes of `key` from `offset`, only if its ETag is still `etag`.

        Raises `StoreError` subclasses for the store's answers and broken connections, and
        `UseSdk` for what this path does not handle.
        """
        request = self._signed(key, range_headers(etag, offset, length))
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
            status, headers = _parse_head(head)
            if status not in HANDLED:
                raise UseSdk(f'HTTP {status}')
            if status not in (200, 206):
                return self._error(status, await self._error_body(connection, headers))
            check_ranged_answer(status, headers.get('content-range'), offset, length)
            size = headers.get('content-length')
            if 'chunked' in headers.get('transfer-encoding', '').lower() or size is None:
                raise UseSdk('a success answer without a Content-Length')
            if int(size) != length:
                raise TransientError(f'the store announced {size} bytes of {length}')
            data = bytearray(length)
            view = memoryview(data)
            received = 0
            while received < length:
                received += await connection.receive_into(view[received:])
            if connection.pending:
                raise TransientError('the store sent bytes past the end of the answer')
            keep = headers.get('connection', '').lower() != 'close'
            return data
        finally:
            if keep and len(self._idle) < _IDLE_CONNECTIONS:
                self._idle.append(connection)
            else:
                connection.close()

    def _signed(self, key, headers):
        """The request's bytes: request line, Host as SigV4 signs it, the signed headers."""
        url = self._url(key)
        lines = [f'GET {urlsplit(url).path} HTTP/1.1', f'Host: {self._host_header}']
        lines += [f'{name}: {value}' for name, value in self._signed_headers(url, headers).items()
                  if name.lower() != 'host']
        lines.append('Accept-Encoding: identity')
        return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')

    async def _connection(self, new=False):
        """(connection, reused): an idle pooled connection, else a new one."""
        if self._idle and not new:
            return self._idle.pop(), True
        try:
            stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise EndpointUnreachable(f'cannot connect to {self._host}:{self._port} '
                                      f'({exc.strerror or exc})') from None
        if self._ssl is not None:
            stream = trio.SSLStream(stream, self._ssl, server_hostname=self._host,
                                    https_compatible=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                stream.transport_stream.socket.close()
                raise EndpointUnreachable(f'TLS with {self._host}:{self._port} failed: '
                                          f'{exc}') from None
        return _Connection(stream), False

    @staticmethod
    async def _read_head(connection):
        received = bytearray()
        while True:
            received += await connection.receive()
            end = received.find(b'\r\n\r\n')
            if end >= 0:
                connection.pending = bytes(received[end + 4:])
                return bytes(received[:end])
            if len(received) > _MAX_HEAD:
                raise TransientError('an answer with over 64 KiB of headers')

    @staticmethod
    async def _error_body(connection, headers):
        """Up to 64 KiB of an error answer's body (the connection is not reused after it)."""
        body = bytearray(connection.pending)
        connection.pending = b''
        size = headers.get('content-length')
        wanted = min(int(size), _MAX_ERROR_BODY) if size is not None else _MAX_ERROR_BODY
        while len(body) < wanted and b'</Error>' not in body:
            try:
                body += await connection.receive()
            except TransientError:
                break
        return bytes(body)
