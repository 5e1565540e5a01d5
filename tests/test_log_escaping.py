"""One log record is one line, and one error is one line, whatever a key or a store message holds.

A key is chosen by whoever can write to the bucket: with a newline in it, a raw log line would end
early and the rest of the key would stand as a record of its own ("forged"). The daemon's
formatter escapes control characters in every record, on stderr and in the log file alike.
"""

import io
import logging
import re
import sys

import pytest

from cachefs import cli
from cachefs.logs import OneLineFormatter, one_line
from conftest import S3_BUCKET, run_cachefs

FORGED = '2026-01-01 00:00:00,000 ERROR cachefs: forged'
RECORD_START = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ')


def formatted(*args, exc_info=None):
    record = logging.LogRecord('cachefs.test', logging.WARNING, __file__, 1, args[0], args[1:],
                               exc_info)
    return OneLineFormatter().format(record)


@pytest.mark.parametrize('char', ['\n', '\r', '\x1b', '\x85', '\u2028', '\x7f', '\udcff', '\0'])
def test_a_control_character_in_a_logged_key_is_escaped(char):
    line = formatted('read of %s failed', f'x{char}{FORGED}')
    assert '\n' not in line and '\r' not in line and char not in line
    assert RECORD_START.match(line) and FORGED in line
    line.encode('utf-8')                       # a lone surrogate would fail here


def test_a_traceback_keeps_its_lines_but_its_message_cannot_start_a_record():
    try:
        try:
            raise KeyError(f'first\n{FORGED}')
        except KeyError as exc:
            raise ValueError(f'x\n{FORGED}') from exc
    except ValueError:
        text = formatted('unexpected error with %r', 'key', exc_info=sys.exc_info())
    lines = text.splitlines()
    assert RECORD_START.match(lines[0])
    assert lines[1] == 'Traceback (most recent call last):'
    assert lines[-1] == f'ValueError: x\\n{FORGED}'
    assert not any(line.startswith(FORGED) for line in lines)


@pytest.mark.parametrize('to_file', [False, True], ids=['stderr', 'log file'])
def test_the_daemon_logs_through_the_one_line_formatter(to_file, tmp_path, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, 'stderr', stderr)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log_file = tmp_path / 'cachefs.log'
    try:
        cli.setup_logging('info', str(log_file) if to_file else None)
        logging.getLogger('cachefs.test').warning('cannot read %s', f'x\n{FORGED}')
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    text = log_file.read_text() if to_file else stderr.getvalue()
    assert len(text.splitlines()) == 1 and RECORD_START.match(text)


def test_an_error_message_with_a_newline_is_printed_on_one_line(tmp_path):
    source = f'{tmp_path}/missing\n{FORGED}'
    result = run_cachefs('mount', source, tmp_path, '--foreground', '--cache-dir',
                         tmp_path / 'cache')
    errors = [line for line in result.stderr.splitlines() if not RECORD_START.match(line)]
    assert errors == [f'cachefs: error: source folder {one_line(source)} does not exist']
    assert result.returncode == 3


@pytest.mark.fuse
def test_a_key_with_a_newline_cannot_forge_a_line_of_the_log(mutable_s3_source, mounter):
    source = mutable_s3_source
    client, prefix = source.extra['client'], source.extra['prefix']
    key = f'{prefix}/x\n{FORGED}'
    client.put_object(Bucket=S3_BUCKET, Key=key, Body=b'old')
    mounted = mounter.mount(source)
    path = mounted.path / f'x\n{FORGED}'
    client.put_object(Bucket=S3_BUCKET, Key=key, Body=b'new')    # the listed version is gone
    with pytest.raises(OSError):
        path.read_bytes()                      # the daemon logs the failed read, with the key
    text = mounted.log_file.read_text()
    assert 'forged' in text
    for line in text.splitlines():
        assert RECORD_START.match(line), line
        assert not line.startswith(FORGED)
