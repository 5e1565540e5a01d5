"""The object store every system reads from: one SeaweedFS server on loopback.

Its data folder and its secret key are kept under the workdir, so the uploaded datasets survive
between runs: a later run only lists the prefix and uploads what is missing or has another
size. The server itself is stopped at the end of every run.
"""

import logging
import os
import secrets
from pathlib import Path

from cachefs.demo.seaweed import SeaweedServer, object_key, upload_tree

from . import host

log = logging.getLogger(__name__)

BUCKET = 'cachefs-bench'


def _secret(workdir):
    """The store's secret key, created once (mode 0600) so that existing data stays readable."""
    path = Path(workdir) / 'seaweedfs.secret'
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_hex(20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(value)
    return value


class Store:
    """A started SeaweedFS server with the benchmark's bucket."""

    def __init__(self, workdir):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)    # get_cost.py may be the first to use it
        self.server = SeaweedServer(workdir / 'seaweedfs', secret_key=_secret(workdir),
                                    log_path=workdir / 'seaweedfs.log')
        self.bucket = BUCKET
        self._token = None

    def start(self):
        self._token = host.on_cleanup('SeaweedFS server', self.stop)
        self.server.start()
        log.info('SeaweedFS pid %d serves S3 at %s', self.server.pid, self.endpoint)
        self.server.create_bucket(self.bucket)
        return self

    def stop(self):
        # A SIGKILL after 2 s loses nothing acknowledged (see SeaweedServer.stop), and a graceful
        # stop takes ~15 s.
        self.server.stop(timeout=2)
        host.done(self._token)

    @property
    def endpoint(self):
        return self.server.endpoint

    @property
    def access_key(self):
        return self.server.access_key

    @property
    def secret_key(self):
        return self.server.secret_key

    def env(self):
        return self.server.env()

    def client(self):
        return self.server.client()

    def ensure(self, part):
        """Upload the files of `part` under its prefix unless the store has them all already."""
        client = self.client()
        have = {}
        pages = client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket,
                                                                  Prefix=part.prefix + '/')
        for page in pages:
            for obj in page.get('Contents', ()):
                have[obj['Key']] = obj['Size']
        want = {object_key(part.prefix, rel): size for rel, size, _ in part.entries}
        if have == want:
            log.info('store already holds %s', part.key)
            return
        log.info('uploading %s (%s) to s3://%s/%s/', part.key, part.describe(), self.bucket,
                 part.prefix)
        upload_tree(client, self.bucket, part.prefix, part.root)
        extra = set(have) - set(want)
        for key in extra:  # leftovers of another generation under the same key
            client.delete_object(Bucket=self.bucket, Key=key)
