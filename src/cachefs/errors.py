"""The one error type that reaches a user, and the exit codes it carries.

Anything a user can get wrong (a bad URL, missing credentials, a busy mount point) is raised as
`UserError` with a one-line message; the CLI prints it without a traceback and exits with its code.
The codes are part of the interface: README.md documents them and scripts may test them.
"""

import logging

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INTERNAL = 1        # a bug: unexpected exception (logged with traceback)
EXIT_USAGE = 2           # bad option, bad value, unknown scheme, malformed URL
EXIT_SOURCE_MISSING = 3  # bucket, prefix or local directory does not exist
EXIT_ACCESS = 4          # credentials missing, rejected, or access denied
EXIT_STORE = 5           # endpoint unreachable or the store keeps failing
EXIT_MOUNTPOINT = 6      # mount point missing, not a directory, not empty, already mounted
EXIT_FUSE = 7            # no /dev/fuse, no permission to mount, FUSE refused the mount
EXIT_CACHE = 8           # cache folder cannot be created or written, untrusted, or in use
EXIT_NOT_MOUNTED = 9     # umount/stats/refresh/warmup: not a cachefs mount (of this user or root)
EXIT_BUSY = 10           # umount: the mount is busy (open files, a working directory in it)

EXIT_CODES = {
    EXIT_OK: 'success',
    EXIT_INTERNAL: 'internal error (a bug: please report it with the log)',
    EXIT_USAGE: 'bad command line, option value or source URL',
    EXIT_SOURCE_MISSING: 'bucket, prefix or local directory not found',
    EXIT_ACCESS: 'credentials missing or rejected, or access denied',
    EXIT_STORE: 'store endpoint unreachable or failing',
    EXIT_MOUNTPOINT: 'mount point missing, not a directory, not empty, or already mounted',
    EXIT_FUSE: 'FUSE unavailable: no /dev/fuse, no permission, or the kernel refused the mount',
    EXIT_CACHE: 'cache folder cannot be created or written, is not trusted, or is in use by '
                'another mount of the same source',
    EXIT_NOT_MOUNTED: 'not a cachefs mount (of this user or root)',
    EXIT_BUSY: 'the mount is busy: files are open in it or a process works in it',
}


class UserError(Exception):
    """A mistake or environment problem the user can fix; `str()` is the one-line message."""

    def __init__(self, message, exit_code=EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
