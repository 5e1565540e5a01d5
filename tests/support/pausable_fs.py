"""A passthrough FUSE file system over a backing folder, whose I/O a test can pause or throttle:
a cache disk that stops answering, or one much slower than the store.

Run as its own process (`PausableFs` below starts and stops it):

    python tests/support/pausable_fs.py BACKING MOUNTPOINT CONTROL_SOCKET

The control socket (a Unix stream socket) takes one command per line and answers `ok`:

    pause          every request (open, read, write, statfs, lookup ...) waits until `resume`
    resume         let them all go on
    rate N         throttle writes to N bytes/s for all files together (0: no limit)
    blocked        answers the number of requests waiting on a pause

Known limitations (it is a test fixture): one path per inode (no hard links), no xattrs, no
locks of its own (flock stays local to the kernel), O_DIRECT is dropped on the backing file.
A request the fs has taken and holds on a pause cannot be interrupted: the kernel waits for its
answer even when the caller is killed, as for a real disk that stopped answering. Resume (or stop
this process, which aborts the connection) to release them.
"""

import argparse
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)


class PausableOps(pyfuse3.Operations):
    def __init__(self, backing):
        super().__init__()
        self._paths = {pyfuse3.ROOT_INODE: backing}
        self._backing_root_ino = os.lstat(backing).st_ino
        self._resumed = trio.Event()
        self._resumed.set()
        self.blocked = 0
        self.rate = 0
        self._write_free_at = 0.0

    # -- control --

    def pause(self):
        if self._resumed.is_set():
            self._resumed = trio.Event()

    def resume(self):
        self._resumed.set()

    async def _gate(self):
        if not self._resumed.is_set():
            self.blocked += 1
            try:
                await self._resumed.wait()
            finally:
                self.blocked -= 1

    async def _throttle(self, size):
        if self.rate > 0:
            now = trio.current_time()
            self._write_free_at = max(self._write_free_at, now) + size / self.rate
            await trio.sleep_until(self._write_free_at)

    # -- inodes and paths --

    def _path(self, inode):
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent_inode, name):
        return os.path.join(self._path(parent_inode), os.fsdecode(name))

    def _inode_of(self, st):
        return pyfuse3.ROOT_INODE if st.st_ino == self._backing_root_ino else st.st_ino

    def _attributes(self, path):
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        inode = self._inode_of(st)
        self._paths[inode] = path
        entry = pyfuse3.EntryAttributes()
        for name in ('st_mode', 'st_nlink', 'st_uid', 'st_gid', 'st_rdev', 'st_size',
                     'st_atime_ns', 'st_mtime_ns', 'st_ctime_ns'):
            setattr(entry, name, getattr(st, name))
        entry.st_ino = inode
        entry.st_blksize = 4096
        entry.st_blocks = (st.st_size + 511) // 512
        entry.generation = 0
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        return entry

    # -- operations: each waits while paused --

    async def lookup(self, parent_inode, name, ctx=None):
        await self._gate()
        return self._attributes(self._child(parent_inode, name))

    async def getattr(self, inode, ctx=None):
        await self._gate()
        return self._attributes(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        await self._gate()
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._attributes(path)

    async def opendir(self, inode, ctx):
        await self._gate()
        self._path(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        await self._gate()
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        for index, name in enumerate(names[start_id:], start_id + 1):
            try:
                attributes = self._attributes(os.path.join(path, name))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, index):
                break

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._gate()
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._attributes(path)

    async def rmdir(self, parent_inode, name, ctx):
        await self._gate()
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def unlink(self, parent_inode, name, ctx):
        await self._gate()
        try:
            os.unlink(self._child(parent_inode, name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._gate()
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        self._attributes(new)

    @staticmethod
    def _backing_flags(flags):
        # The backing file gets plain buffered I/O: the kernel already applied O_DIRECT's
        # alignment rules on the FUSE side, and our buffers are not aligned.
        return flags & ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_TRUNC) | os.O_CLOEXEC

    async def open(self, inode, flags, ctx):
        await self._gate()
        try:
            fd = os.open(self._path(inode), self._backing_flags(flags) |
                         (flags & os.O_TRUNC))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._gate()
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, self._backing_flags(flags) | os.O_CREAT | os.O_EXCL |
                         (flags & os.O_TRUNC), mode)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd), self._attributes(path)

    async def read(self, fh, off, size):
        await self._gate()
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        await self._gate()
        await self._throttle(len(buf))
        await self._gate()
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        await self._gate()

    async def fsync(self, fh, datasync):
        await self._gate()
        os.fsync(fh)

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        await self._gate()
        st = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        data = pyfuse3.StatvfsData()
        for name in ('f_bsize', 'f_frsize', 'f_blocks', 'f_bfree', 'f_bavail', 'f_files',
                     'f_ffree', 'f_favail', 'f_namemax'):
            setattr(data, name, getattr(st, name))
        return data

    async def forget(self, inode_list):
        pass


async def _control(ops, path):
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(8)
    while True:
        conn, _ = await listener.accept()
        await _serve_control(ops, trio.SocketStream(conn))


async def _serve_control(ops, conn):
    async with conn:
        buffer = b''
        while True:
            data = await conn.receive_some(4096)
            if not data:
                return
            buffer += data
            while b'\n' in buffer:
                line, buffer = buffer.split(b'\n', 1)
                command, *args = line.decode().split()
                if command == 'pause':
                    ops.pause()
                    answer = 'ok'
                elif command == 'resume':
                    ops.resume()
                    answer = 'ok'
                elif command == 'rate':
                    ops.rate = int(args[0])
                    answer = 'ok'
                elif command == 'blocked':
                    answer = str(ops.blocked)
                else:
                    answer = 'error: unknown command'
                await conn.send_all(answer.encode() + b'\n')


async def _serve(ops, control_path):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_control, ops, control_path)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async def stop_on_signal():
                async for _ in signals:
                    ops.resume()            # let held requests finish before unmounting
                    pyfuse3.terminate()
                    return
            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('backing')
    parser.add_argument('mountpoint')
    parser.add_argument('control')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ops = PausableOps(os.path.abspath(args.backing))
    pyfuse3.init(ops, args.mountpoint, set(pyfuse3.default_options) | {'fsname=pausablefs'})
    try:
        trio.run(_serve, ops, args.control)
    finally:
        pyfuse3.close(unmount=True)


class PausableFs:
    """Starts pausable_fs.py on `mountpoint` over `backing`, and stops it whatever happens:
    resume, SIGTERM, a lazy unmount, SIGKILL, by PID."""

    def __init__(self, backing, mountpoint, control):
        self.backing, self.mountpoint, self.control = str(backing), str(mountpoint), str(control)
        self.process = None

    def start(self, timeout=20):
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, __file__, self.backing,
                                         self.mountpoint, self.control])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'pausable_fs exited with {self.process.returncode}')
            if _is_mounted(self.mountpoint) and os.path.exists(self.control):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError('pausable_fs did not mount')

    def command(self, line):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(self.control)
            conn.sendall(line.encode() + b'\n')
            answer = b''
            while not answer.endswith(b'\n'):
                data = conn.recv(4096)
                if not data:
                    break
                answer += data
        return answer.decode().strip()

    def pause(self):
        assert self.command('pause') == 'ok'

    def resume(self):
        assert self.command('resume') == 'ok'

    def throttle(self, bytes_per_second):
        assert self.command(f'rate {int(bytes_per_second)}') == 'ok'

    def blocked(self):
        return int(self.command('blocked'))

    def stop(self):
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                try:
                    self.resume()
                except OSError:
                    pass
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if _is_mounted(self.mountpoint):
                subprocess.run(['fusermount3', '-u', '-z', self.mountpoint], check=False)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _is_mounted(path):
    path = os.path.abspath(path)
    with open('/proc/self/mountinfo') as f:
        return any(line.split()[4] == path for line in f)


if __name__ == '__main__':
    main()
