"""The interface every store implements, so that a new store is one new module in `ufs/`.

A store is blocking (the SDKs are), thread-safe, and knows nothing of inodes or blocks. Keys it
returns and accepts are relative to the prefix it was opened with, '/'-separated, and a key that
ends in '/' is a directory marker. All methods raise `ufs.errors.StoreError` subclasses only.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str          # relative to the store's prefix
    size: int
    etag: str         # opaque version tag; a changed object has a different one
    mtime_ns: int


class Store:
    """One bucket prefix (or local folder). Subclasses implement the four methods below."""

    #: URL-like name for messages and the cache folder, never containing secrets
    source: str = ''
    #: seconds one call of `read` or `stat` may take in all (None: unbounded); `AsyncStore`
    #: abandons an attempt that takes longer, whatever the SDK's per-socket timeouts say
    request_timeout: float | None = None

    def list_objects(self) -> Iterator[ObjectInfo]:
        """Yield an `ObjectInfo` for every object under the prefix, paginating as needed."""
        raise NotImplementedError

    def read(self, key: str, etag: str, offset: int, length: int) -> bytes:
        """Return exactly `length` bytes of `key` from `offset`, only if its version is `etag`.

        Raises `ObjectChanged` when the object is no longer that version, so that a block of a
        new version is never stitched to blocks of an old one.
        """
        raise NotImplementedError

    def stat(self, key: str) -> ObjectInfo:
        """Return the `ObjectInfo` of one object (raises `ObjectNotFound`)."""
        raise NotImplementedError

    def check_access(self) -> bool:
        """Cheaply prove that the bucket exists and the credentials work; return True when at
        least one object exists under the prefix (so a missing prefix can be told apart)."""
        raise NotImplementedError

    def close(self) -> None:
        pass
