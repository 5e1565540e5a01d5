"""A fault-injecting S3 proxy for reliability tests, and the fault plans that drive it.

`FaultProxy` sits between cachefs and a real S3 server (the loopback SeaweedFS), forwards every
request unchanged (so signatures stay valid) and, when its `plan` says so, breaks the answer to an
object read (a GET with a Range header) in one of the ways a real network and a real store do.
Listings, HEADs and un-ranged GETs are only broken with `every_request = True` (a store that is
down when the mount starts).

The body faults stream: the proxy sends the real status line, headers and the first part of the
real body, then misbehaves, so the client has already accepted the response when it breaks.

Fault kinds (`KINDS`), by what the client sees:

    reset_mid_body   headers and part of the body, then a TCP reset (connection dropped)
    truncated_body   headers claiming N bytes, fewer sent, then a clean close (FIN): a body shorter
                     than its Content-Length
    short_range      a well-formed 206 whose Content-Length and Content-Range both describe fewer
                     bytes than the Range asked for: only the client's own length check catches it
    http_500         500 InternalError with an S3 XML error body
    slowdown_503     503 SlowDown with an S3 XML error body and Retry-After
    stall_headers    nothing at all for `stall_seconds` (past the request timeout), then a close
    stall_mid_body   headers and part of the body, then nothing for `stall_seconds`, then a close
    slow_drip        headers, then the body a few bytes at a time, each piece well inside the read
                     timeout, for `drip_seconds`: only a total deadline per request ends it

Outside `KINDS` (not part of the every-kind tests): `http_400`, a 400 InvalidRequest, an answer
the lean S3 read paths do not handle (they hand the read to the path below them).

`refuse()` makes the store "go down": the listening socket is closed (new connections are
refused) and every open connection is reset; `resume()` listens on the same port again.
"""

import collections
import http.client
import logging
import random
import socket
import struct
import threading
import time
from http.server import ThreadingHTTPServer

from .proxy import _HOP_BY_HOP, CountingProxy, _Handler

log = logging.getLogger(__name__)

KINDS = ('reset_mid_body', 'truncated_body', 'short_range', 'http_500', 'slowdown_503',
         'stall_headers', 'stall_mid_body', 'slow_drip')
_BEFORE_UPSTREAM = {'http_500', 'slowdown_503', 'stall_headers', 'http_400'}
_CHUNK = 256 * 1024

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
              '<Message>{message}</Message><Resource>{resource}</Resource>'
              '<RequestId>fault-{n}</RequestId></Error>')


def is_object_read(method, headers):
    return method == 'GET' and 'range' in {k.lower() for k in headers.keys()}


# -- plans: (method, path, headers) -> a fault kind or None --

class Always:
    """Every object read fails with `kind` (None: no faults)."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, method, path, headers):
        return self.kind


class FirstTry:
    """The first read of each (object, range) fails with `kind`; its retry goes through."""

    def __init__(self, kind):
        self.kind = kind
        self._seen = set()
        self._lock = threading.Lock()

    def __call__(self, method, path, headers):
        token = (path, headers.get('Range'))
        with self._lock:
            if token in self._seen:
                return None
            self._seen.add(token)
        return self.kind


class ByName:
    """Each object read gets the fault that the plan of the first matching name part says:
    `ByName({'once-': FirstTry('http_500')})`; reads of other objects are not broken."""

    def __init__(self, plans):
        self.plans = plans

    def __call__(self, method, path, headers):
        for part, plan in self.plans.items():
            if part in path:
                return plan(method, path, headers)
        return None


class SeededMix:
    """Each object read fails with probability `rate`, with a kind drawn from `weights`."""

    def __init__(self, seed, rate, weights):
        self.rate = rate
        self.kinds = list(weights)
        self.weights = [weights[k] for k in self.kinds]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, method, path, headers):
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            return self._rng.choices(self.kinds, self.weights)[0]


# -- the proxy --

class _FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver listens with a backlog of 5: a daemon opening 32 connections at once would
    # have SYNs dropped and wait out the 1 s retransmit
    request_queue_size = 128

    def __init__(self, address, proxy):
        self.proxy = proxy
        super().__init__(address, _FaultHandler)

    def process_request(self, request, client_address):
        with self.proxy._lock:
            self.proxy._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.proxy._lock:
            self.proxy._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client that gave up on a broken answer is the point of this server, not an error.
        log.debug('fault proxy: connection from %s ended with an error', client_address,
                  exc_info=True)


class _FaultHandler(_Handler):
    def log_message(self, fmt, *args):
        log.debug('fault proxy: ' + fmt, *args)

    def _forward(self):
        proxy = self.server.proxy
        accepted = self._accept()
        if accepted is None:
            return
        parsed, body = accepted
        kind = None
        if proxy.plan is not None and (proxy.every_request or
                                       is_object_read(self.command, self.headers)):
            kind = proxy.plan(self.command, parsed.path, self.headers)
        if kind in _BEFORE_UPSTREAM:
            proxy.count_fault(kind)
            self._fault_without_upstream(kind, parsed.path)
            return
        upstream = proxy.upstream_connection()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            if kind is None or response.status not in (200, 206) or \
                    (kind == 'short_range' and response.status != 206):
                self._stream(response)
                return
            payload = response.read()
        except (OSError, http.client.HTTPException):
            proxy.drop_upstream_connection()
            self.close_connection = True
            try:
                self.send_error(502)
            except OSError:
                pass
            return
        proxy.count_fault(kind)
        self._fault_in_body(kind, response, payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    # -- normal forwarding, streamed --

    def _send_head(self, response, length, extra=()):
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            lower = key.lower()
            if lower in _HOP_BY_HOP or lower == 'content-length' or \
                    any(lower == e[0].lower() for e in extra):
                continue
            self.send_header(key, value)
        for key, value in extra:
            self.send_header(key, value)
        self.send_header('Content-Length', str(length))
        self.end_headers()

    def _stream(self, response):
        length = response.getheader('Content-Length')
        if length is None or self.command == 'HEAD':
            payload = response.read()
            self._send_head(response, int(length) if length is not None else len(payload))
            if self.command != 'HEAD':
                self.wfile.write(payload)
            return
        length = int(length)
        self._send_head(response, length)
        left = length
        while left:
            chunk = response.read(min(left, _CHUNK))
            if not chunk:
                raise http.client.IncompleteRead(b'')
            self.wfile.write(chunk)
            left -= len(chunk)
        self.server.proxy.count_bytes(length)

    # -- faults --

    def _fault_without_upstream(self, kind, path):
        proxy = self.server.proxy
        if kind == 'stall_headers':
            proxy.sleep(proxy.stall_seconds)
            self._close()
            return
        status, code, message = {
            'http_500': (500, 'InternalError', 'We encountered an internal error. Please try '
                         'again.'),
            'slowdown_503': (503, 'SlowDown', 'Please reduce your request rate.'),
            'http_400': (400, 'InvalidRequest', 'An answer the lean paths do not handle.'),
        }[kind]
        body = _ERROR_XML.format(code=code, message=message, resource=path,
                                 n=proxy.faults_total()).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/xml')
        self.send_header('Content-Length', str(len(body)))
        if status == 503:
            self.send_header('Retry-After', '1')
        self.end_headers()
        self.wfile.write(body)

    def _fault_in_body(self, kind, response, payload):
        proxy = self.server.proxy
        cut = proxy.cut_point(len(payload))
        if kind == 'short_range':
            first = int(response.getheader('Content-Range', 'bytes 0-0/0').split()[1]
                        .split('-')[0])
            total = response.getheader('Content-Range').rsplit('/', 1)[1]
            cut = max(cut, 1)
            self._send_head(response, cut, [('Content-Range',
                                             f'bytes {first}-{first + cut - 1}/{total}')])
            self.wfile.write(payload[:cut])
            return
        self._send_head(response, len(payload))
        if kind == 'slow_drip':
            deadline = time.monotonic() + proxy.drip_seconds
            position = 0
            while time.monotonic() < deadline and position < len(payload) - 1:
                self.wfile.write(payload[position:position + 16])
                position += 16
                if proxy.sleep(proxy.drip_interval):
                    break
            self._close()
            return
        self.wfile.write(payload[:cut])
        if kind == 'reset_mid_body':
            self._reset()
        elif kind == 'truncated_body':
            self._close()
        elif kind == 'stall_mid_body':
            proxy.sleep(proxy.stall_seconds)
            self._close()
        else:
            raise ValueError(f'unknown fault kind {kind!r}')

    def _close(self):
        """A clean close (FIN) of the client connection."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self):
        """An abortive close: the client sees ECONNRESET."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        except OSError:
            pass
        # the file objects hold the socket open; it is really closed (with RST) in finish()
        self.connection.close()


class FaultProxy(CountingProxy):
    """A `CountingProxy` that breaks object reads as `plan` says; see the module docstring."""

    def __init__(self, upstream_host, upstream_port, *, plan=None, stall_seconds=2.0,
                 drip_seconds=12.0, drip_interval=0.25, seed=0):
        super().__init__(upstream_host, upstream_port)
        # CountingProxy's server is replaced by one that tracks connections (for refuse()).
        self._server.server_close()
        self._connections = set()
        self._server = _FaultServer(('127.0.0.1', 0), self)
        self._port = self._server.server_address[1]
        self.plan = plan
        self.every_request = False      # True: the plan breaks listings and HEADs too
        self.stall_seconds = stall_seconds
        self.drip_seconds = drip_seconds
        self.drip_interval = drip_interval
        self.injected = collections.Counter()
        self.bytes_forwarded = 0
        self._cut_rng = random.Random(seed)
        self._wake = threading.Event()

    @property
    def endpoint(self):
        return f'http://127.0.0.1:{self._port}'

    def count_fault(self, kind):
        with self._lock:
            self.injected[kind] += 1

    def faults_total(self):
        with self._lock:
            return sum(self.injected.values())

    def count_bytes(self, n):
        with self._lock:
            self.bytes_forwarded += n

    def cut_point(self, length):
        with self._lock:
            return self._cut_rng.randrange(0, max(length, 1))

    def sleep(self, seconds):
        """Sleep, but wake at once on `heal` or `stop`; True when woken."""
        return self._wake.wait(seconds)

    def heal(self):
        """The store recovers: no more faults, and the stalled or dripping answers in progress
        end now (their connections are closed), as a restarted server's would."""
        self.plan = None
        woken, self._wake = self._wake, threading.Event()
        woken.set()

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name='fault-proxy')
        self._thread.start()
        return self

    def _reset_connections(self):
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def refuse(self):
        """The store goes down: new connections are refused, open ones are reset."""
        woken, self._wake = self._wake, threading.Event()
        woken.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._reset_connections()

    def resume(self):
        """The store comes back on the same port."""
        self._server = _FaultServer(('127.0.0.1', self._port), self)
        return self.start()

    def stop(self):
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._reset_connections()


# -- reads with a wall-clock bound --

class Outcome:
    """What one bounded call did: its result or error, how long it took, whether it hung."""

    __slots__ = ('result', 'error', 'elapsed', 'hung')

    def __init__(self, result=None, error=None, elapsed=0.0, hung=False):
        self.result = result
        self.error = error
        self.elapsed = elapsed
        self.hung = hung


def call_within(seconds, fn, *args):
    """Run `fn(*args)` in a thread and wait at most `seconds` for it. A call still running then
    is reported as hung (its thread is left behind, as a daemon thread)."""
    outcome = Outcome()

    def run():
        started = time.monotonic()
        try:
            outcome.result = fn(*args)
        except BaseException as exc:        # noqa: B902 - reported to the caller
            outcome.error = exc
        outcome.elapsed = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True, name='bounded-call')
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        outcome.hung = True
        outcome.elapsed = time.monotonic() - started
    return outcome


# Store options of the fault and reliability tests: short, so that failures end quickly.
RETRY_TIMEOUT = 3.0
REQUEST_TIMEOUT = 1.0
FAULT_OPTIONS = ('--retry-timeout', f'{RETRY_TIMEOUT:g}s', '--request-timeout',
                 f'{REQUEST_TIMEOUT:g}s')
# A failing read may wait for two retry cycles: the kernel's readahead request for a page fails
# after one, then the kernel asks once more, synchronously, for the page the reader wants.
READ_BOUND = 2 * (RETRY_TIMEOUT + REQUEST_TIMEOUT) + 2.0
