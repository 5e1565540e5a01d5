"""Unit tests of pure logic: sizes, durations and fstab-style -o options."""

import math

import pytest

from cachefs.config import expand_dash_o
from cachefs.errors import UserError
from cachefs.units import parse_duration, parse_size


@pytest.mark.parametrize('text, expected', [
    ('4096', 4096), ('4K', 4096), ('4M', 4 << 20), ('4MiB', 4 << 20), ('4mb', 4 << 20),
    ('100G', 100 << 30), ('1.5G', 3 << 29), ('2T', 2 << 40)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize('text', ['', 'lots', '4X', '-1M'])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize('text, expected', [
    ('30s', 30), ('2h', 7200), ('10m', 600), ('1d', 86400), ('500ms', 0.5), ('45', 45),
    ('inf', math.inf), ('-1', math.inf)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


def test_dash_o_becomes_long_options():
    argv = expand_dash_o(['src', 'mnt', '-o', 'memory_cache_size=100G,allow_other,ro,_netdev',
                          '-oentry_timeout=2h', '--foreground'])
    assert argv == ['src', 'mnt', '--memory-cache-size=100G', '--allow-other', '--entry-timeout=2h',
                    '--foreground']


def test_dash_o_rejects_unknown_options():
    with pytest.raises(UserError, match='bogus'):
        expand_dash_o(['-o', 'bogus=1'])


def test_dash_o_value_required():
    with pytest.raises(UserError, match='needs a value'):
        expand_dash_o(['-o', 'block_size'])


def test_x_systemd_options_are_ignored():
    assert expand_dash_o(['-o', 'x-systemd.automount,noauto,nofail']) == []
