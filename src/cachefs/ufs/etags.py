"""ETags on the wire: the If-Match value a read sends, and the check of the ETag its answer
carries.

Why both: the version guarantee of a read (a block of one object version is never stitched to a
block of another) rests on If-Match, and some S3-compatible stores and proxies ignore If-Match.
So every read path (lean threaded, trio, SDK, OSS) also compares the ETag of the answer, where
the store sends one, with the listed one, and refuses the bytes of another version as
`ObjectChanged` (EIO, never served).

Comparison is of the opaque tag: the surrounding quotes and a weak prefix (`W/"..."`, added by
proxies that think they may transform the body) are dropped, the rest must be equal, case and
all (a multipart ETag "...-N" is compared whole). A listed ETag that cannot be sent as a header
value (a character outside visible ASCII, a quote; a CR or LF would split the request on a
pooled connection) fails the read with a `StoreError` before anything is sent: the key stays in
the listing, and each read of it reports EIO with the reason in the log.
"""

import logging
import re

from .errors import ObjectChanged, StoreError

log = logging.getLogger(__name__)

# RFC 9110 8.8.3: etagc = %x21 / %x23-7E / obs-text; obs-text (bytes over 0x7E) is not sent.
_ETAG_CHARS = re.compile(r'[\x21\x23-\x7e]+')


def if_match(etag):
    """The If-Match header value for a read of version `etag` (raises `StoreError` for an ETag
    that is not a valid entity tag)."""
    if not isinstance(etag, str) or not _ETAG_CHARS.fullmatch(etag):
        raise StoreError(f'the listed ETag {etag!r} cannot be sent in If-Match (characters '
                         f'outside visible ASCII or a quote); refusing to read this object')
    return f'"{etag}"'


def normalise(etag):
    """The opaque tag of an ETag as listed or answered: no weak prefix, no quotes."""
    etag = etag.strip()
    if etag[:2] in ('W/', 'w/'):
        etag = etag[2:]
    if len(etag) >= 2 and etag[0] == '"' and etag[-1] == '"':
        etag = etag[1:-1]
    return etag


def check_answer(listed, answered):
    """Raise `ObjectChanged` when the answer's ETag (None: the store sent none) names another
    version than the listed one."""
    if answered is None:
        return
    if normalise(answered) != normalise(listed):
        raise ObjectChanged(f'the answer is of version {answered!r}, not the listed '
                            f'"{listed}" (the store or a proxy ignored If-Match)')
