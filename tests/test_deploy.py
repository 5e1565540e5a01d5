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
from conftest import assert_tree_matches, clean_env, is_mounted, pid_alive, sha256_of, wait_until

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
