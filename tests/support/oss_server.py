"""A small, honest Aliyun OSS server for tests.

Why this exists
---------------
cachefs talks to object storage through ``oss2``, the Aliyun OSS SDK.  The
usual local stand-ins (SeaweedFS, moto, s3rver, MinIO) speak S3: they reject
oss2's ``Authorization: OSS <id>:<sig>`` header, and their listing XML lacks
the OSS-specific parts oss2 parses (``EncodingType``, ``Type``, ...).  So the
tests run against this server instead.  It is meant to be *honest*: it checks
signatures the way Aliyun documents them (a wrong secret fails exactly as it
would on real OSS) and answers with Aliyun's status codes, headers and XML, so
a client that passes here should not be surprised by the real service.

What it implements (the subset cachefs needs)
---------------------------------------------
* Addressing: path style (``http://127.0.0.1:PORT/bucket/key``, which oss2
  uses for IP and ``localhost`` endpoints) and virtual-host style
  (``Host: bucket.<ip|localhost|domain>``).  Absolute-form request targets
  are accepted too, so the server can stand in as an HTTP proxy for
  virtual-host clients.
* Authentication: OSS V1 header signatures (``Authorization: OSS id:sig``),
  V1 presigned URLs (``OSSAccessKeyId``/``Expires``/``Signature``), V4 header
  signatures (``OSS4-HMAC-SHA256``), STS security tokens
  (``x-oss-security-token``), anonymous access to public buckets, and the
  15-minute clock-skew limit.  V2 (``OSS2``) and V4 presigned URLs are not.
* Service: ListBuckets.
* Bucket: PutBucket (with ``x-oss-acl``), DeleteBucket, GetBucketInfo,
  GetBucketLocation, GetBucketAcl, ListObjects (V1) and ListObjectsV2 with
  prefix, delimiter, marker / continuation-token / start-after, max-keys,
  fetch-owner and ``encoding-type=url``.
* Object: PutObject (Content-MD5 checked, ``Transfer-Encoding: chunked``
  accepted, user metadata kept), GetObject (single ranges with OSS's lenient
  or ``x-oss-range-behavior: standard`` semantics, conditional headers,
  ``response-*`` overrides), HeadObject, GetObjectMeta, DeleteObject.
  ``x-oss-hash-crc64ecma`` is sent only when crcmod's C extension is
  importable (oss2 depends on it); otherwise the header is omitted, which
  oss2 tolerates.
* Everything else (multipart, append, copy, ACL writes, tagging, ...) answers
  ``NotImplemented`` rather than pretending to work.

Objects live one file each under ``root_dir`` with a JSON sidecar holding the
ETag, size, Last-Modified and stored headers, so large objects never sit in
memory and a server restarted on the same directory sees the same data.

Typical use::

    with OssServer(tmp_path, {"AK": "SK"}) as server:
        server.create_bucket("bkt")
        bucket = oss2.Bucket(oss2.Auth("AK", "SK"), server.endpoint, "bkt")
        bucket.put_object("a.txt", b"hi")
        assert server.request_count("PUT") == 1

Run in the foreground with::

    python tests/support/oss_server.py --root DIR --port 9000 --key AK:SK --bucket bkt
"""

import argparse
import base64
import binascii
import bisect
import calendar
import collections
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import socketserver
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape as _xml_escape

log = logging.getLogger(__name__)

# Query parameters that take part in the V1 CanonicalizedResource.  Copied
# from oss2 2.19 (oss2/auth.py ProviderAuth._subresource_key_set): the server
# must sign exactly what the SDK signs, and anything else in the query string
# (prefix, marker, max-keys, list-type, ...) is deliberately left out.
SUBRESOURCES = frozenset([
    'response-content-type', 'response-content-language',
    'response-cache-control', 'logging', 'response-content-encoding',
    'acl', 'uploadId', 'uploads', 'partNumber', 'group', 'link',
    'delete', 'website', 'location', 'objectInfo', 'objectMeta',
    'response-expires', 'response-content-disposition', 'cors', 'lifecycle',
    'restore', 'qos', 'referer', 'stat', 'bucketInfo', 'append', 'position', 'security-token',
    'live', 'comp', 'status', 'vod', 'startTime', 'endTime', 'x-oss-process',
    'symlink', 'callback', 'callback-var', 'tagging', 'encryption', 'versions',
    'versioning', 'versionId', 'policy', 'requestPayment', 'x-oss-traffic-limit', 'qosInfo',
    'asyncFetch',
    'x-oss-request-payer', 'sequential', 'inventory', 'inventoryId', 'continuation-token',
    'worm', 'wormId', 'wormExtend', 'replication', 'replicationLocation',
    'replicationProgress', 'transferAcceleration', 'cname', 'metaQuery',
    'x-oss-ac-source-ip', 'x-oss-ac-subnet-mask', 'x-oss-ac-vpc-id', 'x-oss-ac-forward-allow',
    'resourceGroup', 'style', 'styleName', 'x-oss-async-process', 'regionList',
    'x-oss-write-get-object-response',
    'bucketArchiveDirectRead', 'httpsConfig', 'redundancyTransition',
    'x-oss-target-redundancy-type',
    'x-oss-redundancy-transition-taskid',
    'accessPoint', 'accessPointPolicy', 'publicAccessBlock', 'x-oss-access-point-name',
    'requesterQosInfo', 'qosRequester', 'resourcePoolInfo', 'resourcePool', 'resourcePoolBuckets',
])

# GetObject query parameters that override response headers (they are
# sub-resources, so they are signed, but they do not select another API).
RESPONSE_OVERRIDES = {
    'response-content-type': 'Content-Type',
    'response-content-language': 'Content-Language',
    'response-expires': 'Expires',
    'response-cache-control': 'Cache-Control',
    'response-content-disposition': 'Content-Disposition',
    'response-content-encoding': 'Content-Encoding',
}

# Standard headers PutObject remembers and GetObject/HeadObject return.
STORED_HEADERS = ('Content-Type', 'Content-Encoding', 'Content-Disposition',
                  'Content-Language', 'Cache-Control', 'Expires')

CHUNK_SIZE = 1 << 20          # GET bodies are streamed from disk in 1 MiB pieces
MAX_CLOCK_SKEW = 15 * 60      # OSS rejects requests whose Date is > 15 min off
MAX_KEY_BYTES = 1023          # OSS object-name limit
ACLS = ('private', 'public-read', 'public-read-write')
BUCKET_NAME_RE = re.compile(r'^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$')
ISO8601 = '%Y-%m-%dT%H:%M:%S.000Z'


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

class OssError(Exception):
    """An error answered with Aliyun's <Error> XML body."""

    def __init__(self, status, code, message, **extra):
        super().__init__('%s %s: %s' % (status, code, message))
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra            # extra child elements, e.g. Key, BucketName
        self.headers = []             # extra response headers, e.g. Content-Range


def no_such_bucket(bucket):
    return OssError(404, 'NoSuchBucket', 'The specified bucket does not exist.', BucketName=bucket)


def no_such_key(key):
    return OssError(404, 'NoSuchKey', 'The specified key does not exist.', Key=key)


def invalid_argument(message, name=None, value=None):
    extra = {}
    if name is not None:
        extra = {'ArgumentName': name, 'ArgumentValue': value or ''}
    return OssError(400, 'InvalidArgument', message, **extra)


def not_implemented(what):
    # OSS (and oss2's exception table) use 400 for NotImplemented.
    return OssError(400, 'NotImplemented', 'This test server does not implement %s.' % what)


def method_not_allowed():
    return OssError(405, 'MethodNotAllowed',
                    'The specified method is not allowed against this resource.')


def access_denied(message):
    return OssError(403, 'AccessDenied', message)


def invalid_access_key(key_id):
    return OssError(403, 'InvalidAccessKeyId',
                    'The OSS Access Key Id you provided does not exist in our records.',
                    OSSAccessKeyId=key_id)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def http_date(ts):
    """RFC 1123 date, as used by Date and Last-Modified."""
    return email.utils.formatdate(ts, usegmt=True)


def iso8601(ts):
    return time.strftime(ISO8601, time.gmtime(ts))


def parse_http_date(value):
    """Seconds since the epoch, or None when the value is not an HTTP date."""
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None or dt.tzinfo is None:
        return None
    return dt.timestamp()


def is_ip_or_localhost(host):
    """Mirror of oss2.utils.is_ip_or_localhost (host without port)."""
    if host == 'localhost':
        return True
    try:
        ipaddress.ip_address(host.strip('[]'))
    except ValueError:
        return False
    return True


def split_host_port(host_header):
    host = host_header.strip().lower()
    if host.startswith('['):                       # [v6]:port
        end = host.find(']')
        return host[:end + 1], host[end + 2:]
    name, _, port = host.partition(':')
    return name, port


def xml_text(value):
    return _xml_escape('' if value is None else str(value))


def xml_doc(root, children):
    """Render a nested structure as OSS-style XML.

    children is a list of (tag, value) where value is a string/number, None
    (empty element) or another list of (tag, value).
    """
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n']

    def render(tag, value):
        if isinstance(value, list):
            parts.append('<%s>' % tag)
            for child_tag, child_value in value:
                render(child_tag, child_value)
            parts.append('</%s>' % tag)
        else:
            parts.append('<%s>%s</%s>' % (tag, xml_text(value), tag))

    render(root, children)
    return ''.join(parts).encode('utf-8')


def new_request_id():
    # Real OSS request ids are 24 upper-case hex digits.
    return secrets.token_hex(12).upper()


def _crc64_factory():
    """Return a CRC-64/ECMA factory when crcmod's C extension is present.

    oss2 compares x-oss-hash-crc64ecma with its own CRC on PutObject and on
    full downloads, so a wrong value would break clients; computing it in pure
    Python is far too slow for large objects.  Without the C extension the
    header is simply omitted, which oss2 accepts.
    """
    try:
        import crcmod
        import crcmod._crcfunext  # noqa: F401  (only the fast path is acceptable)
    except ImportError:
        return None
    # Same parameters as oss2.utils.Crc64.
    return lambda: crcmod.Crc(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------

def canonical_resource(bucket, key, query):
    """V1 CanonicalizedResource: /bucket/key plus the signed sub-resources.

    Values are the decoded query values; an empty value is written as the
    bare name ("?objectMeta", "?continuation-token"), exactly like oss2.
    """
    if bucket is None:
        resource = '/'
    else:
        resource = '/%s/%s' % (bucket, key or '')
    subs = sorted((k, v) for k, v in query.items() if k in SUBRESOURCES)
    if subs:
        resource += '?' + '&'.join(k + '=' + v if v else k for k, v in subs)
    return resource


def v1_string_to_sign(method, headers, date, resource):
    """Bytes that V1 signs.

    headers maps lower-case names to the values as received (str decoded as
    latin-1, i.e. the raw wire bytes); resource is a str encoded as UTF-8.
    """
    oss_headers = sorted((k, v) for k, v in headers.items() if k.startswith('x-oss-'))
    canon = b''.join(k.encode('latin-1') + b':' + v.encode('latin-1') + b'\n'
                     for k, v in oss_headers)
    return b'\n'.join([
        method.encode('ascii'),
        headers.get('content-md5', '').encode('latin-1'),
        headers.get('content-type', '').encode('latin-1'),
        date.encode('latin-1'),
        canon + resource.encode('utf-8'),
    ])


def v1_signature(secret, string_to_sign):
    digest = hmac.new(secret.encode('utf-8'), string_to_sign, hashlib.sha1).digest()
    return base64.b64encode(digest).decode('ascii')


def v4_uri_encode(text, keep_slash):
    # quote() keeps A-Z a-z 0-9 _ . - ~ and writes upper-case %XX, which is
    # exactly oss2's __v4_uri_encode.
    return quote(text, safe='/' if keep_slash else '')


def v4_canonical_request(method, bucket, key, query, headers, additional, payload_hash):
    uri = '/' if bucket is None else '/%s/%s' % (bucket, key or '')
    encoded = sorted((v4_uri_encode(k, False), v4_uri_encode(v, False)) for k, v in query.items())
    canon_query = '&'.join(k + '=' + v if v else k for k, v in encoded)
    signed = sorted((k, v) for k, v in headers.items()
                    if k.startswith('x-oss-') or k in ('content-type', 'content-md5')
                    or k in additional)
    canon_headers = b''.join(k.encode('latin-1') + b':' + v.encode('latin-1') + b'\n'
                             for k, v in signed)
    return (method.encode('ascii') + b'\n'
            + v4_uri_encode(uri, True).encode('ascii') + b'\n'
            + canon_query.encode('ascii') + b'\n'
            + canon_headers + b'\n'
            + ';'.join(sorted(additional)).encode('ascii') + b'\n'
            + payload_hash.encode('latin-1'))


def v4_signature(secret, date_time, scope, canonical_request):
    date, region, product, _ = scope.split('/')
    string_to_sign = '\n'.join(['OSS4-HMAC-SHA256', date_time, scope,
                                hashlib.sha256(canonical_request).hexdigest()])
    key = ('aliyun_v4' + secret).encode('utf-8')
    for part in (date, region, product, 'aliyun_v4_request'):
        key = hmac.new(key, part.encode('utf-8'), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode('utf-8'), hashlib.sha256).hexdigest(), string_to_sign


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------

class ObjectMeta:
    """What the sidecar remembers about one object."""

    __slots__ = ('key', 'size', 'etag', 'mtime', 'crc64', 'headers', 'file_id')

    def __init__(self, key, size, etag, mtime, crc64=None, headers=None, file_id=None):
        self.key = key
        self.size = size
        self.etag = etag              # upper-case hex MD5, without quotes
        self.mtime = mtime            # whole seconds, like Last-Modified
        self.crc64 = crc64
        self.headers = headers or {}  # stored Content-Type, x-oss-meta-*, ...
        self.file_id = file_id or hashlib.sha1(key.encode('utf-8')).hexdigest()

    def to_json(self):
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data):
        return cls(**data)


class BucketState:
    def __init__(self, name, directory, created, acl):
        self.name = name
        self.directory = directory
        self.created = created
        self.acl = acl
        self.objects = {}        # key -> ObjectMeta
        self.sorted_keys = []    # UTF-8 encoded keys, sorted bytewise like OSS

    @property
    def object_dir(self):
        return os.path.join(self.directory, 'objects')

    def data_path(self, meta):
        return os.path.join(self.object_dir, meta.file_id + '.data')

    def meta_path(self, meta):
        return os.path.join(self.object_dir, meta.file_id + '.meta.json')


class Storage:
    """Buckets and objects on disk, with an in-memory index for listing.

    One lock guards the index; data files are replaced atomically, and readers
    open the file under the lock, so a reader always gets the bytes that match
    the ETag it reports even while a writer replaces the object.
    """

    def __init__(self, root_dir):
        self.root = os.path.abspath(root_dir)
        os.makedirs(self.root, exist_ok=True)
        self.lock = threading.RLock()
        self.buckets = {}
        self._load()

    # -- persistence -------------------------------------------------------

    def _load(self):
        for name in sorted(os.listdir(self.root)):
            info_path = os.path.join(self.root, name, 'bucket.json')
            if not os.path.isfile(info_path):
                continue
            with open(info_path) as f:
                info = json.load(f)
            bucket = BucketState(name, os.path.join(self.root, name), info['created'], info['acl'])
            for entry in os.listdir(bucket.object_dir):
                if entry.endswith('.meta.json'):
                    with open(os.path.join(bucket.object_dir, entry)) as f:
                        self._index(bucket, ObjectMeta.from_json(json.load(f)))
            self.buckets[name] = bucket
            log.debug('loaded bucket %s with %d objects', name, len(bucket.objects))

    @staticmethod
    def _write_json(path, data):
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _save_bucket(self, bucket):
        self._write_json(os.path.join(bucket.directory, 'bucket.json'),
                         {'created': bucket.created, 'acl': bucket.acl})

    @staticmethod
    def _index(bucket, meta):
        if meta.key not in bucket.objects:
            bisect.insort(bucket.sorted_keys, meta.key.encode('utf-8'))
        bucket.objects[meta.key] = meta

    # -- buckets -----------------------------------------------------------

    def create_bucket(self, name, acl='private'):
        """Create a bucket; re-creating one only updates its ACL.

        Returns True when the bucket was new.
        """
        with self.lock:
            bucket = self.buckets.get(name)
            if bucket is not None:
                bucket.acl = acl
                self._save_bucket(bucket)
                return False
            bucket = BucketState(name, os.path.join(self.root, name), int(time.time()), acl)
            os.makedirs(bucket.object_dir, exist_ok=True)
            self._save_bucket(bucket)
            self.buckets[name] = bucket
            return True

    def get_bucket(self, name):
        with self.lock:
            bucket = self.buckets.get(name)
        if bucket is None:
            raise no_such_bucket(name)
        return bucket

    def delete_bucket(self, name):
        with self.lock:
            bucket = self.get_bucket(name)
            if bucket.objects:
                raise OssError(409, 'BucketNotEmpty',
                               'The bucket you tried to delete is not empty.', BucketName=name)
            for entry in os.listdir(bucket.object_dir):
                os.unlink(os.path.join(bucket.object_dir, entry))
            os.rmdir(bucket.object_dir)
            os.unlink(os.path.join(bucket.directory, 'bucket.json'))
            os.rmdir(bucket.directory)
            del self.buckets[name]

    # -- objects -----------------------------------------------------------

    def put_object(self, bucket_name, key, chunks, headers=None, expected_md5=None,
                   crc_factory=None):
        """Stream chunks into a new version of key and return its ObjectMeta."""
        bucket = self.get_bucket(bucket_name)
        md5 = hashlib.md5()
        crc = crc_factory() if crc_factory else None
        size = 0
        fd, tmp = tempfile.mkstemp(dir=bucket.object_dir, prefix='.upload-')
        try:
            with os.fdopen(fd, 'wb') as f:
                for chunk in chunks:
                    f.write(chunk)
                    md5.update(chunk)
                    if crc is not None:
                        crc.update(chunk)
                    size += len(chunk)
            if expected_md5 is not None and md5.digest() != expected_md5:
                raise OssError(400, 'InvalidDigest', 'The Content-MD5 you specified was invalid.')
            meta = ObjectMeta(key, size, md5.hexdigest().upper(), int(time.time()),
                              crc.crcValue if crc is not None else None, headers or {})
            with self.lock:
                if self.buckets.get(bucket_name) is not bucket:
                    raise no_such_bucket(bucket_name)
                os.replace(tmp, bucket.data_path(meta))
                tmp = None
                self._write_json(bucket.meta_path(meta), meta.to_json())
                self._index(bucket, meta)
            return meta
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def open_object(self, bucket_name, key):
        """Return (meta, open binary file) for the current version of key."""
        with self.lock:
            bucket = self.get_bucket(bucket_name)
            meta = bucket.objects.get(key)
            if meta is None:
                raise no_such_key(key)
            return meta, open(bucket.data_path(meta), 'rb')

    def head_object(self, bucket_name, key):
        with self.lock:
            meta = self.get_bucket(bucket_name).objects.get(key)
        if meta is None:
            raise no_such_key(key)
        return meta

    def delete_object(self, bucket_name, key):
        with self.lock:
            bucket = self.get_bucket(bucket_name)
            meta = bucket.objects.pop(key, None)
            if meta is None:
                return False
            encoded = key.encode('utf-8')
            del bucket.sorted_keys[bisect.bisect_left(bucket.sorted_keys, encoded)]
            os.unlink(bucket.data_path(meta))
            os.unlink(bucket.meta_path(meta))
            return True

    def list_objects(self, bucket_name, prefix, delimiter, start_after, max_keys):
        """One page of a listing, with OSS/S3 semantics.

        Keys and common prefixes both count towards max_keys.  start_after is
        exclusive; when it equals a common prefix (the NextMarker of a page
        that ended on a prefix), that whole prefix is skipped so it is not
        reported twice.  Returns (objects, prefixes, next_marker) where
        next_marker is None unless the listing is truncated.
        """
        bucket = self.get_bucket(bucket_name)
        pfx = prefix.encode('utf-8')
        delim = delimiter.encode('utf-8')
        start = start_after.encode('utf-8') if start_after else b''
        with self.lock:
            keys, objects = bucket.sorted_keys, bucket.objects
            i = max(bisect.bisect_left(keys, pfx), bisect.bisect_right(keys, start) if start else 0)
            contents, prefixes, last = [], [], None
            while i < len(keys) and keys[i].startswith(pfx):
                k = keys[i]
                cut = k.find(delim, len(pfx)) if delim else -1
                if cut >= 0:
                    common = k[:cut + len(delim)]
                    while i < len(keys) and keys[i].startswith(common):
                        i += 1
                    if common == start:
                        continue
                    if len(contents) + len(prefixes) == max_keys:
                        return contents, prefixes, last
                    prefixes.append(common.decode('utf-8'))
                    last = common.decode('utf-8')
                    continue
                if len(contents) + len(prefixes) == max_keys:
                    return contents, prefixes, last
                contents.append(objects[k.decode('utf-8')])
                last = k.decode('utf-8')
                i += 1
        return contents, prefixes, None


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------

class RequestRecord(collections.namedtuple('RequestRecord', 'method bucket key query')):
    """One logged request: (method, bucket, key, query dict).

    bucket is None for service requests and key is None for bucket requests.
    The .headers attribute (lower-case names) rides along for tests that need
    e.g. the Range a client asked for; it is not part of the tuple, so
    ``method, bucket, key, query = record`` keeps working.
    """
    # No __slots__ here on purpose: that gives instances a __dict__ for .headers.


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a client that opens 32 connections at once
    # (a cold read with 32 requests in flight) would see SYNs dropped and wait out the 1 s
    # retransmission, which no real store's front end makes it do.
    request_queue_size = 128

    def __init__(self, address, handler, oss):
        self.oss = oss
        self.connections = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on
        # reverse DNS in sandboxes; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def close_connections(self):
        """Cut keep-alive connections so clients see the server go away."""
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Request:
    """The parts of an HTTP request that OSS routing and signing look at."""

    def __init__(self, method, host, bucket, key, query, headers):
        self.method = method
        self.host = host
        self.bucket = bucket      # None: service-level request
        self.key = key            # None: bucket-level request
        self.query = query        # decoded, last value wins
        self.headers = headers    # lower-case name -> value

    def subresources(self):
        return {k for k in self.query if k in SUBRESOURCES}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'AliyunOSS'

    def version_string(self):
        return self.server_version

    # -- connection bookkeeping ---------------------------------------------

    def setup(self):
        # A server that closes idle keep-alive connections (as OSS and load balancers do):
        # the socket timeout ends the wait for the next request, and the connection closes.
        self.timeout = self.server.oss.idle_timeout
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle
        # plus the client's delayed ACK adds ~40 ms to every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, fmt, *args):
        log.debug('%s - %s', self.address_string(), fmt % args)

    # -- entry points --------------------------------------------------------

    def do_GET(self):
        self._serve()

    do_HEAD = do_PUT = do_DELETE = do_POST = do_OPTIONS = do_PATCH = do_GET

    def _serve(self):
        oss = self.server.oss
        self.request_id = new_request_id()
        self._body_left = None          # set by _body_chunks; None = not started
        self._headers_sent = False
        self._host = self.headers.get('Host', '')
        try:
            req = self._parse()
            oss._record(req)
            oss._authorize(req)
            handler = self._route(req)
            handler(req)
            self._drain_body()          # a body nobody wanted (e.g. on GET)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            if self._headers_sent:      # failed mid-body: all we can do is hang up
                log.exception('error while sending %s %s', self.command, self.path)
                self.close_connection = True
                return
            if not isinstance(exc, OssError):   # keep the server alive, but say so
                log.exception('internal error serving %s %s', self.command, self.path)
                exc = OssError(500, 'InternalError',
                               'We encountered an internal error. Please try again.')
            self._drain_body()
            self._send_error(exc)

    # -- parsing -------------------------------------------------------------

    def _parse(self):
        target = urlsplit(self.path)          # also handles absolute-form targets
        host = target.netloc or self._host
        self._host = host
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = headers[name] + ',' + value if name in headers else value
        path = target.path or '/'

        bucket = self.server.oss._bucket_from_host(host)
        if bucket is None:                    # path style: /bucket/key
            name, _, rest = path[1:].partition('/')
            bucket = unquote(name) or None
            raw_key = rest if bucket else ''
        else:                                 # virtual host: /key
            raw_key = path[1:]
        try:
            key = unquote(raw_key, errors='strict') or None
        except UnicodeDecodeError:
            raise OssError(400, 'InvalidObjectName', 'The specified object is not valid.')
        return _Request(self.command, host, bucket, key, query, headers)

    def _route(self, req):
        oss = self.server.oss
        if req.bucket is None:
            if req.method == 'GET' and not req.subresources() - {'security-token'}:
                return oss._list_buckets_handler(self)
            raise method_not_allowed()
        if req.key is None:
            return oss._bucket_route(self, req)
        return oss._object_route(self, req)

    # -- request body ----------------------------------------------------------

    def _body_chunks(self, chunk_size=CHUNK_SIZE):
        """Yield the request body (Content-Length or chunked) in pieces; call once."""
        assert self._body_left is None, 'request body read twice'
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            self._body_left = -1
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b';', 1)[0].strip() or b'0', 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b'\r\n', b'\n', b''):
                        pass                     # trailers
                    break
                while size:
                    data = self.rfile.read(min(size, chunk_size))
                    if not data:
                        raise ConnectionResetError('client closed mid-body')
                    size -= len(data)
                    yield data
                self.rfile.readline(65537)       # CRLF after each chunk
            self._body_left = 0
            return
        self._body_left = int(self.headers.get('Content-Length') or 0)
        while self._body_left > 0:
            data = self.rfile.read(min(self._body_left, chunk_size))
            if not data:
                raise ConnectionResetError('client closed mid-body')
            self._body_left -= len(data)
            yield data

    def has_body_length(self):
        return ('Content-Length' in self.headers
                or 'chunked' in self.headers.get('Transfer-Encoding', '').lower())

    def _drain_body(self):
        """Consume an unread request body so keep-alive stays in sync."""
        try:
            if self._body_left is None:
                for _ in self._body_chunks():
                    pass
            elif self._body_left != 0:
                self.close_connection = True     # abandoned mid-body
        except (ValueError, OSError):
            self.close_connection = True

    def read_body(self, limit=1 << 20):
        """Small bodies (XML configuration) read whole."""
        data = b''.join(self._body_chunks())
        if len(data) > limit:
            raise invalid_argument('Request body is too large.')
        return data

    # -- responses -------------------------------------------------------------

    def send_oss(self, status, headers=(), body=b'', length=None):
        """Send a complete response; body is bytes or an iterable of bytes."""
        if length is None:
            length = len(body)
        self.send_response(status)
        self.send_header('x-oss-request-id', self.request_id)
        self.send_header('Connection', 'close' if self.close_connection else 'keep-alive')
        for name, value in headers:
            self.send_header(name, value)
        if status != 304:   # a 304 carries no body and must not claim one
            self.send_header('Content-Length', str(length))
        self.end_headers()
        self._headers_sent = True
        if self.command == 'HEAD' or status == 304:
            return
        if isinstance(body, (bytes, bytearray)):
            self.wfile.write(body)
        else:
            for chunk in body:
                self.wfile.write(chunk)

    def send_xml(self, status, body, headers=()):
        self.send_oss(status, [('Content-Type', 'application/xml')] + list(headers), body)

    def _send_error(self, err):
        children = [('Code', err.code), ('Message', err.message),
                    ('RequestId', self.request_id), ('HostId', self._host)]
        children += list(err.extra.items())
        body = xml_doc('Error', children)
        headers = [('Content-Type', 'application/xml')] + err.headers
        if self.command == 'HEAD':
            # HEAD cannot carry the XML, so OSS base64s it into x-oss-err;
            # oss2 decodes that to tell NoSuchKey from NoSuchBucket.
            headers.append(('x-oss-err', base64.b64encode(body).decode('ascii')))
        log.debug('%s %s -> %s %s', self.command, self.path, err.status, err.code)
        self.send_oss(err.status, headers, body)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class OssServer:
    """An OSS-compatible HTTP server on 127.0.0.1 backed by a directory.

    :param root_dir: where buckets and objects are stored (created if needed;
        existing content from an earlier run is loaded).
    :param credentials: {access_key_id: access_key_secret}.
    :param port: TCP port; 0 picks a free one.
    :param sts_credentials: iterable of (access_key_id, secret, security_token)
        triples; such keys are only accepted with their token.
    :param location: region reported by GetBucketInfo/GetBucketLocation and
        checked in V4 signatures (without the "oss-" prefix).
    :param domain: extra host name for virtual-host style, so that
        "bucket.<domain>" addresses a bucket.  IPs and localhost always work.
    :param crc64: send x-oss-hash-crc64ecma; None means "if crcmod's C
        extension is importable".
    :param idle_timeout: seconds a connection may wait for its next request
        before the server closes it (None: no limit).
    """

    owner_id = '1000000000000000'
    owner_name = 'cachefs-test'

    def __init__(self, root_dir, credentials, port=0, sts_credentials=(),
                 location='oss-cn-hangzhou', domain=None, crc64=None, idle_timeout=None):
        self.storage = Storage(root_dir)
        self.idle_timeout = idle_timeout
        self.credentials = dict(credentials)
        self.sts_credentials = {key: (secret, token) for key, secret, token in sts_credentials}
        self.location = location
        self.domain = domain.lower() if domain else None
        factory = _crc64_factory()
        if crc64 and factory is None:
            raise RuntimeError('crc64=True needs crcmod with its C extension')
        self._crc_factory = factory if crc64 is not False else None
        self._requests = []
        self._requests_lock = threading.Lock()
        # Switches for tests of clients facing a store (or proxy) that ignores these headers.
        self.ignore_if_match = False
        self.ignore_range = False
        self._httpd = _HTTPServer(('127.0.0.1', port), _Handler, self)
        self._thread = None

    # -- lifecycle -----------------------------------------------------------

    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def endpoint(self):
        return 'http://127.0.0.1:%d' % self.port

    def start(self):
        """Serve in a daemon thread; returns self."""
        # A short poll interval keeps stop() quick (shutdown waits for one poll).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name='oss-server', daemon=True)
        self._thread.start()
        log.info('OSS test server listening on %s (root %s)', self.endpoint, self.storage.root)
        return self

    def serve_forever(self):
        self._httpd.serve_forever()

    def stop(self):
        """Stop serving, drop open connections and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.close_connections()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- direct data access (no HTTP) ------------------------------------------

    def create_bucket(self, name, acl='private'):
        """Create a bucket; acl is 'private', 'public-read' or 'public-read-write'."""
        if acl not in ACLS:
            raise ValueError('bad acl %r' % acl)
        if not BUCKET_NAME_RE.match(name):
            raise ValueError('bad bucket name %r' % name)
        self.storage.create_bucket(name, acl)

    def put_object(self, bucket, key, data, content_type='application/octet-stream'):
        """Store data (bytes or a binary file object) under key; returns the ETag."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            chunks = [bytes(data)]
        else:
            chunks = iter(lambda: data.read(CHUNK_SIZE), b'')
        meta = self.storage.put_object(bucket, key, chunks, {'Content-Type': content_type},
                                       crc_factory=self._crc_factory)
        return meta.etag

    def get_object(self, bucket, key):
        """The bytes stored under key (for assertions on small objects)."""
        meta, f = self.storage.open_object(bucket, key)
        with f:
            return f.read()

    def delete_object(self, bucket, key):
        return self.storage.delete_object(bucket, key)

    # -- request log -------------------------------------------------------------

    @property
    def requests(self):
        """A snapshot of the logged requests, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    def reset_requests(self):
        with self._requests_lock:
            self._requests.clear()

    def request_count(self, method=None, bucket=None, key=None):
        return sum(1 for r in self.requests
                   if (method is None or r.method == method)
                   and (bucket is None or r.bucket == bucket)
                   and (key is None or r.key == key))

    def _record(self, req):
        record = RequestRecord(req.method, req.bucket, req.key, dict(req.query))
        record.headers = dict(req.headers)
        with self._requests_lock:
            self._requests.append(record)

    # -- addressing ----------------------------------------------------------------

    def _bucket_from_host(self, host_header):
        """Bucket named by a virtual-host Host header, or None for path style."""
        host, _ = split_host_port(host_header)
        if not host or is_ip_or_localhost(host) or host == self.domain:
            return None
        first, _, rest = host.partition('.')
        if rest and (is_ip_or_localhost(rest) or rest == self.domain):
            return first
        return None

    # -- authentication --------------------------------------------------------------

    def _secret_for(self, key_id, token):
        """Secret for key_id, enforcing the STS token rules Aliyun documents."""
        if key_id in self.sts_credentials:
            secret, expected = self.sts_credentials[key_id]
            if token is None:           # STS key without its token (0002-00000003)
                raise invalid_access_key(key_id)
            if not hmac.compare_digest(token.encode('utf-8'), expected.encode('utf-8')):
                # Aliyun's docs describe this case (0002-00000008) without
                # naming the code; InvalidSecurityToken is our best reading.
                raise OssError(403, 'InvalidSecurityToken',
                               'The security token you provided is invalid.')
            return secret
        if key_id in self.credentials:
            if token is not None:       # a token turns the request into STS (0002-00000002)
                raise invalid_access_key(key_id)
            return self.credentials[key_id]
        raise invalid_access_key(key_id)

    @staticmethod
    def _check_skew(when):
        if abs(time.time() - when) > MAX_CLOCK_SKEW:
            raise OssError(403, 'RequestTimeTooSkewed',
                           'The difference between the request time and the current time is '
                           'too large.',
                           RequestTime=http_date(when), ServerTime=http_date(time.time()),
                           MaxAllowedSkewMilliseconds=str(MAX_CLOCK_SKEW * 1000))

    def _authorize(self, req):
        """Authenticate req, then check the bucket exists and the caller may use it."""
        auth = req.headers.get('authorization')
        if auth is not None:
            self._verify_header_auth(req, auth)
        elif 'Signature' in req.query or 'OSSAccessKeyId' in req.query:
            self._verify_presigned(req)
        else:
            self._check_anonymous(req)

    def _check_anonymous(self, req):
        if req.bucket is None:
            raise access_denied('Anonymous access is forbidden for this operation.')
        bucket = self.storage.get_bucket(req.bucket)
        reading = (req.method in ('GET', 'HEAD')
                   and not (req.subresources() - set(RESPONSE_OVERRIDES) - {'objectMeta'}))
        writing = req.key is not None and req.method in ('PUT', 'DELETE') and not req.subresources()
        if reading and bucket.acl in ('public-read', 'public-read-write'):
            return
        if writing and bucket.acl == 'public-read-write':
            return
        raise access_denied('You have no right to access this object because of bucket acl.')

    def _verify_header_auth(self, req, auth):
        scheme, _, rest = auth.strip().partition(' ')
        if scheme == 'OSS':
            self._verify_v1(req, rest)
        elif scheme == 'OSS4-HMAC-SHA256':
            self._verify_v4(req, rest)
        else:
            raise invalid_argument('Authorization header is invalid.', 'Authorization', auth)

    def _verify_v1(self, req, credential):
        key_id, sep, provided = credential.strip().rpartition(':')
        if not sep or not key_id:
            raise invalid_argument('Authorization header is invalid.', 'Authorization', credential)
        secret = self._secret_for(key_id, req.headers.get('x-oss-security-token'))
        # oss2 signs x-oss-date in place of Date when it is present.
        date = req.headers.get('x-oss-date') or req.headers.get('date')
        when = parse_http_date(date) if date else None
        if when is None:
            raise access_denied('OSS authentication requires a valid Date.')
        self._check_skew(when)
        self._compare_v1(req, key_id, secret, date, provided)

    def _verify_presigned(self, req):
        key_id = req.query.get('OSSAccessKeyId')
        expires = req.query.get('Expires')
        provided = req.query.get('Signature')
        if not (key_id and expires and provided):
            raise access_denied('Query-string authentication requires the Signature, Expires and '
                                'OSSAccessKeyId parameters')
        secret = self._secret_for(key_id, req.query.get('security-token'))
        try:
            expires_at = int(expires)
        except ValueError:
            raise access_denied('Invalid expiration time.')
        if expires_at < time.time():
            raise access_denied('Request has expired.')
        self._compare_v1(req, key_id, secret, expires, provided)

    def _compare_v1(self, req, key_id, secret, date, provided):
        resource = canonical_resource(req.bucket, req.key, req.query)
        to_sign = v1_string_to_sign(req.method, req.headers, date, resource)
        expected = v1_signature(secret, to_sign)
        if not hmac.compare_digest(expected.encode('ascii'), provided.encode('latin-1')):
            raise self._signature_mismatch(key_id, provided, to_sign)

    @staticmethod
    def _signature_mismatch(key_id, provided, to_sign):
        return OssError(403, 'SignatureDoesNotMatch',
                        'The request signature we calculated does not match the signature you '
                        'provided. '
                        'Check your key and signing method.',
                        StringToSign=to_sign.decode('utf-8', 'replace'),
                        SignatureProvided=provided,
                        StringToSignBytes=' '.join('%02x' % b for b in to_sign),
                        OSSAccessKeyId=key_id)

    def _verify_v4(self, req, params):
        fields = {}
        for part in params.split(','):
            name, _, value = part.strip().partition('=')
            fields[name] = value
        credential, provided = fields.get('Credential', ''), fields.get('Signature', '')
        pieces = credential.split('/')
        if len(pieces) != 5 or not provided:
            raise invalid_argument('Authorization header is invalid.', 'Authorization', params)
        key_id, scope = pieces[0], '/'.join(pieces[1:])
        date, region, product, terminator = pieces[1:]
        secret = self._secret_for(key_id, req.headers.get('x-oss-security-token'))
        date_time = req.headers.get('x-oss-date', '')
        try:
            when = calendar.timegm(time.strptime(date_time, '%Y%m%dT%H%M%SZ'))
        except ValueError:
            raise access_denied('OSS authentication requires a valid x-oss-date.')
        self._check_skew(when)
        if region != self.location.replace('oss-', '', 1):
            raise invalid_argument('Invalid signing region in Authorization header.')
        if product != 'oss' or terminator != 'aliyun_v4_request' or date != date_time[:8]:
            raise invalid_argument('Invalid credential in Authorization header.')
        additional = [h.lower() for h in fields.get('AdditionalHeaders', '').split(';') if h]
        payload = req.headers.get('x-oss-content-sha256', 'UNSIGNED-PAYLOAD')
        if payload != 'UNSIGNED-PAYLOAD':
            raise not_implemented('signed V4 payloads (only UNSIGNED-PAYLOAD)')
        canonical = v4_canonical_request(req.method, req.bucket, req.key, req.query, req.headers,
                                         additional, payload)
        expected, to_sign = v4_signature(secret, date_time, scope, canonical)
        if not hmac.compare_digest(expected.encode('ascii'), provided.encode('latin-1')):
            raise self._signature_mismatch(key_id, provided, to_sign.encode('utf-8'))

    # -- routing ---------------------------------------------------------------------

    def _bucket_route(self, http, req):
        subs = req.subresources() - {'security-token'}
        if req.method == 'PUT' and not subs:
            return lambda r: self._put_bucket(http, r)
        if req.method == 'PUT' and subs == {'acl'}:
            return lambda r: self._put_bucket(http, r, acl_only=True)
        # Every other bucket operation needs the bucket to exist.
        self.storage.get_bucket(req.bucket)
        if req.method == 'DELETE' and not subs:
            return lambda r: self._delete_bucket(http, r)
        if req.method == 'GET':
            if not subs or subs == {'continuation-token'}:
                if req.query.get('list-type') == '2':
                    return lambda r: self._list_objects_v2(http, r)
                return lambda r: self._list_objects(http, r)
            if subs == {'bucketInfo'}:
                return lambda r: self._get_bucket_info(http, r)
            if subs == {'location'}:
                return lambda r: self._get_bucket_location(http, r)
            if subs == {'acl'}:
                return lambda r: self._get_bucket_acl(http, r)
        raise not_implemented('%s on a bucket with %s'
                              % (req.method, sorted(subs) or 'no sub-resource'))

    def _object_route(self, http, req):
        subs = req.subresources() - {'security-token'}
        if len(req.key.encode('utf-8')) > MAX_KEY_BYTES or req.key[0] in '/\\':
            raise OssError(400, 'InvalidObjectName', 'The specified object is not valid.',
                           Key=req.key)
        if req.method == 'GET' and subs <= set(RESPONSE_OVERRIDES):
            return lambda r: self._get_object(http, r)
        if req.method == 'HEAD' and not subs:
            return lambda r: self._get_object(http, r)
        if req.method == 'HEAD' and subs == {'objectMeta'}:
            return lambda r: self._get_object_meta(http, r)
        if req.method == 'PUT' and not subs:
            if 'x-oss-copy-source' in req.headers:
                raise not_implemented('CopyObject')
            return lambda r: self._put_object(http, r)
        if req.method == 'DELETE' and not subs:
            return lambda r: self._delete_object(http, r)
        if req.method in ('OPTIONS', 'PATCH'):
            raise method_not_allowed()
        raise not_implemented('%s on an object with %s'
                              % (req.method, sorted(subs) or 'no sub-resource'))

    # -- service / bucket operations ------------------------------------------------------

    def _owner(self):
        return [('ID', self.owner_id), ('DisplayName', self.owner_name)]

    def _endpoints(self):
        return [('ExtranetEndpoint', '127.0.0.1:%d' % self.port),
                ('IntranetEndpoint', '127.0.0.1:%d' % self.port)]

    def _list_buckets_handler(self, http):
        def handle(req):
            prefix = req.query.get('prefix', '')
            marker = req.query.get('marker', '')
            max_keys = self._max_keys(req)
            with self.storage.lock:
                names = sorted(n for n in self.storage.buckets
                               if n.startswith(prefix) and n > marker)
                buckets = [self.storage.buckets[n] for n in names]
            page, truncated = buckets[:max_keys], len(buckets) > max_keys
            children = [('Owner', self._owner())]
            if 'prefix' in req.query or 'marker' in req.query or 'max-keys' in req.query:
                children += [('Prefix', prefix), ('Marker', marker), ('MaxKeys', max_keys),
                             ('IsTruncated', 'true' if truncated else 'false')]
                if truncated:
                    children.append(('NextMarker', page[-1].name))
            children.append(('Buckets', [('Bucket', [
                ('CreationDate', iso8601(b.created)),
                ('ExtranetEndpoint', '127.0.0.1:%d' % self.port),
                ('IntranetEndpoint', '127.0.0.1:%d' % self.port), ('Location', self.location),
                ('Name', b.name), ('Region', self.location.replace('oss-', '', 1)),
                ('StorageClass', 'Standard')]) for b in page]))
            http.send_xml(200, xml_doc('ListAllMyBucketsResult', children))
        return handle

    def _put_bucket(self, http, req, acl_only=False):
        acl = req.headers.get('x-oss-acl', 'private')
        if acl not in ACLS:
            raise invalid_argument('no such bucket access control exists', 'x-oss-acl', acl)
        if not BUCKET_NAME_RE.match(req.bucket):
            raise OssError(400, 'InvalidBucketName', 'The specified bucket is not valid.',
                           BucketName=req.bucket)
        if acl_only:
            self.storage.get_bucket(req.bucket)
        # CreateBucketConfiguration (storage class etc.) is accepted and ignored
        http.read_body()
        # All keys belong to one account here, and OSS answers success when
        # the owner re-creates an existing bucket (only the ACL changes).
        self.storage.create_bucket(req.bucket, acl)
        http.send_oss(200, [('Location', '/' + req.bucket)])

    def _delete_bucket(self, http, req):
        self.storage.delete_bucket(req.bucket)
        http.send_oss(204)

    def _get_bucket_info(self, http, req):
        bucket = self.storage.get_bucket(req.bucket)
        info = [('AccessMonitor', 'Disabled'),
                ('CreationDate', iso8601(bucket.created))] + self._endpoints() + [
                ('Location', self.location),
                ('StorageClass', 'Standard'),
                ('TransferAcceleration', 'Disabled'),
                ('CrossRegionReplication', 'Disabled'),
                ('DataRedundancyType', 'LRS'),
                ('Name', bucket.name),
                ('ResourceGroupId', 'rg-default'),
                ('Owner', [('DisplayName', self.owner_name), ('ID', self.owner_id)]),
                ('AccessControlList', [('Grant', bucket.acl)]),
                ('Comment', ''),
                ('ServerSideEncryptionRule', [('SSEAlgorithm', 'None')]),
                ('BucketPolicy', [('LogBucket', ''), ('LogPrefix', '')])]
        http.send_xml(200, xml_doc('BucketInfo', [('Bucket', info)]))

    def _get_bucket_location(self, http, req):
        http.send_xml(200, xml_doc('LocationConstraint', self.location))

    def _get_bucket_acl(self, http, req):
        bucket = self.storage.get_bucket(req.bucket)
        http.send_xml(200, xml_doc('AccessControlPolicy', [
            ('Owner', self._owner()), ('AccessControlList', [('Grant', bucket.acl)])]))

    # -- listing --------------------------------------------------------------------------

    @staticmethod
    def _max_keys(req):
        raw = req.query.get('max-keys', '') or '100'
        try:
            value = int(raw)
        except ValueError:
            raise invalid_argument('Argument max-keys is not a valid integer.', 'max-keys', raw)
        if not 0 < value <= 1000:
            raise invalid_argument('Argument max-keys must be between 1 and 1000.', 'max-keys', raw)
        return value

    @staticmethod
    def _encoder(req):
        encoding = req.query.get('encoding-type', '')
        if encoding not in ('', 'url'):
            raise invalid_argument('The Encoding-Type is invalid.', 'encoding-type', encoding)
        if encoding == 'url':
            return lambda s: quote(s, safe='/')
        return lambda s: s

    def _contents(self, objects, enc, with_owner):
        entries = []
        for meta in objects:
            entry = [('Key', enc(meta.key)), ('LastModified', iso8601(meta.mtime)),
                     ('ETag', '"%s"' % meta.etag), ('Type', 'Normal'), ('Size', meta.size),
                     ('StorageClass', 'Standard')]
            if with_owner:
                entry.append(('Owner', self._owner()))
            entries.append(('Contents', entry))
        return entries

    def _list_objects(self, http, req):
        prefix = req.query.get('prefix', '')
        delimiter = req.query.get('delimiter', '')
        marker = req.query.get('marker', '')
        max_keys = self._max_keys(req)
        enc = self._encoder(req)
        objects, prefixes, next_marker = self.storage.list_objects(req.bucket, prefix, delimiter,
                                                                   marker, max_keys)
        children = [('Name', req.bucket), ('Prefix', enc(prefix)), ('Marker', enc(marker)),
                    ('MaxKeys', max_keys), ('Delimiter', enc(delimiter))]
        if req.query.get('encoding-type'):
            children.append(('EncodingType', 'url'))
        children.append(('IsTruncated', 'true' if next_marker is not None else 'false'))
        if next_marker is not None:
            children.append(('NextMarker', enc(next_marker)))
        children += self._contents(objects, enc, with_owner=True)
        children += [('CommonPrefixes', [('Prefix', enc(p))]) for p in prefixes]
        http.send_xml(200, xml_doc('ListBucketResult', children))

    def _list_objects_v2(self, http, req):
        prefix = req.query.get('prefix', '')
        delimiter = req.query.get('delimiter', '')
        token = req.query.get('continuation-token', '')
        start_after = req.query.get('start-after', '')
        fetch_owner = req.query.get('fetch-owner', 'false').lower() == 'true'
        max_keys = self._max_keys(req)
        enc = self._encoder(req)
        start = self._decode_token(token) if token else start_after
        objects, prefixes, last = self.storage.list_objects(req.bucket, prefix, delimiter, start,
                                                            max_keys)
        children = [('Name', req.bucket), ('Prefix', enc(prefix))]
        if token:
            children.append(('ContinuationToken', token))
        if start_after:
            children.append(('StartAfter', enc(start_after)))
        children += [('MaxKeys', max_keys), ('Delimiter', enc(delimiter))]
        if req.query.get('encoding-type'):
            children.append(('EncodingType', 'url'))
        children.append(('IsTruncated', 'true' if last is not None else 'false'))
        if last is not None:
            children.append(('NextContinuationToken', self._encode_token(last)))
        children.append(('KeyCount', len(objects) + len(prefixes)))
        children += self._contents(objects, enc, with_owner=fetch_owner)
        children += [('CommonPrefixes', [('Prefix', enc(p))]) for p in prefixes]
        http.send_xml(200, xml_doc('ListBucketResult', children))

    @staticmethod
    def _encode_token(last):
        # Opaque to clients, like OSS's; URL-safe so no encoding question arises.
        return base64.urlsafe_b64encode(last.encode('utf-8')).decode('ascii').rstrip('=')

    @staticmethod
    def _decode_token(token):
        try:
            return base64.urlsafe_b64decode(token + '=' * (-len(token) % 4)).decode('utf-8')
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise invalid_argument('The continuation token provided is incorrect.',
                                   'continuation-token', token)

    # -- objects -----------------------------------------------------------------------------

    def _put_object(self, http, req):
        if not http.has_body_length():
            raise OssError(411, 'MissingContentLength',
                           'You must provide the Content-Length HTTP header.')
        expected_md5 = None
        if 'content-md5' in req.headers:
            try:
                expected_md5 = base64.b64decode(req.headers['content-md5'], validate=True)
            except binascii.Error:
                expected_md5 = b''
            if len(expected_md5) != 16:
                raise OssError(400, 'InvalidDigest', 'The Content-MD5 you specified was invalid.')
        stored = {name: req.headers[name.lower()] for name in STORED_HEADERS
                  if name.lower() in req.headers}
        stored.setdefault('Content-Type', 'application/octet-stream')
        stored.update((k, v) for k, v in req.headers.items() if k.startswith('x-oss-meta-'))
        meta = self.storage.put_object(req.bucket, req.key, http._body_chunks(), stored,
                                       expected_md5, self._crc_factory)
        headers = [('ETag', '"%s"' % meta.etag), ('Content-MD5', self._content_md5(meta))]
        if meta.crc64 is not None:
            headers.append(('x-oss-hash-crc64ecma', str(meta.crc64)))
        http.send_oss(200, headers)

    @staticmethod
    def _content_md5(meta):
        return base64.b64encode(bytes.fromhex(meta.etag)).decode('ascii')

    def _delete_object(self, http, req):
        self.storage.get_bucket(req.bucket)
        self.storage.delete_object(req.bucket, req.key)   # missing keys are fine, as on OSS
        http.send_oss(204)

    def _get_object_meta(self, http, req):
        meta = self.storage.head_object(req.bucket, req.key)
        headers = [('ETag', '"%s"' % meta.etag), ('Last-Modified', http_date(meta.mtime))]
        if meta.crc64 is not None:
            headers.append(('x-oss-hash-crc64ecma', str(meta.crc64)))
        http.send_oss(200, headers, length=meta.size)

    def _object_headers(self, meta):
        headers = [('ETag', '"%s"' % meta.etag), ('Last-Modified', http_date(meta.mtime)),
                   ('Accept-Ranges', 'bytes'), ('x-oss-object-type', 'Normal'),
                   ('x-oss-storage-class', 'Standard')]
        if meta.crc64 is not None:
            headers.append(('x-oss-hash-crc64ecma', str(meta.crc64)))
        headers += sorted(meta.headers.items())
        return headers

    def _get_object(self, http, req):
        meta, f = self.storage.open_object(req.bucket, req.key)
        with f:
            headers = self._object_headers(meta)
            status = None if self.ignore_if_match else self._preconditions(req, meta)
            if status == 304:
                http.send_oss(304, [h for h in headers if h[0] in ('ETag', 'Last-Modified')])
                return
            overrides = {RESPONSE_OVERRIDES[k]: v for k, v in req.query.items()
                         if k in RESPONSE_OVERRIDES}
            headers = [h for h in headers if h[0] not in overrides] + sorted(overrides.items())
            # HeadObject describes the whole object; only GET honours Range.
            range_header = req.headers.get('range') if req.method == 'GET' and \
                not self.ignore_range else None
            span = parse_range(range_header, meta.size,
                               req.headers.get('x-oss-range-behavior', '').lower() == 'standard')
            if span is None:
                start, length, status = 0, meta.size, 200
            else:
                start, end = span
                length, status = end - start + 1, 206
                headers.append(('Content-Range', 'bytes %d-%d/%d' % (start, end, meta.size)))
            body = () if req.method == 'HEAD' else _file_chunks(f, start, length)
            http.send_oss(status, headers, body, length=length)

    @staticmethod
    def _preconditions(req, meta):
        """Apply If-Match & co. (RFC 7232 order); returns 304 or None, raises 412."""
        etag = meta.etag

        def matches(header):
            tags = [t.strip() for t in header.split(',')]
            return '*' in tags or any(t.strip('"').upper() == etag for t in tags)

        def failed(condition):
            return OssError(412, 'PreconditionFailed',
                            'At least one of the pre-conditions you specified did not hold.',
                            Condition=condition)

        h = req.headers
        if 'if-match' in h:
            if not matches(h['if-match']):
                raise failed('If-Match')
        elif 'if-unmodified-since' in h:
            since = parse_http_date(h['if-unmodified-since'])
            if since is not None and meta.mtime > since:
                raise failed('If-Unmodified-Since')
        if 'if-none-match' in h:
            if matches(h['if-none-match']):
                return 304
        elif 'if-modified-since' in h:
            since = parse_http_date(h['if-modified-since'])
            if since is not None and meta.mtime <= since:
                return 304
        return None


def parse_range(header, size, standard):
    """Resolve a Range header the way OSS does.

    Returns (first, last) inclusive, or None for "send the whole object".
    Only the first range of a multi-range header is used (OSS ignores the
    rest).  By default any range OSS considers invalid (outside the object,
    malformed) is ignored and the whole object is sent with 200.  With
    x-oss-range-behavior: standard an end past the object is clamped and a
    start past it is 416 InvalidRange, as in RFC 7233.
    """
    if not header:
        return None
    m = re.match(r'^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*(?:,|$)', header)
    if not m or (m.group(1) == '' and m.group(2) == ''):
        return None
    first, last = m.group(1), m.group(2)
    if first == '':                                  # suffix: last N bytes
        n = int(last)
        if standard:
            if n == 0 or size == 0:
                raise _invalid_range(size)
            return max(0, size - n), size - 1
        return (size - n, size - 1) if 0 < n <= size else None
    first = int(first)
    last = int(last) if last != '' else size - 1
    if first > last:
        return None                                  # unsatisfiable syntax: ignored by both modes
    if first >= size:
        if standard:
            raise _invalid_range(size)
        return None
    if last >= size:
        if not standard:
            return None
        last = size - 1
    return first, last


def _invalid_range(size):
    err = OssError(416, 'InvalidRange', 'The requested range cannot be satisfied')
    err.headers.append(('Content-Range', 'bytes */%d' % size))
    return err


def _file_chunks(f, start, length):
    f.seek(start)
    while length > 0:
        data = f.read(min(CHUNK_SIZE, length))
        if not data:
            raise IOError('object file shrank while being served')
        length -= len(data)
        yield data


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description='Run the OSS test server in the foreground.')
    parser.add_argument('--root', required=True, help='directory that holds buckets and objects')
    parser.add_argument('--port', type=int, default=0,
                        help='TCP port on 127.0.0.1 (0 = any free port)')
    parser.add_argument('--key', action='append', default=[], metavar='ID:SECRET',
                        help='access key pair; may be repeated')
    parser.add_argument('--sts', action='append', default=[], metavar='ID:SECRET:TOKEN',
                        help='STS key with its security token; may be repeated')
    parser.add_argument('--bucket', action='append', default=[], metavar='NAME',
                        help='bucket to create at start; may be repeated')
    parser.add_argument('--domain', help='host name for virtual-host style (bucket.DOMAIN)')
    parser.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    credentials = dict(k.split(':', 1) for k in args.key)
    sts = [tuple(s.split(':', 2)) for s in args.sts]
    if not credentials and not sts:
        parser.error('give at least one --key ID:SECRET')
    server = OssServer(args.root, credentials, args.port, sts_credentials=sts, domain=args.domain)
    for name in args.bucket:
        server.create_bucket(name)
    print('OSS test server on %s (root %s)' % (server.endpoint, server.storage.root), flush=True)
    # Treat SIGTERM like Ctrl-C so the socket is closed cleanly either way.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == '__main__':
    main()
