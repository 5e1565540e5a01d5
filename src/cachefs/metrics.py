"""Prometheus metrics of a mount (`--metrics-addr HOST:PORT`), and the latency percentiles that
`cachefs stats` prints: both computed from the same counters and FUSE latency histograms.

The HTTP server runs in the daemon process, in prometheus_client's own thread. A scrape calls
the daemon's `stats()` from that thread: it only reads plain ints and lengths, which is safe
under the GIL, and never changes anything. The per-operation latency dict is mutated on the trio
thread, so the collector copies it (`dict(...)`, `list(buckets)`) before using it, and derives
each histogram's count from its buckets, so that the exposed count always equals the +Inf bucket.

Only counters and sizes are exported, never an option value: endpoint URLs and credentials
cannot appear in a metric. The source URL (bucket and prefix, or a local folder) is a label of
`cachefs_info`.
"""

import logging
import math

from .config import parse_address
from .errors import EXIT_USAGE, UserError

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the FUSE latency histogram buckets; the last bucket is open.
# fuse/operations.py fills the histogram; defined here so that this module (which `cachefs stats`
# imports for its percentiles) never imports the FUSE layer, and with it pyfuse3 and trio.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)

# (metric name, stats key, help); counters get prometheus_client's `_total` suffix.
COUNTERS = (
    ('cachefs_store_requests', 'store_requests', 'Ranged reads sent to the store.'),
    ('cachefs_store_bytes', 'store_bytes', 'Bytes read from the store.'),
    ('cachefs_store_retries', 'store_retries', 'Store requests retried after a failure.'),
    ('cachefs_store_errors', 'store_errors', 'Store reads that failed for good (EIO and kin).'),
    ('cachefs_cache_misses', 'misses', 'Block reads that had to go to the store.'),
    ('cachefs_shared_fetches', 'shared_fetches',
     'Block reads that waited for a fetch already in flight.'),
    ('cachefs_prefetches', 'prefetches', 'Blocks read ahead of sequential readers.'),
    ('cachefs_prefetched_bytes', 'prefetched_bytes', 'Bytes read ahead of sequential readers.'),
    ('cachefs_memory_evictions', 'memory_evictions', 'Blocks evicted from the memory tier.'),
    ('cachefs_disk_evictions', 'evictions', 'Block files evicted from the SSD tier.'),
    ('cachefs_disk_writes', 'disk_writes', 'Block files written to the SSD tier.'),
    ('cachefs_disk_write_bytes', 'disk_write_bytes', 'Bytes written to the SSD tier.'),
    ('cachefs_disk_skipped_writes', 'disk_skipped_writes',
     'Blocks not written to the SSD tier (full with eviction none, or writes queued too deep).'),
    ('cachefs_disk_write_errors', 'disk_write_errors', 'Failed SSD tier writes.'),
    ('cachefs_disk_corrupt_blocks', 'disk_corrupt_blocks',
     'Block files dropped because they failed their checksum.'),
    # the cluster tier (--cluster), present only when it is on
    ('cachefs_cluster_hits', 'cluster_hits', 'Blocks served by a cluster peer, verified.'),
    ('cachefs_cluster_misses', 'cluster_misses', 'Blocks a cluster peer did not hold.'),
    ('cachefs_cluster_read_bytes', 'cluster_read_bytes', 'Bytes of blocks served by peers.'),
    ('cachefs_cluster_fills', 'cluster_fills', 'Blocks stored in the cluster by this node.'),
    ('cachefs_cluster_fill_bytes', 'cluster_fill_bytes', 'Bytes stored in the cluster.'),
    ('cachefs_cluster_fills_dropped', 'cluster_fills_dropped',
     'Blocks not stored in the cluster: fill queue full, or their peer down.'),
    ('cachefs_cluster_fill_errors', 'cluster_fill_errors',
     'Fills that failed (peer failed, or refused the value).'),
    ('cachefs_cluster_errors', 'cluster_errors',
     'Cluster reads that failed (peer failures, timeouts, refused blocks); read from the store.'),
    ('cachefs_cluster_timeouts', 'cluster_timeouts',
     'Cluster requests past their deadline (connect, read or fill).'),
    ('cachefs_cluster_refused_blocks', 'cluster_refused_blocks',
     'Blocks from peers refused: bad header, length or checksum.'),
    ('cachefs_cluster_skipped', 'cluster_skipped',
     'Block reads not asked of the cluster: no peer, or their peer down.'),
    ('cachefs_cluster_waits', 'cluster_waits',
     'Block reads that waited for another node reading the same block from the store.'),
    ('cachefs_cluster_wait_timeouts', 'cluster_wait_timeouts',
     'Of those, reads that stopped waiting and read the store themselves.'),
)
GAUGES = (
    ('cachefs_files', 'files', 'Files in the mounted tree.'),
    ('cachefs_dirs', 'dirs', 'Folders in the mounted tree.'),
    ('cachefs_dataset_bytes', 'dataset_bytes', 'Total size of the files in the mounted tree.'),
    ('cachefs_listing_generation', 'listing_generation', 'Refreshes of the listing since mount.'),
    ('cachefs_listed_at_seconds', 'listed_at', 'Unix time of the listing in use.'),
    ('cachefs_uptime_seconds', 'uptime_s', 'Seconds since the daemon started.'),
    ('cachefs_memory_blocks', 'memory_blocks', 'Blocks held by the memory tier.'),
    ('cachefs_store_requests_in_flight', 'store_in_flight',
     'Store calls under way, waits between retries included.'),
    ('cachefs_disk_writes_pending', 'disk_writes_pending',
     'Blocks not yet on the SSD tier (held in memory, queued or being written).'),
    ('cachefs_disk_index_ready', 'disk_index_ready',
     '1 once the block files found at start are indexed.'),
    ('cachefs_disk_offline', 'disk_offline',
     '1 while the SSD tier is offline (a disk call missed its deadline; reads go to the store).'),
    ('cachefs_prefetch_in_flight_bytes', 'prefetch_in_flight_bytes',
     'Bytes of the prefetches under way.'),
    ('cachefs_prefetch_memory_used_bytes', 'prefetch_memory_used_bytes',
     'Prefetch budget in use: prefetches under way plus prefetched blocks not yet read.'),
    ('cachefs_prefetch_memory_capacity_bytes', 'prefetch_memory_capacity_bytes',
     'The prefetch budget (--prefetch-memory).'),
    ('cachefs_fuse_retired_nodes', 'fuse_retired_nodes',
     'Nodes of replaced listings still held because the kernel refers to them.'),
    ('cachefs_cluster_peers', 'cluster_peers', 'Peers of the cluster tier (resolved).'),
    ('cachefs_cluster_peers_up', 'cluster_peers_up', 'Cluster peers not skipped as down.'),
    ('cachefs_cluster_fill_queue', 'cluster_fill_queue',
     'Blocks waiting to be stored in the cluster.'),
)
TIERS = (('memory', 'memory_hits', 'memory_used_bytes', 'memory_capacity_bytes'),
         ('disk', 'disk_hits', 'disk_used_bytes', 'disk_capacity_bytes'))
# (tier label, stats key) of the bytes answered to reads, by the tier that served them.
READ_TIERS = (('memory', 'memory_read_bytes'), ('disk', 'disk_read_bytes'),
              ('store', 'store_read_bytes'))


def latency_snapshot(latency):
    """{op: (seconds, [count per bucket])} copied from `Operations.latency`, which the trio
    thread keeps changing: copy the dict first, then each bucket list."""
    return {op: (entry.seconds, list(entry.buckets)) for op, entry in dict(latency).items()}


def percentile(buckets, bounds, q):
    """The q-quantile (0..1) of a histogram: `buckets` holds the count per bucket, bucket i
    ending at bounds[i] (the last one is open). Interpolates linearly inside the bucket, as
    Prometheus' histogram_quantile does; a quantile in the open bucket is `inf`. None when
    the histogram is empty."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(buckets):
        if count and below + count >= rank:
            if index >= len(bounds):
                return math.inf
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * max(rank - below, 0) / count
        below += count
    return math.inf


def collect_families(stats, latency, bounds):
    """The metric families of one scrape, from a stats dict and a latency snapshot."""
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily, InfoMetricFamily)
    from prometheus_client.utils import floatToGoString

    from . import __version__

    info = InfoMetricFamily('cachefs', 'The mounted source and the cache policy.')
    info.add_metric([], {'source': str(stats.get('source', '')),
                         'eviction_policy': str(stats.get('eviction_policy', '')),
                         'version': __version__})
    yield info
    for name, key, text in COUNTERS:
        if key in stats:
            yield CounterMetricFamily(name, text, value=stats[key])
    for name, key, text in GAUGES:
        if key in stats:
            yield GaugeMetricFamily(name, text, value=float(stats[key]))
    hits = CounterMetricFamily('cachefs_cache_hits', 'Block reads served by a cache tier.',
                               labels=['tier'])
    used = GaugeMetricFamily('cachefs_cache_used_bytes', 'Bytes held by a cache tier.',
                             labels=['tier'])
    capacity = GaugeMetricFamily('cachefs_cache_capacity_bytes', 'Capacity of a cache tier.',
                                 labels=['tier'])
    for tier, hit_key, used_key, capacity_key in TIERS:
        hits.add_metric([tier], stats.get(hit_key, 0))
        used.add_metric([tier], stats.get(used_key, 0))
        capacity.add_metric([tier], stats.get(capacity_key, 0))
    yield from (hits, used, capacity)
    if any(key in stats for _, key in READ_TIERS):
        served = CounterMetricFamily(
            'cachefs_read_bytes', 'Bytes answered to FUSE reads, by the tier that served them '
            '(reads served by the kernel page cache never reach the daemon).', labels=['tier'])
        for tier, key in READ_TIERS:
            served.add_metric([tier], stats.get(key, 0))
        yield served
    if 'cluster_peer_states' in stats:
        peer_up = GaugeMetricFamily('cachefs_cluster_peer_up',
                                    '1 while a cluster peer answers, 0 while it is skipped.',
                                    labels=['peer'])
        for peer, state in sorted(stats['cluster_peer_states'].items()):
            peer_up.add_metric([peer], 1.0 if state == 'up' else 0.0)
        yield peer_up
    lookups = stats.get('hits', 0) + stats.get('misses', 0)
    yield GaugeMetricFamily('cachefs_cache_hit_ratio',
                            'Block reads served by a cache tier, of all block reads since mount.',
                            value=stats.get('hits', 0) / lookups if lookups else 0.0)
    histogram = HistogramMetricFamily('cachefs_fuse_op_latency_seconds',
                                      'Time to answer a FUSE request, per operation.',
                                      labels=['op'])
    for op, (seconds, buckets) in sorted(latency.items()):
        cumulative, points = 0, []
        for bound, count in zip(bounds, buckets):
            cumulative += count
            points.append((floatToGoString(bound), cumulative))
        points.append(('+Inf', sum(buckets)))
        histogram.add_metric([op], points, sum_value=seconds)
    yield histogram


class _Collector:
    def __init__(self, stats, latency, bounds):
        self._stats = stats
        self._latency = latency
        self._bounds = bounds

    def collect(self):
        try:
            stats = self._stats()
        except Exception:       # a scrape must never hurt the daemon; log and export nothing
            log.exception('metrics: could not read the counters')
            return
        yield from collect_families(stats, latency_snapshot(self._latency), self._bounds)


class MetricsServer:
    """prometheus_client's HTTP server on its own thread; `stop()` ends it."""

    def __init__(self, server, thread, address):
        self._server = server
        self._thread = thread
        self.address = address

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        log.info('metrics server on %s stopped', self.address)


def start_metrics_server(address, stats, latency):
    """Serve /metrics on `address` (HOST:PORT). `stats` is a callable returning the daemon's
    stats dict; `latency` is `Operations.latency` ({op: OpLatency}), read on every scrape."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, latency, LATENCY_BUCKETS))
    # process_resident_memory_bytes and kin (read from /proc/self on each scrape): the memory
    # alert compares the resident memory with the memory tier plus the prefetch budget
    ProcessCollector(registry=registry)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f'cannot serve metrics on {address}: {exc.strerror or exc}',
                        EXIT_USAGE) from None
    thread.name = 'cachefs-metrics'
    log.info('serving Prometheus metrics on http://%s/metrics', address)
    return MetricsServer(server, thread, address)
