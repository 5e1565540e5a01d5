"""Deployment files: packaging/ (systemd, fstab), Dockerfile, deploy/ (Kubernetes, Fluid).

The systemd service is tested by running its own ExecStart line (as systemd would expand it) with
a fake $NOTIFY_SOCKET; mount(8) is tested by really mounting through it. The Kubernetes manifests
are checked against the Kubernetes API's JSON schemas that kubernetes-validate bundles (offline),
and the Fluid resources, which core schemas do not know, against a schema of the fields they use
(FLUID_SCHEMAS below, written from Fluid's CRDs). Nothing here applies them to a cluster or builds
the image: there is neither a cluster nor a Docker daemon on the test machines.
"""

import errno
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cachefs.cli import build_parser
from cachefs.config import expand_dash_o
from cachefs.units import parse_size
from conftest import (assert_tree_matches, clean_env, free_port, is_mounted, pid_alive, sha256_of,
                      wait_until)

ROOT = Path(__file__).parent.parent
SYSTEMD = ROOT / 'packaging' / 'systemd'
SERVICE = SYSTEMD / 'cachefs@.service'
ENV_EXAMPLE = SYSTEMD / 'cachefs.env.example'
MOUNT_UNIT = SYSTEMD / 'mnt-training.mount'
FSTAB = ROOT / 'packaging' / 'fstab.example'
DEPLOY = ROOT / 'deploy'
# deploy/prometheus/ holds Prometheus rules (test_alert_rules checks them), not Kubernetes objects
MANIFESTS = sorted(path for path in DEPLOY.rglob('*.yaml')
                   if path.relative_to(DEPLOY).parts[0] != 'prometheus')
ENTRYPOINT = DEPLOY / 'fluid' / 'fluid-entrypoint.py'
VENV_BIN = Path(sys.executable).parent
# Kubernetes versions the manifests are checked against: 1.29 is the first where native sidecars
# (init containers with restartPolicy: Always) are on by default.
KUBERNETES_VERSIONS = ('1.29', '1.37')


# -- helpers: systemd files --

def read_unit(path):
    """{section: [(key, value), ...]} of a systemd unit file, continuation lines joined."""
    sections, section, pending = {}, None, ''
    for raw in Path(path).read_text().splitlines():
        line = (pending + ' ' + raw.strip()) if pending else raw.strip()
        pending = ''
        if not line or line[0] in '#;':
            continue
        if line.endswith('\\'):
            pending = line[:-1].rstrip()
            continue
        if line.startswith('['):
            section = line.strip('[]')
            sections.setdefault(section, [])
        else:
            key, _, value = line.partition('=')
            sections[section].append((key.strip(), value.strip()))
    return sections


def unit_value(unit, section, key):
    """The setting systemd uses: the last one of that name."""
    values = [value for name, value in unit.get(section, []) if name == key]
    return values[-1] if values else None


def read_environment_file(path):
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and line[0] not in '#;':
            key, _, value = line.partition('=')
            env[key.strip()] = value.strip().strip('"')
    return env


def escape_path(path):
    """`systemd-escape --path PATH`."""
    path = '/'.join(part for part in str(path).split('/') if part)
    if not path:
        return '-'
    out = []
    for i, char in enumerate(path):
        if char == '/':
            out.append('-')
        elif char.isascii() and (char.isalnum() or char in ':_.') and not (i == 0 and char == '.'):
            out.append(char)
        else:
            out += [f'\\x{byte:02x}' for byte in char.encode()]
    return ''.join(out)


def expand_command(line, env, path):
    """The argv systemd runs for an Exec*= line of instance `escape_path(path)`: the specifiers
    %f %i %I %% replaced, ${VAR} as one word, a lone $VAR split at white space."""
    specifiers = {'f': str(path), 'i': escape_path(path), 'I': str(path).strip('/'), '%': '%'}

    def specifier(match):
        assert match.group(1) in specifiers, f'the test does not know %{match.group(1)}'
        return specifiers[match.group(1)]

    argv = []
    for word in shlex.split(line.lstrip('-@:+!')):
        word = re.sub(r'%(.)', specifier, word)
        lone = re.fullmatch(r'\$([A-Za-z_][A-Za-z0-9_]*)', word)
        if lone:
            argv += env.get(lone.group(1), '').split()
        else:
            argv.append(re.sub(r'\$\{([A-Za-z_][A-Za-z0-9_]*)\}',
                               lambda m: env.get(m.group(1), ''), word))
    return argv


def service_env(source, options):
    """The example environment file, with the test's source and options."""
    env = read_environment_file(ENV_EXAMPLE)
    assert {'CACHEFS_SOURCE', 'CACHEFS_OPTIONS'} <= env.keys()
    return dict(env, CACHEFS_SOURCE=source, CACHEFS_OPTIONS=options)


def service_argv(mountpoint, env):
    """The unit's ExecStart, run with this interpreter's cachefs instead of the installed path."""
    argv = expand_command(unit_value(read_unit(SERVICE), 'Service', 'ExecStart'), env, mountpoint)
    assert Path(argv[0]).name == 'cachefs' and argv[1:3] == ['mount', '--foreground']
    return [sys.executable, '-m', 'cachefs', *argv[1:]]


def parse_cachefs_mount(argv):
    """Parse `cachefs mount ...` arguments the way the CLI does (raises on an unknown option)."""
    return build_parser().parse_args(expand_dash_o(['mount', *argv]))


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []

    def wait_for(self, line, process, log, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                assert process.poll() is None, f'exited {process.returncode}: {log.read_text()}'
                continue
            self.messages.append(message)
            if line in message.split('\n'):
                return message
        raise AssertionError(f'no {line} within {timeout}s; got {self.messages}')

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket():
    # a short path: unix socket paths are limited to 108 bytes, pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix='cachefs-notify-') as folder:
        sock = NotifySocket(Path(folder) / 'notify')
        try:
            yield sock
        finally:
            sock.close()


def stop_and_unmount(process, mountpoint):
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    if is_mounted(mountpoint):
        subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)


@contextmanager
def service_process(local_source, tmp_path, notify_socket):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    env = service_env(local_source.url, f'--cache-dir {tmp_path / "cache"}')
    log = tmp_path / 'daemon.log'
    with open(log, 'w') as log_file:
        process = subprocess.Popen(service_argv(mountpoint, env), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=log_file,
                                   env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    try:
        yield process, mountpoint, env, log
    finally:
        stop_and_unmount(process, mountpoint)


def largest_file(manifest):
    return max(manifest, key=lambda relpath: manifest[relpath][0])


# -- systemd service --

def test_service_is_a_notify_service_that_restarts_and_stops_cleanly():
    service = read_unit(SERVICE)
    assert unit_value(service, 'Service', 'Type') == 'notify'
    assert unit_value(service, 'Service', 'Restart') == 'on-failure'
    assert unit_value(service, 'Service', 'KillSignal') == 'SIGTERM'
    assert unit_value(service, 'Service', 'TimeoutStopSec')
    assert 'network-online.target' in unit_value(service, 'Unit', 'After').split()
    assert 'network-online.target' in unit_value(service, 'Unit', 'Wants').split()
    assert unit_value(service, 'Service', 'EnvironmentFile') == '/etc/cachefs/%i.env'
    stop_post = unit_value(service, 'Service', 'ExecStopPost')
    assert stop_post.startswith('-')          # a failure (nothing to unmount) is ignored
    assert shlex.split(stop_post[1:])[:1] == ['/usr/bin/fusermount3']
    assert {'-u', '-z', '%f'} <= set(shlex.split(stop_post[1:]))


def test_service_example_options_are_cachefs_options():
    env = read_environment_file(ENV_EXAMPLE)
    options = parse_cachefs_mount([env['CACHEFS_SOURCE'], '/mnt/training',
                                   *env['CACHEFS_OPTIONS'].split()])
    assert options.source == env['CACHEFS_SOURCE']


@pytest.mark.fuse
def test_service_reports_ready_once_the_mount_answers_and_unmounts_on_sigterm(
        local_source, tmp_path, notify_socket):
    with service_process(local_source, tmp_path, notify_socket) as (process, mountpoint, _, log):
        notify_socket.wait_for('READY=1', process, log)
        # READY=1 comes only once the mount answers: it is already there and serves data
        assert is_mounted(mountpoint)
        relpath = largest_file(local_source.manifest)
        assert sha256_of(mountpoint / relpath) == local_source.manifest[relpath][1]
        process.send_signal(signal.SIGTERM)
        notify_socket.wait_for('STOPPING=1', process, log, timeout=30)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert not is_mounted(mountpoint)


@pytest.mark.fuse
def test_service_stop_post_detaches_the_dead_mount_of_a_killed_daemon(
        local_source, tmp_path, notify_socket):
    if not Path('/usr/bin/fusermount3').exists():
        pytest.skip('/usr/bin/fusermount3 is absent (Debian package fuse3)')
    with service_process(local_source, tmp_path, notify_socket) as (process, mountpoint, env, log):
        notify_socket.wait_for('READY=1', process, log)
        process.kill()
        process.wait(timeout=30)
        with pytest.raises(OSError) as dead:
            os.listdir(mountpoint)
        assert dead.value.errno == errno.ENOTCONN
        stop_post = unit_value(read_unit(SERVICE), 'Service', 'ExecStopPost')
        subprocess.run(expand_command(stop_post, env, mountpoint), check=False, timeout=30)
        assert not is_mounted(mountpoint)
        assert os.listdir(mountpoint) == []


@pytest.fixture
def units_for_verify(tmp_path):
    """Copies of the units whose ExecStart names this interpreter's cachefs (verify checks that
    the programs exist)."""
    cachefs = VENV_BIN / 'cachefs'
    if not shutil.which('systemd-analyze'):
        pytest.skip('systemd-analyze is absent')
    if not cachefs.exists():
        pytest.skip(f'{cachefs} is absent')
    (tmp_path / SERVICE.name).write_text(
        SERVICE.read_text().replace('/usr/local/bin/cachefs', str(cachefs)))
    shutil.copy(MOUNT_UNIT, tmp_path / MOUNT_UNIT.name)
    # the template is verified through an instance, which systemd-analyze finds beside it
    return [tmp_path / 'cachefs@mnt-training.service', tmp_path / MOUNT_UNIT.name]


def test_units_pass_systemd_analyze_verify(units_for_verify):
    for unit in units_for_verify:
        result = subprocess.run(['systemd-analyze', 'verify', str(unit)], capture_output=True,
                                text=True, timeout=60, cwd=unit.parent)
        # systemd-analyze also reports on the host's own units; only ours count here
        complaints = [line for line in result.stderr.splitlines()
                      if str(unit.parent) in line or unit.name.split('@')[0] in line]
        assert (result.returncode, complaints) == (0, []), result.stderr


# -- mount unit and fstab --

def test_mount_unit_is_named_for_its_mount_point_and_uses_the_cachefs_helper():
    mount = read_unit(MOUNT_UNIT)
    where = unit_value(mount, 'Mount', 'Where')
    assert MOUNT_UNIT.name == escape_path(where) + '.mount'
    if shutil.which('systemd-escape'):
        escaped = subprocess.run(['systemd-escape', '--path', where], capture_output=True,
                                 text=True, check=True).stdout.strip()
        assert escaped == escape_path(where)
    assert unit_value(mount, 'Mount', 'Type') == 'cachefs'
    options = parse_cachefs_mount([unit_value(mount, 'Mount', 'What'), where,
                                   '-o', unit_value(mount, 'Mount', 'Options')])
    assert options.allow_other


def fstab_lines():
    return [line.split() for line in FSTAB.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


def test_fstab_example_lines_are_cachefs_mounts_with_known_options():
    lines = fstab_lines()
    assert {fields[2] for fields in lines} == {'cachefs', 'fuse.cachefs'}
    for source, mountpoint, _type, options, *_ in lines:
        assert parse_cachefs_mount([source, mountpoint, '-o', options]).source == source


# -- mount(8) --

@contextmanager
def temporary_link(link, target):
    """`link` -> `target` for the duration, unless an equal link is already there."""
    link = Path(link)
    if os.path.lexists(link):
        if os.path.realpath(link) != os.path.realpath(target):
            pytest.skip(f'{link} exists and is not a link to {target}; not replacing it')
        yield
        return
    link.symlink_to(target)
    try:
        yield
    finally:
        link.unlink()


def mount_with_mount8(fstype, source, mountpoint, cache_dir):
    # generic options, as an fstab line carries them, must be ignored
    return subprocess.run(['mount', '-t', fstype, source, str(mountpoint), '-o',
                           f'cache_dir={cache_dir},_netdev,nofail,x-systemd.automount'],
                          capture_output=True, text=True, timeout=120, env=clean_env())


def assert_mount8_round_trip(fstype, local_source, tmp_path):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    result = mount_with_mount8(fstype, local_source.url, mountpoint, tmp_path / 'cache')
    pid = None
    try:
        assert result.returncode == 0, result.stderr
        pid = int(os.getxattr(mountpoint, 'user.cachefs.pid'))
        assert_tree_matches(mountpoint, local_source.manifest)
        result = subprocess.run(['umount', str(mountpoint)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: not pid_alive(pid), timeout=30)
        assert not is_mounted(mountpoint)
    finally:
        if is_mounted(mountpoint):
            subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def require_root_and_mount8():
    if os.geteuid() != 0:
        pytest.skip('mount(8) runs helpers only for root here, and the test links into /usr')
    if not shutil.which('mount'):
        pytest.skip('mount(8) is absent')


@pytest.mark.fuse
def test_mount_t_cachefs_runs_the_mount_cachefs_helper(local_source, tmp_path):
    """`mount -t cachefs` runs /sbin/mount.cachefs (util-linux looks there for mount.<type>)."""
    require_root_and_mount8()
    helper = VENV_BIN / 'mount.cachefs'
    if not helper.exists():
        pytest.skip(f'{helper} is absent')
    # /sbin is a link to /usr/sbin on merged-/usr systems; link where the file really goes
    with temporary_link(Path(os.path.realpath('/sbin')) / 'mount.cachefs', helper):
        assert_mount8_round_trip('cachefs', local_source, tmp_path)


@pytest.mark.fuse
def test_mount_t_fuse_cachefs_runs_cachefs_through_mount_fuse3(local_source, tmp_path):
    """`mount -t fuse.cachefs` runs /sbin/mount.fuse3, which runs `cachefs SOURCE MOUNTPOINT -o
    ...` through /bin/sh. mount(8) drops PATH, so the shell's default PATH must find cachefs:
    the test links it into /usr/local/bin."""
    require_root_and_mount8()
    if not any(Path(d, 'mount.fuse3').exists() or Path(d, 'mount.fuse').exists()
               for d in ('/sbin', '/usr/sbin')):
        pytest.skip('mount.fuse3 is absent (Debian package fuse3)')
    cachefs = VENV_BIN / 'cachefs'
    if not cachefs.exists():
        pytest.skip(f'{cachefs} is absent')
    with temporary_link('/usr/local/bin/cachefs', cachefs):
        assert_mount8_round_trip('fuse.cachefs', local_source, tmp_path)


# -- Dockerfile --

def dockerfile_instructions():
    text = (ROOT / 'Dockerfile').read_text().replace('\\\n', ' ')
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def test_dockerfile_runs_cachefs_in_the_foreground_on_python_slim():
    instructions = dockerfile_instructions()
    args = dict(value.split('=', 1) for name, value in instructions
                if name == 'ARG' and '=' in value)
    bases = [value.split()[0] for name, value in instructions if name == 'FROM']
    assert {re.sub(r'\$\{(\w+)\}', lambda m: args[m.group(1)], base) for base in bases} == {
        'python:3.11-slim'}
    entrypoints = [json.loads(value) for name, value in instructions if name == 'ENTRYPOINT']
    assert entrypoints == [['cachefs', 'mount', '--foreground']]


def dockerignore_patterns():
    patterns = []
    for line in (ROOT / '.dockerignore').read_text().splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            exclude = not line.startswith('!')
            pattern = line.lstrip('!').strip('/')
            regex = ''.join('.*' if part == '**' else
                            re.escape(part).replace(r'\*', '[^/]*').replace(r'\?', '[^/]')
                            for part in re.split(r'(\*\*)', pattern))
            patterns.append((re.compile(regex + '$'), pattern.count('/') + 1, exclude, pattern))
    return patterns


def _included(relpath, patterns):
    """Docker's rule for one path: the last pattern that matches it, or matches the first
    folders of it, decides."""
    parts = relpath.split('/')
    included = True
    for regex, depth, exclude, _ in patterns:
        if regex.match(relpath) or (depth < len(parts) and regex.match('/'.join(parts[:depth]))):
            included = not exclude
    return included


def in_build_context(relpath, patterns):
    """Whether Docker sends `relpath`: Docker does not walk into an excluded folder unless an
    exception (`!pattern`) names something inside it."""
    parts = relpath.split('/')
    for depth in range(1, len(parts)):
        folder = '/'.join(parts[:depth])
        if not _included(folder, patterns) and not any(
                not exclude and pattern.startswith(folder + '/')
                for _, _, exclude, pattern in patterns):
            return False
    return _included(relpath, patterns)


def test_docker_build_context_holds_what_the_dockerfile_copies_and_little_else():
    patterns = dockerignore_patterns()
    copied = []
    for name, value in dockerfile_instructions():
        words = value.split()
        if name == 'COPY' and not any(word.startswith('--from') for word in words):
            copied += [word for word in words[:-1] if not word.startswith('--')]
    files = []
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files += [path] if path.is_file() else [p for p in path.rglob('*.py')
                                                if '__pycache__' not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in files
               if not in_build_context(str(p.relative_to(ROOT)), patterns)]
    assert files and missing == []
    for unwanted in ('.git/HEAD', '.venv/bin/python', 'tests/conftest.py',
                     'src/cachefs/__pycache__/cli.cpython-311.pyc'):
        assert not in_build_context(unwanted, patterns), unwanted


# -- Kubernetes manifests --

def load_manifests():
    yaml = pytest.importorskip('yaml', reason='PyYAML comes with kubernetes-validate (test extra)')
    documents = []
    for path in MANIFESTS:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f'{path.relative_to(ROOT)}#{index}', document))
    return documents


def is_fluid(document):
    return document.get('apiVersion', '').split('/')[0].endswith('fluid.io')


def kubernetes_definitions(version):
    from importlib.resources import files
    folder = files('kubernetes_validate') / 'kubernetes-json-schema' / f'v{version}.0-local-strict'
    return json.loads((folder / '_definitions.json').read_text())


def ref(name):
    return {'$ref': 'https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1.' + name}


def array(items):
    return {'type': 'array', 'items': items}


def closed(properties, required=()):
    return {'type': 'object', 'properties': properties, 'required': list(required),
            'additionalProperties': False}


STRING = {'type': 'string'}
STRING_MAP = {'type': 'object', 'additionalProperties': {'type': 'string'}}
QUANTITY = {'type': ['string', 'integer']}
IMAGE = {'image': STRING, 'imageTag': STRING,
         'imagePullPolicy': {'enum': ['Always', 'IfNotPresent', 'Never']}}
# The fields of Fluid's data.fluid.io/v1alpha1 CRDs that these manifests may use, as Fluid defines
# them (api/v1alpha1/*_types.go); core types refer to the Kubernetes schemas.
FUSE_SPEC = closed({
    **IMAGE, 'command': array(STRING), 'args': array(STRING), 'options': STRING_MAP,
    'env': array(ref('EnvVar')), 'resources': ref('ResourceRequirements'),
    'nodeSelector': STRING_MAP, 'volumeMounts': array(ref('VolumeMount')),
    'livenessProbe': ref('Probe'), 'readinessProbe': ref('Probe'),
    'networkMode': {'enum': ['HostNetwork', '', 'ContainerNetwork']},
    'cleanPolicy': {'enum': ['OnDemand', 'OnRuntimeDeleted']}})
SECRET_OPTION = closed({'name': STRING, 'valueFrom': closed({'secretKeyRef': closed(
    {'name': STRING, 'key': STRING}, ['name'])})}, ['name', 'valueFrom'])
FLUID_SPECS = {
    'ThinRuntimeProfile': closed({
        'fileSystemType': {'type': 'string', 'minLength': 1}, 'fuse': FUSE_SPEC,
        'volumes': array(ref('Volume'))}, ['fileSystemType']),
    'Dataset': closed({
        'accessModes': array({'enum': ['ReadWriteOnce', 'ReadOnlyMany', 'ReadWriteMany',
                                       'ReadWriteOncePod']}),
        'mounts': array(closed({
            'mountPoint': {'type': 'string', 'minLength': 1}, 'name': STRING, 'path': STRING,
            'readOnly': {'type': 'boolean'}, 'shared': {'type': 'boolean'},
            'options': STRING_MAP, 'encryptOptions': array(SECRET_OPTION)}, ['mountPoint'])),
        'sharedOptions': STRING_MAP, 'sharedEncryptOptions': array(SECRET_OPTION),
        'tolerations': array(ref('Toleration')),
        'placement': {'enum': ['Exclusive', 'Shared', '']}}),
    'ThinRuntime': closed({
        'profileName': STRING, 'fuse': FUSE_SPEC, 'replicas': {'type': 'integer'},
        'volumes': array(ref('Volume')),
        'tieredstore': closed({'levels': array(closed({
            'mediumtype': {'enum': ['MEM', 'SSD', 'HDD']},
            'volumeType': {'enum': ['hostPath', 'emptyDir']}, 'path': STRING,
            'quota': QUANTITY, 'high': STRING, 'low': STRING}, ['mediumtype']))})}),
    'DataProcess': closed({
        'dataset': closed({'name': STRING, 'namespace': STRING, 'mountPath': STRING,
                           'subPath': STRING}, ['name', 'mountPath']),
        'processor': {**closed({
            'serviceAccountName': STRING,
            'podMetadata': closed({'labels': STRING_MAP, 'annotations': STRING_MAP}),
            'job': closed({'podSpec': ref('PodSpec')}),
            'script': closed({
                **IMAGE, 'restartPolicy': {'enum': ['Never', 'OnFailure']},
                'command': array(STRING), 'source': {'type': 'string', 'minLength': 1},
                'env': array(ref('EnvVar')), 'volumeMounts': array(ref('VolumeMount')),
                'volumes': array(ref('Volume')), 'resources': ref('ResourceRequirements')},
                ['source'])}),
            'oneOf': [{'required': ['job']}, {'required': ['script']}]},
        'policy': {'enum': ['Once', 'Cron', 'OnEvent']}, 'schedule': STRING,
        'ttlSecondsAfterFinished': {'type': 'integer'}}, ['dataset', 'processor']),
}
CLUSTER_SCOPED = {'ThinRuntimeProfile'}


def fluid_schema(kind):
    metadata = closed({'name': {'type': 'string', 'pattern': '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'},
                       'namespace': STRING, 'labels': STRING_MAP, 'annotations': STRING_MAP},
                      ['name'])
    if kind in CLUSTER_SCOPED:
        metadata['not'] = {'required': ['namespace']}
    return closed({'apiVersion': {'const': 'data.fluid.io/v1alpha1'}, 'kind': {'const': kind},
                   'metadata': metadata, 'spec': FLUID_SPECS[kind]},
                  ['apiVersion', 'kind', 'metadata', 'spec'])


def fluid_errors(document, definitions):
    import jsonschema
    from referencing import Registry, Resource
    kind = document.get('kind')
    if kind not in FLUID_SPECS:
        return [f'no schema for Fluid kind {kind!r}']
    registry = Registry().with_resource('https://kubernetes.io/api/_definitions.json',
                                        Resource.from_contents(definitions))
    validator = jsonschema.Draft202012Validator(fluid_schema(kind), registry=registry)
    return [f'{"/".join(map(str, error.absolute_path))}: {error.message}'
            for error in validator.iter_errors(document)]


@pytest.mark.parametrize('version', KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_and_fluid_schemas(version):
    kubernetes_validate = pytest.importorskip(
        'kubernetes_validate.utils', reason='kubernetes-validate is in the test extra')
    definitions = kubernetes_definitions(version)
    errors = []
    for name, document in load_manifests():
        if is_fluid(document):
            errors += [f'{name}: {error}' for error in fluid_errors(document, definitions)]
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f'{name}: {"/".join(map(str, exc.absolute_path))}: {exc.message}')
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f'{name}: {exc.message}')
    assert errors == []


def test_fluid_schema_rejects_a_misspelt_field():
    pytest.importorskip('kubernetes_validate', reason='kubernetes-validate is in the test extra')
    profile = next(doc for _, doc in load_manifests() if doc['kind'] == 'ThinRuntimeProfile')
    definitions = kubernetes_definitions(KUBERNETES_VERSIONS[-1])
    broken = json.loads(json.dumps(profile))
    broken['spec']['fuse']['comand'] = broken['spec']['fuse'].pop('command')
    assert fluid_errors(profile, definitions) == []
    assert fluid_errors(broken, definitions) != []


def documents_of(relpath):
    return [doc for name, doc in load_manifests() if name.startswith(relpath + '#')]


def cachefs_command(container):
    """The parsed `cachefs mount --foreground ...` that a container runs (after `exec`)."""
    script = ' '.join(container.get('command', []) + container.get('args', []))
    words = shlex.split(script[script.index('cachefs mount --foreground'):])
    assert words[:3] == ['cachefs', 'mount', '--foreground']
    return parse_cachefs_mount(words[3:])


def mount_of(container, volume):
    return next(m for m in container['volumeMounts'] if m['name'] == volume)


def test_sidecar_shares_its_mount_with_the_trainer_through_mount_propagation():
    pod = documents_of('deploy/sidecar/training-job.yaml')[0]['spec']['template']['spec']
    sidecar = next(c for c in pod['initContainers'] if c['name'] == 'cachefs')
    trainer = next(c for c in pod['containers'] if c['name'] == 'trainer')
    command = cachefs_command(sidecar)
    assert sidecar['restartPolicy'] == 'Always'              # a native sidecar
    assert sidecar['securityContext']['privileged'] is True
    shared = next(m for m in sidecar['volumeMounts'] if m['mountPath'] == command.mountpoint)
    assert shared['mountPropagation'] == 'Bidirectional'
    assert mount_of(trainer, shared['name'])['mountPropagation'] == 'HostToContainer'
    assert 'emptyDir' in next(v for v in pod['volumes'] if v['name'] == shared['name'])
    assert sidecar['startupProbe']['exec']['command'] == ['cachefs', 'stats', command.mountpoint]
    assert command.allow_other
    assert any(m['mountPath'] == command.cache_dir for m in sidecar['volumeMounts'])


def test_daemonset_mounts_on_gpu_nodes_under_a_host_path_and_unmounts_before_stopping():
    daemonset = next(doc for doc in documents_of('deploy/daemonset/cachefs-daemonset.yaml')
                     if doc['kind'] == 'DaemonSet')
    pod = daemonset['spec']['template']['spec']
    assert pod['nodeSelector']
    container = pod['containers'][0]
    command = cachefs_command(container)
    host_paths = {v['name']: v['hostPath']['path'] for v in pod['volumes'] if 'hostPath' in v}
    mountpoint = next(m for m in container['volumeMounts'] if m['mountPath'] == command.mountpoint)
    assert host_paths[mountpoint['name']] == command.mountpoint
    assert mountpoint['mountPropagation'] == 'Bidirectional'
    assert container['securityContext']['privileged'] is True
    cache = next(m for m in container['volumeMounts'] if m['mountPath'] == command.cache_dir)
    assert cache['name'] in host_paths
    assert container['lifecycle']['preStop']['exec']['command'][:3] == [
        'cachefs', 'umount', command.mountpoint]
    trainer_pod = documents_of('deploy/daemonset/training-job.yaml')[0]['spec']['template']['spec']
    trainer_volume = next(v for v in trainer_pod['volumes'] if 'hostPath' in v)
    assert trainer_volume['hostPath']['path'] == command.mountpoint


# -- Fluid --

def load_entrypoint():
    spec = importlib.util.spec_from_file_location('fluid_entrypoint', ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fluid_profile():
    return next(doc for doc in documents_of('deploy/fluid/thinruntimeprofile.yaml')
                if doc['kind'] == 'ThinRuntimeProfile')


def test_fluid_profile_runs_the_entrypoint_the_image_installs():
    fuse = fluid_profile()['spec']['fuse']
    assert fuse['command'][-1] == '/usr/local/bin/cachefs-fluid-entrypoint'
    dockerfile = (ROOT / 'Dockerfile').read_text()
    assert 'deploy/fluid/fluid-entrypoint.py /usr/local/bin/cachefs-fluid-entrypoint' in dockerfile


def test_fluid_entrypoint_turns_the_fluid_config_into_cachefs_options_and_credentials(
        tmp_path, monkeypatch):
    entrypoint = load_entrypoint()
    secrets = tmp_path / 'secrets' / 'imagenet-s3'
    secrets.mkdir(parents=True)
    (secrets / 'aws_secret_access_key').write_text('s3cr3t\n')
    monkeypatch.setattr(entrypoint, 'SECRETS_DIR', str(tmp_path / 'secrets') + '/')
    config = {'mounts': [{'mountPoint': 's3://bucket/train', 'name': 'train', 'options': {
                  'region': 'us-west-2', 'memory_cache_size': '4G',
                  'aws_access_key_id': 'AKIDEXAMPLE',
                  'aws_secret_access_key': str(secrets / 'aws_secret_access_key')}}],
              'targetPath': '/runtime-mnt/thin/default/imagenet/thin-fuse',
              'runtimeOptions': {'memory_cache_size': '2G', 'cache_size': '100G'}}
    argv, env = entrypoint.build_command(config, {'MOUNT_OPTIONS': 'ro,allow_other',
                                                  'MOUNT_POINT': '/ignored'})
    assert argv[:5] == ['cachefs', 'mount', '--foreground', 's3://bucket/train',
                        '/runtime-mnt/thin/default/imagenet/thin-fuse']
    assert env == {'AWS_ACCESS_KEY_ID': 'AKIDEXAMPLE', 'AWS_SECRET_ACCESS_KEY': 's3cr3t'}
    options = parse_cachefs_mount(argv[3:])
    assert (options.region, options.allow_other, options.cache_size) == ('us-west-2', True,
                                                                         100 << 30)
    assert options.memory_cache_size == 4 << 30       # the Dataset's option wins
    assert not any('s3cr3t' in word or 'AKID' in word for word in argv)


def test_fluid_entrypoint_refuses_a_dataset_of_several_mounts(tmp_path, capsys):
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'mounts': [{'mountPoint': 's3://a'}, {'mountPoint': 's3://b'}],
                                  'targetPath': str(tmp_path / 'mnt')}))
    assert load_entrypoint().main(['--config', str(config)]) == 2
    assert 'exactly one mount' in capsys.readouterr().err


def start_fluid_fuse_container(local_source, tmp_path, name='fuse'):
    """The entrypoint as Fluid starts it: config.json, MOUNT_POINT and MOUNT_OPTIONS."""
    target = tmp_path / 'runtime-mnt' / 'thin' / 'default' / 'imagenet' / 'thin-fuse'
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({
        'mounts': [{'mountPoint': 'local://' + str(local_source.local_root), 'name': 'data',
                    'options': {'cache_dir': str(tmp_path / 'cache')}}],
        'targetPath': str(target), 'accessModes': ['ReadOnlyMany']}))
    env = clean_env(MOUNT_POINT=str(target), MOUNT_OPTIONS='ro,allow_other',
                    PATH=f'{VENV_BIN}:{os.environ.get("PATH", "/usr/bin:/bin")}')
    log = tmp_path / f'{name}.log'
    with open(log, 'w') as log_file:
        process = subprocess.Popen([sys.executable, str(ENTRYPOINT), '--config', str(config)],
                                   env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=log_file)
    return process, target, log


@contextmanager
def fluid_fuse_container(local_source, tmp_path, name='fuse'):
    process, target, log = start_fluid_fuse_container(local_source, tmp_path, name)
    try:
        yield process, target, log
    finally:
        stop_and_unmount(process, target)


def wait_for_mount(process, target, log):
    def answering():
        assert process.poll() is None, log.read_text()
        try:
            os.getxattr(target, 'user.cachefs.pid')
            return True
        except OSError:
            return False
    assert wait_until(answering, timeout=60), log.read_text()


def fstype_of(path):
    with open('/proc/self/mountinfo') as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return fields[fields.index('-') + 1]
    return None


@pytest.mark.fuse
def test_fluid_entrypoint_mounts_the_dataset_with_the_profiles_type_and_unmounts_on_sigterm(
        local_source, tmp_path):
    with fluid_fuse_container(local_source, tmp_path) as (process, target, log):
        wait_for_mount(process, target, log)
        # Fluid waits for a mount of the profile's fileSystemType at the target path
        assert fstype_of(target) == fluid_profile()['spec']['fileSystemType']
        relpath = largest_file(local_source.manifest)
        assert sha256_of(target / relpath) == local_source.manifest[relpath][1]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert not is_mounted(target)


@pytest.mark.fuse
def test_fluid_entrypoint_replaces_the_dead_mount_of_a_killed_fuse_container(
        local_source, tmp_path):
    killed, target, log = start_fluid_fuse_container(local_source, tmp_path, 'killed')
    try:
        wait_for_mount(killed, target, log)
        killed.kill()
        killed.wait(timeout=30)
        with pytest.raises(OSError) as dead:
            os.listdir(target)
        assert dead.value.errno == errno.ENOTCONN
        with fluid_fuse_container(local_source, tmp_path) as (process, target, log):
            wait_for_mount(process, target, log)
            relpath = largest_file(local_source.manifest)
            assert sha256_of(target / relpath) == local_source.manifest[relpath][1]
    finally:
        stop_and_unmount(killed, target)


# -- the cluster tier: memcached with extstore, its Service and NetworkPolicy, cachefs with
# --cluster (deploy/cluster/, deploy/fluid/, packaging/systemd/cachefs-memcached.service) --

CLUSTER = 'deploy/cluster/'
MEMCACHED_UNIT = SYSTEMD / 'cachefs-memcached.service'
MEMCACHED_PORT = 11211
QUANTITY_UNITS = {'': 1, 'Ki': 1 << 10, 'Mi': 1 << 20, 'Gi': 1 << 30, 'Ti': 1 << 40,
                  'k': 10 ** 3, 'M': 10 ** 6, 'G': 10 ** 9, 'T': 10 ** 12}


def quantity(text):
    """A Kubernetes memory quantity (`5Gi`, `512Mi`, `1G`) in bytes."""
    number, unit = re.fullmatch(r'([0-9]+)([A-Za-z]*)', str(text)).groups()
    return int(number) * QUANTITY_UNITS[unit]


def cluster_documents():
    """{kind: [document, ...]} of deploy/cluster/."""
    kinds = {}
    for name, document in load_manifests():
        if name.startswith(CLUSTER):
            kinds.setdefault(document['kind'], []).append(document)
    return kinds


def memcached_daemonset(kinds):
    return next(d for d in kinds['DaemonSet'] if d['metadata']['name'] == 'cachefs-memcached')


def cachefs_daemonset(kinds):
    return next(d for d in kinds['DaemonSet'] if d['metadata']['name'] != 'cachefs-memcached')


def labels_match(selector, labels):
    """Whether a label selector (matchLabels only, the form these manifests use) selects
    `labels`; an empty selector selects everything."""
    assert set(selector) <= {'matchLabels'}, f'the test reads matchLabels only: {selector}'
    return all(labels.get(key) == value
               for key, value in selector.get('matchLabels', {}).items())


def memcached_problems(argv, block_size):
    """What is wrong with a memcached command line for the cluster tier; [] when nothing."""
    problems = []
    words = list(argv)
    if Path(words[0]).name != 'memcached':
        return [f'not memcached: {words[0]}']

    def value(flag):
        return words[words.index(flag) + 1] if flag in words else None
    max_item = value('-I')
    # an item is the block, its key and its header: -I must leave room for the last two
    if max_item is None or parse_size(max_item) < block_size + 64 * 1024:
        problems.append(f'-I {max_item} does not hold a block of {block_size} bytes')
    if value('-m') is None or not value('-m').isdigit():
        problems.append('-m (memory in MiB) is missing')
    if value('-U') != '0':
        problems.append('UDP is not off (-U 0)')
    if value('-p') not in (None, str(MEMCACHED_PORT)):
        problems.append(f'port {value("-p")} is not {MEMCACHED_PORT}')
    settings = [item.split('=', 1) for flag, text in zip(words, words[1:]) if flag == '-o'
                for item in text.split(',')]
    names = [name for name, _ in settings]
    if 'ext_path' not in names:
        problems.append('no extstore (-o ext_path=FILE:SIZE)')
    elif 'ext_page_size' not in names or names.index('ext_page_size') > names.index('ext_path'):
        # memcached refuses ext_page_size after an ext_path
        problems.append('ext_page_size does not come before ext_path')
    ext = dict(settings)
    if ext.get('ext_item_age') != '0':
        problems.append('ext_item_age is not 0 (items may leave memory before the SSD)')
    if int(ext.get('ext_max_sleep', 1_000_000)) > 10_000:
        # at its default (1 s) the flusher sleeps while sets of blocks fill the RAM, and memory
        # evicts items that never reached the SSD (docs/cluster.md, "memcached settings")
        problems.append('ext_max_sleep is over 10000 us (items evicted before the SSD)')
    # memcached refuses to start otherwise (measured with 1.6.18): an item must fit one write
    # buffer, and a page must be a whole number of write buffers (sizes in MiB)
    page, buffer = int(ext.get('ext_page_size', 64)), int(ext.get('ext_wbuf_size', 4))
    if max_item is not None and buffer << 20 < parse_size(max_item):
        problems.append(f'ext_wbuf_size={buffer} (MiB) is smaller than -I {max_item}')
    if page % buffer:
        problems.append(f'ext_page_size={page} is not a multiple of ext_wbuf_size={buffer}')
    return problems


def memcached_memory(argv):
    return int(argv[argv.index('-m') + 1]) << 20


def ext_path(argv):
    settings = dict(item.split('=', 1) for flag, text in zip(argv, argv[1:]) if flag == '-o'
                    for item in text.split(','))
    path, size = settings['ext_path'].rsplit(':', 1)
    return path, parse_size(size)


def network_policy_problems(policy, servers, clients):
    """What is wrong with a NetworkPolicy meant to let the pods labelled `clients` (and no
    others) reach the pods labelled `servers` on TCP 11211 (and no other port); [] when
    nothing."""
    spec = policy['spec']
    problems = []
    if not spec['podSelector'].get('matchLabels') or not labels_match(spec['podSelector'],
                                                                      servers):
        problems.append('does not select the memcached pods (or selects every pod)')
    if 'Ingress' not in spec.get('policyTypes', ['Ingress']):
        problems.append('does not restrict ingress')
    for rule in spec.get('ingress', []):
        if [(port.get('protocol', 'TCP'), port.get('port'), port.get('endPort'))
                for port in rule.get('ports', [])] != [('TCP', MEMCACHED_PORT, None)]:
            problems.append(f'admits ports other than TCP {MEMCACHED_PORT}: {rule.get("ports")}')
        if not rule.get('from'):
            problems.append('admits every source')
        for peer in rule.get('from', []):
            pods = peer.get('podSelector')
            if 'ipBlock' in peer or not pods or not pods.get('matchLabels'):
                problems.append(f'admits more than labelled pods: {peer}')
            elif not labels_match(pods, clients):
                problems.append(f'does not admit the cachefs pods: {peer}')
            elif 'namespaceSelector' in peer and not peer['namespaceSelector'].get('matchLabels'):
                problems.append(f'admits the labelled pods of every namespace: {peer}')
    if not spec.get('ingress'):
        problems.append('admits nothing')
    return problems


def secret_file_problems(pod, container, path, secret_name):
    """What is wrong with `path` being the file of key `secret` of the Secret `secret_name`,
    mounted read-only into `container`, readable by its owner only; [] when nothing."""
    volumes = {volume['name']: volume for volume in pod['volumes']}
    for mount in container['volumeMounts']:
        folder = mount['mountPath'].rstrip('/') + '/'
        secret = volumes[mount['name']].get('secret')
        if not path.startswith(folder) or secret is None:
            continue
        problems = []
        if secret['secretName'] != secret_name:
            problems.append(f'{path} is from Secret {secret["secretName"]}, not {secret_name}')
        files = {item['path']: item['key'] for item in secret.get('items', [])} or None
        name = path[len(folder):]
        if (files or {}).get(name, None if files else name) != 'secret':
            problems.append(f'{path} is not the key `secret` of the Secret')
        if secret.get('defaultMode', 0o644) & 0o077:
            problems.append(f'{path} is readable by others (defaultMode '
                            f'{oct(secret.get("defaultMode", 0o644))})')
        if not mount.get('readOnly'):
            problems.append(f'{folder} is mounted writable')
        if secret.get('optional'):
            problems.append('the Secret is optional: cachefs would start without its key')
        return problems
    return [f'{path} is on no Secret volume of the container']


def cluster_checks(kinds):
    """Every problem of deploy/cluster/ as loaded (or as a test broke it); [] when none."""
    memcached, cachefs = memcached_daemonset(kinds), cachefs_daemonset(kinds)
    server_pod = memcached['spec']['template']
    client_pod = cachefs['spec']['template']
    server_labels = server_pod['metadata']['labels']
    client_labels = client_pod['metadata']['labels']
    container = server_pod['spec']['containers'][0]
    argv = container['command'] + container['args']
    client = client_pod['spec']['containers'][0]
    command = cachefs_command(client)
    problems = memcached_problems(argv, command.block_size)
    # memory: the limit holds -m plus connections, hash table and extstore write buffers
    limit = quantity(container['resources']['limits']['memory'])
    if not problems and limit < memcached_memory(argv) + (512 << 20):
        problems.append(f'memory limit {limit} leaves less than 512 MiB above -m')
    if not problems:
        folder = str(Path(ext_path(argv)[0]).parent)
        mount = next((m for m in container['volumeMounts'] if m['mountPath'] == folder), None)
        volume = mount and next(v for v in server_pod['spec']['volumes']
                                if v['name'] == mount['name'])
        if not volume or 'hostPath' not in volume:
            problems.append(f'the extstore folder {folder} is not on the node (hostPath)')
    for probe in ('readinessProbe', 'livenessProbe'):
        port = container.get(probe, {}).get('tcpSocket', {}).get('port')
        if port not in ('memcache', MEMCACHED_PORT):
            problems.append(f'no {probe} on the port')
    service = next(s for s in kinds['Service'] if labels_match(
        {'matchLabels': s['spec']['selector']}, server_labels))
    if service['spec'].get('clusterIP') != 'None':
        problems.append('the Service is not headless (clusterIP: None)')
    # the URL names the headless Service by its cluster DNS name, on the memcached port
    url = re.fullmatch(r'memcached://([^:/]+):(\d+)', command.cluster or '')
    expected = f'{service["metadata"]["name"]}.{service["metadata"]["namespace"]}' \
        '.svc.cluster.local'
    if not url or url.groups() != (expected, str(MEMCACHED_PORT)):
        problems.append(f'--cluster {command.cluster} is not memcached://{expected}:11211')
    problems += secret_file_problems(client_pod['spec'], client, command.cluster_secret_file or '',
                                     'cachefs-cluster')
    policies = [p for p in kinds['NetworkPolicy']
                if labels_match(p['spec']['podSelector'], server_labels)]
    if not policies:
        problems.append('no NetworkPolicy selects the memcached pods')
    for policy in policies:
        problems += network_policy_problems(policy, server_labels, client_labels)
        if 'Egress' not in policy['spec'].get('policyTypes', []) or policy['spec'].get('egress'):
            problems.append('memcached may open connections (egress is not denied)')
    return problems


def test_cluster_manifests_run_memcached_with_extstore_behind_a_policy_and_cachefs_with_it():
    assert cluster_checks(cluster_documents()) == []


def _memcached_container(kinds):
    return memcached_daemonset(kinds)['spec']['template']['spec']['containers'][0]


def _swap_ext_options(kinds):
    args = _memcached_container(kinds)['args']
    index = next(i for i, arg in enumerate(args) if 'ext_path=' in arg)
    items = args[index].split(',')
    items.insert(0, items.pop())
    args[index] = ','.join(items)


def _drop_ext_option(name):
    def edit(kinds):
        args = _memcached_container(kinds)['args']
        index = next(i for i, arg in enumerate(args) if 'ext_path=' in arg)
        args[index] = ','.join(item for item in args[index].split(',')
                               if not item.startswith(name + '='))
    return edit


def _set_memcached_arg(flag, value):
    def edit(kinds):
        args = _memcached_container(kinds)['args']
        args[args.index(flag) + 1] = value
    return edit


def _policy(kinds):
    return next(p for p in kinds['NetworkPolicy']
                if p['metadata']['name'] == 'cachefs-memcached')['spec']


def _replace_in_cachefs(old, new):
    def edit(kinds):
        args = cachefs_daemonset(kinds)['spec']['template']['spec']['containers'][0]['args']
        assert old in args[0]
        args[0] = args[0].replace(old, new)
    return edit


def _secret_volume(kinds):
    return next(v for v in cachefs_daemonset(kinds)['spec']['template']['spec']['volumes']
                if 'secret' in v)['secret']


# one mistake each, made in a copy of deploy/cluster/
BROKEN_CLUSTER = {
    'ext_path before ext_page_size': _swap_ext_options,
    'the flusher at its default sleep': _drop_ext_option('ext_max_sleep'),
    '-I no larger than a block': _set_memcached_arg('-I', '4m'),
    'write buffers smaller than -I': _set_memcached_arg('-I', '32m'),
    'UDP on': _set_memcached_arg('-U', '11211'),
    'memory limit at -m': lambda k: _memcached_container(k)['resources']['limits'].update(
        memory='4Gi'),
    'no readiness probe': lambda k: _memcached_container(k).pop('readinessProbe'),
    'a second port admitted': lambda k: _policy(k)['ingress'][0]['ports'].append(
        {'protocol': 'TCP', 'port': 22}),
    'every pod admitted': lambda k: _policy(k)['ingress'][0]['from'].append({'podSelector': {}}),
    'an address range admitted': lambda k: _policy(k)['ingress'][0]['from'].append(
        {'ipBlock': {'cidr': '0.0.0.0/0'}}),
    'another label admitted': lambda k: _policy(k)['ingress'][0]['from'][0]['podSelector'][
        'matchLabels'].update({'cachefs-cluster': 'other'}),
    'egress allowed': lambda k: _policy(k).update(egress=[{}]),
    'the policy selects other pods': lambda k: _policy(k)['podSelector']['matchLabels'].update(
        app='other'),
    'a Service with a cluster IP': lambda k: k['Service'][0]['spec'].pop('clusterIP'),
    'the wrong Service name': _replace_in_cachefs('cachefs-memcached.cachefs',
                                                  'memcached.cachefs'),
    'no --cluster': _replace_in_cachefs(
        '--cluster memcached://cachefs-memcached.cachefs.svc.cluster.local:11211', ''),
    'no --cluster-secret-file': _replace_in_cachefs(
        '--cluster-secret-file /etc/cachefs/cluster/secret', ''),
    'a secret file outside the Secret': _replace_in_cachefs('/etc/cachefs/cluster/secret',
                                                           '/etc/cachefs/secret'),
    'a secret readable by all': lambda k: _secret_volume(k).update(defaultMode=0o644),
    'an optional secret': lambda k: _secret_volume(k).update(optional=True),
}


@pytest.mark.parametrize('mistake', BROKEN_CLUSTER)
def test_cluster_checks_fail_on_a_copy_with_one_mistake(mistake):
    kinds = json.loads(json.dumps(cluster_documents()))
    BROKEN_CLUSTER[mistake](kinds)
    assert cluster_checks(kinds) != []


def unit_environment(unit):
    return dict(value.split('=', 1) for key, value in unit.get('Service', [])
                if key == 'Environment')


def memcached_unit_argv(**overrides):
    unit = read_unit(MEMCACHED_UNIT)
    env = dict(unit_environment(unit), **overrides)
    return expand_command(unit_value(unit, 'Service', 'ExecStart'), env, '/')


def test_memcached_unit_runs_memcached_with_extstore_as_its_own_confined_user():
    unit = read_unit(MEMCACHED_UNIT)
    argv = memcached_unit_argv()
    assert memcached_problems(argv, 4 << 20) == []
    path, _ = ext_path(argv)
    cache = unit_value(unit, 'Service', 'CacheDirectory')
    assert Path(path).parent == Path('/var/cache') / cache
    assert unit_value(unit, 'Service', 'CacheDirectoryMode') == '0700'
    assert str(Path(path).parent) in unit_value(unit, 'Unit', 'RequiresMountsFor').split()
    user = unit_value(unit, 'Service', 'User')
    sysusers = (SYSTEMD / 'cachefs-memcached.sysusers').read_text()
    assert re.search(rf'^u {re.escape(user)} ', sysusers, re.M)
    hardening = {'NoNewPrivileges': 'yes', 'ProtectSystem': 'strict', 'PrivateDevices': 'yes',
                 'CapabilityBoundingSet': '', 'RestrictNamespaces': 'yes',
                 'IPAddressDeny': 'any'}
    assert {key: unit_value(unit, 'Service', key) for key in hardening} == hardening
    # the memory limit holds -m and about 1 GiB more
    assert parse_size(unit_value(unit, 'Service', 'MemoryMax')) >= memcached_memory(argv) + (
        512 << 20)


def test_memcached_unit_checks_fail_on_a_broken_command_line():
    argv = memcached_unit_argv()
    index = argv.index('-o') + 1
    swapped = argv[:index] + [','.join(reversed(argv[index].split(',')))] + argv[index + 1:]
    assert memcached_problems(swapped, 4 << 20) != []
    assert memcached_problems(memcached_unit_argv(MAX_ITEM='4m'), 4 << 20) != []


def test_memcached_unit_passes_systemd_analyze_verify_and_security(tmp_path):
    if not shutil.which('systemd-analyze'):
        pytest.skip('systemd-analyze is absent')
    if not Path('/usr/bin/memcached').exists():
        pytest.skip('/usr/bin/memcached is absent (verify checks that ExecStart exists)')
    unit = tmp_path / MEMCACHED_UNIT.name
    shutil.copy(MEMCACHED_UNIT, unit)
    result = subprocess.run(['systemd-analyze', 'verify', str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    complaints = [line for line in result.stderr.splitlines()
                  if str(tmp_path) in line or unit.name in line]
    assert (result.returncode, complaints) == (0, []), result.stderr
    # "exposure" from 0 (locked down) to 10 (unprotected), the threshold in tenths: the unit is
    # at 1.3 (Debian's own memcached.service: 4.8)
    result = subprocess.run(['systemd-analyze', 'security', '--offline=yes', '--threshold=20',
                             str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def memcached_call(sock, request, until):
    sock.sendall(request)
    answer = b''
    while not answer.endswith(until):
        chunk = sock.recv(1 << 20)
        assert chunk, answer[-200:]
        answer += chunk
    return answer


def memcached_argv_of(where, folder, port):
    """The memcached command line of the unit or of the DaemonSet, with small sizes, a free
    port on loopback and the extstore file in `folder`."""
    if where == 'unit':
        argv = memcached_unit_argv(MEMORY_MB='64', LISTEN='127.0.0.1',
                                   EXTSTORE=f'{folder}/extstore:256M')
    else:
        container = _memcached_container(cluster_documents())
        argv = container['command'] + container['args'] + ['-l', '127.0.0.1']
        argv[argv.index('-m') + 1] = '64'
        argv = [re.sub(r'ext_path=[^,]*', f'ext_path={folder}/extstore:256M', word)
                for word in argv]
    argv[argv.index('-p') + 1] = str(port)
    return argv


@pytest.mark.parametrize('where', ['unit', 'daemonset'])
def test_memcached_command_line_keeps_a_sealed_block_in_extstore(where, tmp_path):
    """The command line of the unit (ExecStart) and of the DaemonSet, as they are but for the
    sizes, the port and the folder: memcached starts and returns a block of the default block
    size, sealed (48-byte header) under a cluster key (62 characters), intact."""
    if not Path('/usr/bin/memcached').exists():
        pytest.skip('/usr/bin/memcached is absent (Debian package memcached)')
    folder = Path(tempfile.mkdtemp(prefix='cachefs-extstore-'))
    port = free_port()
    argv = memcached_argv_of(where, folder, port)
    if os.geteuid() == 0:
        # memcached refuses to run as root; systemd and the image run it as its own user
        shutil.chown(folder, 'nobody')
        argv += ['-u', 'nobody']
    log = tmp_path / 'memcached.log'
    value = os.urandom(48 + (4 << 20))
    key = b'cfs1:' + b'0' * 57
    with open(log, 'w') as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=log_file)
    try:
        assert wait_until(lambda: process.poll() is not None or _port_open(port), timeout=30)
        assert process.poll() is None, log.read_text()
        with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
            stored = memcached_call(sock, b'set %s 0 0 %d\r\n%s\r\n' % (key, len(value), value),
                                    b'\r\n')
            assert stored == b'STORED\r\n', stored
            answer = memcached_call(sock, b'get %s\r\n' % key, b'END\r\n')
        header = b'VALUE %s 0 %d\r\n' % (key, len(value))
        assert answer == header + value + b'\r\nEND\r\n'
        assert (folder / 'extstore').exists()
    finally:
        process.kill()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def _port_open(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def test_service_example_shows_the_cluster_tier_with_cachefs_options():
    line = next(line for line in ENV_EXAMPLE.read_text().splitlines()
                if line.startswith('#CACHEFS_OPTIONS=') and '--cluster' in line)
    options = parse_cachefs_mount(['s3://bucket', '/mnt/training',
                                   *line.split('=', 1)[1].split()])
    assert options.cluster.startswith('memcached://')
    assert options.cluster_secret_file.startswith('/etc/cachefs/')


# -- the cluster tier through Fluid --

def fluid_config_for(dataset, runtime):
    """config.json and MOUNT_OPTIONS as Fluid's ThinRuntime writes them for `dataset` (with its
    default configmap config storage: an encryptOption becomes the path of the Secret's file)."""
    mount = dict(dataset['spec']['mounts'][0])
    options = dict(mount.get('options', {}))
    for option in mount.pop('encryptOptions', []):
        ref = option['valueFrom']['secretKeyRef']
        options[option['name']] = f'/etc/fluid/secrets/{ref["name"]}/{ref["key"]}'
    mount['options'] = options
    fuse_options = dict(fluid_profile()['spec']['fuse'].get('options', {}),
                        **runtime['spec']['fuse'].get('options', {}))
    config = {'mounts': [mount], 'runtimeOptions': runtime['spec']['fuse'].get('options', {}),
              'targetPath': f'/runtime-mnt/thin/default/{dataset["metadata"]["name"]}/thin-fuse',
              'accessModes': dataset['spec']['accessModes']}
    mount_options = ','.join(f'{k}={v}' if v else k for k, v in fuse_options.items())
    return config, {'MOUNT_OPTIONS': mount_options}


def test_fluid_cluster_dataset_mounts_with_the_cluster_and_its_secret_file():
    documents = documents_of('deploy/fluid/dataset-cluster.yaml')
    dataset = next(d for d in documents if d['kind'] == 'Dataset')
    runtime = next(d for d in documents if d['kind'] == 'ThinRuntime')
    argv, env = load_entrypoint().build_command(*fluid_config_for(dataset, runtime))
    options = parse_cachefs_mount(argv[3:])
    kinds = cluster_documents()
    service = kinds['Service'][0]['metadata']
    assert options.cluster == (f'memcached://{service["name"]}.{service["namespace"]}'
                               f'.svc.cluster.local:{MEMCACHED_PORT}')
    assert options.cluster_secret_file == '/etc/fluid/secrets/cachefs-cluster/secret'
    assert 'AWS_SECRET_ACCESS_KEY' in env
    # a pod network address, which the NetworkPolicy can tell from the node's other pods
    assert runtime['spec']['fuse']['networkMode'] == 'ContainerNetwork'
    # the labels Fluid gives the runtime's fuse pods, in the Dataset's namespace
    fuse_pod = {'role': 'thin-fuse', 'release': runtime['metadata']['name'], 'app': 'thin'}
    namespace = {'kubernetes.io/metadata.name': dataset['metadata'].get('namespace', 'default')}
    policy = documents_of('deploy/fluid/cluster-networkpolicy.yaml')[0]
    server_labels = memcached_daemonset(kinds)['spec']['template']['metadata']['labels']
    assert policy['metadata']['namespace'] == service['namespace']
    assert network_policy_problems(policy, server_labels, fuse_pod) == []
    assert all(labels_match(peer['namespaceSelector'], namespace)
               for rule in policy['spec']['ingress'] for peer in rule['from'])


def test_fluid_entrypoint_writes_an_inline_cluster_secret_to_a_private_file(tmp_path,
                                                                            monkeypatch):
    """Fluid's secret config storage puts the key itself in config.json: it goes to a file that
    only the fuse container's user can read, and never onto the command line."""
    entrypoint = load_entrypoint()
    monkeypatch.setattr(entrypoint, 'PRIVATE_DIR', str(tmp_path))
    config = {'mounts': [{'mountPoint': 's3://bucket/train', 'options': {
                  'cluster': 'memcached://memcached.cachefs.svc.cluster.local:11211',
                  'cluster_secret_file': 'f00dfeed' * 8}}],
              'targetPath': '/runtime-mnt/thin/default/imagenet/thin-fuse'}
    argv, _ = entrypoint.build_command(config, {})
    assert not any('f00dfeed' in word for word in argv)
    path = Path(parse_cachefs_mount(argv[3:]).cluster_secret_file)
    assert path.parent == tmp_path
    assert path.read_text() == 'f00dfeed' * 8
    assert path.stat().st_mode & 0o777 == 0o600
