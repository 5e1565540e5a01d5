"""Every test module has a tier (conftest.TIERS), so that `pytest -m t0` ... `-m t4` together run
the whole suite, and a test's tier says what it needs: one that mounts is never in t0 or t1, one
that uses a store server never in t0."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import MODULE_TIER, TIER_NEEDS, TIERS, tier_of

TESTS = Path(__file__).parent


def test_every_test_module_has_a_tier_and_every_tier_row_a_module():
    modules = {path.name for path in TESTS.glob('test_*.py')}
    assert modules - set(MODULE_TIER) == set(), 'add these modules to TIERS in tests/conftest.py'
    assert set(MODULE_TIER) - modules == set(), 'TIERS names modules that do not exist'


def test_no_module_is_in_two_tiers():
    names = [name for names in TIERS.values() for name in names]
    assert len(names) == len(set(names))
    assert set(TIERS) == set(TIER_NEEDS)


def item(module, fixtures=(), keywords=()):
    """A collected test, as far as its tier goes."""
    return SimpleNamespace(path=TESTS / module, fixturenames=list(fixtures),
                           keywords=dict.fromkeys(keywords))


@pytest.mark.parametrize('fixtures, keywords, tier', [
    ((), (), 't0'),
    (('tmp_path', 'local_source'), (), 't0'),
    (('s3_source',), (), 't1'),
    (('private_oss_source',), (), 't1'),
    (('tmp_path', 'mounter'), (), 't2'),
    (('tmp_path',), ('fuse',), 't2'),
    (('source', 'mounter'), ('fuse',), 't2'),
], ids=['pure', 'local source', 's3 server', 'oss server', 'mounter', 'fuse marker', 'both'])
def test_a_test_is_raised_to_the_tier_of_what_it_needs(fixtures, keywords, tier):
    assert tier_of(item('test_options.py', fixtures, keywords)) == tier


def test_a_higher_tier_of_the_module_is_kept():
    assert tier_of(item('test_deploy.py', ('local_source', 'mounter'), ('fuse',))) == 't4'
    assert tier_of(item('test_faults.py')) == 't3'


def test_a_module_without_a_row_has_no_tier():
    assert tier_of(item('test_somewhere_new.py')) is None
