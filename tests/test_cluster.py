"""The cluster tier on the three-node rig (tests/support/cluster_rig.py): three "nodes" (network
namespaces), each with its own memcached and its own cachefs mount, reading one dataset from a
far store (the session's SeaweedFS) behind a proxy that counts what the store sends.

Sizes are small (a dataset of about 50 MiB in 1 MiB blocks; each node's SSD and memory tiers
far smaller than it, prefetch off so that prefetched blocks do not stand in for a tier); the
full-size figures are bench/cluster.py's. Every file of every epoch is checked by sha256.
"""

import random
import re
import threading
import uuid

import pytest

from conftest import BLOCK_SIZE, S3_BUCKET, drop_page_cache, sha256_of, wait_until, write_tree
from cachefs.demo.seaweed import upload_tree
from support import cluster_rig
from support.cluster_rig import ClusterRig

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(cluster_rig.unavailable() is not None,
                                 reason=cluster_rig.unavailable() or '')]

NODES = 3
# each node: 4 MiB of memory tier and 8 MiB of SSD tier against a dataset of ~50 MiB
NODE_TIERS = ('--memory-cache-size', '4M', '--cache-size', '8M', '--prefetch-window', '0')


@pytest.fixture(scope='module')
def dataset(seaweed, tmp_path_factory):
    """~50 MiB in files of 1-6 blocks, some with a partial last block, under a prefix of its
    own in the session's bucket; (url prefix, manifest)."""
    rng = random.Random(14)
    files = {f'shard-{i:02d}.bin': rng.randbytes(int(BLOCK_SIZE * rng.choice((1, 2.5, 4, 6))))
             for i in range(14)}
    root = tmp_path_factory.mktemp('cluster-data')
    manifest = write_tree(root, files)
    prefix = f'cluster-{uuid.uuid4().hex[:8]}'
    seaweed.create_bucket(S3_BUCKET)
    upload_tree(seaweed.client(), S3_BUCKET, prefix + '/', root)
    return prefix, manifest


@pytest.fixture
def rig(tmp_path, request):
    rig = ClusterRig(tmp_path / 'rig', nodes=NODES, log_dir=tmp_path)
    # the mounts go before the daemon logs are checked (support/checklogs.py)
    request.config.pluginmanager.get_plugin('support.checklogs').stop_before_check(
        request.node, lambda: [m.unmount() for node in rig.nodes for m in node.mounts])
    with rig:
        yield rig
    assert rig.leftovers() == []


def mount_all(rig, seaweed, dataset, proxy, *extra, engines=True):
    prefix, _ = dataset
    if engines:
        for node in rig.nodes:
            node.start_memcached(memory='64M', disk='128M')
    url = 'memcached://' + ','.join(f'{node.ip}:{cluster_rig.MEMCACHED_PORT}'
                                    for node in rig.nodes)
    env = dict(seaweed.env(), CACHEFS_CONFIG='/dev/null')
    env.pop('AWS_ENDPOINT_URL')
    return [node.mount(f's3://{S3_BUCKET}/{prefix}', '--endpoint-url', proxy.endpoint,
                       '--cluster', url, *NODE_TIERS, *extra, env=env, block_size=BLOCK_SIZE)
            for node in rig.nodes]


def read_epoch(mounts, manifest, epoch, during=None):
    """Every node reads every file at once with the others, each in its own shuffled order;
    [(node, relpath, problem)] of every error and every wrong file. `during(node_index, done)`
    is called after each file a node read."""
    problems = []

    def reader(index, mounted):
        order = sorted(manifest)
        random.Random(f'{epoch}-{index}').shuffle(order)
        for done, relpath in enumerate(order, 1):
            try:
                if sha256_of(mounted.path / relpath) != manifest[relpath][1]:
                    problems.append((index, relpath, 'wrong content'))
            except OSError as exc:
                problems.append((index, relpath, repr(exc)))
            if during is not None:
                during(index, done)
    threads = [threading.Thread(target=reader, args=(i, m)) for i, m in enumerate(mounts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), 'a reader hangs'
    return problems


def fills_settled(mounts):
    """Every node's queued cluster fills have been sent."""
    return wait_until(lambda: all(m.stats().get('cluster_fill_queue', 0) == 0 for m in mounts))


def dataset_bytes(dataset):
    return sum(size for size, _ in dataset[1].values())


def test_the_first_epoch_of_three_nodes_reads_the_dataset_from_the_store_about_once(
        rig, seaweed, dataset):
    proxy = rig.store_proxy(seaweed.s3_port)
    mounts = mount_all(rig, seaweed, dataset, proxy)
    proxy.reset()
    assert read_epoch(mounts, dataset[1], 1) == []
    # without the tier each node reads it all: 3x; with it about 1x (two nodes that miss one
    # block at the same moment both read it: no cross-node single flight)
    ratio = proxy.bytes_sent / dataset_bytes(dataset)
    assert 1 <= ratio < 1.5, ratio
    assert sum(m.stats()['cluster_hits'] for m in mounts) > 0


def test_a_second_epoch_reads_nothing_from_the_store_when_the_dataset_fits_the_pool(
        rig, seaweed, dataset):
    proxy = rig.store_proxy(seaweed.s3_port)
    mounts = mount_all(rig, seaweed, dataset, proxy)
    assert read_epoch(mounts, dataset[1], 1) == []
    assert fills_settled(mounts)
    assert sum(m.stats()['cluster_fills_dropped'] for m in mounts) == 0
    drop_page_cache()
    proxy.reset()
    assert read_epoch(mounts, dataset[1], 2) == []
    assert proxy.bytes_sent == 0 and proxy.count('GET') == 0


def test_an_engine_killed_mid_epoch_costs_no_read_error_and_no_wrong_byte(rig, seaweed, dataset):
    proxy = rig.store_proxy(seaweed.s3_port)
    mounts = mount_all(rig, seaweed, dataset, proxy)
    assert read_epoch(mounts, dataset[1], 1) == []
    assert fills_settled(mounts)
    drop_page_cache()
    proxy.reset()
    victim = rig.nodes[1].memcached
    third = len(dataset[1]) // 3

    def kill_a_third_of_the_way_in(index, done):
        if index == 1 and done == third:
            victim.kill()
    assert read_epoch(mounts, dataset[1], 2, during=kill_a_third_of_the_way_in) == []
    assert not victim.running
    # only the dead engine's blocks come from the store again (each node that misses one reads
    # it: at most about its third of the dataset per node), not the whole dataset per node
    assert proxy.bytes_sent < 1.2 * dataset_bytes(dataset)
    assert any(m.stats()['cluster_peers_up'] == NODES - 1 for m in mounts)


def test_an_over_full_pool_never_marks_a_peer_down(rig, seaweed, dataset):
    # memcached 1.6.18 answers a miss found in extstore (a value whose page was evicted) with a
    # bare EN, without the request's opaque token: a miss, not a peer gone wrong
    proxy = rig.store_proxy(seaweed.s3_port)
    for node in rig.nodes:
        node.start_memcached(memory='16M', disk='16M', item_max='2m',
                             extstore={'ext_page_size': 4, 'ext_wbuf_size': 2})
    mounts = mount_all(rig, seaweed, dataset, proxy, engines=False)
    for epoch in (1, 2, 3):
        assert read_epoch(mounts, dataset[1], epoch) == []
        assert fills_settled(mounts)
        drop_page_cache()
    logs = ''.join(m.log_file.read_text() for m in mounts)
    assert re.findall(r'WARNING .* is down .*', logs) == []
    assert all(m.stats()['cluster_peers_up'] == NODES for m in mounts)


def test_a_cluster_absent_at_mount_is_a_warning_and_the_store_serves(rig, seaweed, dataset,
                                                                     tmp_path):
    proxy = rig.store_proxy(seaweed.s3_port)
    mounts = mount_all(rig, seaweed, dataset, proxy, engines=False)
    proxy.reset()
    assert read_epoch(mounts[:1], dataset[1], 1) == []
    assert proxy.bytes_sent >= dataset_bytes(dataset)
    log = mounts[0].log_file.read_text()
    assert re.search(r'WARNING .*cluster', log), log[-2000:]
    assert mounts[0].stats()['cluster_peers_up'] == 0


def test_a_restarted_engine_is_used_again(rig, seaweed, dataset):
    proxy = rig.store_proxy(seaweed.s3_port)
    mounts = mount_all(rig, seaweed, dataset, proxy, '--cluster-refresh', '1s')
    victim = rig.nodes[1].memcached
    victim.kill()
    # the nodes find it down when they ask it for a block; the store serves its blocks
    assert read_epoch(mounts, dataset[1], 1) == []
    assert all(m.stats()['cluster_peers_up'] == NODES - 1 for m in mounts)
    victim.start()
    # probed again after the breaker's first wait (5 s) at a refresh (1 s here)
    assert wait_until(lambda: all(m.stats()['cluster_peers_up'] == NODES for m in mounts),
                      timeout=60)
    drop_page_cache()
    assert read_epoch(mounts, dataset[1], 2) == []
    assert fills_settled(mounts)
    assert int(victim.memcached_stats()['curr_items']) > 0
