"""The cluster tier: the nodes of a job pool their caches in memcached, between each node's own
SSD tier and the store.

`ClusterTier` wraps the store that the block cache fetches from and has the same `read(key,
etag, offset, length)` (cache/fetches.py's `BlockStore`), so the block cache does not know it is
there: a block missing from memory and from the SSD is asked of the one peer that rendezvous
hashing picks for its cluster key (cluster_peers.py); a hit whose header and checksum verify is
returned (cluster_protocol.py); a miss, a timeout, a refused block or a peer that is down falls
through to the store, and the block the store returned is then stored in the cluster off the
reader's path. The block cache puts what `read` returns into memory and on the SSD, as it does
with the store's blocks.

Why memcached, and why this client. memcached 1.6 with extstore is what operators already run
(one per node, LRU, SSD-backed; docs/cluster.md has the measurements against the other engines).
It needs nothing from the engine but get and add. The client is this small trio client of the
meta protocol rather than pymemcache: pymemcache blocks, so every block would cost a worker
thread hand-off (60-100 us each way, the GIL ping-pong with the FUSE loop, and threads abandoned
on timeouts), and it copies values through its own buffers; its timeouts are per socket
operation, not per request. Here a block read is one `mg` on a pooled trio connection with a
deadline for the whole answer, received straight into the block's buffer, under the same strict
framing as the S3 path (ufs/s3_trio.py).

Failure rules. A read waits at most `connect_timeout` for a connection and `read_timeout` for the
whole answer, then reads the store; the peer is then down (circuit breaker, cluster_peers.py) and
skipped without waiting. A block that does not verify is never returned (counted in
`refused_blocks`; one warning per peer) and is replaced in the cluster by the store's bytes.
At most `max_reads` blocks (the store's concurrency) are read from peers at once, and at most 64
connections go to one peer; the wait for either is not bounded separately: every holder is,
and a read that waited its turn does not ask a peer that went down meanwhile.

Fills. A block read from the store is queued for its peer (a bounded queue of `fill_queue`
blocks, emptied by `_FILL_WORKERS` tasks); when the queue is full the fill is dropped, never
waited for. A fill sends the block with `ms` in add mode (a block is the same whoever fills it,
and a block several nodes fill is stored once; set mode over a lease's empty item or a refused
block), under a deadline of 5 x `read_timeout` (the fill timeout). A queued
fill holds a reference to its block: memory for at most `fill_queue` blocks beyond the tiers'.

Cross-node single flight. A block is asked for with the meta protocol's lease (`mg ... N10`):
on a miss memcached keeps an empty item for 10 s and tells one asker that it won (W): that node
reads the store and fills the block (`ms` in set mode, over the empty item); the others (Z) ask
again, 10 ms apart doubling to 100 ms, for at most 2 x `read_timeout`, then read the store
themselves. So nodes that miss the same block at once (every node warming up the same files)
read it from the store once. A node with `fill_queue` 0 never takes a lease (it would not fill).
A winner whose fill is dropped or refused leaves the empty item until it expires: readers of
that block wait that long, then read the store.

Not done (known limitations): no replication: a peer that leaves takes its blocks with it (they
come from the store again).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio
import xxhash

from .cluster_peers import ClusterURL, Peer, PeerSet, parse_cluster_url
from .cluster_protocol import (BUSY, WON, BlockRefused, ClusterError, MetaConnection,
                               PeerFailure, Sealer, ServerRefused, cluster_key, cluster_namespace)
from ..errors import EXIT_USAGE, UserError
from .fetches import BlockStore
from .memory import Block

log = logging.getLogger(__name__)

_FILL_WORKERS = 4
_MAX_IDLE = 16                  # idle connections kept per peer
_MAX_IDLE_SECONDS = 60.0        # an idle connection older than this is closed, not reused
_FILL_TIMEOUT_FACTOR = 5
_LEASE_WAIT_FACTOR = 2
LEASE_SECONDS = 10              # how long a missing block's lease (empty item) lives
_THREAD_HASHING = 256 * 1024    # blocks this large are checked and sealed in worker threads


MIN_SECRET = 16


def read_secret(path: str) -> bytes:
    """The shared secret in `path` (surrounding whitespace dropped, at least 16 bytes); a
    `UserError` (one line, exit 2) when it cannot be read or is too short."""
    try:
        with open(path, 'rb') as f:
            secret = f.read(1 << 16).strip()
    except OSError as exc:
        raise UserError(f'--cluster-secret-file {path}: {exc.strerror}', EXIT_USAGE) from None
    if len(secret) < MIN_SECRET:
        raise UserError(f'--cluster-secret-file {path}: the secret must be at least '
                        f'{MIN_SECRET} bytes (e.g. openssl rand -hex 32)', EXIT_USAGE)
    return secret


class ClusterCounters:
    __slots__ = ('hits', 'misses', 'read_bytes', 'fills', 'fill_bytes', 'fills_dropped',
                 'fill_errors', 'errors', 'timeouts', 'refused_blocks', 'skipped', 'waits',
                 'wait_timeouts')

    def __init__(self) -> None:
        self.hits = 0               # blocks served by a peer, verified
        self.misses = 0             # blocks a peer did not have
        self.read_bytes = 0         # bytes of the blocks served by peers
        self.fills = 0              # blocks stored in the cluster
        self.fill_bytes = 0
        self.fills_dropped = 0      # fills not sent: queue full, or their peer down
        self.fill_errors = 0        # fills that failed (peer failed or refused the value)
        self.errors = 0             # reads that failed: peer failures, timeouts, refused blocks
        self.timeouts = 0           # reads and fills past their deadline (in errors too)
        self.refused_blocks = 0     # blocks that did not verify (in errors too)
        self.skipped = 0            # reads not asked of the cluster: no peer, or peer down
        self.waits = 0              # reads that waited for another node's fetch of the block
        self.wait_timeouts = 0      # of those, reads that gave up waiting (then the store)


class ClusterTier:
    """A `BlockStore` in front of `store`; `run` (in the daemon's nursery) keeps the peer set
    resolved and sends the fills."""

    def __init__(self, store: BlockStore, url: ClusterURL | str, namespace: str, block_size: int,
                 secret: bytes | None = None, connect_timeout: float = 0.1,
                 read_timeout: float = 0.5, refresh: float = 30.0, fill_queue: int = 16,
                 lease: int = LEASE_SECONDS, max_reads: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.url = parse_cluster_url(url) if isinstance(url, str) else url
        self.namespace = namespace
        self.block_size = block_size
        self.sealer = Sealer(secret)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.fill_timeout = read_timeout * _FILL_TIMEOUT_FACTOR
        self.lease_wait = read_timeout * _LEASE_WAIT_FACTOR
        self.refresh_interval = refresh
        # cross-node single flight: a miss leaves an empty item in memcached for this long, and
        # only the node that got it (W) fetches the block; 0 turns it off
        self.lease = lease if fill_queue else 0
        self.peers = PeerSet(self.url, clock)
        self.counters = ClusterCounters()
        self.keyed = secret is not None
        # fill_queue 0: never fill (a node that only reads what others filled)
        self._fill_send, self._fill_receive = trio.open_memory_channel[
            tuple[str, Block, bool, int]](fill_queue)
        self._fill_queue = fill_queue
        self._hashers = trio.CapacityLimiter(8)
        # block reads from peers under way, each with its block's buffer: as many as the store's
        # (--store-concurrency), so that the memory budget's store reads cover them too
        self._reads = trio.CapacityLimiter(max_reads)

    @staticmethod
    def namespace_of(source_identity: str) -> str:
        return cluster_namespace(source_identity)

    # -- the read path --

    async def read(self, key: str, etag: str, offset: int, length: int) -> Block:
        """`length` bytes of version `etag` of `key` from `offset`: from the cluster when its
        peer has the block and it verifies, else from the store (then filled in the cluster)."""
        ckey = cluster_key(self.namespace, key, etag, offset, length, self.block_size)
        peer = self.peers.pick(ckey)
        replace = False         # the fill must overwrite: a refused block, or our lease's item
        if peer is not None:
            admitted = peer.admit()
            if admitted is not False:
                try:
                    found = await self._get(peer, ckey, length, probe=admitted is None)
                    if found is BUSY:
                        found = await self._wait_for_fill(peer, ckey, length)
                except BlockRefused:
                    replace = True
                except Exception:
                    # a bug here must not cost the reader its block: the store still has it
                    log.exception('cluster read of a block from %s failed', peer.name)
                    self.counters.errors += 1
                else:
                    if found is WON:
                        replace = True
                    elif found is not None and not isinstance(found, str):
                        self.counters.hits += 1
                        self.counters.read_bytes += length
                        return found
            else:
                self.counters.skipped += 1
        else:
            self.counters.skipped += 1
        data = await self.store.read(key, etag, offset, length)
        if peer is not None and self._fill_queue:
            self._queue_fill(ckey, data, replace)
        return data

    async def _wait_for_fill(self, peer: Peer, ckey: str, length: int) -> Block | str | None:
        """Another node holds the lease of this block (it is reading it from the store): ask
        again, 10 ms apart doubling to 100 ms, for at most 2 x the read timeout; then the
        store."""
        self.counters.waits += 1
        deadline = trio.current_time() + self.lease_wait
        delay = 0.01
        while trio.current_time() + delay < deadline:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
            if not peer.up:
                return None         # down meanwhile: the store (and no probe taken here)
            found = await self._get(peer, ckey, length, probe=False)
            if found is not BUSY:
                return found
        self.counters.wait_timeouts += 1
        return None

    async def _get(self, peer: Peer, ckey: str, length: int,
                   probe: bool) -> Block | str | None:
        """The verified block from `peer`, or None (a miss, or any failure: counted, logged
        once per state change), or WON / BUSY (a miss whose lease this node got / another node
        has). Raises `BlockRefused` for a value that is not the block."""
        try:
            async with self._reads:
                if not (probe or peer.up):
                    # down while this read waited its turn: skipped, not one more timeout
                    self.counters.skipped += 1
                    return None
                answer = await self._request(peer, self.read_timeout, 'get', ckey, length,
                                             self.lease)
            if isinstance(answer, tuple):
                await self._hashing(self.sealer.check, ckey, *answer)
        except PeerFailure as exc:
            self.counters.errors += 1
            peer.failed(str(exc), probe)
            return None
        except ServerRefused as exc:
            self.counters.errors += 1
            log.debug('cluster peer %s: %s', peer.name, exc)
            peer.succeeded(probe)
            return None
        except BlockRefused as exc:
            peer.succeeded(probe)        # it answers: the block is bad, not the peer
            self.counters.errors += 1
            self.counters.refused_blocks += 1
            if not peer.refused_logged:
                peer.refused_logged = True
                log.warning('refused a block from cluster peer %s (%s); read from the store '
                            'instead (further refused blocks are only counted: '
                            'cluster_refused_blocks)', peer.name, exc)
            raise
        finally:
            if probe and peer.probing:      # cancelled: let a later request probe it
                peer.probing = False
        peer.succeeded(probe)
        if answer is None or answer is WON:
            self.counters.misses += 1
            return answer
        if answer is BUSY:
            return answer
        return answer[1]

    async def _hashing(self, fn: Callable[..., Any], ckey: str, *buffers: Any) -> Any:
        """`fn` (a checksum of a block) in a worker thread when it is a MAC of 256 KiB or
        more: hashlib releases the GIL, so those run beside the trio thread, which they would
        hold for milliseconds per 4 MiB block (HMAC-SHA256: about 0.6 ms/MiB here). An unkeyed
        checksum (XXH3, 0.02 ms/MiB) costs less than the hand-off to a thread."""
        if not self.sealer.keyed or len(buffers[-1]) < _THREAD_HASHING:
            return fn(ckey, *buffers)
        return await trio.to_thread.run_sync(fn, ckey, *buffers, limiter=self._hashers)

    async def _request(self, peer: Peer, timeout: float, what: str, *args: Any) -> Any:
        """One request (a `MetaConnection` method) to `peer`: the connection within the connect
        timeout, the whole answer within `timeout`. A pooled connection that fails is replaced
        once by a new one (a restarted memcached leaves every pooled connection dead). Raises
        `PeerFailure` or `ServerRefused`; the connection is dropped after any error."""
        async with peer.slots:
            connection: MetaConnection | None
            connection, reused = await self._connection(peer)
            try:
                with trio.move_on_after(timeout):
                    try:
                        result = await getattr(connection, what)(*args)
                    except PeerFailure:
                        if not reused:
                            raise
                        connection.close()
                        connection, reused = await self._connect(peer), False
                        result = await getattr(connection, what)(*args)
                    self._release(peer, connection)
                    connection = None
                    return result
                self.counters.timeouts += 1
                raise PeerFailure(f'no complete answer within {timeout * 1000:g} ms')
            finally:
                if connection is not None:
                    connection.close()

    async def _connection(self, peer: Peer) -> tuple[MetaConnection, bool]:
        """(connection, reused): an idle connection to `peer` (newest first), else a new one
        within the connect timeout. Raises `PeerFailure`."""
        now = time.monotonic()
        while peer.idle:
            connection = peer.idle.pop()
            if now - connection.idle_since > _MAX_IDLE_SECONDS or connection.readable():
                connection.close()
                continue
            return connection, True
        return await self._connect(peer), False

    async def _connect(self, peer: Peer) -> MetaConnection:
        with trio.move_on_after(self.connect_timeout):
            try:
                stream = await trio.open_tcp_stream(peer.ip, peer.port)
            except OSError as exc:
                # trio's "all attempts to connect failed" carries the attempts' errors as cause
                cause: BaseException | None = exc.__cause__
                if getattr(cause, 'exceptions', None):         # an exception group
                    cause = cause.exceptions[0]                 # type: ignore[union-attr]
                if not isinstance(cause, OSError):
                    cause = exc
                raise PeerFailure(f'cannot connect: {cause.strerror or cause}') from None
            return MetaConnection(stream)
        self.counters.timeouts += 1
        raise PeerFailure(f'no connection within {self.connect_timeout * 1000:g} ms')

    @staticmethod
    def _release(peer: Peer, connection: MetaConnection) -> None:
        if peer.up and not peer.retired and len(peer.idle) < _MAX_IDLE:
            connection.idle_since = time.monotonic()
            peer.idle.append(connection)
        else:
            connection.close()

    # -- fills --

    def _queue_fill(self, ckey: str, data: Block, replace: bool) -> None:
        # The block's fingerprint as the store returned it: the fill checks the bytes it seals
        # against it, so that a block whose buffer changed meanwhile (a bug: block buffers are
        # reused, ufs/block_buffers.py) is never sealed and served to every node as another
        # block's bytes. XXH3: 0.02 ms of CPU per MiB.
        try:
            self._fill_send.send_nowait((ckey, data, replace, xxhash.xxh3_64_intdigest(data)))
        except trio.WouldBlock:
            self.counters.fills_dropped += 1

    async def _fill_worker(self) -> None:
        async for ckey, data, replace, fingerprint in self._fill_receive:
            try:
                await self._fill(ckey, data, replace, fingerprint)
            except Exception:           # a bug must not end the fills, nor the daemon
                log.exception('storing a block in the cluster failed')
                self.counters.fill_errors += 1
            del data

    async def _fill(self, ckey: str, data: Block, replace: bool, fingerprint: int) -> None:
        peer = self.peers.pick(ckey)        # again: the peer set may have changed meanwhile
        if peer is None:
            self.counters.fills_dropped += 1
            return
        admitted = peer.admit()
        if admitted is False:
            self.counters.fills_dropped += 1
            return
        try:        # from here on, a probe admitted is handed back however this ends
            header = await self._hashing(self.sealer.seal, ckey, data)
            if xxhash.xxh3_64_intdigest(data) != fingerprint:
                # checked after sealing: bytes changed before or while they were sealed stop
                # here, bytes changed while they are sent fail the readers' check of the seal
                log.error('a block changed between its store read and its fill; not stored in '
                          'the cluster (a bug: please report it)')
                self.counters.fill_errors += 1
                return
            stored = await self._request(peer, self.fill_timeout, 'add', ckey, header, data,
                                         replace)
        except PeerFailure as exc:
            self.counters.fill_errors += 1
            peer.failed(str(exc), admitted is None)
            return
        except ServerRefused as exc:
            self.counters.fill_errors += 1
            peer.succeeded(admitted is None)
            if 'too large' in str(exc) and not peer.too_large_logged:
                peer.too_large_logged = True
                log.warning('cluster peer %s refuses blocks of %d bytes as too large: start '
                            'memcached with -I larger than the block size (e.g. -I %dm)',
                            peer.name, len(header) + len(data),
                            max(2, 2 * math.ceil(self.block_size / (1 << 20))))
            else:
                log.debug('cluster peer %s did not store a block: %s', peer.name, exc)
            return
        finally:
            if admitted is None and peer.probing:
                peer.probing = False
        peer.succeeded(admitted is None)
        if stored:
            self.counters.fills += 1
            self.counters.fill_bytes += len(data)

    # -- background --

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve the peers (again every `refresh_interval`), probe them, send the fills."""
        async with trio.open_nursery() as nursery:
            for _ in range(_FILL_WORKERS):
                nursery.start_soon(self._fill_worker)
            try:
                await self.peers.refresh()
                await self._probe_all()
            except Exception:           # a bug must not end the daemon: reads use the store
                log.exception('resolving the cluster peers failed')
            self._announce()
            task_status.started()
            while True:
                await trio.sleep(self.refresh_interval)
                try:
                    await self.peers.refresh()
                    await self._probe_all(only_down=True)
                except Exception:       # a bug must not end the daemon: the peers stay as were
                    log.exception('refreshing the cluster peers failed')

    def _announce(self) -> None:
        peers = self.peers.peers
        up = sum(peer.up for peer in peers)
        if not peers or not up:
            log.warning('cluster tier %s: no peer answers (%d known); blocks come from the '
                        'store until one does', self.url, len(peers))
        else:
            log.info('cluster tier %s: %d peers, %d answering; blocks checked %s', self.url,
                     len(peers), up, 'with the shared secret' if self.keyed
                     else 'without a secret (integrity only)')

    async def _probe_all(self, only_down: bool = False) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.peers.peers:
                if only_down and peer.up:
                    continue
                nursery.start_soon(self._probe, peer)

    async def _probe(self, peer: Peer) -> None:
        admitted = peer.admit()
        if admitted is False:
            return
        try:
            await self._request(peer, self.read_timeout, 'noop')
        except ClusterError as exc:
            peer.failed(str(exc), admitted is None)
        else:
            peer.succeeded(admitted is None)
        finally:
            if admitted is None and peer.probing:
                peer.probing = False

    def stats(self) -> dict[str, Any]:
        """The cluster's counters for `cachefs stats` and the metrics (read by the metrics
        thread too: plain ints and a tuple replaced whole)."""
        c = self.counters
        peers = self.peers.peers
        return {
            'cluster_hits': c.hits,
            'cluster_misses': c.misses,
            'cluster_read_bytes': c.read_bytes,
            'cluster_fills': c.fills,
            'cluster_fill_bytes': c.fill_bytes,
            'cluster_fills_dropped': c.fills_dropped,
            'cluster_fill_errors': c.fill_errors,
            'cluster_errors': c.errors,
            'cluster_timeouts': c.timeouts,
            'cluster_refused_blocks': c.refused_blocks,
            'cluster_skipped': c.skipped,
            'cluster_waits': c.waits,
            'cluster_wait_timeouts': c.wait_timeouts,
            'cluster_fill_queue': self._fill_send.statistics().current_buffer_used,
            'cluster_peers': len(peers),
            'cluster_peers_up': sum(peer.up for peer in peers),
            'cluster_peer_states': {peer.name: 'up' if peer.up else 'down' for peer in peers},
        }
