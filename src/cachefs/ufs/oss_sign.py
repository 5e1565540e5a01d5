"""OSS V1 header signatures of object GETs, checked once against oss2's.

Why: the lean OSS read path (`oss_trio`) sends its ranged GETs without oss2 and requests, so it
signs them itself. V1 is what oss2 signs with by default (`oss2.Auth`, `oss2.StsAuth`):
Authorization: OSS <key id>:base64(HMAC-SHA1(secret, VERB \\n Content-MD5 \\n Content-Type \\n
Date \\n canonicalized x-oss-* headers canonicalized resource)), the resource being
/bucket/key with the key as it is (not percent-encoded), and no sub-resource for a plain GET.
This signs the one request shape the read path sends: a GET with Range, If-Match,
x-oss-range-behavior and, for STS credentials, x-oss-security-token.

Safety: `OssSigner.matching` signs a probe request (a key with spaces, '+', '%', '~', '?', '#'
and non-ASCII letters) with oss2's own auth object and with this code, at the Date oss2 put in
its request, and returns None unless both sets of headers that reach the store (Date,
Authorization, the security token) are identical; the store then keeps oss2 for reads. An oss2
that signs another way (V4 by default, another header) turns this path off rather than sending
requests the store refuses.
"""

import base64
import email.utils
import hashlib
import hmac
import logging
import time

import oss2
import oss2.http

log = logging.getLogger(__name__)

PROBE_KEY = 'cachefs-signature-probe/a b+c%20~d?e#f/é中'
_PROBE_HEADERS = {'Range': 'bytes=0-9', 'If-Match': '"0123456789ABCDEF0123456789ABCDEF"',
                  'x-oss-range-behavior': 'standard'}


class OssSigner:
    """V1 signatures of GETs of one bucket's objects, with one set of credentials."""

    __slots__ = ('_bucket', '_key_id', '_secret', '_token', '_second', '_date')

    def __init__(self, bucket, key_id, secret, token=None):
        self._bucket = bucket
        self._key_id = key_id
        self._secret = secret.encode('utf-8')
        self._token = token or None
        self._second = -1           # the second `_date` is for
        self._date = ''

    @classmethod
    def matching(cls, auth, bucket, key_id, secret, token=None):
        """A signer whose headers equal those `auth` (oss2's Auth or StsAuth for these
        credentials) adds to a probe GET, or None."""
        url = f'http://127.0.0.1/{bucket}/cachefs-probe'    # oss2 does not sign the URL
        request = oss2.http.Request('GET', url, headers=dict(_PROBE_HEADERS))
        try:
            auth._sign_request(request, bucket, PROBE_KEY)
        except Exception as exc:        # an auth object of another shape: keep oss2
            log.debug('oss2 could not sign the probe: %r', exc)
            return None
        theirs = {name.lower(): value for name, value in request.headers.items()
                  if name.lower() in ('date', 'authorization', 'x-oss-security-token')}
        if 'date' not in theirs:
            return None
        signer = cls(bucket, key_id, secret, token)
        ours = {name.lower(): value for name, value in
                signer.sign(PROBE_KEY, _PROBE_HEADERS, date=theirs['date']).items()
                if name.lower() in ('date', 'authorization', 'x-oss-security-token')}
        if ours != theirs:
            return None
        return signer

    def sign(self, key, headers, date=None):
        """`headers` plus Date, the security token if any and Authorization, for a GET of
        `key` (as listed, not encoded) in this bucket. `headers` holds no Content-MD5 or
        Content-Type (a GET has no body), and its x-oss-* names are lower-case."""
        signed = dict(headers)
        signed['Date'] = date or self._now()
        if self._token is not None:
            signed['x-oss-security-token'] = self._token
        oss_headers = sorted((name.lower(), value) for name, value in signed.items()
                             if name[:6].lower() == 'x-oss-')
        canonical = ''.join(f'{name}:{value}\n' for name, value in oss_headers)
        text = f'GET\n\n\n{signed["Date"]}\n{canonical}/{self._bucket}/{key}'
        digest = hmac.new(self._secret, text.encode('utf-8'), hashlib.sha1).digest()
        signed['Authorization'] = f'OSS {self._key_id}:{base64.b64encode(digest).decode()}'
        return signed

    def _now(self):
        """The HTTP date of now, made once a second (as oss2's `utils.http_date`)."""
        second = int(time.time())
        if second != self._second:
            self._date = email.utils.formatdate(second, usegmt=True)
            self._second = second
        return self._date

