"""The bench's metadata-objects scenario, pure logic: the names dataset, its uploader's
signature, and how a stopped peer figure is reported."""

import re
from types import SimpleNamespace

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from bench import datasets, report
from bench.scenarios import OBJECT_ROWS


def test_names_follow_the_imagenet_layout_in_key_order():
    names = datasets.imagenet_names(20_000)
    assert len(names) == len(set(names)) == 20_000
    assert names == sorted(names)
    folders = {name.split('/')[0] for name in names}
    assert len(folders) == datasets.IMAGENET_FOLDERS
    assert all(re.fullmatch(r'(n\d{8})/\1_\d+\.JPEG', name) for name in names)
    imagenet = datasets.imagenet_names(1_281_167)
    assert len(set(imagenet)) == 1_281_167
    assert len({name.split('/')[0] for name in imagenet}) == 1000
    part = datasets.prepare_names(2000)
    assert part.key == 'names-2000-in-1000' and part.root is None
    assert {(size, sha) for _, size, sha in part.entries} == {(0, datasets.EMPTY_SHA256)}


def test_the_uploaders_signature_is_botocores():
    store = SimpleNamespace(endpoint='http://127.0.0.1:8333', bucket='cachefs-bench',
                            access_key='AKIDEXAMPLE', secret_key='wJalrXUtnFEMI/K7MDENG+bPxRfiCY')
    putter = datasets._Putter(store)
    for key in ('names-2000-in-1000/n00000001/n00000001_7.JPEG', 'a b/c+d~e%f'):
        request = AWSRequest(method='PUT', url='http://127.0.0.1:8333' + putter.path(key),
                             data=b'')
        S3SigV4Auth(Credentials(store.access_key, store.secret_key), 's3',
                    'us-east-1').add_auth(request)
        ours = putter.headers(key, request.headers['X-Amz-Date'])
        assert ours['Authorization'] == request.headers['Authorization']


def figure(median, stopped=False):
    return {'median': median, 'values': [median], 'cpu_s': None, 'peak_rss_bytes': None,
            'extra': {'stopped': 1} if stopped else {}}


def test_a_stopped_peer_figure_is_a_lower_bound():
    first = OBJECT_ROWS[0]
    figures = {first.key: {'cachefs': figure(20.0), 's3fs': figure(240.0, stopped=True),
                           'rclone': figure(80.0)}}
    table = report.main_table(figures, ['cachefs', 's3fs', 'rclone'], OBJECT_ROWS)
    row = table.splitlines()[2]
    assert '> 240.0 (stopped)' in row and '| 4.00x' in row and '> 4.00x' not in row
    figures[first.key]['rclone'] = figure(240.0, stopped=True)
    row = report.main_table(figures, ['cachefs', 's3fs', 'rclone'], OBJECT_ROWS).splitlines()[2]
    assert row.count('> 240.0 (stopped)') == 2 and '> 12.00x' in row
