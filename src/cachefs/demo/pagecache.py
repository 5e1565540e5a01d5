"""Dropping the kernel page cache, so that a measured read reaches cachefs (or the disk), not RAM.

Used by the demo, the benchmarks and the tests. It affects every process on the machine: their
next reads come from disk, which costs time, never correctness.
"""

import logging
import os

log = logging.getLogger(__name__)


def drop_page_cache():
    """Write dirty pages back, then drop the clean page cache, dentries and inodes (root only).

    Returns False, and does nothing, when not root.
    """
    if os.geteuid() != 0:
        return False
    os.sync()
    with open('/proc/sys/vm/drop_caches', 'w') as f:
        f.write('3\n')
    return True
