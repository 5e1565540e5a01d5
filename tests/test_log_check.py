"""The log check (`support/checklogs.py`): a test fails when a daemon it ran logged an error or a
traceback the test did not declare with `@pytest.mark.expected_log(regex)`.

The logs come from a real daemon: a background `cachefs mount` onto a mount point that does not
exist logs one ERROR record and exits 6, with no server and no mount. Small test files run by
`pytester` then hold that log in their `tmp_path`, as a test that ran the daemon would.
"""

import textwrap
from pathlib import Path

import pytest

from conftest import run_cachefs
from support.checklogs import unexpected_records

TESTS = Path(__file__).parent
ERROR_MESSAGE = r'ERROR cachefs\.cli: mount point \S+/no-such-mountpoint does not exist'


@pytest.fixture(scope='module')
def daemon_error_log(tmp_path_factory):
    """The log of a real daemon that failed: its text, with one ERROR record."""
    folder = tmp_path_factory.mktemp('failed-daemon')
    log_file = folder / 'daemon.log'
    result = run_cachefs('mount', folder, folder / 'no-such-mountpoint', '--cache-dir',
                         folder / 'cache', '--log-file', log_file, '--log-level', 'debug')
    assert result.returncode == 6, result.stderr
    return log_file.read_text()


@pytest.fixture
def checked(pytester, daemon_error_log):
    """Runs one test file under the log check; the test file finds the daemon's log text in
    DAEMON_LOG."""
    pytester.makeconftest(f'''
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        pytest_plugins = ['support.checklogs']
        DAEMON_LOG = {daemon_error_log!r}
    ''')

    def run(source):
        pytester.makepyfile(textwrap.dedent('''
            import pytest
            from conftest import DAEMON_LOG
        ''') + textwrap.dedent(source))
        return pytester.runpytest_inprocess('-p', 'no:cacheprovider',
                                            '-W', 'ignore::pytest.PytestAssertRewriteWarning')
    return run


def test_a_test_whose_daemon_logged_an_unexpected_error_fails_naming_the_record(checked):
    result = checked('''
        def test_reads(tmp_path):
            (tmp_path / 'mnt.log').write_text(DAEMON_LOG)
    ''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*1 unexpected error(s) in the daemon logs*',
                                 'mnt.log: * ERROR cachefs.cli: mount point */no-such-mountpoint'
                                 ' does not exist'])


def test_an_error_the_test_declared_passes(checked):
    result = checked(f'''
        @pytest.mark.expected_log({ERROR_MESSAGE!r})
        def test_mounts_nothing(tmp_path):
            (tmp_path / 'mnt.log').write_text(DAEMON_LOG)
    ''')
    result.assert_outcomes(passed=1)


def test_a_declaration_excuses_only_the_message_it_matches(checked):
    result = checked('''
        @pytest.mark.expected_log(r'ERROR cachefs\\.cli: access denied')
        def test_mounts_nothing(tmp_path):
            (tmp_path / 'mnt.log').write_text(DAEMON_LOG)
    ''')
    result.assert_outcomes(failed=1)


def test_an_error_logged_while_the_test_unmounts_fails_the_test_itself(checked):
    """What a daemon logs on its way out (the `mounter` fixture unmounts before the check) is
    the test's, and reported as its failure, not as an error of a teardown."""
    result = checked('''
        @pytest.fixture
        def daemon(request, tmp_path):
            log = tmp_path / 'mnt.log'
            log.write_text('')
            plugin = request.config.pluginmanager.get_plugin('support.checklogs')
            plugin.stop_before_check(request.node, lambda: log.write_text(DAEMON_LOG))
            return log

        def test_reads(daemon):
            pass
    ''')
    result.assert_outcomes(failed=1)


def test_an_error_logged_in_a_fixtures_teardown_is_reported_not_lost(checked):
    result = checked('''
        @pytest.fixture
        def daemon(tmp_path):
            yield
            (tmp_path / 'mnt.log').write_text(DAEMON_LOG)

        def test_reads(daemon):
            pass
    ''')
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(['*1 unexpected error(s) in the daemon logs*'])


def test_a_failing_test_is_reported_with_its_own_failure_only(checked):
    result = checked('''
        def test_reads(tmp_path):
            (tmp_path / 'mnt.log').write_text(DAEMON_LOG)
            assert False, 'the read failed'
    ''')
    result.assert_outcomes(failed=1)
    result.stdout.no_fnmatch_line('*unexpected error(s) in the daemon logs*')


def test_a_traceback_fails_even_after_a_warning_and_a_plain_warning_does_not():
    log = ('2026-01-01 00:00:00,000 WARNING cachefs.ufs.s3: a read failed; retrying\n'
           '2026-01-01 00:00:01,000 WARNING botocore.credentials: refresh failed\n'
           'Traceback (most recent call last):\n'
           '  File "x.py", line 1, in <module>\n'
           'OSError: no route\n'
           '2026-01-01 00:00:02,000 DEBUG cachefs: done\n')
    assert unexpected_records(log) == [
        '2026-01-01 00:00:01,000 WARNING botocore.credentials: refresh failed\n'
        'Traceback (most recent call last):\n'
        '  File "x.py", line 1, in <module>\n'
        'OSError: no route']


def test_a_message_that_quotes_a_forged_record_is_not_an_error():
    """A key can hold anything; the formatter escapes its newlines, so a forged record or the
    word Traceback inside a message never starts a line of its own."""
    log = ('2026-01-01 00:00:00,000 WARNING cachefs.ufs.s3: skipping key '
           "'x\\n2026-01-01 00:00:00,000 ERROR cachefs: Traceback (most recent call last):'\n")
    assert unexpected_records(log) == []


def test_a_traceback_printed_on_stderr_before_any_record_fails():
    log = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom\n'
    assert len(unexpected_records(log)) == 1


REPLY_DROPPED = ('2026-01-01 00:00:02,000 ERROR pyfuse3: fuse_read(): fuse_reply_* failed with No '
                 'such file or directory\n')
SESSION_EXITING = ('2026-01-01 00:00:01,000 DEBUG pyfuse3: FUSE session exit flag set while '
                   'waiting for FUSE fd to become readable.\n')


def test_an_answer_the_kernel_dropped_at_the_unmount_is_no_error():
    assert unexpected_records(SESSION_EXITING + REPLY_DROPPED) == []


def test_an_answer_the_kernel_dropped_while_mounted_is_an_error():
    remounted = '2026-01-01 00:00:01,500 INFO cachefs.daemon: mounted /src on /mnt\n'
    assert unexpected_records(REPLY_DROPPED) == [REPLY_DROPPED.rstrip('\n')]
    assert unexpected_records(SESSION_EXITING + remounted + REPLY_DROPPED) == [
        REPLY_DROPPED.rstrip('\n')]
