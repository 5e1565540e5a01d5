"""SigV4 signatures of object GETs (no query, no body), checked once against botocore's.

Why: botocore's `S3SigV4Auth.add_auth` costs about half the CPU of a whole ranged GET on the trio
path (canonical request through generic code, four HMACs for the signing key on every request);
the first epoch over small files is one GET per file. This signs just the one request shape the
read paths send, with the signing key kept for the day.

Safety: `FastSigner.matching` signs a probe request with botocore and with this code, at the same
timestamp, and returns None unless both Authorization headers are identical; the caller then
keeps botocore's signer. So a botocore change in what it signs (another header, another payload
hash) turns this path off rather than sending requests the store refuses.
"""

import datetime
import hashlib
import hmac
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest

_TIMESTAMP = '%Y%m%dT%H%M%SZ'


def _hmac(key, text):
    return hmac.new(key, text.encode('utf-8'), hashlib.sha256).digest()


class FastSigner:
    def __init__(self, url_prefix, region, payload_hash):
        self._host = _host_from_url(url_prefix)
        self._region = region
        self._payload_hash = payload_hash      # what botocore sends as X-Amz-Content-SHA256
        self._keys = {}                        # (secret key, date) -> signing key

    @classmethod
    def matching(cls, url_prefix, region, credentials):
        """A signer whose signatures equal botocore's for a probe GET, or None."""
        frozen = credentials.get_frozen_credentials()
        probe_url = url_prefix + 'cachefs-signature-probe/a%20b~c'
        headers = {'Range': 'bytes=0-9', 'If-Match': '"0123456789abcdef"'}
        request = AWSRequest(method='GET', url=probe_url, headers=dict(headers))
        S3SigV4Auth(frozen, 's3', region).add_auth(request)
        payload_hash = request.headers.get('X-Amz-Content-SHA256')
        if payload_hash is None:
            return None
        signer = cls(url_prefix, region, payload_hash)
        ours = signer.sign(urlsplit(probe_url).path, headers, frozen,
                           timestamp=request.headers['X-Amz-Date'])
        if ours.get('Authorization') != request.headers['Authorization']:
            return None
        return signer

    def sign(self, path, headers, frozen, timestamp=None):
        """`headers` plus X-Amz-Date, X-Amz-Content-SHA256, the session token if any, and
        Authorization, for a GET of `path` (percent-encoded as sent) on this store."""
        if timestamp is None:
            timestamp = datetime.datetime.now(datetime.timezone.utc).strftime(_TIMESTAMP)
        signed = dict(headers)
        signed['X-Amz-Date'] = timestamp
        signed['X-Amz-Content-SHA256'] = self._payload_hash
        if frozen.token:
            signed['X-Amz-Security-Token'] = frozen.token
        canonical = sorted([('host', self._host)] +
                           [(name.lower(), ' '.join(value.split()))
                            for name, value in signed.items()])
        names = ';'.join(name for name, _ in canonical)
        request = '\n'.join(['GET', path, '',
                             ''.join(f'{name}:{value}\n' for name, value in canonical),
                             names, self._payload_hash])
        date = timestamp[:8]
        scope = f'{date}/{self._region}/s3/aws4_request'
        string_to_sign = '\n'.join(['AWS4-HMAC-SHA256', timestamp, scope,
                                    hashlib.sha256(request.encode('utf-8')).hexdigest()])
        signature = hmac.new(self._signing_key(frozen.secret_key, date),
                             string_to_sign.encode('utf-8'), hashlib.sha256).hexdigest()
        signed['Authorization'] = (f'AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, '
                                   f'SignedHeaders={names}, Signature={signature}')
        return signed

    def _signing_key(self, secret, date):
        key = self._keys.get((secret, date))
        if key is None:
            key = _hmac(f'AWS4{secret}'.encode('utf-8'), date)
            for part in (self._region, 's3', 'aws4_request'):
                key = _hmac(key, part)
            self._keys = {(secret, date): key}     # one day and one secret at a time
        return key
