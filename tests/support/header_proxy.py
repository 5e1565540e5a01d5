"""A proxy that drops request headers (If-Match, Range) on their way to an S3 store, as some
S3-compatible stores and middleboxes effectively do, and counts the body bytes each answer got
across to the client.

SigV4 signs Range and If-Match, so a store would refuse the signature of a request that lost
them: the proxy signs the stripped request again with the store's credentials (the test's own
SeaweedFS keys), keeping the Host the client signed. The store then answers the request as if
the client had never sent those headers: the whole object with 200 for a ranged GET, the
current version for a GET of an old one.

Answers stream to the client in 16 KiB pieces through a 64 KiB send buffer, and each GET's
answer is recorded in `answers` as (path, status, body bytes the client's socket accepted):
a client that stops reading an answer and closes the connection stops that count within a
piece, the send buffer and its own receive buffer.
"""

import http.client
import logging
import socket
import threading

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .proxy import _HOP_BY_HOP, CountingProxy, _Handler

log = logging.getLogger(__name__)

_PIECE = 16 * 1024
_SEND_BUFFER = 64 * 1024
_SIGNATURE_HEADERS = {'authorization', 'x-amz-date', 'x-amz-content-sha256'}


class _StrippingHandler(_Handler):
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)

    def log_message(self, fmt, *args):
        log.debug('header proxy: ' + fmt, *args)

    def _forward(self):
        proxy = self.server.proxy
        accepted = self._accept()
        if accepted is None:
            return
        parsed, body = accepted
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if any(name.lower() in proxy.strip for name in headers):
            headers = proxy.resigned(self.command, self.path, {
                k: v for k, v in headers.items() if k.lower() not in proxy.strip})
        upstream = proxy.upstream_connection()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException):
            proxy.drop_upstream_connection()
            self.send_error(502)
            return
        length = response.getheader('Content-Length')
        if length is None:                  # chunked upstream: sent on with a length
            response = _Buffered(response)
            length = str(len(response.payload))
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != 'content-length':
                self.send_header(key, value)
        self.send_header('Content-Length', length)
        self.end_headers()
        sent = 0
        try:
            left = int(length) if self.command != 'HEAD' else 0
            while left:
                piece = response.read(min(left, _PIECE))
                if not piece:
                    raise http.client.IncompleteRead(b'')
                self.connection.sendall(piece)
                sent += len(piece)
                left -= len(piece)
        except (OSError, http.client.HTTPException):
            # The client closed its end (or the store broke): this answer ends here.
            proxy.drop_upstream_connection()
            self.close_connection = True
        if self.command == 'GET':
            proxy.answered(parsed.path, response.status, sent)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _Buffered:
    """An upstream answer read whole, read again in pieces."""

    def __init__(self, response):
        self.status, self.reason = response.status, response.reason
        self._headers = response.getheaders()
        self.payload = response.read()
        self._position = 0

    def getheaders(self):
        return self._headers

    def read(self, amount):
        piece = self.payload[self._position:self._position + amount]
        self._position += len(piece)
        return piece


class HeaderStrippingProxy(CountingProxy):
    def __init__(self, upstream_host, upstream_port, *, strip, access_key, secret_key,
                 region='us-east-1'):
        super().__init__(upstream_host, upstream_port)
        self._server.server_close()
        self._server = type(self._server)(('127.0.0.1', 0), _StrippingHandler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.strip = {name.lower() for name in strip}
        self._credentials = Credentials(access_key, secret_key)
        self._region = region
        self.answers = []               # (path, status, body bytes sent) of each GET

    def resigned(self, method, path, headers):
        """`headers` signed again for `method path` (after some were dropped)."""
        kept = {k: v for k, v in headers.items() if k.lower() not in _SIGNATURE_HEADERS}
        host = next(v for k, v in kept.items() if k.lower() == 'host')
        request = AWSRequest(method=method, url=f'http://{host}{path}', headers=kept)
        S3SigV4Auth(self._credentials, 's3', self._region).add_auth(request)
        return dict(request.headers.items())

    def answered(self, path, status, sent):
        with self._lock:
            self.answers.append((path, status, sent))

    def get_answers(self):
        with self._lock:
            return list(self.answers)

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name='header-proxy')
        self._thread.start()
        return self
