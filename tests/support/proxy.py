"""A counting (and, for fault tests, misbehaving) HTTP proxy between cachefs and a test store.

Tests must count store requests at the wire, not with the daemon's own counters: this proxy
forwards every request unchanged (Host header included, so S3 signatures stay valid) to the
upstream server and records (method, path, query). `fault` is an optional callable that may
replace the forwarding for a request (used by the fault-injection tests).
"""

import http.client
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class _ProxyServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a daemon opening 32 connections at once would
    # have SYNs dropped and wait out the 1 s retransmit
    request_queue_size = 128

_HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade',
               'te', 'trailer'}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):
        log.debug('proxy: ' + fmt, *args)

    def _accept(self):
        """Read and record the request; (parsed path, body), or None when `fault` answered it."""
        proxy = self.server.proxy
        parsed = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else None
        proxy.record(self.command, parsed.path, parsed.query, self.headers)
        self._in_flight = True
        if proxy.fault is not None and proxy.fault(self, body):
            return None
        return parsed, body

    def handle_one_request(self):
        # A request is in flight from its recording until its answer is written.
        self._in_flight = False
        try:
            super().handle_one_request()
        finally:
            if self._in_flight:
                self.server.proxy.request_done()

    def _forward(self):
        proxy = self.server.proxy
        accepted = self._accept()
        if accepted is None:
            return
        _, body = accepted
        upstream = proxy.upstream_connection()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            proxy.drop_upstream_connection()
            self.send_error(502)
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != 'content-length':
                self.send_header(key, value)
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(payload)
            proxy.sent(len(payload))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class CountingProxy:
    def __init__(self, upstream_host, upstream_port, host='127.0.0.1'):
        # host: the address it listens on (the cluster rig's bridge, for nodes in namespaces)
        self.upstream = (upstream_host, upstream_port)
        self.fault = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self.requests = []
        self.in_flight = 0
        self.max_in_flight = 0          # high-water mark of requests in flight, since reset()
        self.bytes_sent = 0             # body bytes forwarded to clients, since reset()
        self._server = _ProxyServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = None

    @property
    def endpoint(self):
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def record(self, method, path, query, headers):
        with self._lock:
            self.requests.append((method, urllib.parse.unquote(path), query))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def sent(self, size):
        with self._lock:
            self.bytes_sent += size

    def request_done(self):
        with self._lock:
            self.in_flight -= 1

    def count(self, method=None):
        with self._lock:
            return sum(1 for r in self.requests if method is None or r[0] == method)

    def reset(self):
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight
            self.bytes_sent = 0

    def upstream_connection(self):
        connection = getattr(self._local, 'connection', None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(*self.upstream,
                                                                             timeout=60)
        return connection

    def drop_upstream_connection(self):
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name='counting-proxy')
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
