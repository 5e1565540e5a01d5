"""What a mount reports: `cachefs stats` for humans (hit ratio, tiers, latency percentiles) and
Prometheus metrics on `--metrics-addr`, both from the daemon's counters."""

import math
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.fuse.operations import LATENCY_BUCKETS, OpLatency
from cachefs.metrics import _Collector, percentile
from conftest import drop_page_cache, free_port, is_mounted, live_metrics, run_cachefs

BOUNDS = (0.001, 0.01, 0.1)


def test_percentile_interpolates_within_the_bucket():
    buckets = [0, 10, 0, 0]                       # ten requests between 1 ms and 10 ms
    assert percentile(buckets, BOUNDS, 0.5) == pytest.approx(0.0055)
    assert percentile(buckets, BOUNDS, 0.9) == pytest.approx(0.0091)
    assert percentile([10, 0, 0, 0], BOUNDS, 0.5) == pytest.approx(0.0005)   # from zero


def test_percentile_in_the_open_bucket_is_infinite_and_of_nothing_is_none():
    assert percentile([1, 0, 0, 99], BOUNDS, 0.5) == math.inf
    assert percentile([0, 0, 0, 0], BOUNDS, 0.5) is None


def fake_stats():
    return {'source': 's3://bucket/train', 'eviction_policy': 'lru', 'store_requests': 7,
            'hits': 3, 'misses': 1, 'memory_hits': 2, 'disk_hits': 1, 'memory_used_bytes': 10,
            'memory_capacity_bytes': 100, 'disk_used_bytes': 0, 'disk_capacity_bytes': 0,
            'files': 5}


def scrape(stats, latency):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, latency, LATENCY_BUCKETS))
    return generate_latest(registry).decode()


def test_collector_exports_counters_and_cumulative_latency_buckets():
    read = OpLatency()
    for seconds in (0.00005, 0.002, 0.002, 20.0):
        read.record(seconds)
    text = scrape(fake_stats, {'read': read})
    assert 'cachefs_store_requests_total 7.0' in text
    assert 'cachefs_cache_hits_total{tier="memory"} 2.0' in text
    assert 'cachefs_fuse_op_latency_seconds_bucket{le="0.0001",op="read"} 1.0' in text
    assert 'cachefs_fuse_op_latency_seconds_bucket{le="0.0025",op="read"} 3.0' in text
    assert 'cachefs_fuse_op_latency_seconds_bucket{le="10.0",op="read"} 3.0' in text
    assert 'cachefs_fuse_op_latency_seconds_bucket{le="+Inf",op="read"} 4.0' in text
    assert 'cachefs_fuse_op_latency_seconds_count{op="read"} 4.0' in text


def test_a_failing_stats_callable_gives_an_empty_scrape_not_an_error():
    def broken():
        raise AttributeError('not serving yet')
    assert 'cachefs_' not in scrape(broken, {})



@pytest.mark.fuse
def test_metrics_endpoint_serves_counters_and_read_latency(s3_source, mounter):
    port = free_port()
    mounted = mounter.mount(s3_source, '--metrics-addr', f'127.0.0.1:{port}')
    (mounted.path / 'one_block.bin').read_bytes()
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as response:
        text = response.read().decode()
    requests = next(line for line in text.splitlines()
                    if line.startswith('cachefs_store_requests_total '))
    assert float(requests.split()[1]) >= 1
    assert any(line.startswith('cachefs_fuse_op_latency_seconds_bucket{')
               and 'op="read"' in line for line in text.splitlines())
    assert f'source="{s3_source.url}"' in text
    assert s3_source.env['AWS_SECRET_ACCESS_KEY'] not in text
    assert s3_source.args[1] not in text      # the endpoint URL


@pytest.mark.fuse
def test_metrics_port_in_use_fails_the_mount_with_one_line(local_source, tmp_path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        address = '127.0.0.1:%d' % taken.getsockname()[1]
        mountpoint = tmp_path / 'mnt'
        mountpoint.mkdir()
        result = run_cachefs('mount', local_source.url, mountpoint, '--cache-dir',
                             tmp_path / 'cache', '--metrics-addr', address)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'cachefs: error: cannot serve metrics on {address}: Address already in use']
    assert not is_mounted(mountpoint)


def test_bad_metrics_address_is_a_usage_error(tmp_path):
    result = run_cachefs('mount', tmp_path, tmp_path, '--metrics-addr', 'localhost')
    assert result.returncode == 2 and 'HOST:PORT' in result.stderr


@pytest.mark.fuse
def test_stats_for_humans_show_ratio_tiers_prefetch_and_latency_percentiles(local_source,
                                                                            mounter):
    mounted = mounter.mount(local_source)
    (mounted.path / 'five_and_a_half_blocks.bin').read_bytes()
    result = run_cachefs('stats', mounted.path)
    assert result.returncode == 0, result.stderr
    lines = {line[:16].strip(): line[16:] for line in result.stdout.splitlines()
             if line[:16].strip()}
    assert lines['hit ratio'].endswith('shared a fetch)')
    assert ' in ' in lines['from the store'] and 'retries' in lines['from the store']
    assert 'errors' in lines['from the store']
    assert 'block reads' in lines['from the cache']
    assert 'read ahead' in lines['prefetch']
    assert '%' in lines['memory tier'] and '%' in lines['SSD tier']
    assert lines['latency'].split() == ['op', 'count', 'p50', 'p90', 'p99']
    read = next(line.split() for line in result.stdout.splitlines()
                if line.split()[:1] == ['read'])
    assert int(read[1]) >= 1 and all(cell[-2:] in ('us', 'ms') or cell.endswith('s')
                                     for cell in read[2:])
    assert '"fuse_ops"' in run_cachefs('stats', '--json', mounted.path).stdout


def samples(text):
    """{(sample name, labels as a sorted tuple): value} of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_live(port):
    return samples(live_metrics(port))


def test_collector_exports_bytes_read_by_tier_and_the_ssd_tier_state():
    def stats():
        return fake_stats() | {'memory_read_bytes': 5, 'disk_read_bytes': 6,
                               'store_read_bytes': 7, 'disk_offline': True,
                               'fuse_retired_nodes': 2, 'prefetch_in_flight_bytes': 8}
    found = samples(scrape(stats, {}))
    assert [found[('cachefs_read_bytes_total', (('tier', tier),))]
            for tier in ('memory', 'disk', 'store')] == [5, 6, 7]
    assert found[('cachefs_disk_offline', ())] == 1
    assert found[('cachefs_fuse_retired_nodes', ())] == 2
    assert found[('cachefs_prefetch_in_flight_bytes', ())] == 8


@pytest.mark.fuse
def test_bytes_read_by_tier_add_up_to_what_the_daemon_answered(local_source, mounter):
    """An SSD epoch, a store read and a memory read of the same mount, each counted in full in
    its tier (no prefetch: a reader's own fetch goes to the memory tier)."""
    from_disk, other = 'five_and_a_half_blocks.bin', 'one_block_plus_one.bin'
    first = mounter.mount(local_source, '--prefetch-window', '0')
    (first.path / from_disk).read_bytes()
    mounter.umount(first)                   # writes its blocks to the SSD
    drop_page_cache()
    port = free_port()
    mounted = mounter.mount(local_source, '--prefetch-window', '0',
                            '--metrics-addr', f'127.0.0.1:{port}')
    disk_size = len((mounted.path / from_disk).read_bytes())
    other_size = len((mounted.path / other).read_bytes())
    drop_page_cache()
    assert len((mounted.path / other).read_bytes()) == other_size
    found = scrape_live(port)
    by_tier = {tier: found[('cachefs_read_bytes_total', (('tier', tier),))]
               for tier in ('memory', 'disk', 'store')}
    assert by_tier == {'memory': other_size, 'disk': disk_size, 'store': other_size}
    assert found[('cachefs_disk_offline', ())] == 0
    assert found[('cachefs_fuse_retired_nodes', ())] == 0
