"""A loopback HTTP/1.1 server that answers each request with bytes a test scripted: any status
line, any headers, any body, sent in pieces, then a close, a hold or more bytes. For tests of
a client's response parser against hostile or broken answers (tests/test_http_hostile.py).

`server.reply` is called with the request's head (bytes up to the blank line) and returns a
`Reply`. The server records every request head and counts connections.
"""

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Reply:
    pieces: list                    # bytes sent one after the other, `gap` seconds apart
    close: bool = True              # close the connection after the pieces
    hold: float = 0.0               # else keep it open this long (or until the client closes)
    later: bytes = b''              # bytes sent `gap_later` seconds after the pieces
    gap: float = 0.0
    gap_later: float = 0.05
    extra: dict = field(default_factory=dict)


class ScriptedServer:
    def __init__(self, reply=None):
        self.reply = reply
        self.requests = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(('127.0.0.1', 0))
        self._listener.settimeout(0.05)
        self._threads = []
        self._open = set()

    @property
    def port(self):
        return self._listener.getsockname()[1]

    @property
    def endpoint(self):
        return f'http://127.0.0.1:{self.port}'

    def start(self):
        thread = threading.Thread(target=self._accept, daemon=True, name='scripted-http')
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            for connection in list(self._open):
                connection.close()
        self._listener.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reset(self):
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def _accept(self):
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.add(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True,
                             name='scripted-http-connection').start()

    def _serve(self, connection):
        connection.settimeout(5)
        received = b''
        try:
            while not self._stop.is_set():
                while b'\r\n\r\n' not in received:
                    data = connection.recv(65536)
                    if not data:
                        return
                    received += data
                head, _, received = received.partition(b'\r\n\r\n')
                with self._lock:
                    self.requests.append(head)
                reply = self.reply(head)
                for index, piece in enumerate(reply.pieces):
                    if index and reply.gap:
                        time.sleep(reply.gap)
                    connection.sendall(piece)
                if reply.later:
                    time.sleep(reply.gap_later)
                    connection.sendall(reply.later)
                if reply.close:
                    return
                if reply.hold:
                    connection.settimeout(reply.hold)
                    try:
                        while connection.recv(65536):
                            pass
                    except OSError:
                        pass
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(connection)
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
