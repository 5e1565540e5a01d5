"""The parallel listing of an S3 prefix (`S3Store.list_objects`, fanned out over the prefix's
folders) against the loopback SeaweedFS: it gives the same objects as the sequential listing (one
page after the other, `list_fan_out = 1`), in S3's key order, on the lean path and through
`list_objects_v2`, with pages broken at random by the fault proxy (retried) and with small pages;
a page that keeps failing fails it with the sequential listing's error; and it never has more list
requests in flight than its bound, counted at the proxy.

S3 returns keys in key order; SeaweedFS (a file system underneath) lists a folder's keys at the
place of the folder's name ('a/b' before 'a-b') and cannot hold a key 'a' beside 'a/b'. So the
sequential listing is compared in key order (`s3_order`), and the key 'a' beside 'a/b' is checked
against a stand-in for S3's listing semantics (pure logic) at the end."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachefs.ufs.errors import StoreError, TransientError
from cachefs.ufs.s3 import S3Store

from conftest import S3_BUCKET
from support.faults import Always, FaultProxy, SeededMix
from support.proxy import CountingProxy

# Keys a local tree cannot hold: a file and a folder of the same name, directory markers, the
# prefix itself as an object, names that sort around '/', characters URLs and XML must escape.
ODD_KEYS = ('', 'a/', 'a/b', 'a/c/d', 'a-b', 'a.b', 'a0', 'b/', 'b/x', 'empty-dir/',
            'x y/é+%#&=;~\'.txt', 'x y/sub dir/ü', 'top.txt', 'z/deep/deeper/deepest/k',
            'zz', '~tilde/k')


def put_keys(seaweed, prefix, keys):
    """Folder markers ('a/', and '' for the prefix itself) go first, one at a time: SeaweedFS
    loses a marker PUT at the same moment as a PUT of a key under it (the implicit folder of
    'a/b' replaces the explicit 'a/'), which CI hit once."""
    client = seaweed.client()

    def put(key):
        client.put_object(Bucket=S3_BUCKET, Key=prefix + key, Body=key.encode()[:7])
    markers = [key for key in keys if (prefix + key).endswith('/')]
    for key in markers:
        put(key)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, [key for key in keys if key not in markers]))


@pytest.fixture(scope='module')
def odd_prefix(seaweed, s3_source):
    put_keys(seaweed, 'plist-odd/', ODD_KEYS)
    return 'plist-odd/'


@pytest.fixture(scope='module')
def folders_prefix(seaweed, s3_source):
    """50 folders of 30 keys, and keys directly under the prefix between and around them."""
    keys = [f'class-{f:03d}/img-{i:04d}.jpg' for f in range(50) for i in range(30)]
    keys += ['00-readme.txt', 'class-020.txt', 'class-020-extra.txt', 'labels.csv', 'zz-last']
    put_keys(seaweed, 'plist-folders/', keys)
    return 'plist-folders/', len(keys)


def open_store(endpoint, prefix, fan_out, sdk=False, page_keys=None):
    store = S3Store(S3_BUCKET, prefix, endpoint_url=endpoint)
    store.list_fan_out = fan_out
    if sdk:
        store._lister = None
    elif page_keys is not None:
        store._lister.page_keys = page_keys
    return store


def s3_order(objects):
    return sorted(objects, key=lambda o: o.key)


def listing(endpoint, prefix, fan_out, **options):
    store = open_store(endpoint, prefix, fan_out, **options)
    try:
        return list(store.list_objects())
    finally:
        store.close()


@pytest.mark.parametrize('sdk', [False, True], ids=['lean', 'list_objects_v2'])
def test_parallel_listing_of_the_edge_case_tree_equals_the_sequential_one(seaweed, s3_env, sdk):
    sequential = s3_order(listing(seaweed.endpoint, 'data/', 1, sdk=sdk))
    assert {o.key for o in sequential} == set(s3_env.manifest)
    assert listing(seaweed.endpoint, 'data/', 16, sdk=sdk) == sequential


@pytest.mark.parametrize('sdk', [False, True], ids=['lean', 'list_objects_v2'])
def test_parallel_listing_of_odd_keys_equals_the_sequential_one(seaweed, s3_env, odd_prefix,
                                                                sdk):
    sequential = s3_order(listing(seaweed.endpoint, odd_prefix, 1, sdk=sdk))
    assert [o.key for o in sequential] == sorted(ODD_KEYS)
    assert listing(seaweed.endpoint, odd_prefix, 4, sdk=sdk) == sequential


@pytest.mark.parametrize('page_keys', [None, 7])
def test_parallel_listing_of_many_folders_equals_the_sequential_one(seaweed, s3_env,
                                                                    folders_prefix, page_keys):
    prefix, count = folders_prefix
    sequential = s3_order(listing(seaweed.endpoint, prefix, 1))
    assert len(sequential) == count
    assert listing(seaweed.endpoint, prefix, 16, page_keys=page_keys) == sequential


def test_parallel_listing_of_a_single_deep_folder_equals_the_sequential_one(seaweed, s3_env,
                                                                            folders_prefix):
    prefix = folders_prefix[0] + 'class-007/'
    sequential = s3_order(listing(seaweed.endpoint, prefix, 1))
    assert len(sequential) == 30
    assert listing(seaweed.endpoint, prefix, 16, page_keys=4) == sequential


def test_list_requests_in_flight_never_exceed_the_bound(seaweed, s3_env, folders_prefix):
    prefix, _ = folders_prefix
    sequential = s3_order(listing(seaweed.endpoint, prefix, 1))
    with CountingProxy('127.0.0.1', seaweed.s3_port) as proxy:
        for fan_out in (1, 4):
            proxy.reset()
            assert s3_order(listing(proxy.endpoint, prefix, fan_out, page_keys=5)) == sequential
            assert 1 <= proxy.max_in_flight <= fan_out, (fan_out, proxy.max_in_flight)
            # 51 folders of 6 or 7 pages each: 4 workers overlap
            if fan_out > 1:
                assert proxy.max_in_flight > 1
            assert proxy.count('GET') > 50 * 6


class AfterFirst:
    """The first `n` requests go through, every later one fails with `kind`."""

    def __init__(self, n, kind):
        self.left = n
        self.kind = kind
        self._lock = threading.Lock()

    def __call__(self, method, path, headers):
        with self._lock:
            self.left -= 1
            return self.kind if self.left < 0 else None


@pytest.fixture
def fault_proxy(seaweed):
    proxy = FaultProxy('127.0.0.1', seaweed.s3_port)
    proxy.every_request = True      # the plan breaks listing pages, not only object reads
    with proxy:
        yield proxy


@pytest.mark.parametrize('seed', [1, 2])
def test_pages_broken_at_random_are_retried_and_the_listing_is_unchanged(
        seaweed, s3_env, folders_prefix, fault_proxy, seed):
    prefix, _ = folders_prefix
    sequential = s3_order(listing(seaweed.endpoint, prefix, 1))
    fault_proxy.plan = SeededMix(seed, 0.15, {'http_500': 1, 'slowdown_503': 1,
                                              'reset_mid_body': 1, 'truncated_body': 1})
    assert listing(fault_proxy.endpoint, prefix, 8, page_keys=9) == sequential
    assert fault_proxy.faults_total() > 5


@pytest.mark.parametrize('fan_out', [1, 8])
@pytest.mark.parametrize('first', [0, 3], ids=['first-page', 'mid-listing'])
def test_a_page_that_keeps_failing_fails_the_listing_as_the_sequential_one_does(
        seaweed, s3_env, folders_prefix, fault_proxy, fan_out, first):
    prefix, _ = folders_prefix
    fault_proxy.plan = AfterFirst(first, 'http_500') if first else Always('http_500')
    store = open_store(fault_proxy.endpoint, prefix, fan_out, page_keys=9)
    store.list_retry_timeout = 0.5
    try:
        with pytest.raises(TransientError, match=r'^listing s3://cachefs-test/plist-folders: '
                                                 r'.*InternalError'):
            list(store.list_objects())
    finally:
        store.close()


def test_the_default_fan_out_is_16_within_the_store_concurrency(seaweed, s3_env):
    for connections, expected in ((64, 16), (4, 4), (1, 1)):
        store = S3Store(S3_BUCKET, 'data/', endpoint_url=seaweed.endpoint,
                        max_connections=connections)
        assert store.list_fan_out == expected
        store.close()


def test_a_random_tree_lists_alike_in_parallel_and_sequentially(seaweed, s3_env):
    rng = random.Random(5)
    alphabet = 'ab/-_é+z0'      # no '.': SeaweedFS refuses path components '.' and '..'
    # SeaweedFS cannot hold 'a' beside 'a/...': keep keys that end in 'z' and hold no '//'
    keys = sorted({''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))).lstrip('/')
                   .replace('//', '/') + 'z' for _ in range(300)})
    put_keys(seaweed, 'plist-random/', keys)
    sequential = s3_order(listing(seaweed.endpoint, 'plist-random/', 1))
    assert listing(seaweed.endpoint, 'plist-random/', 6, page_keys=3) == sequential


class FakeS3:
    """S3's ListObjectsV2 semantics (key order, delimiter, pages of `page_keys` entries) over a
    list of keys, in place of `S3Store._list_page`."""

    def __init__(self, keys, page_keys):
        self.keys = sorted(keys)
        self.page_keys = page_keys

    def __call__(self, prefix, token, delimiter):
        entries = []
        for key in self.keys:
            if not key.startswith(prefix):
                continue
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            entry = ('prefix', key[:cut + 1]) if cut >= 0 else ('key', key)
            if entry not in entries:
                entries.append(entry)
        start = int(token or 0)
        page = entries[start:start + self.page_keys]
        objects = [(name, 1, 'e', 0) for kind, name in page if kind == 'key']
        prefixes = [name for kind, name in page if kind == 'prefix']
        more = start + self.page_keys < len(entries)
        return objects, prefixes, str(start + self.page_keys) if more else None


def test_a_key_beside_a_folder_of_its_name_lists_in_key_order_in_parallel(seaweed, s3_env):
    keys = ['p/' + k for k in ('', 'a', 'a/', 'a/b', 'a-b', 'a.b', 'a/c/d', 'b', 'b/x', 'c/',
                               'a0', 'z', 'zz/y')]
    store = open_store(seaweed.endpoint, 'p/', 4)
    try:
        for page_keys in (1, 2, 1000):
            store._list_page = FakeS3(keys, page_keys)
            store.list_fan_out = 1
            sequential = list(store.list_objects())
            assert [o.key for o in sequential] == sorted(k[2:] for k in keys)
            store.list_fan_out = 4
            assert list(store.list_objects()) == sequential
    finally:
        store.close()


class ForgedFolders(FakeS3):
    """A store whose first-level answer names `forged` among the folders of the prefix."""

    def __init__(self, keys, forged):
        super().__init__(keys, 1000)
        self.forged = forged

    def __call__(self, prefix, token, delimiter):
        objects, prefixes, token = super().__call__(prefix, token, delimiter)
        return objects, prefixes + self.forged if delimiter else prefixes, token


@pytest.mark.parametrize('forged', [['other/'], ['p/'], ['p/a'], ['p/a/']],
                         ids=['outside the prefix', 'the prefix', 'no slash', 'named twice'])
def test_a_folder_the_store_names_outside_the_prefix_or_twice_fails_the_listing(
        seaweed, s3_env, forged):
    keys = ['p/a/1', 'p/a/2', 'p/b/1', 'other/secret']
    store = open_store(seaweed.endpoint, 'p/', 4)
    try:
        store._list_page = ForgedFolders(keys, forged)
        with pytest.raises(StoreError, match='folder'):
            list(store.list_objects())
    finally:
        store.close()


@pytest.mark.parametrize('size', [-1, 1 << 63])
def test_a_listed_size_no_object_can_have_fails_the_listing(seaweed, s3_env, size):
    """A negative size would make the file a folder in the tree, one beyond int64 fail the saved
    listing with an OverflowError: the listing fails with a StoreError instead (not retried)."""
    store = open_store(seaweed.endpoint, 'p/', 1)
    try:
        pages = []

        def page(prefix, token, delimiter):
            pages.append(token)
            return [(prefix + 'a', 1, 'e', 0), (prefix + 'b', size, 'e', 0)], [], None
        store._list_page = page
        with pytest.raises(StoreError, match='size'):
            list(store.list_objects())
        assert pages == [None]
    finally:
        store.close()
