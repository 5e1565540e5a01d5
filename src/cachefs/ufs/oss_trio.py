"""OSS ranged GETs on the trio thread: `s3_trio`'s connection pool and strict HTTP/1.1 parser,
with OSS's URL, V1 signature (`oss_sign`) and error codes (`oss_errors`), instead of oss2's
`get_object` in a worker thread.

Why: the S3 store reads on the trio thread for the same reason (`s3_trio`): a worker thread
costs the hand-off, GIL ping-pong with the FUSE loop and the SDK's per-request machinery, and a
first epoch over small files is one GET per file (bench/oss_cost.py measures both paths).

What stays oss2's: the object URL (`Bucket._make_url`: path style for IP and localhost
endpoints and with --path-style, virtual-host style otherwise, the key percent-encoded with '/'
too), checked once for its shape and for the encoding of a key of odd characters; the
signature's rules (`OssSigner.matching` compares ours with oss2's on a probe). The TLS
trust is requests' (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's bundle), as oss2's
session has it. Where requests would go through a proxy (HTTP(S)_PROXY for the endpoint),
or the signature differs, the store keeps oss2 for reads.
An answer outside `s3_get.HANDLED` (a redirect, 400, 416) or a success body without a
Content-Length raises `UseSdk`, and the store repeats that read through oss2 (`s3_detour`).
Every check of `s3_trio` applies: the exact range, length and ETag of the answer before its
body, nothing past the body, connections dropped after any error, pooled ones bounded in idle
time, age and requests, an idle connection the store closed replaced once.
"""

import logging
import os
from urllib.parse import quote, urlsplit

import requests.certs
import requests.utils

from .oss_errors import OSS_CODES
from .oss_sign import PROBE_KEY
from .s3_get import UseSdk, error_answer, range_headers
from .s3_trio import PooledGetter, verifying_context

log = logging.getLogger(__name__)

_PROBE_KEY = 'cachefs-url-probe'


def ca_bundle():
    """The CA bundle requests (so oss2) verifies an https endpoint with."""
    return (os.environ.get('REQUESTS_CA_BUNDLE') or os.environ.get('CURL_CA_BUNDLE')
            or requests.certs.where())


def ssl_context():
    """A TLS context that trusts what requests does: the `ca_bundle` file, or the folder of
    certificates it names (requests takes a folder too). Raises `UseSdk` (oss2 keeps reads)
    when it cannot be loaded: a missing or empty bundle must not fail the mount here."""
    bundle = ca_bundle()
    try:
        return verifying_context(bundle)
    except OSError as exc:          # ssl.SSLError too
        raise UseSdk(f'the CA bundle {bundle} cannot be loaded ({exc})') from None


class OssTrioGetter(PooledGetter):
    """Signed ranged GETs of one OSS bucket's object versions over pooled trio connections."""

    def __init__(self, bucket, signer):
        """`bucket`: the store's oss2.Bucket (its URL rules); `signer`: an `OssSigner` that
        signs as the bucket's auth does."""
        url = bucket._make_url(bucket.bucket_name, _PROBE_KEY)
        parts = urlsplit(url)
        if parts.query or parts.fragment or not parts.path.endswith('/' + _PROBE_KEY):
            raise UseSdk(f'unexpected object URL shape {parts.scheme}://{parts.netloc}'
                         f'{parts.path}')
        self._prefix = url[:-len(_PROBE_KEY)]
        self._path_prefix = parts.path[:-len(_PROBE_KEY)]
        # the keys' encoding too, on the signature probe's key of odd characters
        odd = urlsplit(bucket._make_url(bucket.bucket_name, PROBE_KEY)).path
        if odd != self._target(PROBE_KEY):
            raise UseSdk(f'oss2 encodes keys another way ({odd!r})')
        self._host_header = parts.netloc            # as requests sends it
        self._signer = signer
        context = None
        if parts.scheme == 'https':
            context = ssl_context()
        self._open_pool(self._prefix, context)

    @staticmethod
    def usable_with(bucket):
        """Why this path cannot replace oss2 for `bucket`, or None when it can."""
        url = bucket._make_url(bucket.bucket_name, _PROBE_KEY)
        if getattr(bucket, 'proxies', None) or requests.utils.get_environ_proxies(url):
            return 'requests go through a proxy'
        if urlsplit(url).scheme not in ('http', 'https'):
            return f'the endpoint {bucket.endpoint} is neither http nor https'
        return None

    def _range_headers(self, etag, offset, length):
        headers = range_headers(etag, offset, length)
        # 'standard' makes an unsatisfiable range an error instead of a whole-object reply.
        headers['x-oss-range-behavior'] = 'standard'
        return headers

    def _target(self, key):
        """The request target of `key`: percent-encoded as oss2 does ('/' too)."""
        try:
            return self._path_prefix + quote(key, safe='')
        except UnicodeEncodeError:
            raise UseSdk('a key that is not valid UTF-8') from None

    def _signed(self, key, headers):
        """The request's bytes: the key encoded (`_target`), signed over the key as it is."""
        return self._request_bytes(self._target(key), self._host_header,
                                   self._signer.sign(key, headers))

    @staticmethod
    def _error(status, body):
        raise error_answer(status, body, OSS_CODES)
