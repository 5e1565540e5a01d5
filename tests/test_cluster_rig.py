"""The three-node rig of the cluster tier's tests (tests/support/cluster_rig.py) itself: its
nodes reach the far store and each other's memcached, a mount made in a node is visible here,
an engine can be killed and restarted, and closing the rig leaves nothing behind."""

import os
import sys

import pytest

from conftest import BLOCK_SIZE, S3_BUCKET, sha256_of
from support import cluster_rig
from support.cluster_rig import ClusterRig, process_alive

pytestmark = pytest.mark.skipif(cluster_rig.unavailable() is not None,
                                reason=cluster_rig.unavailable() or '')

# run in a node: sets and gets one key on the memcached at argv[1] (text protocol, no client)
PROBE = '''
import socket, sys
host, port = sys.argv[1].rsplit(':', 1)
key, value = sys.argv[2].encode(), sys.argv[2].encode() * 1000
with socket.create_connection((host, int(port)), timeout=5) as sock:
    sock.sendall(b'set %s 0 0 %d\\r\\n%s\\r\\n' % (key, len(value), value))
    assert sock.recv(100) == b'STORED\\r\\n'
    sock.sendall(b'get %s\\r\\n' % key)
    answer = b''
    while not answer.endswith(b'END\\r\\n'):
        answer += sock.recv(65536)
assert answer.split(b'\\r\\n')[1] == value
print(len(value))
'''


@pytest.fixture
def rig(tmp_path):
    with ClusterRig(tmp_path / 'rig', nodes=3, log_dir=tmp_path) as rig:
        yield rig
    assert rig.leftovers() == []


def test_every_node_reaches_every_other_nodes_memcached(rig):
    for node in rig.nodes:
        node.start_memcached(memory='16M', disk='64M')
    for node in rig.nodes:
        for other in rig.nodes:
            result = node.run([sys.executable, '-c', PROBE, other.memcached.address,
                               f'from-{node.index}'])
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == [str(len(f'from-{node.index}') * 1000)]


@pytest.mark.fuse
def test_a_node_mounts_the_far_store_through_the_counting_proxy(rig, seaweed, s3_source):
    proxy = rig.store_proxy(seaweed.s3_port)
    node = rig.nodes[2]
    mounted = node.mount(s3_source.url, '--endpoint-url', proxy.endpoint, env=s3_source.env,
                         block_size=BLOCK_SIZE)
    # the mount is visible to this process although its daemon runs in the node's namespace
    assert os.readlink(f'/proc/{mounted.pid}/ns/net') != os.readlink('/proc/self/ns/net')
    relpath, (size, digest) = max(s3_source.manifest.items(), key=lambda item: item[1][0])
    assert sha256_of(mounted.path / relpath) == digest
    assert proxy.count('GET') > 0 and proxy.bytes_sent >= size
    assert all(path.startswith(f'/{S3_BUCKET}') for _, path, _ in proxy.requests)


def test_a_killed_engine_refuses_and_a_restarted_one_serves_again(rig):
    node = rig.nodes[0]
    engine = node.start_memcached(memory='16M', disk='64M')
    first = engine.pid
    engine.kill()
    assert not process_alive(first)
    refused = node.run([sys.executable, '-c', PROBE, engine.address, 'k'])
    assert refused.returncode != 0 and 'ConnectionRefused' in refused.stderr
    engine.start()
    assert engine.pid != first
    assert node.run([sys.executable, '-c', PROBE, engine.address, 'k']).returncode == 0


def test_closing_the_rig_after_a_failure_leaves_nothing_behind(tmp_path):
    rig = ClusterRig(tmp_path / 'rig', nodes=2, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match='test failure'):
        with rig:
            pids = [node.start_memcached(memory='16M', disk='64M').pid for node in rig.nodes]
            assert rig.leftovers()
            raise RuntimeError('test failure')
    assert rig.leftovers() == []
    assert not any(process_alive(pid) for pid in pids)
    assert not any(name.startswith(rig.prefix) for name in cluster_rig.netns_list())
    assert not any(name.startswith(rig.prefix) for name in cluster_rig.link_list())


def test_two_rigs_at_once_get_their_own_names_and_subnets(tmp_path):
    with ClusterRig(tmp_path / 'a', nodes=1) as first, ClusterRig(tmp_path / 'b', nodes=1) as other:
        assert first.prefix != other.prefix
        assert not first.subnet.overlaps(other.subnet)
