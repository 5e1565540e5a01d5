"""A pytest plugin, after S3QL's pytest_checklogs: a test fails when a cachefs daemon it ran
logged an error or a traceback that the test did not declare.

Which logs: every `*.log` file directly in the test's `tmp_path`. The `mounter` fixture writes
each mount's log there (`mnt.log`), and the tests that start a daemon their own way name its
`--log-file` (or its redirected stderr) the same way. A daemon's stderr goes to its log file too,
so a traceback Python prints on its own (an exception in a thread) is seen as well.

What fails: a record at ERROR or CRITICAL level, and a record followed by a traceback (a warning
logged with `exc_info` included); not pyfuse3's error about an answer the kernel no longer wanted
once the mount is going away (REPLY_AFTER_UNMOUNT below). A record is one line (`cachefs.logs`
escapes every control character of a message), so only a line that starts with the formatter's
timestamp starts one; the lines after it, up to the next record, are its traceback or whatever
the process printed on stderr.

Declaring what a test provokes on purpose, narrowly, one regular expression per message:

    @pytest.mark.expected_log(r'ERROR cachefs\\.fuse\\.operations: read of .* failed')

A record is expected when one of the test's expressions matches it (`re.search` over the record
and its continuation lines). When: at the end of the test's call, after the mounts are unmounted
(fixtures register what must stop first with `stop_before_check`), so that the test itself is
reported as failed with the unexpected records; what a fixture's teardown still makes a daemon log
is checked after the teardown, as an error of that teardown.
"""

import logging
import re
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

# `cachefs.logs.FORMAT` (asctime, level name, logger name), as its first line in the file
RECORD = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ')
FAILING_LEVELS = ('ERROR', 'CRITICAL')
TRACEBACK = 'Traceback (most recent call last):'
SHOWN_LINES = 12        # of each unexpected record in the failure message

# A read still in flight when the mount goes away (readahead of a file whose read failed, say):
# the kernel ends the request with the unmount, and when the daemon answers it libfuse discards
# the answer with ENOENT, which pyfuse3 logs at ERROR. Harmless once pyfuse3's session is exiting,
# so every test would have to declare it now and then; before that it is still an error.
SESSION_EXITING = 'DEBUG pyfuse3: FUSE session exit flag set'
MOUNTED = re.compile(r'INFO cachefs\.daemon: mounted ')
REPLY_AFTER_UNMOUNT = re.compile(
    r'ERROR pyfuse3: fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$')

_offsets = pytest.StashKey()       # item -> {log path: bytes already checked}
_stoppers = pytest.StashKey()      # item -> [callables that stop the test's daemons]
_checked = pytest.StashKey()       # item -> True once the call passed and its logs were checked


def records(text):
    """The records of a log's text: (level, text), the text with its continuation lines.
    Lines before the first record form one of level None (a daemon's stderr before logging)."""
    level, lines = None, []
    for line in text.splitlines():
        match = RECORD.match(line)
        if match:
            if lines:
                yield level, '\n'.join(lines)
            level, lines = match.group('level'), [line]
        else:
            lines.append(line)
    if lines:
        yield level, '\n'.join(lines)


def is_failing(level, text):
    # the first line of a record is its message, which may quote anything a store sent
    lines = text.splitlines()[0 if level is None else 1:]
    return level in FAILING_LEVELS or any(TRACEBACK in line for line in lines)


def unexpected_records(text, expected=()):
    """The records of `text` that fail a test: errors and tracebacks no expression matches."""
    patterns = [re.compile(pattern) for pattern in expected]
    found, exiting = [], False
    for level, record in records(text):
        if MOUNTED.search(record):
            exiting = False
        elif SESSION_EXITING in record:
            exiting = True
        if not is_failing(level, record) or any(p.search(record) for p in patterns):
            continue
        if exiting and REPLY_AFTER_UNMOUNT.search(record):
            continue
        found.append(record)
    return found


def expected_patterns(item):
    return [pattern for mark in item.iter_markers('expected_log') for pattern in mark.args]


def stop_before_check(item, stop):
    """Have `stop()` run at the end of the test's call, before its logs are checked (a mount's
    teardown; it must be safe to call again)."""
    item.stash.setdefault(_stoppers, []).append(stop)


def logs_of(item):
    tmp_path = getattr(item, 'funcargs', {}).get('tmp_path')
    return sorted(Path(tmp_path).glob('*.log')) if tmp_path is not None else []


def new_text(item, path):
    """What `path` holds past what this test already checked."""
    offsets = item.stash.setdefault(_offsets, {})
    with open(path, 'rb') as f:
        f.seek(offsets.get(path, 0))
        data = f.read()
    offsets[path] = offsets.get(path, 0) + len(data)
    return data.decode('utf-8', errors='replace')


def check_logs(item):
    """Raise a test failure listing every unexpected record in the logs of `item`."""
    expected = expected_patterns(item)
    found = []
    for path in logs_of(item):
        for record in unexpected_records(new_text(item, path), expected):
            lines = record.splitlines()
            shown = lines[:SHOWN_LINES] + ([f'... ({len(lines) - SHOWN_LINES} more lines)']
                                           if len(lines) > SHOWN_LINES else [])
            found.append(f'{path.name}: ' + '\n    '.join(shown))
    if found:
        pytest.fail(f'{len(found)} unexpected error(s) in the daemon logs (declare those the test '
                    'provokes with @pytest.mark.expected_log(regex)):\n' + '\n'.join(found),
                    pytrace=False)


def pytest_configure(config):
    config.addinivalue_line('markers', 'expected_log(*regexes): errors or tracebacks the test '
                            'makes a daemon log on purpose, one regex per message')


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield          # a test that failed is reported as it failed, unchecked
    for stop in item.stash.get(_stoppers, ()):
        stop()
    item.stash[_checked] = True
    check_logs(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if item.stash.get(_checked, False):
        check_logs(item)    # only what the fixtures' teardown added
    return result
