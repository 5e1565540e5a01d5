#!/usr/bin/env python3
"""Start cachefs in a Fluid ThinRuntime fuse pod, from the configuration Fluid hands it.

Fluid writes /etc/fluid/config/config.json into the fuse container (since Fluid 1.1; earlier
versions used /etc/fluid/config.json, which is read when the first is absent)::

    {"mounts": [{"mountPoint": "s3://bucket/prefix", "name": "...",
                 "options": {"region": "us-west-2",
                             "aws_access_key_id": "/etc/fluid/secrets/<secret>/<key>"}}],
     "targetPath": "/runtime-mnt/thin/<namespace>/<dataset>/thin-fuse",
     "runtimeOptions": {"memory_cache_size": "8G"}, "accessModes": ["ReadOnlyMany"]}

and sets MOUNT_POINT (the target path) and MOUNT_OPTIONS (the ThinRuntimeProfile's and the
ThinRuntime's `spec.fuse.options`, as `a=b,c`). This script turns that into
`cachefs mount --foreground SOURCE TARGET -o ...` and execs it, so that cachefs itself receives
SIGTERM when Fluid stops the pod and unmounts cleanly.

Options are applied in this order, a later one winning: MOUNT_OPTIONS, runtimeOptions, the
Dataset mount's options. An option named aws_* or oss_* (aws_access_key_id,
oss_access_key_secret, aws_session_token, ...) becomes the environment variable of that name in
upper case, which boto3 and oss2 read; its value is read from the file when Fluid passes a path
under /etc/fluid/secrets/ (encryptOptions in Fluid's default configmap mode). Every other option
goes to cachefs as `-o name=value`, so a misspelt one stops the mount with cachefs's exit code 2.

`cluster_secret_file` (the cluster tier's shared key, docs/cluster.md) is a Dataset
encryptOption too: Fluid passes the path of the Secret's file, which goes to cachefs as it is,
or, with Fluid's secret config storage, the key itself, which this script writes to a file only
its user can read (in /dev/shm: memory, not the container's disk) and passes that file's path,
so that the key never appears on a command line. A value that starts with `/` is a path.

Exactly one Dataset mount is supported: cachefs mounts one source. A `local:///path` mount point
is the local folder /path (Fluid bind-mounts it into the fuse container).
"""

import argparse
import errno
import json
import os
import shlex
import subprocess
import sys
import tempfile

CONFIG_PATHS = ('/etc/fluid/config/config.json', '/etc/fluid/config.json')
SECRETS_DIR = '/etc/fluid/secrets/'
ENV_PREFIXES = ('aws_', 'oss_')
# options whose value names a file that holds a secret (see the module docstring)
SECRET_FILE_OPTIONS = ('cluster_secret_file',)
PRIVATE_DIR = '/dev/shm'
EXIT_USAGE = 2


class ConfigError(Exception):
    """The Fluid configuration cannot be turned into a cachefs mount."""


def load_config(path=None):
    paths = [path] if path else CONFIG_PATHS
    for candidate in paths:
        if os.path.exists(candidate):
            with open(candidate) as f:
                return json.load(f)
    raise ConfigError('no Fluid configuration at ' + ' or '.join(paths))


def parse_option_list(text):
    """`a=b,c` (MOUNT_OPTIONS) -> {'a': 'b', 'c': ''}."""
    options = {}
    for item in filter(None, (text or '').split(',')):
        name, _, value = item.partition('=')
        options[name.strip()] = value
    return options


def _secret_value(value):
    if value.startswith(SECRETS_DIR) and os.path.isfile(value):
        with open(value) as f:
            return f.read().strip()
    return value


def _secret_file(value):
    """The path of the file that holds a secret: `value` itself when it is a path, else a new
    file (mode 0600) that holds `value`."""
    if value.startswith('/'):
        return value
    folder = PRIVATE_DIR if os.path.isdir(PRIVATE_DIR) else None
    fd, path = tempfile.mkstemp(prefix='cachefs-secret-', dir=folder)
    with os.fdopen(fd, 'w') as f:
        f.write(value)
    return path


def build_command(config, environ):
    """(argv, extra environment) of the cachefs command for `config`."""
    mounts = config.get('mounts') or []
    if len(mounts) != 1:
        raise ConfigError(f'the Dataset must have exactly one mount for cachefs, not {len(mounts)}')
    mount = mounts[0]
    source = mount.get('mountPoint', '')
    if source.startswith('local://'):
        source = source[len('local://'):]
    if not source or source.startswith('pvc://'):
        raise ConfigError(f'unsupported Dataset mountPoint {source!r}: use s3://, oss:// or '
                          'local:///path')
    target = config.get('targetPath') or environ.get('MOUNT_POINT')
    if not target:
        raise ConfigError('neither targetPath in the configuration nor MOUNT_POINT is set')

    options = parse_option_list(environ.get('MOUNT_OPTIONS'))
    options.update(config.get('runtimeOptions') or {})
    options.update(mount.get('options') or {})

    argv = ['cachefs', 'mount', '--foreground', source, target]
    env = {}
    for name, value in options.items():
        key = name.strip().lower().replace('-', '_')
        if key.startswith(ENV_PREFIXES):
            env[key.upper()] = _secret_value(str(value))
        elif key in SECRET_FILE_OPTIONS and value not in ('', None):
            argv += ['-o', f'{key}={_secret_file(str(value))}']
        elif value in ('', None):
            argv += ['-o', key]
        else:
            argv += ['-o', f'{key}={value}']
    return argv, env


def clear_dead_mount(target):
    """A mount left by a killed daemon answers ENOTCONN, and cachefs refuses to mount over it."""
    try:
        os.listdir(target)      # not stat: the kernel may answer that from its attribute cache
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        subprocess.run(['cachefs', 'umount', target], check=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', help='configuration file (default: where Fluid puts it)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the cachefs command line instead of running it')
    args = parser.parse_args(argv)
    try:
        command, env = build_command(load_config(args.config), os.environ)
    except (ConfigError, ValueError, OSError) as exc:
        print(f'cachefs-fluid-entrypoint: error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    # the environment carries the credentials; only their names are shown
    shown = shlex.join(command) + ''.join(f' [{name} set]' for name in sorted(env))
    if args.dry_run:
        print(shown)
        return 0
    print(f'cachefs-fluid-entrypoint: {shown}', file=sys.stderr, flush=True)
    target = command[4]
    clear_dead_mount(target)
    os.makedirs(target, exist_ok=True)
    os.execvpe(command[0], command, dict(os.environ, **env))


if __name__ == '__main__':
    sys.exit(main())
