"""The daemon's memory formula, the cgroup memory limit (v1 and v2, read from crafted files), the
sizing of defaulted options under it, the refusal of explicit options that cannot fit, and how
the CLI knows which options the user gave."""

import argparse
import logging

import pytest

from cachefs import cli, configfile, memory_budget
from cachefs.config import MOUNT_OPTIONS
from cachefs.errors import EXIT_USAGE, UserError
from cachefs.memory_budget import (BASE_BYTES, HEADROOM, TREE_BYTES_PER_FILE, Limit,
                                   cgroup_limit, fit, formula, formula_of, size_to_limit)

MiB = 1 << 20
GiB = 1 << 30


def defaults(**changes):
    values = {o.name.replace('-', '_'): o.default for o in MOUNT_OPTIONS}
    values.update(changes)
    return argparse.Namespace(**values)


# -- the formula --

def test_formula_adds_every_term_of_the_readme():
    parts = formula(block_size=4 * MiB, memory_cache_size=GiB, prefetch_memory=512 * MiB,
                    prefetch_window=32 * MiB, ssd_tier=True, store_concurrency=32,
                    max_idle_threads=128, files=1000)
    assert parts.memory_cache == GiB
    assert parts.prefetch == 512 * MiB
    assert parts.write_queue == 8 * 4 * MiB
    assert parts.store_requests == 32 * 4 * MiB
    assert parts.fuse_reads == 128 * MiB
    assert parts.tree == 1000 * TREE_BYTES_PER_FILE
    assert parts.base == BASE_BYTES
    assert parts.total == (GiB + 512 * MiB + 32 * MiB + 128 * MiB + 128 * MiB
                           + 1000 * TREE_BYTES_PER_FILE + BASE_BYTES)


def test_formula_drops_prefetch_when_it_is_off_and_the_write_queue_without_an_ssd_tier():
    parts = formula_of(defaults(prefetch_window=0), files=0, ssd_tier=False)
    assert parts.prefetch == 0 and parts.write_queue == 0


def test_the_cluster_tiers_fill_queue_counts_only_with_a_cluster():
    assert formula_of(defaults(), files=0, ssd_tier=True).cluster_fills == 0
    with_cluster = formula_of(defaults(cluster='memcached://10.0.0.1', cluster_fill_queue=16),
                              files=0, ssd_tier=True)
    # the queue and the 4 fills being sent, a block each
    assert with_cluster.cluster_fills == (16 + 4) * 4 * MiB
    assert with_cluster.total == formula_of(defaults(), files=0, ssd_tier=True).total + \
        with_cluster.cluster_fills
    assert 'cluster fills 80' in with_cluster.describe()


def test_the_defaults_with_an_imagenet_tree_need_gibibytes():
    total = formula_of(defaults(), files=1_281_167, ssd_tier=True).total
    assert 3 * GiB < total < 4 * GiB


# -- the cgroup limit --

def v1_machine(tmp_path, own='/pod/daemon', limits=None):
    """A hybrid machine: the memory controller on v1, a cgroup2 mount without it."""
    memory = tmp_path / 'memory'
    unified = tmp_path / 'unified'
    for folder, value in (limits or {}).items():
        (memory / folder).mkdir(parents=True, exist_ok=True)
        (memory / folder / 'memory.limit_in_bytes').write_text(f'{value}\n')
    (memory / own.strip('/')).mkdir(parents=True, exist_ok=True)
    unified.mkdir(exist_ok=True)
    cgroup = f'9:name=systemd:/\n4:memory:{own}\n3:cpuset:/\n0::/\n'
    mountinfo = (f'31 23 0:28 / {tmp_path} rw - tmpfs tmpfs rw\n'
                 f'35 31 0:32 / {memory} rw,relatime - cgroup cgroup rw,memory\n'
                 f'36 31 0:33 / {tmp_path / "cpu"} rw - cgroup cgroup rw,cpu,cpuacct\n'
                 f'41 31 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw\n')
    return cgroup, mountinfo


def test_v1_limit_of_the_own_cgroup(tmp_path):
    cgroup, mountinfo = v1_machine(tmp_path, limits={
        '.': 9223372036854771712, 'pod': 9223372036854771712, 'pod/daemon': 300 * MiB})
    limit = cgroup_limit(cgroup, mountinfo)
    assert limit.bytes == 300 * MiB
    assert limit.where == f'cgroup v1 {tmp_path}/memory/pod/daemon/memory.limit_in_bytes'


def test_v1_smallest_ancestor_limit_counts(tmp_path):
    cgroup, mountinfo = v1_machine(tmp_path, limits={
        'pod': 200 * MiB, 'pod/daemon': 9223372036854771712})
    assert cgroup_limit(cgroup, mountinfo).bytes == 200 * MiB


def test_v1_huge_value_is_no_limit(tmp_path):
    cgroup, mountinfo = v1_machine(tmp_path, limits={'.': 9223372036854771712,
                                                     'pod/daemon': 9223372036854771712})
    assert cgroup_limit(cgroup, mountinfo) is None


def v2_machine(tmp_path, own='/kubepods/pod1/daemon', root='/', limits=None):
    unified = tmp_path / 'cgroup'
    for folder, value in (limits or {}).items():
        (unified / folder).mkdir(parents=True, exist_ok=True)
        (unified / folder / 'memory.max').write_text(f'{value}\n')
    cgroup = f'0::{own}\n'
    mountinfo = f'29 23 0:26 {root} {unified} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n'
    return cgroup, mountinfo


def test_v2_memory_max_and_ancestors(tmp_path):
    cgroup, mountinfo = v2_machine(tmp_path, limits={
        'kubepods': 'max', 'kubepods/pod1': 2 * GiB, 'kubepods/pod1/daemon': 'max'})
    limit = cgroup_limit(cgroup, mountinfo)
    assert limit.bytes == 2 * GiB
    assert limit.where == f'cgroup v2 {tmp_path}/cgroup/kubepods/pod1/memory.max'


def test_v2_max_everywhere_is_no_limit(tmp_path):
    cgroup, mountinfo = v2_machine(tmp_path, limits={'kubepods/pod1/daemon': 'max'})
    assert cgroup_limit(cgroup, mountinfo) is None


def test_v2_mount_of_a_subtree_maps_the_path_below_its_root(tmp_path):
    # a container's view without a cgroup namespace: the mount shows the pod's cgroup at its top
    cgroup, mountinfo = v2_machine(tmp_path, own='/kubepods/pod1/daemon',
                                   root='/kubepods/pod1', limits={'daemon': 512 * MiB})
    assert cgroup_limit(cgroup, mountinfo).bytes == 512 * MiB


def test_both_versions_the_smallest_counts(tmp_path):
    cgroup1, mountinfo1 = v1_machine(tmp_path / 'a', limits={'pod/daemon': 700 * MiB})
    cgroup2, mountinfo2 = v2_machine(tmp_path / 'b', own='/x', limits={'x': 600 * MiB})
    cgroup = cgroup1.replace('0::/\n', '') + cgroup2
    mountinfo = mountinfo1.replace('cgroup2 cgroup2', 'tmpfs tmpfs') + mountinfo2
    assert cgroup_limit(cgroup, mountinfo).bytes == 600 * MiB


def test_no_cgroup_mount_is_no_limit(tmp_path):
    assert cgroup_limit('0::/\n', '23 1 8:1 / / rw - ext4 /dev/sda1 rw\n') is None
    assert memory_budget.read_cgroup_limit(str(tmp_path / 'no-proc')) is None


# -- sizing --

def test_defaults_that_fit_are_left_alone():
    sizing = size_to_limit(defaults(), 1000, True, Limit(8 * GiB, 'test'), frozenset())
    assert sizing.lowered == ()
    assert sizing.memory_cache_size == GiB and sizing.prefetch_memory == 512 * MiB


def test_no_limit_changes_nothing():
    sizing = size_to_limit(defaults(), 10**7, True, None, frozenset())
    assert sizing.lowered == () and sizing.memory_cache_size == GiB


def test_memory_tier_is_lowered_first_in_whole_blocks():
    options = defaults()
    limit = Limit(2 * GiB, 'test')
    sizing = size_to_limit(options, 1000, True, limit, frozenset())
    assert sizing.lowered == ('memory-cache-size',)
    assert sizing.prefetch_memory == 512 * MiB
    assert sizing.memory_cache_size % options.block_size == 0
    assert sizing.formula.total <= limit.bytes * HEADROOM
    assert sizing.formula.total > limit.bytes * HEADROOM - options.block_size


def test_then_prefetch_memory_never_below_the_floors():
    options = defaults(block_size=MiB)
    limit = Limit(400 * MiB, 'test')
    sizing = size_to_limit(options, 100, True, limit, frozenset())
    assert sizing.lowered == ('memory-cache-size', 'prefetch-memory')
    assert sizing.memory_cache_size == memory_budget.MEMORY_CACHE_FLOOR_BLOCKS * MiB
    assert memory_budget.PREFETCH_FLOOR_BLOCKS * MiB <= sizing.prefetch_memory < 512 * MiB
    assert sizing.formula.total <= limit.bytes * HEADROOM


def test_explicit_memory_tier_is_kept_and_prefetch_gives_way():
    options = defaults(memory_cache_size=GiB)
    sizing = size_to_limit(options, 0, True, Limit(2 * GiB, 'test'),
                           frozenset({'memory-cache-size'}))
    assert sizing.memory_cache_size == GiB
    assert sizing.lowered == ('prefetch-memory',)


def test_explicit_options_that_cannot_fit_are_refused_naming_them():
    options = defaults(memory_cache_size=GiB)
    with pytest.raises(UserError) as caught:
        size_to_limit(options, 0, True, Limit(GiB, 'cgroup v1 /x/memory.limit_in_bytes'),
                      frozenset({'memory-cache-size'}))
    assert caught.value.exit_code == EXIT_USAGE
    message = str(caught.value)
    assert '\n' not in message
    assert message.startswith('memory limit 1.0 GiB (cgroup v1 /x/memory.limit_in_bytes): '
                              'the options given (--memory-cache-size) need')


def test_an_explicit_default_value_counts_as_explicit():
    # the user gave --memory-cache-size 1G, which is also the default: it is not lowered
    with pytest.raises(UserError):
        size_to_limit(defaults(), 0, True, Limit(GiB, 'test'), frozenset({'memory-cache-size'}))


def test_a_limit_too_small_for_the_floors_is_refused_even_without_explicit_options():
    with pytest.raises(UserError, match='even with the memory tier and prefetch memory at '
                       'their floors'):
        size_to_limit(defaults(), 0, True, Limit(100 * MiB, 'test'), frozenset())


def test_the_tree_counts():
    options = defaults(block_size=MiB, memory_cache_size=64 * MiB, prefetch_memory=32 * MiB)
    explicit = frozenset({'memory-cache-size', 'prefetch-memory'})
    limit = Limit(1 * GiB, 'test')
    size_to_limit(options, 1000, True, limit, explicit)
    with pytest.raises(UserError):
        size_to_limit(options, 500_000, True, limit, explicit)


def test_fit_changes_the_options_and_says_so_in_one_line():
    options = defaults()
    lines = []
    fit(options, 1000, True, Limit(2 * GiB, 'cgroup v2 /c/memory.max'), announce=lines.append)
    assert options.memory_cache_size < GiB
    assert len(lines) == 1 and '\n' not in lines[0]
    assert lines[0].startswith('memory limit 2.0 GiB (cgroup v2 /c/memory.max): sized down '
                               '--memory-cache-size from 1.0 GiB to ')


def test_fit_without_announce_only_checks():
    options = defaults()
    fit(options, 1000, True, Limit(2 * GiB, 'test'), announce=None)
    assert options.memory_cache_size == GiB


def test_fit_logs_nothing_when_the_defaults_fit(caplog):
    with caplog.at_level(logging.DEBUG, logger='cachefs.memory_budget'):
        fit(defaults(), 1000, True, Limit(16 * GiB, 'test'))
    assert caplog.records == []


# -- which options the user gave --

@pytest.fixture
def no_ambient_configuration(monkeypatch, tmp_path):
    monkeypatch.setattr(configfile, 'SYSTEM_CONFIG', str(tmp_path / 'no-system-config.toml'))
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path / 'no-user-config'))
    for name in list(configfile.os.environ):
        if name.startswith('CACHEFS_'):
            monkeypatch.delenv(name)


def parse_mount(*args):
    argv = cli.expand_dash_o(['mount', 's3://bucket/prefix', '/mnt/x', *map(str, args)])
    parser = cli.build_parser()
    return cli.apply_option_layers(parser, argv, parser.parse_args(argv))


def test_nothing_given_nothing_explicit(no_ambient_configuration):
    assert parse_mount().explicit == frozenset()


def test_flags_and_dash_o_are_explicit_even_with_the_default_value(no_ambient_configuration):
    options = parse_mount('--memory-cache-size', '1G', '-o', 'prefetch_memory=512M,allow_other')
    assert options.explicit == {'memory-cache-size', 'prefetch-memory', 'allow-other'}


def test_environment_and_config_file_are_explicit(no_ambient_configuration, tmp_path,
                                                  monkeypatch):
    config = tmp_path / 'config.toml'
    config.write_text('[mount]\nprefetch_memory = "64M"\n[profile.small]\n'
                      'store_concurrency = 8\n')
    monkeypatch.setenv('CACHEFS_MEMORY_CACHE_SIZE', '1G')
    options = parse_mount('--config', config, '--profile', 'small')
    assert options.explicit == {'memory-cache-size', 'prefetch-memory', 'store-concurrency',
                                'config', 'profile'}


def test_a_built_in_profile_is_not_explicit(no_ambient_configuration):
    options = parse_mount('--profile', 'training')
    assert options.explicit == {'profile'}


def test_the_daemon_of_a_background_mount_inherits_what_was_explicit(no_ambient_configuration,
                                                                     monkeypatch):
    # its command line holds every option (cli._argv_of); the parent says which were given
    monkeypatch.setenv(cli.EXPLICIT_ENV, 'memory-cache-size')
    options = parse_mount('--memory-cache-size', '1G', '--prefetch-memory', '512M')
    assert options.explicit == {'memory-cache-size'}
    assert cli.EXPLICIT_ENV not in configfile.os.environ
