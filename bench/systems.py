"""The systems under test, and how each one is mounted, observed and unmounted.

- `cachefs`: `cachefs mount` (daemon in the background; its PID and counters asked through
  cachefs.control, which checks that the mount and the PID really are a cachefs daemon's).
- `s3fs`: s3fs-fuse with its disk cache (`use_cache`), run in the foreground (`-f`) as our own
  child so that its PID is known without guessing.
- `rclone`: `rclone mount --vfs-cache-mode full`, also a foreground child.
- `local`: the dataset's own local folder: the upper bound on this disk.
- `boto3`: no file system at all; the scenarios read the store directly with parallel ranged
  GETs: the upper bound of the store.

Peers run with their documented defaults plus only what is needed to mount the loopback store
read-only with a disk cache; the exact command lines are logged and put in the JSON. A peer whose
binary is missing is reported as skipped, never replaced by something else.

Every mount registers its own teardown with `host.on_cleanup` before it is started, so a run
that dies half-way still unmounts it and stops its daemon.
"""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import host

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 600   # seconds; listing 20,000 keys takes a few
UMOUNT_TIMEOUT = 120


class Mount:
    """A live view of a dataset: a path to read, and the PID that serves it (if any)."""

    def __init__(self, system, path, pid=None, closer=None, token=None, seconds=0.0):
        self.system = system
        self.path = str(path)
        self.pid = pid
        self.mount_seconds = seconds
        self._closer = closer
        self._token = token

    def usage(self):
        """(CPU seconds so far, peak RSS bytes so far) of the serving process, or (None, None)."""
        if self.pid is None:
            return None, None
        return host.cpu_seconds(self.pid), host.peak_rss_bytes(self.pid)

    def stats(self):
        """The daemon's counters (cachefs only), else None."""
        return None

    def close(self):
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer()
        host.done(self._token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CacheFSMount(Mount):
    def stats(self):
        from cachefs import control
        return control.open_mount(self.path).stats()


def _pids_with_argument(argument):
    """PIDs whose command line has `argument` as one whole argument (our unique mount path).

    Only used when a daemon that we started never told us its PID (a mount that timed out).
    """
    wanted = argument.encode()
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as f:
                    if wanted in f.read().split(b'\0'):
                        pids.append(int(entry))
            except OSError:
                pass
    return [pid for pid in pids if pid != os.getpid()]


class System:
    """Base class: a name, whether it can run here, and how to present a dataset."""
    name = '?'
    kind = 'mount'            # 'mount', 'local' (a folder) or 'store' (no file system)

    def __init__(self, store, rundir):
        self.store = store
        self.rundir = Path(rundir)
        self.commands = []    # the command lines used, for the report

    def unavailable(self):
        """None when the system can run here, else why not (the report's skip note)."""
        return None

    def version(self):
        return ''

    def mountpoint(self):
        path = self.rundir / 'mnt' / self.name
        path.mkdir(parents=True, exist_ok=True)
        if host.is_mounted(path):
            raise RuntimeError(f'{path} is still mounted from an earlier step')
        return path

    def log_path(self):
        path = self.rundir / 'logs' / f'{self.name}.log'
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _remember(self, command):
        log.info('$ %s', ' '.join(str(c) for c in command))
        text = ' '.join(portable(c, self.rundir.parent) for c in command)
        if text not in self.commands:
            self.commands.append(text)


def portable(argument, workdir):
    """One argument of a command line as the report shows it: without this machine's paths,
    so that it reads the same from any checkout and work folder. The interpreter becomes
    `python`, and the work folder (`--workdir`, where the run folder, mounts and caches live)
    `WORKDIR`, also inside an option value (`use_cache=...`)."""
    text = str(argument)
    if text == sys.executable:
        return 'python'
    workdir = str(Path(workdir).absolute())
    if text == workdir:
        return 'WORKDIR'
    return text.replace(workdir + '/', 'WORKDIR/')


def _fuse_missing():
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse is missing'
    return None


class LocalDisk(System):
    name = 'local'
    kind = 'local'

    def version(self):
        return 'the dataset folder on the local disk'

    def mount(self, part, cache_dir=None, **options):
        return Mount(self, part.root)


class Boto3(System):
    name = 'boto3'
    kind = 'store'

    def unavailable(self):
        try:
            import boto3  # noqa: F401
        except ImportError:
            return 'boto3 is not installed'
        return None

    def version(self):
        import boto3
        return f'boto3 {boto3.__version__}'


class CacheFS(System):
    name = 'cachefs'

    def unavailable(self):
        try:
            import cachefs  # noqa: F401
        except ImportError:
            return 'cachefs is not installed in this Python'
        return _fuse_missing()

    def version(self):
        import cachefs
        return f'cachefs {cachefs.__version__}'

    def mount(self, part, cache_dir, **options):
        """`cachefs mount`, which returns once the mount answers; options are long options."""
        mnt = self.mountpoint()
        command = [sys.executable, '-m', 'cachefs', 'mount',
                   f's3://{self.store.bucket}/{part.prefix}', mnt,
                   '--endpoint-url', self.store.endpoint, '--cache-dir', cache_dir,
                   '--log-file', self.log_path()]
        for name, value in options.items():
            command += ['--' + name.replace('_', '-'), str(value)]
        self._remember(command)
        state = {'pid': None}

        def close():
            if host.is_mounted(mnt):
                subprocess.run([sys.executable, '-m', 'cachefs', 'umount', str(mnt)],
                               timeout=UMOUNT_TIMEOUT, check=False)
            host.unmount(mnt)
            pids = [state['pid']] if state['pid'] else _pids_with_argument(str(mnt))
            for pid in pids:
                host.stop_pid(pid, 'cachefs')

        token = host.on_cleanup(f'cachefs mount {mnt}', close)
        started = time.monotonic()
        try:
            result = subprocess.run(command, env=dict(os.environ, **self.store.env()),
                                    capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
            seconds = time.monotonic() - started
            if result.returncode != 0:
                raise RuntimeError(f'cachefs mount failed ({result.returncode}): '
                                   f'{result.stderr.strip()}; see {self.log_path()}')
            from cachefs import control
            state['pid'] = control.open_mount(mnt).daemon_pid()
        except BaseException:
            close()
            host.done(token)
            raise
        return CacheFSMount(self, mnt, state['pid'], close, token, seconds)


class _ForegroundDaemon(System):
    """A peer that we run in the foreground as our child: its PID is the Popen's."""
    binary = '?'
    version_flag = '--version'

    def unavailable(self):
        if not shutil.which(self.binary):
            return f'{self.binary} is not installed'
        return _fuse_missing()

    def version(self):
        out = subprocess.run([self.binary, self.version_flag], capture_output=True,
                             text=True).stdout
        return out.splitlines()[0].strip() if out else self.binary

    def _private_file(self, name, text):
        """Write `text` to a 0600 file in the run folder (it holds the store's secret key)."""
        path = self.rundir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        return path

    def _command(self, part, mnt, cache_dir):
        raise NotImplementedError

    def _env(self):
        return dict(os.environ)

    def mount(self, part, cache_dir, **options):
        if options:
            raise ValueError(f'{self.name} takes no benchmark options')
        mnt = self.mountpoint()
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        command = self._command(part, mnt, cache_dir)
        self._remember(command)
        logf = open(self.log_path(), 'ab')
        state = {}

        def close():
            host.unmount(mnt)
            proc = state.get('proc')
            if proc is not None:
                try:
                    # Both exit on their own once unmounted; give them time to flush.
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    host.stop_pid(proc.pid, self.binary)
                    proc.wait(timeout=10)
            logf.close()

        token = host.on_cleanup(f'{self.name} mount {mnt}', close)
        started = time.monotonic()
        try:
            # Own session: a Ctrl-C reaches us, and we stop the daemon in order.
            state['proc'] = subprocess.Popen(command, env=self._env(), stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            host.wait_for_mount(mnt, state['proc'], timeout=60)
        except BaseException as exc:
            close()
            host.done(token)
            if not isinstance(exc, Exception):   # Ctrl-C, SIGTERM: keep stopping
                raise
            raise RuntimeError(f'{self.name} did not mount: {exc}; see {self.log_path()}') from None
        seconds = time.monotonic() - started
        return Mount(self, mnt, state['proc'].pid, close, token, seconds)


class S3FS(_ForegroundDaemon):
    name = 's3fs'
    binary = 's3fs'
    version_flag = '--version'

    def _passwd_file(self):
        # s3fs refuses a password file that others can read.
        return self._private_file('s3fs.passwd',
                                  f'{self.store.access_key}:{self.store.secret_key}\n')

    def _command(self, part, mnt, cache_dir):
        options = [f'url={self.store.endpoint}', 'use_path_request_style',
                   f'use_cache={cache_dir}', f'passwd_file={self._passwd_file()}', 'ro',
                   'dbglevel=warn']
        return ['s3fs', f'{self.store.bucket}:/{part.prefix}', str(mnt), '-f',
                '-o', ','.join(options)]


class Rclone(_ForegroundDaemon):
    name = 'rclone'
    binary = 'rclone'
    version_flag = 'version'

    def _config(self):
        return self._private_file('rclone.conf', (
            '[bench]\ntype = s3\nprovider = SeaweedFS\n'
            f'access_key_id = {self.store.access_key}\n'
            f'secret_access_key = {self.store.secret_key}\n'
            f'endpoint = {self.store.endpoint}\nregion = us-east-1\n'))

    def _env(self):
        env = dict(os.environ)
        # rclone 1.60 fails on this machine's AWS_CA_BUNDLE; the store is plain http anyway.
        env.pop('AWS_CA_BUNDLE', None)
        return env

    def _command(self, part, mnt, cache_dir):
        return ['rclone', '--config', str(self._config()), 'mount',
                f'bench:{self.store.bucket}/{part.prefix}', str(mnt),
                '--vfs-cache-mode', 'full', '--cache-dir', str(cache_dir), '--read-only',
                '--log-level', 'NOTICE']


ALL = {cls.name: cls for cls in (LocalDisk, Boto3, CacheFS, S3FS, Rclone)}
ORDER = ('local', 'boto3', 'cachefs', 's3fs', 'rclone')
