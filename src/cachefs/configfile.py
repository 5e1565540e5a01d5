"""The option layers below the command line: environment, config file and profile.

Precedence, highest first:

    command-line flags (and -o)  >  CACHEFS_<OPTION> environment variables  >  config file
    >  profile  >  built-in defaults

`layered_defaults` merges the lower four into one `{dest: value}` dict that the CLI installs
with `parser.set_defaults` before parsing the command line again, so an explicit flag always
wins. Every value, whatever layer it comes from, goes through the converter of its option in
`config.py`: `cache_size = "100G"` in the file, `CACHEFS_CACHE_SIZE=100G` and `--cache-size 100G`
are checked and converted by the same code.

The config file is TOML, one flat `[mount]` table whose keys are option names (dashes or
underscores), and optional `[profile.NAME]` tables that adjust a built-in profile or define a
new one. Only one file is read: `--config PATH` (or `CACHEFS_CONFIG`), else for a non-root user
`~/.config/cachefs/config.toml`, else `/etc/cachefs/config.toml`, the first that exists.
"""

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:                           # Python 3.10
    import tomli as tomllib

from .config import FLAG_FALSE, FLAG_TRUE, MOUNT_OPTIONS, Option, converter
from .errors import EXIT_USAGE, UserError

log = logging.getLogger(__name__)

ENV_PREFIX = 'CACHEFS_'
SYSTEM_CONFIG = '/etc/cachefs/config.toml'

# Settings for a kind of work, as option text (converted like any other value). Training reads
# immutable data epoch after epoch: nothing changes under the mount, so the kernel may keep
# names and attributes for a day and the listing is kept until `cachefs refresh`; the SSD tier
# stops admitting when it cannot hold the whole dataset (`auto`, resolved by the daemon once the
# dataset size is known), and sequential shard reads are prefetched.
PROFILES = {
    'training': {
        'entry-timeout': '24h',
        'attr-timeout': '24h',
        'metadata-ttl': 'inf',
        'eviction': 'auto',
        'prefetch-window': '32M',
    },
}

_OPTIONS = {option.name: option for option in MOUNT_OPTIONS}
_NOT_IN_FILE = {'config'}


def user_config_path() -> str:
    base = os.environ.get('XDG_CONFIG_HOME') or os.path.expanduser('~/.config')
    return os.path.join(base, 'cachefs', 'config.toml')


def find_config_file(explicit: str | None = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """The config file to read, or None. An explicit path (flag or CACHEFS_CONFIG) must exist."""
    environ = os.environ if environ is None else environ
    explicit = explicit or environ.get(ENV_PREFIX + 'CONFIG')
    if explicit:
        if not os.path.isfile(explicit) and explicit != os.devnull:
            raise UserError(f'config file {explicit} does not exist', EXIT_USAGE)
        return explicit
    candidates = [SYSTEM_CONFIG] if os.geteuid() == 0 else [user_config_path(), SYSTEM_CONFIG]
    return next((path for path in candidates if os.path.isfile(path)), None)


def _option(name: str, where: str) -> Option:
    option = _OPTIONS.get(str(name).replace('_', '-'))
    if option is None:
        raise UserError(f'{where}: unknown option {name!r}', EXIT_USAGE)
    return option


def convert(option: Option, value: Any, where: str) -> Any:
    """A value from the environment, the file or a profile, converted as its flag would be."""
    if option.kind == 'flag':
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in FLAG_TRUE | FLAG_FALSE:
            return text in FLAG_TRUE
        raise UserError(f'{where}: {option.name} takes true or false, not {value!r}', EXIT_USAGE)
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise UserError(f'{where}: {option.name} takes one value, not {value!r}', EXIT_USAGE)
    text = str(value).strip()
    if option.kind == 'choice':
        if text not in option.choices:
            raise UserError(f'{where}: {option.name} must be one of '
                            f'{", ".join(option.choices)}, not {text!r}', EXIT_USAGE)
        return text
    try:
        return converter(option)(text)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f'{where}: {option.name}: {exc}', EXIT_USAGE) from None


def load_config_file(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """({option name: raw value} of [mount], {profile: {option name: raw value}})."""
    try:
        with open(path, 'rb') as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise UserError(f'config file {path}: {exc.strerror}', EXIT_USAGE) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f'config file {path}: {exc}', EXIT_USAGE) from None
    unknown = set(document) - {'mount', 'profile'}
    if unknown:
        raise UserError(f'config file {path}: unknown table or key {sorted(unknown)[0]!r} '
                        '(use [mount] and [profile.NAME])', EXIT_USAGE)
    mount = _table(document.get('mount', {}), f'config file {path} [mount]')
    for name in mount:
        if name in _NOT_IN_FILE:
            raise UserError(f'config file {path}: {name} cannot be set in a config file',
                            EXIT_USAGE)
    profiles = document.get('profile', {})
    if not isinstance(profiles, dict):
        raise UserError(f'config file {path}: profile must be tables: [profile.NAME]', EXIT_USAGE)
    profiles = {name: _table(table, f'config file {path} [profile.{name}]')
                for name, table in profiles.items()}
    for name, table in profiles.items():
        if 'profile' in table or 'config' in table:
            raise UserError(f'config file {path} [profile.{name}]: a profile cannot name a '
                            'profile or a config file', EXIT_USAGE)
    return mount, profiles


def _table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UserError(f'{where}: expected a table of options', EXIT_USAGE)
    return {_option(name, where).name: value for name, value in table.items()}


def environment_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{option name: text} of the CACHEFS_<OPTION> variables that are set."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for option in MOUNT_OPTIONS:
        variable = ENV_PREFIX + option.name.replace('-', '_').upper()
        if variable in environ:
            values[option.name] = environ[variable]
    return values


def layered_defaults(flag_config: str | None = None, flag_profile: str | None = None,
                     environ: Mapping[str, str] | None = None,
                     explicit: set[str] | None = None) -> dict[str, Any]:
    """{dest: converted value} from the environment, the config file and the profile: the
    defaults to install before the command line is parsed again. `flag_config` and
    `flag_profile` are the --config and --profile given on the command line, if any. `explicit`,
    when given, receives the names of the options the user set in these layers (environment,
    config file, a profile table of the file), not those of a built-in profile."""
    environ = os.environ if environ is None else environ
    env = environment_values(environ)
    path = find_config_file(flag_config, environ)
    file_values, file_profiles = load_config_file(path) if path else ({}, {})
    profiles = {name: dict(values) for name, values in PROFILES.items()}
    for name, values in file_profiles.items():
        profiles.setdefault(name, {}).update(values)
    profile = flag_profile or env.get('profile') or file_values.get('profile')
    if profile is not None and profile not in profiles:
        raise UserError(f'unknown profile {profile!r} (known: {", ".join(sorted(profiles))})',
                        EXIT_USAGE)
    layers = [(profiles[profile] if profile is not None else {},
               lambda name: f'profile {profile}'),
              (file_values, lambda name: f'config file {path}'),
              (env, lambda name: ENV_PREFIX + name.replace('-', '_').upper())]
    merged = {}
    for values, where in layers:
        for name, value in values.items():
            merged[name] = convert(_OPTIONS[name], value, where(name))
    if explicit is not None:
        explicit.update(env, file_values, file_profiles.get(profile, {}) if profile else {})
    if profile is not None:
        merged['profile'] = profile
    if path is not None:
        merged['config'] = path
        log.debug('options from %s: %s', path, sorted(file_values))
    return {name.replace('-', '_'): value for name, value in merged.items()}
