"""A TLS-terminating TCP relay in front of a plain-HTTP test store, with a throw-away
self-signed certificate for 127.0.0.1 (made with the openssl command): lets tests check that
cachefs's own HTTPS connections verify the certificate the way botocore's do."""

import socket
import ssl
import subprocess
import threading


def make_certificate(folder):
    """(certificate path, key path) of a new self-signed certificate for 127.0.0.1."""
    cert, key = folder / 'relay-cert.pem', folder / 'relay-key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                    '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True)
    return cert, key


class TlsRelay:
    def __init__(self, upstream_port, cert, key):
        self.upstream_port = upstream_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(('127.0.0.1', 0))
        self.port = self._listener.getsockname()[1]
        self._sockets = []
        self._threads = []
        self._stopping = False

    @property
    def endpoint(self):
        return f'https://127.0.0.1:{self.port}'

    def __enter__(self):
        self._start(self._accept)
        return self

    def __exit__(self, *exc):
        # Shut the sockets down (which wakes the pipe threads' recv), wait for the threads, and
        # only then close them: a socket closed while a thread still uses it frees its number
        # for the next test's connection, which would then get this relay's bytes.
        self._stopping = True
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._listener.shutdown(socket.SHUT_RDWR)     # wakes the accept() (Linux)
        except OSError:
            pass
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()
        for sock in list(self._sockets):
            try:
                sock.close()
            except OSError:
                pass

    def _start(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self):
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._start(self._serve, client)

    def _serve(self, client):
        try:
            secure = self._context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()              # a client that refused our certificate
            return
        upstream = socket.create_connection(('127.0.0.1', self.upstream_port))
        self._sockets += [secure, upstream]
        self._start(self._pipe, upstream, secure)
        self._pipe(secure, upstream)

    @staticmethod
    def _pipe(source, target):
        try:
            while data := source.recv(262144):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
