"""`cachefs warmup` loads a mount's files into its cache through the daemon, skips what is
already cached, and `--check` tells how much is cached without loading anything."""

import json
import os

import pytest

from conftest import S3_BUCKET, assert_tree_matches, run_cachefs

pytestmark = pytest.mark.fuse


def warmup(*args, env=None):
    result = run_cachefs('warmup', '--json', '--threads', 4, *args, env=env)
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def non_empty(manifest):
    return [path for path, (size, _) in manifest.items() if size]


def test_check_before_warmup_reports_nothing_cached(s3_source, mounter):
    mounted = mounter.mount(s3_source)
    result, report = warmup('--check', mounted.path)
    assert result.returncode == 0, result.stderr
    assert report['cached_bytes'] == 0 and report['cached_ratio'] == 0
    assert report['bytes'] == sum(size for size, _ in s3_source.manifest.values())
    assert report['files'] == len(s3_source.manifest)
    # only the empty file: none of its 0 blocks is missing
    assert report['files_cached'] == len(s3_source.manifest) - len(non_empty(s3_source.manifest))
    human = run_cachefs('warmup', '--check', mounted.path / 'special')
    assert '(0.0%)' in human.stdout


def everything_but_the_300_file_folder(manifest):
    """The top-level files and folders except many/ (which would make the test slow)."""
    return {path: entry for path, entry in manifest.items() if not path.startswith('many/')}


def test_warmed_files_are_fully_cached_and_reading_them_sends_no_store_request(s3_source,
                                                                             mounter):
    mounted = mounter.mount(s3_source)
    manifest = everything_but_the_300_file_folder(s3_source.manifest)
    paths = sorted({mounted.path / path.split('/')[0] for path in manifest})
    result, report = warmup(*paths)
    assert result.returncode == 0, result.stderr
    assert report['errors'] == 0
    assert report['files_loaded'] == len(non_empty(manifest))
    assert report['bytes_loaded'] == sum(size for size, _ in manifest.values())

    result, check = warmup('--check', *paths)
    assert check['cached_ratio'] == 1.0 and check['files_cached'] == len(manifest)
    assert '(100.0%)' in run_cachefs('warmup', '--check', *paths).stdout

    before = s3_source.request_count()
    assert_tree_matches(mounted.path, manifest)
    assert s3_source.request_count() == before


def test_warmup_continues_where_an_earlier_one_stopped(s3_source, mounter):
    mounted = mounter.mount(s3_source)
    folder = sorted(path for path in s3_source.manifest if path.startswith('special/'))
    first_half, rest = folder[:len(folder) // 2], folder[len(folder) // 2:]
    result, report = warmup(*[mounted.path / path for path in first_half])
    assert report['files_loaded'] == len(first_half), result.stderr

    before = s3_source.request_count()
    result, report = warmup(mounted.path / 'special')
    assert result.returncode == 0, result.stderr
    assert report['files_already_cached'] == len(first_half)
    assert report['files_loaded'] == len(rest)
    assert report['bytes_loaded'] == sum(s3_source.manifest[path][0] for path in rest)
    assert s3_source.request_count() - before == len(rest)     # one block each


def test_summary_names_files_that_cannot_be_read_and_the_exit_code_is_5(mutable_s3_source,
                                                                         mounter):
    source = mutable_s3_source
    mounted = mounter.mount(source, '--retry-timeout', '1s')
    client, prefix = source.extra['client'], source.extra['prefix']
    client.delete_object(Bucket=S3_BUCKET, Key=f'{prefix}/shard-1.bin')
    result, report = warmup(mounted.path)
    assert result.returncode == 5
    assert report['errors'] == 1
    assert report['failed'][0]['path'] == str(mounted.path / 'shard-1.bin')
    assert report['files_loaded'] == len(source.manifest) - 1
    human = run_cachefs('warmup', mounted.path / 'shard-1.bin')
    assert human.returncode == 5 and 'shard-1.bin' in human.stdout


def test_human_summary_counts_loaded_and_skipped_files(local_source, mounter):
    mounted = mounter.mount(local_source)
    some = mounted.path / 'one_block.bin'
    run_cachefs('warmup', some)
    result = run_cachefs('warmup', some, mounted.path / 'one_byte.bin')
    assert result.returncode == 0, result.stderr
    assert 'loaded          1 files' in result.stdout
    assert 'already cached  1 files skipped' in result.stdout
    # not a terminal: plain progress lines on stderr, no progress bar
    assert result.stderr.startswith('warmup: ')


def test_a_path_outside_any_cachefs_mount_is_refused_with_exit_9(tmp_path):
    result = run_cachefs('warmup', tmp_path)
    assert result.returncode == 9
    assert result.stderr.strip() == f'cachefs: error: {tmp_path} is not inside a cachefs mount'


def test_a_missing_path_is_a_usage_error(mounter, local_source):
    mounted = mounter.mount(local_source)
    result = run_cachefs('warmup', mounted.path / 'no-such-file')
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(mounted.path / 'no-such-file')


def test_a_failed_path_with_a_newline_is_listed_on_one_line(capsys):
    from cachefs.warmup import _print_errors
    _print_errors({'errors': 1, 'failed': [{'path': '/mnt/a\nfake line', 'error': 'bad\rkey'}]})
    assert capsys.readouterr().out.splitlines()[1:] == ['  /mnt/a\\nfake line: bad\\rkey']
