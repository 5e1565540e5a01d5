"""Where the buffers that store reads fill come from: one place, so that how block memory is
allocated (fresh, reused, pre-faulted) is decided here and not in every read path.

The lean read paths (`s3_trio`, and any store that reads into a buffer of its own) take the
buffer for a block from `new_block_buffer`.
"""

import logging

log = logging.getLogger(__name__)


def new_block_buffer(length: int) -> bytearray:
    """A writable buffer of exactly `length` bytes for one block read from the store."""
    return bytearray(length)
