"""Unit tests of cachefs's SigV4 signer for object GETs (pure logic: no server). It must sign
exactly as botocore does, header for header, or not be used at all."""

from urllib.parse import quote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cachefs.ufs.s3_sign import FastSigner

KEYS = ['plain.bin', 'a b/c~d+e.bin', 'ünï/cødé €.jpg', "odd/%25 # & = , ; ' !.bin", 'x' * 900]
PREFIXES = ['http://127.0.0.1:8333/bucket/', 'https://bucket.s3.eu-west-1.amazonaws.com/',
            'https://s3.example.com:9443/b/', 'http://[::1]:80/b/']


def botocore_headers(url, headers, credentials, region):
    request = AWSRequest(method='GET', url=url, headers=dict(headers))
    S3SigV4Auth(credentials.get_frozen_credentials(), 's3', region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize('prefix', PREFIXES)
@pytest.mark.parametrize('token', [None, 'session/token+with=odd chars'])
def test_signatures_equal_botocores_for_every_key_range_and_credential_kind(prefix, token):
    credentials = Credentials('AKIDEXAMPLE', 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY', token)
    region = 'eu-west-1'
    signer = FastSigner.matching(prefix, region, credentials)
    assert signer is not None
    for key in KEYS:
        url = prefix + quote(key.encode(), safe='/~')
        headers = {'Range': 'bytes=4096-8191', 'If-Match': '"9b2cf535f27731c974343645a3985328"'}
        expected = botocore_headers(url, headers, credentials, region)
        ours = signer.sign(urlsplit(url).path, headers, credentials.get_frozen_credentials(),
                           timestamp=expected['X-Amz-Date'])
        assert ours == expected, key


def test_the_signing_key_follows_the_date_and_the_secret():
    prefix = PREFIXES[0]
    first = Credentials('AKID', 'secret-one')
    signer = FastSigner.matching(prefix, 'us-east-1', first)
    path = '/bucket/k'
    headers = {'Range': 'bytes=0-0'}
    for credentials, timestamp in [(first, '20261126T235959Z'), (first, '20261127T000001Z'),
                                   (Credentials('AKID', 'secret-two'), '20261127T000002Z')]:
        ours = signer.sign(path, headers, credentials.get_frozen_credentials(), timestamp)
        request = AWSRequest(method='GET', url='http://127.0.0.1:8333' + path, headers=headers)
        auth = S3SigV4Auth(credentials.get_frozen_credentials(), 's3', 'us-east-1')
        request.context['timestamp'] = timestamp
        auth._modify_request_before_signing(request)
        canonical = auth.canonical_request(request)
        signature = auth.signature(auth.string_to_sign(request, canonical), request)
        assert ours['Authorization'].endswith('Signature=' + signature)


def test_a_signer_that_disagrees_with_botocore_is_not_used(monkeypatch):
    monkeypatch.setattr(FastSigner, 'sign', lambda self, *args, **kwargs: {'Authorization': 'x'})
    assert FastSigner.matching(PREFIXES[0], 'us-east-1', Credentials('AKID', 'secret')) is None
