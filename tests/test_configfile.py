"""Mount options come from flags > CACHEFS_* environment > config file > profile > defaults, and
every layer's values are checked and converted like the flags."""

import math
from types import SimpleNamespace

import pytest

from cachefs import cli, configfile
from cachefs.config import resolve_auto_eviction
from cachefs.errors import UserError
from conftest import BLOCK_SIZE

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_ambient_configuration(monkeypatch, tmp_path):
    """Neither the developer's config files nor CACHEFS_* variables leak into these tests."""
    monkeypatch.setattr(configfile, 'SYSTEM_CONFIG', str(tmp_path / 'no-system-config.toml'))
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path / 'no-user-config'))
    for name in list(configfile.os.environ):
        if name.startswith('CACHEFS_'):
            monkeypatch.delenv(name)


def write_config(tmp_path, text):
    path = tmp_path / 'config.toml'
    path.write_text(text)
    return path


def parse_mount(*args):
    """The options `cachefs mount` would run with."""
    argv = cli.expand_dash_o(['mount', 's3://bucket/prefix', '/mnt/x', *map(str, args)])
    parser = cli.build_parser()
    return cli.apply_option_layers(parser, argv, parser.parse_args(argv))


def test_without_any_layer_the_built_in_defaults_apply():
    options = parse_mount()
    assert options.memory_cache_size == 1 << 30 and options.eviction == 'lru'
    assert options.profile is None and options.config is None


def test_config_file_values_are_converted_like_flags(tmp_path):
    path = write_config(tmp_path, '[mount]\nmemory_cache_size = "64M"\nentry-timeout = "2h"\n'
                        'metadata_ttl = inf\nfree_space_ratio = 0.2\nallow_other = true\n'
                        'cache_size = "50%"\nstore_concurrency = 8\n')
    options = parse_mount('--config', path)
    assert options.memory_cache_size == 64 * MiB
    assert options.entry_timeout == 7200.0
    assert options.metadata_ttl == math.inf
    assert options.free_space_ratio == 0.2
    assert options.allow_other is True
    assert options.cache_size == '50%'
    assert options.store_concurrency == 8


def test_flag_beats_environment_beats_file_beats_profile(tmp_path, monkeypatch):
    path = write_config(tmp_path, '[mount]\nentry_timeout = "1h"\nattr_timeout = "1h"\n'
                        'prefetch_window = "8M"\n')
    monkeypatch.setenv('CACHEFS_ATTR_TIMEOUT', '30m')
    monkeypatch.setenv('CACHEFS_PREFETCH_WINDOW', '16M')
    options = parse_mount('--config', path, '--profile', 'training', '--prefetch-window', '4M')
    assert options.metadata_ttl == math.inf        # profile only
    assert options.entry_timeout == 3600.0         # file over profile
    assert options.attr_timeout == 1800.0          # environment over file
    assert options.prefetch_window == 4 * MiB      # flag over environment
    assert options.eviction == 'auto'              # profile, resolved by the daemon


def test_dash_o_counts_as_a_flag(tmp_path):
    path = write_config(tmp_path, '[mount]\nmemory_cache_size = "64M"\n')
    options = parse_mount('-o', f'config={path},memory_cache_size=32M')
    assert options.memory_cache_size == 32 * MiB


def test_training_profile_settings():
    options = parse_mount('--profile', 'training')
    assert (options.entry_timeout, options.attr_timeout) == (86400.0, 86400.0)
    assert options.metadata_ttl == math.inf
    assert options.eviction == 'auto'
    assert options.prefetch_window > 0


def test_profile_can_come_from_the_environment_or_the_file(tmp_path, monkeypatch):
    path = write_config(tmp_path, '[mount]\nprofile = "training"\n')
    assert parse_mount('--config', path).metadata_ttl == math.inf
    monkeypatch.setenv('CACHEFS_PROFILE', 'training')
    assert parse_mount().eviction == 'auto'


def test_config_file_can_adjust_a_profile_and_define_one(tmp_path):
    path = write_config(tmp_path, '[profile.training]\nentry_timeout = "12h"\n'
                        '[profile.tiny]\nmemory_cache_size = "16M"\n')
    options = parse_mount('--config', path, '--profile', 'training')
    assert options.entry_timeout == 43200.0 and options.metadata_ttl == math.inf
    assert parse_mount('--config', path, '--profile', 'tiny').memory_cache_size == 16 * MiB


def test_config_file_is_found_in_the_default_places(tmp_path, monkeypatch):
    system = tmp_path / 'etc-config.toml'
    system.write_text('[mount]\nregion = "eu-west-1"\n')
    monkeypatch.setattr(configfile, 'SYSTEM_CONFIG', str(system))
    assert parse_mount().region == 'eu-west-1'
    monkeypatch.setenv('CACHEFS_CONFIG', str(write_config(tmp_path, '[mount]\nregion = "x"\n')))
    assert parse_mount().region == 'x'


def test_environment_flags_take_true_and_false(monkeypatch):
    monkeypatch.setenv('CACHEFS_PATH_STYLE', 'yes')
    assert parse_mount().path_style is True
    monkeypatch.setenv('CACHEFS_PATH_STYLE', '0')
    assert parse_mount().path_style is False


@pytest.mark.parametrize('text, words', [
    ('[mount]\nbogus = 1\n', ['bogus']),
    ('[mount]\nblock_size = "lots"\n', ['block-size', 'lots']),
    ('[mount]\neviction = "fifo"\n', ['eviction', 'fifo']),
    ('[mount]\nallow_other = "maybe"\n', ['allow-other']),
    ('[mount]\nconfig = "/other.toml"\n', ['config']),
    ('[mounts]\nregion = "x"\n', ['mounts']),
    ('[mount\n', ['config file']),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, text, words):
    path = write_config(tmp_path, text)
    with pytest.raises(UserError) as raised:
        parse_mount('--config', path)
    assert raised.value.exit_code == 2
    assert '\n' not in str(raised.value)
    for word in words:
        assert word in str(raised.value)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv('CACHEFS_CACHE_SIZE', 'huge')
    with pytest.raises(UserError, match='CACHEFS_CACHE_SIZE'):
        parse_mount()


def test_unknown_profile_and_missing_config_file_are_usage_errors(tmp_path):
    with pytest.raises(UserError, match='unknown profile'):
        parse_mount('--profile', 'inference')
    with pytest.raises(UserError, match='does not exist'):
        parse_mount('--config', tmp_path / 'missing.toml')


@pytest.mark.parametrize('capacity, dataset, expected', [
    (100, 1000, 'none'), (1000, 1000, 'lru'), (None, 1000, 'lru')])
def test_auto_eviction_is_none_only_when_the_dataset_does_not_fit(capacity, dataset, expected):
    options = SimpleNamespace(eviction='auto')
    disk = SimpleNamespace(capacity=capacity, eviction='auto') if capacity else None
    resolve_auto_eviction(options, disk, dataset)
    assert options.eviction == expected
    if disk is not None:
        assert disk.eviction == expected


@pytest.mark.fuse
def test_a_mount_uses_the_config_file_and_a_flag_overrides_it(local_source, mounter, tmp_path):
    path = write_config(tmp_path, '[mount]\nmemory_cache_size = "48M"\nprofile = "training"\n')
    mounted = mounter.mount(local_source, '--config', path, '--cache-size', BLOCK_SIZE)
    stats = mounted.stats()
    assert stats['memory_capacity_bytes'] == 48 * MiB
    assert stats['eviction_policy'] == 'none'      # training: the 1-block SSD tier is too small
    overridden = mounter.mount(local_source, '--config', path, '--memory-cache-size', '24M',
                               name='mnt2', cache_dir=tmp_path / 'cache2')
    assert overridden.stats()['memory_capacity_bytes'] == 24 * MiB
