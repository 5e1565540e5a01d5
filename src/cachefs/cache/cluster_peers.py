"""The cluster's peers: the `--cluster` URL, its resolution into peer addresses, rendezvous
hashing of blocks onto peers, and each peer's circuit breaker.

The URL. `memcached://HOST[:PORT][,HOST[:PORT]...]` (port 11211 by default; IPv6 in brackets).
One name that resolves to every node (a Kubernetes headless Service) or a list of addresses or
names. Every name is resolved again every `--cluster-refresh`; a name that fails to resolve keeps
its last addresses (none at mount: a warning, and reads go to the store until it resolves); a
name's IPv4 addresses are used when it has any (one peer per dual-stack node), else its IPv6.

Rendezvous (highest random weight) hashing. A block goes to the peer whose BLAKE2b weight of
(peer address, cluster key) is highest. A peer is named by its resolved `IP:PORT`, so that every
node, whatever name it was given, picks the same peer for a block. Adding a peer moves to it only
the blocks it now wins (about 1/N of them), removing one moves only its own blocks, and no table
of virtual nodes is kept. Cost: one small hash per peer per block read, nothing next to a block.

Circuit breaker. A peer that fails a request (connection refused or reset, a timeout, a garbled
answer) is down: it is skipped, and its blocks come from the store, for 5 s, then one request
probes it (the others keep skipping it meanwhile); a failed probe doubles the wait, up to 60 s;
a probe that succeeds brings it back. One WARNING per change of state (down, back), none per
block. Peers are probed at each refresh too, so that one no read asked for is seen back.
Everything here runs on the trio thread; `Peer.up` is read by the metrics thread (a plain bool).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from .cluster_protocol import MetaConnection

log = logging.getLogger(__name__)

DEFAULT_PORT = 11211
# (host, port) -> [(ip, port)]: a stand-in for DNS in tests (raises OSError when it fails)
Resolver = Callable[[str, int], Iterable[tuple[str, int]]]
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 60.0
RESOLVE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ClusterURL:
    scheme: str
    hosts: tuple[tuple[str, int], ...]      # (host or IP, port), as given

    def __str__(self) -> str:
        return f'{self.scheme}://' + ','.join(f'{_host_text(h)}:{p}' for h, p in self.hosts)


def _host_text(host: str) -> str:
    return f'[{host}]' if ':' in host else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_LABEL = r'(?!-)[A-Za-z0-9-]{1,63}(?<!-)'
_HOST_NAME = re.compile(rf'{_LABEL}(?:\.{_LABEL})*\.?')


def parse_cluster_url(text: str) -> ClusterURL:
    """`memcached://HOST[:PORT][,HOST[:PORT]...]`; ValueError with a one-line message."""
    text = str(text).strip()
    scheme, sep, rest = text.partition('://')
    example = '(example: memcached://cachefs-cache.ns.svc:11211 or memcached://10.0.0.1,10.0.0.2)'
    if not sep:
        raise ValueError(f'not a cluster URL: {text!r} {example}')
    if scheme != 'memcached':
        raise ValueError(f'unknown cluster engine {scheme!r}: only memcached:// is supported')
    if any(c in rest for c in '/?#@'):
        raise ValueError('a cluster URL holds only HOST[:PORT] entries, separated by commas (no '
                         f'path, query or user) {example}')
    hosts = []
    for entry in rest.split(','):
        entry = entry.strip()
        if not entry:
            raise ValueError(f'an empty host in the cluster URL {example}')
        if entry.startswith('['):
            host, bracket, port_text = entry[1:].partition(']')
            if not bracket or (port_text and not port_text.startswith(':')):
                raise ValueError(f'a malformed IPv6 address in the cluster URL: {entry!r}')
            port_text = port_text[1:]
            if not _is_ip(host) or ':' not in host:
                raise ValueError(f'not an IPv6 address: {host!r}')
        else:
            host, colon, port_text = entry.partition(':')
            if colon and not port_text:
                raise ValueError(f'a host with an empty port in the cluster URL: {entry!r}')
            if not _HOST_NAME.fullmatch(host) or len(host) > 253:
                raise ValueError(f'not a host name or address: {host!r}')
        port = DEFAULT_PORT
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f'not a port (1 to 65535): {port_text!r}')
            port = int(port_text)
        if (host, port) not in hosts:
            hosts.append((host, port))
    return ClusterURL(scheme, tuple(hosts))


def peer_name(ip: str, port: int) -> str:
    return f'{_host_text(ip)}:{port}'


def _weight(name: str, cluster_key: str) -> int:
    digest = hashlib.blake2b(f'{name}\0{cluster_key}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'big')


def rendezvous(names: Iterable[str], cluster_key: str) -> str | None:
    """The name (of `names`) with the highest weight for `cluster_key`; None when empty."""
    best, best_weight = None, -1
    for name in names:
        weight = _weight(name, cluster_key)
        if weight > best_weight or (weight == best_weight and best is not None and name > best):
            best, best_weight = name, weight
    return best


class Peer:
    """One memcached node: its address, its idle connections and its circuit breaker."""

    __slots__ = ('name', 'ip', 'port', 'up', 'down_until', 'backoff', 'probing', 'idle',
                 'slots', 'refused_logged', 'too_large_logged', 'retired', '_clock')

    def __init__(self, ip: str, port: int, clock: Callable[[], float] = time.monotonic,
                 max_connections: int = 64) -> None:
        self.ip = ip
        self.port = port
        self.name = peer_name(ip, port)
        self.up = True              # until a request fails
        self.down_until = 0.0
        self.backoff = 0.0
        self.probing = False
        self.idle: list[MetaConnection] = []
        self.slots = trio.CapacityLimiter(max_connections)
        self.refused_logged = False     # one warning for the first block refused from it
        self.too_large_logged = False   # one warning when it refuses items as too large
        self.retired = False            # no longer resolved: keeps no idle connection
        self._clock = clock

    def admit(self) -> bool | None:
        """Whether a request may go to this peer now: True (up), None (down, and this request
        probes it: the caller must report its outcome), False (down: skip it)."""
        if self.up:
            return True
        if self.probing or self._clock() < self.down_until:
            return False
        self.probing = True
        return None

    def succeeded(self, probe: bool) -> None:
        """A request to this peer succeeded (`probe`: the one admitted while it was down; a
        request sent before it went down and answered since does not bring it back)."""
        if not self.up and not probe:
            return
        if not self.up:
            log.warning('cluster peer %s answers again: its blocks are read from it again',
                        self.name)
        self.up = True
        self.probing = False
        self.backoff = 0.0

    def failed(self, reason: str, probe: bool) -> None:
        """A request to this peer failed (`probe`: the one request admitted while it was down)."""
        if self.up:
            self.up = False
            self.backoff = FIRST_BACKOFF
            log.warning('cluster peer %s is down (%s): its blocks come from the store, and it '
                        'is tried again in %gs', self.name, reason, self.backoff)
        elif probe:
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            log.debug('cluster peer %s still down (%s); next try in %gs', self.name, reason,
                      self.backoff)
        else:
            return      # a request sent before it went down: changes nothing
        self.probing = False
        self.down_until = self._clock() + self.backoff
        self.close_idle()

    def close_idle(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class PeerSet:
    """The peers of the cluster URL, resolved again by `refresh`; states survive a refresh for
    the addresses still there. `peers` is a tuple replaced whole (the metrics thread reads it)."""

    def __init__(self, url: ClusterURL, clock: Callable[[], float] = time.monotonic,
                 max_connections: int = 64) -> None:
        self.url = url
        self._clock = clock
        self._max_connections = max_connections
        self.peers: tuple[Peer, ...] = ()
        self._by_name: dict[str, Peer] = {}
        self._names: tuple[str, ...] = ()
        self._resolved: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}
        self._unresolved: set[str] = set()      # names whose last resolution failed
        # addresses given as IPs need no resolver: usable before the first refresh
        self._install([(h, p) for h, p in url.hosts if _is_ip(h)])

    def _install(self, addresses: Iterable[tuple[str, int]]) -> None:
        peers = []
        for ip, port in sorted(set(addresses)):
            name = peer_name(ip, port)
            peer = self._by_name.get(name) or Peer(ip, port, self._clock, self._max_connections)
            peers.append(peer)
        old = {peer.name for peer in self.peers}
        new = {peer.name for peer in peers}
        for name in old - new:
            self._by_name[name].retired = True
            self._by_name[name].close_idle()
        if old and old != new:
            log.info('cluster peers: %d (added %s, removed %s)', len(peers),
                     ', '.join(sorted(new - old)) or 'none', ', '.join(sorted(old - new)) or 'none')
        self._by_name = {peer.name: peer for peer in peers}
        self._names = tuple(peer.name for peer in peers)
        self.peers = tuple(peers)

    async def refresh(self, resolve: Resolver | None = None) -> None:
        """Resolve every name of the URL again (a name that fails keeps its last addresses)."""
        addresses: list[tuple[str, int]] = []
        for host, port in self.url.hosts:
            if _is_ip(host):
                addresses.append((host, port))
                continue
            try:
                found = await _resolve(host, port, resolve)
            except (OSError, UnicodeError) as exc:
                exc = exc if isinstance(exc, OSError) else OSError(str(exc))
                if host not in self._unresolved:
                    self._unresolved.add(host)
                    log.warning('cannot resolve cluster host %s (%s); %s', host,
                                exc.strerror or exc,
                                'keeping its last addresses' if self._resolved.get((host, port))
                                else 'its blocks come from the store until it resolves')
                found = self._resolved.get((host, port), ())
            else:
                if host in self._unresolved:
                    self._unresolved.discard(host)
                    log.warning('cluster host %s resolves again (%d addresses)', host,
                                len(found))
                self._resolved[(host, port)] = found
            addresses.extend(found)
        self._install(addresses)

    def pick(self, cluster_key: str) -> Peer | None:
        """The peer that holds `cluster_key` (rendezvous hashing), or None without peers."""
        name = rendezvous(self._names, cluster_key)
        return None if name is None else self._by_name[name]


async def _resolve(host: str, port: int,
                   resolve: Resolver | None) -> tuple[tuple[str, int], ...]:
    if resolve is not None:         # tests
        return tuple(resolve(host, port))
    with trio.move_on_after(RESOLVE_TIMEOUT):
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # IPv4 when the name has any: a dual-stack node would otherwise count as two peers,
        # one of them down where memcached listens on IPv4 only
        v4 = {(str(info[4][0]), port) for info in infos if info[0] == socket.AF_INET}
        return tuple(sorted(v4 or {(str(info[4][0]), port) for info in infos}))
    raise OSError(f'no answer from the resolver within {RESOLVE_TIMEOUT:g}s')
