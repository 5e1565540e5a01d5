"""What the cluster tier puts on the wire: cluster keys, the sealed block format, and the client
side of memcached's meta protocol (mg/ms/mn), strict, over any trio stream.

Cluster keys. A block is stored under `cluster_key(namespace, key, etag, offset, length,
block_size)`: the namespace (`cfs1:` and a digest of the source URL and endpoint, so that mounts
of different buckets or stores never share entries) and a BLAKE2b digest of the object key, its
ETag, the block's offset and length and the block size, in hex: 62 printable ASCII characters,
within memcached's 250 bytes and free of spaces and control characters whatever the object key
holds.

Sealed blocks. A value is a 48-byte header followed by the block's bytes:

    magic b'CFSC' | version (2) | flags (bit 0: keyed) | 2 reserved zero bytes |
    length (uint64 LE) | checksum (32 bytes)

The checksum covers the cluster key, the first 16 header bytes and the data. With a shared secret
(`--cluster-secret-file`) it is HMAC-SHA256 under a key derived from the secret, so a host on the
network that does not hold the secret cannot make a block the reader accepts. Without one it is
XXH3-128 (then 16 zero bytes): it detects corruption and blocks stored under another key, and
nothing more, since anyone who can write to the engine could compute any unkeyed checksum; the
trust boundary then is the network (docs/cluster.md). Why these two: a cluster hit is checked on
every read, and on this machine BLAKE2b costs 1.1 ms of CPU per MiB, HMAC-SHA256 0.6 (SHA
instructions), XXH3 0.02; a keyed check needs a MAC, an unkeyed one only a good hash.

The reader refuses anything else: another magic or version, keyed when it has no secret or
unkeyed when it has one, a length other than the one it asked for, a checksum that does not
verify. A refused block is never returned.

The meta protocol client. One request per connection at a time, answers read with exact framing:
a reply line is at most 1 KiB of printable ASCII ending in CRLF, with the opaque token (`O`) of
the request; a value (`VA <size>`) must have exactly the size the reader expects (the header plus
the block) before a byte of it is read, and must end in CRLF; nothing may follow a reply. Any
other answer (garbage, a value cut short, another opaque, a close) raises `PeerFailure`, and the
caller drops the connection; a value of another size raises `BlockRefused` (the peer answers,
but not with the block asked for) and the connection is dropped too. Values are received
straight into the block's buffer (`ufs.block_buffers`), without an intermediate copy on plain
TCP.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import select
import struct
from typing import Union

import trio
import xxhash

from ..ufs.block_buffers import new_block_buffer

log = logging.getLogger(__name__)

MAGIC = b'CFSC'
VERSION = 2                                 # 1: BLAKE2b checksums (refused, then replaced)
FLAG_KEYED = 1
HEADER = struct.Struct('<4sBBHQ32s')        # magic, version, flags, reserved, length, checksum
HEADER_SIZE = HEADER.size                   # 48
_SIGNED = 16                                # header bytes before the checksum, covered by it
_PERSON = b'cachefs-cluster'                # first in every digest: no other use collides
MAX_LINE = 1024                             # bytes of a reply line, CRLF excluded
_RECEIVE = 256 * 1024

Buffer = Union[bytes, bytearray, memoryview]


class ClusterError(Exception):
    """A cluster request that did not give a usable answer; the block comes from the store."""


class PeerFailure(ClusterError):
    """The peer or the connection failed (refused, closed, garbled, too slow): the connection
    is dropped and the peer counts as failing (circuit breaker)."""


class BlockRefused(ClusterError):
    """A value came back intact on the wire but is not the block asked for (bad header, length
    or checksum): the peer answers, the block is not trusted."""


class ServerRefused(ClusterError):
    """The peer answered with SERVER_ERROR (e.g. an item larger than its -I, out of memory):
    it is up, but did not do what was asked."""


# -- keys --

def _digest(*parts: bytes, size: int) -> bytes:
    h = hashlib.blake2b(digest_size=size, person=_PERSON)
    for part in parts:
        h.update(len(part).to_bytes(8, 'little'))       # framed: no two tuples hash alike
        h.update(part)
    return h.digest()


def cluster_namespace(source_identity: str) -> str:
    """'cfs1:' + 16 hex digits of the source URL and endpoint (`source_identity`)."""
    return 'cfs1:' + _digest(source_identity.encode('utf-8', 'surrogateescape'), size=8).hex()


def cluster_key(namespace: str, key: str, etag: str, offset: int, length: int,
                block_size: int) -> str:
    """The memcached key of one block of one object version (see the module docstring)."""
    digest = _digest(key.encode('utf-8', 'surrogateescape'),
                     etag.encode('utf-8', 'surrogateescape'),
                     struct.pack('<QQQ', offset, length, block_size), size=20)
    return f'{namespace}:{digest.hex()}'


# -- sealed blocks --

def derive_key(secret: bytes) -> bytes:
    """The HMAC key (64 bytes) for a secret of any length."""
    return hashlib.blake2b(secret, digest_size=64, person=b'cachefs-secret').digest()


class Sealer:
    """Seals blocks for the cluster and checks the blocks it returns; `secret` (bytes, or None
    for an unkeyed checksum) is shared by every node of the cluster."""

    __slots__ = ('_key', '_flags')

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = derive_key(secret) if secret else b''
        self._flags = FLAG_KEYED if secret else 0

    @property
    def keyed(self) -> bool:
        """Whether checksums are MACs (milliseconds per block: worth a worker thread)."""
        return bool(self._key)

    def _checksum(self, cluster_key: bytes, signed: bytes, data: Buffer) -> bytes:
        h = hmac.new(self._key, digestmod='sha256') if self._key else xxhash.xxh3_128()
        h.update(_PERSON)
        h.update(cluster_key)
        h.update(signed)
        h.update(data)
        return h.digest().ljust(32, b'\0')

    def seal(self, cluster_key: str, data: Buffer) -> bytes:
        """The header to send before `data`."""
        signed = HEADER.pack(MAGIC, VERSION, self._flags, 0, len(data), b'\0' * 32)[:_SIGNED]
        return signed + self._checksum(cluster_key.encode('ascii'), signed, data)

    def check(self, cluster_key: str, header: Buffer, data: Buffer) -> None:
        """Raise `BlockRefused` unless `header` + `data` is the block sealed under
        `cluster_key` with this sealer's secret."""
        if len(header) != HEADER_SIZE:
            raise BlockRefused(f'a header of {len(header)} bytes')
        magic, version, flags, reserved, length, checksum = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or reserved or flags & ~FLAG_KEYED:
            raise BlockRefused('not a cachefs block of this version')
        if flags != self._flags:
            raise BlockRefused('sealed with a secret' if flags & FLAG_KEYED
                               else 'sealed without the shared secret')
        if length != len(data):
            raise BlockRefused(f'its header says {length} bytes, it holds {len(data)}')
        if not hmac.compare_digest(
                self._checksum(cluster_key.encode('ascii'), bytes(header[:_SIGNED]), data),
                checksum):
            raise BlockRefused('bad checksum')


# -- the meta protocol --

_KEY = re.compile(r'[!-~]{1,250}')                  # printable ASCII, no space
_REPLY = re.compile(rb'(VA|EN|HD|NS|EX|NF|MN)((?: [!-~]+)*)')
_ERROR = re.compile(rb'(ERROR|CLIENT_ERROR|SERVER_ERROR)(?: ([ -~]*))?')
_SIZE = re.compile(rb'[0-9]{1,10}')


def _check_key(key: str) -> bytes:
    if not _KEY.fullmatch(key):
        raise ValueError(f'not a memcached key: {key[:80]!r}')
    return key.encode('ascii')


def get_command(key: str, opaque: int, lease: int = 0) -> bytes:
    """`mg` of a value; with `lease` (seconds), a miss makes memcached keep an empty item for
    that long and give this client alone the right to fill it (W), the others Z."""
    if lease:
        return b'mg %s v N%d O%d\r\n' % (_check_key(key), lease, opaque)
    return b'mg %s v O%d\r\n' % (_check_key(key), opaque)


def add_command(key: str, size: int, opaque: int, replace: bool = False) -> bytes:
    """`ms` of a value of `size` bytes, never expiring (memcached's LRU evicts it); mode add
    (stored only if absent: a block is the same whoever fills it, and extstore is spared the
    rewrite) or, with `replace`, set (over a value that was refused)."""
    mode = b'MS' if replace else b'ME'
    return b'ms %s %d T0 %s O%d\r\n' % (_check_key(key), size, mode, opaque)


NOOP_COMMAND = b'mn\r\n'
WON = 'won'         # a miss, and this client is the one to fetch and fill the block
BUSY = 'busy'       # a miss that another client is fetching and will fill


def parse_reply(line: bytes, opaque: int | None) -> tuple[str, int | None]:
    """(code, value size or None) of a reply line (without its CRLF). Raises `ServerRefused` for
    SERVER_ERROR, `PeerFailure` for anything that is not a well-formed reply to this request."""
    error = _ERROR.fullmatch(line)
    if error is not None:
        text = (error.group(2) or b'').decode('ascii')
        if error.group(1) == b'SERVER_ERROR':
            raise ServerRefused(f'SERVER_ERROR {text}'.strip())
        raise PeerFailure(f'the peer answered {error.group(1).decode()} {text}'.strip())
    reply = _REPLY.fullmatch(line)
    if reply is None:
        raise PeerFailure(f'not a meta protocol reply: {line[:80]!r}')
    code = reply.group(1).decode()
    tokens = reply.group(2).split()
    size = None
    if code == 'VA':
        if not tokens or not _SIZE.fullmatch(tokens[0]):
            raise PeerFailure(f'a value without a size: {line[:80]!r}')
        size = int(tokens.pop(0))
    if code != 'MN':
        opaques = [t for t in tokens if t.startswith(b'O')]
        # memcached 1.6.18 answers a miss found in extstore (the item's value was on a page
        # since evicted) with a bare `EN`, without the request's opaque token; a connection
        # carries one request at a time and is never reused with unread bytes, so a bare `EN`
        # can only be this request's miss
        bare_miss = code == 'EN' and not tokens
        if opaque is not None and opaques != [b'O%d' % opaque] and not bare_miss:
            raise PeerFailure(f'a reply to another request: {line[:80]!r}')
    return code, size


class MetaConnection:
    """One connection to a memcached peer; one request at a time; dropped after any error or
    cancellation (the caller closes it: a connection whose last answer was not read to its end
    cannot carry another)."""

    __slots__ = ('stream', 'socket', 'pending', 'opaque', 'idle_since')

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # plain TCP: values are received straight into the block's buffer
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.pending = bytearray()
        self.opaque = 0
        self.idle_since = 0.0

    def close(self) -> None:
        """Drop the connection at once (no await: callable while being cancelled)."""
        if self.socket is not None:
            self.socket.close()
        else:
            close = getattr(self.stream, 'close', None)     # memory streams in tests
            if close is not None:
                close()

    def readable(self) -> bool:
        """Whether an idle connection has something to read (bytes nobody asked for, or the
        peer's close): then it must not carry another request."""
        if self.pending:
            return True
        if self.socket is None:
            return False
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def _send(self, *parts: Buffer) -> None:
        try:
            for part in parts:
                await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerFailure(f'sending failed ({type(exc).__name__})') from None

    async def _receive(self, size: int) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerFailure(f'receiving failed ({type(exc).__name__})') from None
        if not data:
            raise PeerFailure('the peer closed the connection')
        return data

    async def _line(self) -> bytes:
        searched = 0
        while True:
            end = self.pending.find(b'\r\n', searched)
            if end >= 0:
                line: bytes = bytes(self.pending[:end])
                del self.pending[:end + 2]
                if end > MAX_LINE:
                    raise PeerFailure(f'a reply line of {end} bytes')
                return line
            if len(self.pending) > MAX_LINE:
                raise PeerFailure(f'a reply line of over {MAX_LINE} bytes')
            searched = max(0, len(self.pending) - 1)
            self.pending += await self._receive(_RECEIVE)

    async def _exactly(self, view: memoryview) -> None:
        """Fill `view` from the pending bytes, then from the connection."""
        filled = min(len(self.pending), len(view))
        if filled:
            view[:filled] = self.pending[:filled]
            del self.pending[:filled]
        while filled < len(view):
            if self.socket is not None:
                try:
                    count = await self.socket.recv_into(view[filled:])
                except OSError as exc:
                    raise PeerFailure(f'receiving failed ({type(exc).__name__})') from None
                if not count:
                    raise PeerFailure('the peer closed the connection')
            else:
                data = await self._receive(len(view) - filled)
                count = len(data)
                view[filled:filled + count] = data
            filled += count

    def _next_opaque(self) -> int:
        self.opaque = (self.opaque + 1) % 1_000_000_000
        return self.opaque

    def _done(self) -> None:
        if self.pending:
            raise PeerFailure('the peer sent bytes past the end of its reply')

    async def get(self, key: str, length: int,
                  lease: int = 0) -> tuple[bytes, bytearray] | None | str:
        """(header, data) of the value stored under `key`, which must hold a header and
        exactly `length` bytes, or None when the peer has no such key. The data buffer comes
        from `ufs.block_buffers`; the caller checks the header before trusting either.
        With `lease` (see `get_command`), a miss is WON (this client fetches and fills the
        block) or BUSY (another client does)."""
        opaque = self._next_opaque()
        await self._send(get_command(key, opaque, lease))
        line = await self._line()
        code, size = parse_reply(line, opaque)
        if code == 'EN':
            self._done()
            return None
        if code != 'VA':
            raise PeerFailure(f'{code} to a get')
        flags = line.split()[2:]
        # The empty item memcached keeps for a lease: W, this client's (it asked with `lease`);
        # Z, another client's, whose fill is on its way: BUSY, also for a client that takes no
        # leases itself (`--cluster-fill-queue 0`), which would otherwise refuse it as a block
        if size == 0 and (b'W' in flags or b'Z' in flags):
            end = bytearray(2)
            await self._exactly(memoryview(end))
            if end != b'\r\n':
                raise PeerFailure('a value not ended by CRLF')
            self._done()
            return WON if lease and b'W' in flags else BUSY
        if size != HEADER_SIZE + length:
            # refused before a byte of it is read (a huge size allocates nothing); the caller
            # drops the connection, whose unread value it cannot carry on after
            raise BlockRefused(f'a value of {size} bytes where {HEADER_SIZE + length} were '
                               'expected')
        header = bytearray(HEADER_SIZE)
        await self._exactly(memoryview(header))
        data = new_block_buffer(length)
        await self._exactly(memoryview(data))
        end = bytearray(2)
        await self._exactly(memoryview(end))
        if end != b'\r\n':
            raise PeerFailure('a value not ended by CRLF')
        self._done()
        return bytes(header), data

    async def add(self, key: str, header: bytes, data: Buffer, replace: bool = False) -> bool:
        """Store `header` + `data` under `key`: True when stored, False when the key was
        already there (mode add). Raises `ServerRefused` when the peer refuses the value."""
        opaque = self._next_opaque()
        await self._send(add_command(key, len(header) + len(data), opaque, replace),
                         header, data, b'\r\n')
        code, _ = parse_reply(await self._line(), opaque)
        self._done()
        if code == 'HD':
            return True
        if code == 'NS':
            return False
        raise PeerFailure(f'{code} to a store request')

    async def noop(self) -> None:
        await self._send(NOOP_COMMAND)
        code, _ = parse_reply(await self._line(), None)
        self._done()
        if code != 'MN':
            raise PeerFailure(f'{code} to a no-op')
