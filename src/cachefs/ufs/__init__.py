"""Stores ("under file systems"): where the bytes live. `open_store` turns a source URL into one."""

import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import EXIT_ACCESS, EXIT_USAGE, UserError
from .errors import CredentialsMissing

log = logging.getLogger(__name__)

_BUCKET_NAME = re.compile(r'^[a-z0-9][a-z0-9.\-_]{1,254}$', re.IGNORECASE)


@dataclass(frozen=True)
class SourceURL:
    scheme: str     # 's3', 'oss' or 'file'
    bucket: str     # '' for file
    prefix: str     # '' or ending in '/'; for file: the absolute folder path

    def __str__(self):
        if self.scheme == 'file':
            return 'file://' + self.prefix
        return f'{self.scheme}://{self.bucket}/{self.prefix}'.rstrip('/')


_CREDENTIALS_HELP = ('put them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, '
                     'or OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET) or in ~/.aws/credentials')


def _has_userinfo(url):
    """True when `url` names a user (and maybe a password) before its host: 'x://user:pw@host'.

    A command line is visible to every user of the machine (ps, /proc/PID/cmdline), and the URL
    would reach logs and error messages: credentials there are refused, never echoed."""
    _, separator, rest = url.partition('://')
    if not separator:
        return False
    authority = rest.split('/', 1)[0].split('?', 1)[0]
    return '@' in authority


def parse_source(text):
    """'s3://bucket/some/prefix' -> SourceURL('s3', 'bucket', 'some/prefix/')."""
    if '://' not in text:
        return SourceURL('file', '', os.path.abspath(text))
    if _has_userinfo(text):
        raise UserError(f'the source URL must not hold credentials; {_CREDENTIALS_HELP}',
                        EXIT_USAGE)
    scheme, _, rest = text.partition('://')
    scheme = scheme.lower()
    if scheme == 'file':
        if not rest.startswith('/'):
            raise UserError(f'bad source URL {text!r}: use file:///absolute/path', EXIT_USAGE)
        return SourceURL('file', '', os.path.abspath(rest))
    if scheme not in ('s3', 'oss'):
        raise UserError(f'unknown source scheme {scheme!r} in {text!r} '
                        '(use s3://bucket/prefix, oss://bucket/prefix or a local path)', EXIT_USAGE)
    bucket, _, prefix = rest.partition('/')
    if not _BUCKET_NAME.match(bucket):
        raise UserError(f'bad bucket name {bucket!r} in {text!r}', EXIT_USAGE)
    prefix = prefix.strip('/')
    return SourceURL(scheme, bucket, prefix + '/' if prefix else '')


def endpoint_problem(endpoint_url, scheme=None):
    """Why `endpoint_url` cannot be a store endpoint (None: it can). Never quotes the URL, which
    may hold credentials: 'http://KEY:SECRET@host:port' is refused without echoing it.

    S3 needs http:// or https://; OSS also takes a bare host ('oss-cn-hangzhou.aliyuncs.com'),
    as oss2 does. Any other scheme (ftp://, s3://) would only fail later, after retries."""
    has_scheme = '://' in endpoint_url
    if _has_userinfo(endpoint_url if has_scheme else 'https://' + endpoint_url):
        return f'must not hold credentials; {_CREDENTIALS_HELP}'
    if has_scheme:
        url_scheme = endpoint_url.partition('://')[0].lower()
        if url_scheme not in ('http', 'https'):
            return f'unsupported scheme {url_scheme[:16]!r}: use http:// or https://'
    elif scheme == 's3':
        return 'an S3 endpoint needs http:// or https:// (e.g. http://127.0.0.1:8333)'
    try:
        parts = urlsplit(endpoint_url if has_scheme else 'https://' + endpoint_url)
        parts.port                                      # raises on a bad port
    except ValueError:
        return 'not a valid URL (its port?)'
    if not parts.hostname or any(c.isspace() for c in endpoint_url):
        return 'names no host (e.g. http://127.0.0.1:8333 or oss-cn-hangzhou.aliyuncs.com)'
    return None


def check_endpoint(endpoint_url, where='--endpoint-url', scheme=None):
    """Refuse an endpoint URL that carries credentials, has another scheme than http(s) or no
    host, with one line (exit 2)."""
    if not endpoint_url:
        return
    problem = endpoint_problem(endpoint_url, scheme)
    if problem:
        raise UserError(f'{where}: {problem}', EXIT_USAGE)


def open_store(source, options):
    """Build the `Store` for a parsed source. Raises `UserError` for missing configuration."""
    check_endpoint(getattr(options, 'endpoint_url', None), scheme=source.scheme)
    if source.scheme == 's3':
        check_endpoint(os.environ.get('AWS_ENDPOINT_URL'), 'AWS_ENDPOINT_URL', 's3')
    elif source.scheme == 'oss':
        check_endpoint(os.environ.get('OSS_ENDPOINT'), 'OSS_ENDPOINT', 'oss')
    try:
        if source.scheme == 'file':
            from .local import LocalStore
            return LocalStore(source.prefix)
        if source.scheme == 's3':
            from .s3 import S3Store
            return S3Store(source.bucket, source.prefix,
                           endpoint_url=options.endpoint_url or None, region=options.region or None,
                           path_style=options.path_style, request_timeout=options.request_timeout,
                           no_sign_request=options.no_sign_request,
                           max_connections=options.store_concurrency)
        from .oss import OssStore
        endpoint = options.endpoint_url or os.environ.get('OSS_ENDPOINT')
        if not endpoint:
            raise UserError('oss:// needs --endpoint-url (for example '
                            'oss-cn-hangzhou.aliyuncs.com) or OSS_ENDPOINT', EXIT_USAGE)
        return OssStore(source.bucket, source.prefix, endpoint,
                        request_timeout=options.request_timeout, path_style=options.path_style)
    except CredentialsMissing as exc:
        raise UserError(str(exc), EXIT_ACCESS) from None
