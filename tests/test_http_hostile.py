"""The hand-written HTTP paths against hostile and broken answers (issue 11, items 5 and 7).

A scripted loopback server (`support.scripted_http`) answers the real `TrioGetter` (and the
lean threaded getter) with whatever a test or hypothesis draws: status lines, header sets,
lengths, bodies shorter or longer, garbage, answers split across reads. The properties: no
answer ever yields bytes that are not the object's, the right answer is accepted, nothing but
the store errors (and `UseSdk`, which hands a read to the SDK) comes out, and nothing waits for
more than a bounded time. Then the fixes one by one: header values with CR, LF or NUL are
never sent, conflicting framing is refused, error bodies are bounded, pooled connections age
out; and a store or proxy that ignores Range costs one header read per read, not the object.
"""

import dataclasses
import errno
import os
import resource
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.ufs import s3_trio
from cachefs.ufs.errors import StoreError, TransientError
from cachefs.ufs.oss import OssStore
from cachefs.ufs.s3 import _SDK_ERRORS, S3Store, translate
from cachefs.ufs.s3_get import UseSdk, content_length, range_headers

from conftest import BLOCK_SIZE, OSS_BUCKET, S3_BUCKET
from support.faults import call_within
from support.header_proxy import HeaderStrippingProxy
from support.scripted_http import Reply, ScriptedServer

SIZE = 96
OBJECT = bytes(range(100, 100 + SIZE))
OTHER = bytes(range(10, 10 + SIZE))
ETAG = '6f1ed002ab5595859014ebf0951522d9'
OTHER_ETAG = '0cc175b9c0f1b6a831c399e269772661-2'
HUNG = 'hung'
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope='module')
def scripted():
    with ScriptedServer() as server:
        yield server


@pytest.fixture(scope='module')
def store(scripted):
    """An S3Store whose endpoint is the scripted server (no network at construction)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {'AWS_ACCESS_KEY_ID': 'hostile', 'AWS_SECRET_ACCESS_KEY': 'secret',
                            'AWS_CONFIG_FILE': '/dev/null', 'AWS_DEFAULT_REGION': 'us-east-1',
                            'AWS_SHARED_CREDENTIALS_FILE': '/dev/null',
                            'AWS_EC2_METADATA_DISABLED': 'true'}.items():
            patch.setenv(name, value)
        for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'AWS_PROFILE',
                     'AWS_ENDPOINT_URL'):
            patch.delenv(name, raising=False)
        store = S3Store('hostile-bucket', '', endpoint_url=scripted.endpoint, path_style=True,
                        request_timeout=5)
    assert store._trio_getter is not None and store._getter is not None
    yield store
    store.close()


def forget_connections(getter):
    """Pooled connections belong to one trio run; each test or example starts without (called
    inside the new run: a trio socket closes only there)."""
    for connection in getter._idle:
        connection.close()
    getter._idle.clear()


def trio_read(store, offset, length, etag=ETAG, timeout=2.0):
    """One read on the trio path, bounded as AsyncStore bounds it: bytes, the error, or HUNG."""
    getter = store._trio_getter

    async def main():
        forget_connections(getter)
        with trio.move_on_after(timeout):
            try:
                return await getter.get('obj', etag, offset, length)
            except (StoreError, UseSdk) as exc:
                return exc
        return HUNG
    return trio.run(main)


def threaded_read(store, offset, length, etag=ETAG):
    """One read on the lean threaded path (its SDK errors mapped as S3Store.read maps them)."""
    try:
        return store._getter.get('obj', etag, offset, length)
    except (StoreError, UseSdk) as exc:
        return exc
    except _SDK_ERRORS as exc:
        return translate(exc, 'reading')


def answer(status_line, headers, body):
    return status_line + b'\r\n' + b''.join(h + b'\r\n' for h in headers) + b'\r\n' + body


def right_answer(offset, length, source=OBJECT, etag=ETAG):
    end = offset + length - 1
    return answer(b'HTTP/1.1 206 Partial Content',
                  [b'Content-Range: bytes %d-%d/%d' % (offset, end, SIZE),
                   b'Content-Length: %d' % length, b'ETag: "%s"' % etag.encode(),
                   b'Content-Type: application/octet-stream'], source[offset:end + 1])


# -- the property: random and adversarial answers --

# Mutations of the right answer that leave it right (the client must accept it) ...
BENIGN = ('version_10', 'no_reason', 'cl_dup_same', 'cl_comma_same', 'etag_missing',
          'etag_weak', 'etag_unquoted', 'connection_close', 'keep_alive', 'cl_spaces')
# ... and ones that break it in the ways stores, proxies and attackers do.
HOSTILE = ('whole_200', 'status_200', 'status_error', 'status_error_no_length', 'status_odd',
           'status_line_garbage', 'unicode_digit_status', 'cl_missing', 'cl_conflict',
           'cl_comma_conflict', 'cl_bad', 'cl_wrong', 'te_with_cl', 'te_only', 'cr_missing',
           'cr_other', 'cr_dup', 'etag_other', 'etag_dup_conflict', 'etag_case', 'body_short',
           'body_long', 'header_junk', 'fold', 'space_colon', 'bare_lf', 'prefix_garbage',
           'long_headers', 'control_char')


@dataclasses.dataclass
class Scenario:
    offset: int
    length: int
    other_version: bool
    mutations: list
    data: bytes
    cuts: list
    hold: bool

    @property
    def must_succeed(self):
        if self.other_version or not set(self.mutations) <= set(BENIGN) | {'whole_200'}:
            return False
        return 'whole_200' not in self.mutations or (self.offset == 0 and self.length == SIZE)


@st.composite
def scenarios(draw):
    offset = draw(st.integers(0, SIZE - 1))
    length = draw(st.integers(1, SIZE - offset))
    other = draw(st.integers(0, 4)) == 0
    mutations = draw(st.lists(st.sampled_from(BENIGN + HOSTILE), max_size=3, unique=True))
    if other:
        mutations = [m for m in mutations if m != 'etag_missing']   # it says its version
    source, etag = (OTHER, OTHER_ETAG) if other else (OBJECT, ETAG)
    end = offset + length - 1
    status = b'HTTP/1.1 206 Partial Content'
    body = source[offset:end + 1]
    headers = {'range': [b'Content-Range: bytes %d-%d/%d' % (offset, end, SIZE)],
               'length': [b'Content-Length: %d' % length],
               'etag': [b'ETag: "%s"' % etag.encode()],
               'other': [b'Content-Type: application/octet-stream']}
    prefix = b''
    for mutation in mutations:
        if mutation == 'version_10':
            status = status.replace(b'1.1', b'1.0')
        elif mutation == 'no_reason':
            status = status.split(b' ')[0] + b' ' + status.split(b' ')[1]
        elif mutation == 'cl_dup_same':
            headers['length'] = headers['length'] * 2
        elif mutation == 'cl_comma_same':
            headers['length'] = [b'Content-Length: %d, %d' % (len(body), len(body))]
        elif mutation == 'cl_spaces':
            headers['length'] = [b'Content-Length:   %d  ' % len(body)]
        elif mutation == 'etag_missing':
            headers['etag'] = []
        elif mutation == 'etag_weak':
            headers['etag'] = [b'ETag: W/"%s"' % etag.encode()]
        elif mutation == 'etag_unquoted':
            headers['etag'] = [b'ETag: %s' % etag.encode()]
        elif mutation == 'connection_close':
            headers['other'].append(b'Connection: close')
        elif mutation == 'keep_alive':
            headers['other'].append(b'Connection: keep-alive')
        elif mutation == 'whole_200':
            status, body, headers['range'] = b'HTTP/1.1 200 OK', source, []
            headers['length'] = [b'Content-Length: %d' % SIZE]
        elif mutation == 'status_200':
            status, headers['range'] = b'HTTP/1.1 200 OK', []
        elif mutation in ('status_error', 'status_error_no_length'):
            code = draw(st.sampled_from([403, 404, 412, 429, 500, 503]))
            status = b'HTTP/1.1 %d Error' % code
            body = b'<Error><Code>%s</Code><Message>m</Message></Error>' % draw(
                st.sampled_from([b'NoSuchKey', b'PreconditionFailed', b'SlowDown', b'X']))
            headers['range'] = []
            headers['length'] = [] if mutation.endswith('no_length') else \
                [b'Content-Length: %d' % draw(st.sampled_from([len(body), len(body) + 50]))]
        elif mutation == 'status_odd':
            status = b'HTTP/1.1 %d Odd' % draw(st.sampled_from([100, 204, 301, 304, 400, 999]))
        elif mutation == 'status_line_garbage':
            status = draw(st.binary(max_size=40)).replace(b'\r', b'').replace(b'\n', b'')
        elif mutation == 'unicode_digit_status':
            status = 'HTTP/1.1 2\u00b2\u00b9 OK'.encode('latin-1')
        elif mutation == 'cl_missing':
            headers['length'] = []
        elif mutation == 'cl_conflict':
            headers['length'] = [b'Content-Length: %d' % len(body),
                                 b'Content-Length: %d' % (len(body) + 1)]
        elif mutation == 'cl_comma_conflict':
            headers['length'] = [b'Content-Length: %d, %d' % (len(body), len(body) + 2)]
        elif mutation == 'cl_bad':
            value = draw(st.sampled_from(['+%d', '%d.0', '0x%d', '', '-%d', '%d abc',
                                          '\u00b2%d', '%d\x00']))
            text = value % len(body) if '%d' in value else value
            headers['length'] = [b'Content-Length: ' + text.encode('latin-1')]
        elif mutation == 'cl_wrong':
            delta = draw(st.sampled_from([-1, 1, 1000, -len(body)]))
            headers['length'] = [b'Content-Length: %d' % max(0, len(body) + delta)]
        elif mutation == 'te_with_cl':
            headers['other'].append(b'Transfer-Encoding: chunked')
        elif mutation == 'te_only':
            headers['length'] = []
            headers['other'].append(b'Transfer-Encoding: chunked')
            body = b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body)
        elif mutation == 'cr_missing':
            headers['range'] = []
        elif mutation == 'cr_other':
            first = (offset + 1) % SIZE
            headers['range'] = [b'Content-Range: bytes %d-%d/%d' % (first, first + length - 1,
                                                                   SIZE)]
        elif mutation == 'cr_dup':
            headers['range'] = headers['range'] * 2
        elif mutation == 'etag_other':
            headers['etag'] = [b'ETag: "%s"' % draw(st.sampled_from(
                [OTHER_ETAG, ETAG.upper(), ETAG + '-1', '', 'W/'])).encode()]
        elif mutation == 'etag_dup_conflict':
            headers['etag'] = headers['etag'] + [b'ETag: "%s"' % OTHER_ETAG.encode()]
        elif mutation == 'etag_case':
            headers['etag'] = [b'etag: "%s"' % etag.upper().encode()]
        elif mutation == 'body_short':
            body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
        elif mutation == 'body_long':
            body = body + draw(st.binary(min_size=1, max_size=64))
        elif mutation == 'header_junk':
            junk = draw(st.binary(max_size=40)).replace(b'\r', b'').replace(b'\n', b'')
            headers['other'].insert(draw(st.integers(0, len(headers['other']))), junk)
        elif mutation == 'fold':
            headers['other'].append(b' folded-continuation')
        elif mutation == 'space_colon':
            headers['length'] = [line.replace(b':', b' :') for line in headers['length']]
        elif mutation == 'bare_lf':
            headers['other'].append(b'X-A: 1\nContent-Length: 0')
        elif mutation == 'prefix_garbage':
            prefix = draw(st.binary(min_size=1, max_size=20))
        elif mutation == 'long_headers':
            headers['other'] += [b'X-Pad-%d: %s' % (i, b'p' * 1000) for i in range(70)]
        elif mutation == 'control_char':
            headers['other'].append(b'X-Control: a\x01b')
    lines = [line for group in ('range', 'length', 'etag', 'other') for line in headers[group]]
    if draw(st.booleans()):
        lines.reverse()
    data = prefix + answer(status, lines, body)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    hold = draw(st.integers(0, 9)) == 0
    return Scenario(offset, length, other, mutations, data, cuts, hold)


def pieces(data, cuts):
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [b'']


@FUZZ
@given(scenario=scenarios())
def test_no_answer_yields_bytes_that_are_not_the_objects_and_none_hangs_or_crashes(
        scripted, store, scenario):
    scripted.reply = lambda head: Reply(pieces(scenario.data, scenario.cuts),
                                        close=not scenario.hold, hold=3.0 if scenario.hold
                                        else 0.0, gap=0.001 if scenario.cuts else 0.0)
    result = trio_read(store, scenario.offset, scenario.length, timeout=0.5)
    expected = OBJECT[scenario.offset:scenario.offset + scenario.length]
    if isinstance(result, (bytes, bytearray)):
        assert result == expected, scenario.mutations
    elif result == HUNG:
        # Only an answer that neither ends nor closes waits, and only for the request deadline.
        assert scenario.hold, scenario.mutations
    else:
        assert isinstance(result, (StoreError, UseSdk)), result
    if scenario.must_succeed:
        assert result == expected, (scenario.mutations, result)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(head=st.binary(max_size=300))
def test_the_head_parser_raises_only_transient_errors(head):
    try:
        status, version, headers = s3_trio._parse_head(head)
    except TransientError:
        return
    assert 100 <= status <= 999 and version in (0, 1)
    for values in headers.values():
        for value in values:
            assert not set(value) & set('\r\n\x00')


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(values=st.lists(st.text(max_size=12), max_size=3),
       encodings=st.lists(st.text(max_size=8), max_size=2))
def test_content_length_is_one_unambiguous_number_or_refused(values, encodings):
    try:
        size = content_length(values, encodings)
    except TransientError:
        return
    if size is None:
        assert values == []
    else:
        parts = [part.strip() for value in values for part in value.split(',')]
        assert not encodings and all(part.isascii() and int(part) == size for part in parts)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(etag=st.text(max_size=20))
def test_a_request_never_carries_a_header_line_the_listing_injected(store, etag):
    """Whatever the listed ETag holds, the request is the expected lines and nothing else, or
    the read is refused before anything is sent."""
    try:
        request = store._trio_getter._signed('obj', range_headers(etag, 0, 1))
    except StoreError:
        return
    lines = request.decode('latin-1').split('\r\n')
    assert lines[-2:] == ['', ''] and '' not in lines[:-2]
    assert not any(set(line) & set('\r\n\x00') for line in lines)
    assert [line for line in lines if line.lower().startswith('if-match:')] == \
        [f'If-Match: "{etag}"']


# -- the fixes, one behaviour each --

@pytest.mark.parametrize('etag', ['e\r\nX-Injected: 1', 'e\r\n\tfolded', 'e\x00', 'e\x7f',
                                  'e"quote', 'caf\u00e9', 'e f', ''])
@pytest.mark.parametrize('path', ['trio', 'threads', 'sdk'])
def test_an_etag_that_is_no_valid_header_value_fails_the_read_before_anything_is_sent(
        scripted, store, path, etag):
    scripted.reset()
    scripted.reply = lambda head: Reply([right_answer(0, 1)])
    if path == 'trio':
        result = trio_read(store, 0, 1, etag=etag)
    elif path == 'threads':
        result = threaded_read(store, 0, 1, etag=etag)
    else:
        getter, store._getter = store._getter, None
        try:
            with pytest.raises(StoreError) as raised:
                store.read('obj', etag, 0, 1)
        finally:
            store._getter = getter
        result = raised.value
    assert isinstance(result, StoreError) and not result.retryable, result
    assert 'ETag' in str(result)
    assert scripted.requests == []


def test_a_header_value_with_a_control_character_is_never_sent(store):
    with pytest.raises(StoreError, match='control character'):
        store._trio_getter._signed('obj', {'X-Value': 'a\r\nInjected: 1'})


@pytest.mark.parametrize('path', ['trio', 'threads'])
@pytest.mark.parametrize('lengths', [[b'9', b'5'], [b'5, 7'], [b'5, 5, 6']])
def test_conflicting_content_lengths_are_refused(scripted, store, path, lengths):
    """Even where one of them (the last, here) frames the right bytes: a proxy in between may
    have framed the answer by another one."""
    head = [b'Content-Range: bytes 0-4/%d' % SIZE, b'ETag: "%s"' % ETAG.encode()]
    scripted.reply = lambda _: Reply([answer(b'HTTP/1.1 206 Partial Content', head + [
        b'Content-Length: ' + value for value in lengths], OBJECT[:5])])
    result = trio_read(store, 0, 5) if path == 'trio' else threaded_read(store, 0, 5)
    assert isinstance(result, TransientError), result


@pytest.mark.parametrize('path', ['trio', 'threads'])
def test_identical_duplicate_content_lengths_are_accepted(scripted, store, path):
    head = [b'Content-Range: bytes 0-4/%d' % SIZE, b'ETag: "%s"' % ETAG.encode(),
            b'Content-Length: 5', b'Content-Length: 5']
    scripted.reply = lambda _: Reply([answer(b'HTTP/1.1 206 Partial Content', head,
                                             OBJECT[:5])])
    result = trio_read(store, 0, 5) if path == 'trio' else threaded_read(store, 0, 5)
    assert result == OBJECT[:5]


def test_a_content_length_with_a_transfer_encoding_is_refused(scripted, store):
    head = [b'Content-Range: bytes 0-4/%d' % SIZE, b'ETag: "%s"' % ETAG.encode(),
            b'Content-Length: 5', b'Transfer-Encoding: chunked']
    scripted.reply = lambda _: Reply([answer(b'HTTP/1.1 206 Partial Content', head,
                                             b'5\r\n' + OBJECT[:5] + b'\r\n0\r\n\r\n')])
    assert isinstance(trio_read(store, 0, 5), TransientError)


@pytest.mark.parametrize('length', [None, 1000])
@pytest.mark.parametrize('path', ['trio', 'threads'])
def test_an_error_body_that_does_not_end_is_not_waited_for(scripted, store, path, length):
    """A 503 whose body only a close would end (or that stops short of its length), from a
    server that then holds the connection for 10 s: the read fails within the error-body
    bound, with the status's error, not at the request deadline."""
    body = b'<Error><Code>SlowDown</Code><Message>slow'     # no </Error>: it never ends
    head = [] if length is None else [b'Content-Length: %d' % length]
    scripted.reply = lambda _: Reply([answer(b'HTTP/1.1 503 Slow Down', head, body)],
                                     close=False, hold=10.0)
    started = time.monotonic()
    if path == 'trio':
        result = trio_read(store, 0, 5, timeout=8.0)
    else:
        result = call_within(8.0, threaded_read, store, 0, 5).result
    assert isinstance(result, TransientError), result
    assert time.monotonic() - started < 4.0


def test_bytes_after_an_answer_never_become_the_next_answer(scripted, store):
    """A store that sends another answer after the one asked for (here one forged for the
    next request's range) poisons a pooled connection: it is dropped, and the next request
    gets its answer on a new connection."""
    forged = right_answer(5, 5, source=OTHER)
    replies = iter([Reply([right_answer(0, 5)], close=False, later=forged),
                    Reply([right_answer(5, 5)])])
    scripted.reply = lambda _: next(replies)
    scripted.reset()
    getter = store._trio_getter

    async def main():
        forget_connections(getter)
        first = await getter.get('obj', ETAG, 0, 5)
        await trio.sleep(0.3)                       # the forged answer is in the socket
        return first, await getter.get('obj', ETAG, 5, 5)
    assert trio.run(main) == (OBJECT[:5], OBJECT[5:10])
    assert scripted.connections == 2


def test_a_pooled_connection_on_a_descriptor_over_1023_is_checked_and_reused(scripted, store):
    """A daemon with many files open gets socket descriptors over 1023, which select() refuses:
    the check before reuse must still work there (it raised ValueError out of every read)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f'RLIMIT_NOFILE {soft} leaves no descriptor over 1023')
    scripted.reply = keep_alive_replies
    scripted.reset()
    getter = store._trio_getter
    fillers = []

    async def main():
        forget_connections(getter)
        fillers.append(os.open('/dev/null', os.O_RDONLY))
        while fillers[-1] < 1100:       # every lower descriptor taken: the next socket's is over
            fillers.append(os.open('/dev/null', os.O_RDONLY))
        first = await getter.get('obj', ETAG, 0, 5)
        assert getter._idle[0]._socket().fileno() > 1023
        return first, await getter.get('obj', ETAG, 5, 5)
    try:
        assert trio.run(main) == (OBJECT[:5], OBJECT[5:10])
    finally:
        for fd in fillers:
            os.close(fd)
    assert scripted.connections == 1


def keep_alive_replies(head):
    range_ = head.split(b'Range: bytes=')[1].split(b'\r\n')[0]
    first, last = (int(n) for n in range_.split(b'-'))
    return Reply([right_answer(first, last - first + 1)], close=False)


def test_a_pooled_connection_idle_for_too_long_is_not_reused(scripted, store, monkeypatch):
    monkeypatch.setattr(s3_trio, '_MAX_IDLE_SECONDS', 0.2)
    scripted.reply = keep_alive_replies
    scripted.reset()
    getter = store._trio_getter

    async def main():
        forget_connections(getter)
        assert await getter.get('obj', ETAG, 0, 4) == OBJECT[:4]
        assert await getter.get('obj', ETAG, 4, 4) == OBJECT[4:8]    # reused at once
        await trio.sleep(0.4)
        assert await getter.get('obj', ETAG, 8, 4) == OBJECT[8:12]
    trio.run(main)
    assert scripted.connections == 2


def test_a_pooled_connection_carries_a_bounded_number_of_requests(scripted, store,
                                                                   monkeypatch):
    monkeypatch.setattr(s3_trio, '_MAX_REQUESTS', 3)
    scripted.reply = keep_alive_replies
    scripted.reset()
    getter = store._trio_getter

    async def main():
        forget_connections(getter)
        for n in range(7):
            assert await getter.get('obj', ETAG, n, 1) == OBJECT[n:n + 1]
    trio.run(main)
    assert scripted.connections == 3


def test_a_pooled_connection_older_than_the_limit_is_not_reused(scripted, store, monkeypatch):
    monkeypatch.setattr(s3_trio, '_MAX_AGE_SECONDS', 0.3)
    scripted.reply = keep_alive_replies
    scripted.reset()
    getter = store._trio_getter

    async def main():
        forget_connections(getter)
        for n in range(6):              # never idle long, but old after 0.3 s
            assert await getter.get('obj', ETAG, n, 1) == OBJECT[n:n + 1]
            await trio.sleep(0.1)
    trio.run(main)
    assert scripted.connections >= 2


def test_endless_headers_fail_the_read_with_bounded_memory(scripted, store):
    """A server that sends header lines without end: the read fails after 64 KiB of them."""
    endless = [b'HTTP/1.1 206 Partial Content\r\n'] + [b'X-Pad: %s\r\n' % (b'p' * 4000)] * 200
    scripted.reply = lambda _: Reply(endless, close=False, hold=5.0)
    result = trio_read(store, 0, 5, timeout=4.0)
    assert isinstance(result, TransientError) and 'headers' in str(result), result


# -- a store or proxy that ignores Range (item 7) --

@pytest.fixture
def range_ignored(seaweed, s3_env):
    with HeaderStrippingProxy('127.0.0.1', seaweed.s3_port, strip={'Range'},
                              access_key=seaweed.access_key,
                              secret_key=seaweed.secret_key) as proxy:
        yield proxy


def object_answers(proxy, key, count):
    """(status, body bytes sent) of the proxy's answers to GETs of `key`, once `count` are in
    (the proxy records an answer once it stops sending it)."""
    deadline = time.monotonic() + 10
    while True:
        answers = [(status, sent) for path, status, sent in proxy.get_answers()
                   if path.endswith('/' + key)]
        if len(answers) >= count or time.monotonic() > deadline:
            return answers
        time.sleep(0.02)


@pytest.mark.parametrize('offset', [0, BLOCK_SIZE])
@pytest.mark.parametrize('path', ['trio', 'threads', 'sdk'])
async def test_a_whole_object_answer_to_a_ranged_read_is_refused_without_reading_it(
        mutable_s3_source, range_ignored, path, offset):
    """The store answers 200 with the whole 4.5 MiB object: the read fails at once (not
    retried: the store would ignore Range again), and the client takes far less than a block
    of it before it closes the connection."""
    source = mutable_s3_source
    store = S3Store(S3_BUCKET, source.extra['prefix'] + '/', endpoint_url=range_ignored.endpoint)
    obj = {o.key: o for o in store.list_objects()}['shard-2.bin']
    assert obj.size > 4 * BLOCK_SIZE
    if path == 'sdk':
        store._getter = None
    with pytest.raises(StoreError, match='ignored the Range') as refused:
        if path == 'trio':
            await store.read_async(obj.key, obj.etag, offset, BLOCK_SIZE)
        else:
            await trio.to_thread.run_sync(store.read, obj.key, obj.etag, offset, BLOCK_SIZE)
    assert not refused.value.retryable
    ((status, sent),) = object_answers(range_ignored, obj.key, 1)
    assert status == 200
    assert sent < BLOCK_SIZE, f'{sent} bytes of a {obj.size}-byte answer went across'


async def test_a_whole_object_answer_is_the_right_answer_for_a_one_block_object(
        mutable_s3_source, range_ignored):
    source = mutable_s3_source
    store = S3Store(S3_BUCKET, source.extra['prefix'] + '/', endpoint_url=range_ignored.endpoint)
    obj = {o.key: o for o in store.list_objects()}['labels/classes.txt']
    expected = (source.local_root / 'labels/classes.txt').read_bytes()
    assert await store.read_async(obj.key, obj.etag, 0, obj.size) == expected
    assert store.read(obj.key, obj.etag, 0, obj.size) == expected


@pytest.mark.fuse
def test_reads_through_a_proxy_that_ignores_range_end_quickly_with_eio(
        mounter, mutable_s3_source, range_ignored):
    """Mounted with the default 60 s retry time: a multi-block file fails with EIO within
    seconds (each attempt read only headers), a one-block file reads byte-exact."""
    source = dataclasses.replace(mutable_s3_source,
                                 args=['--endpoint-url', range_ignored.endpoint])
    mounted = mounter.mount(source, '--prefetch-window', '0')
    path = mounted.path / 'shard-2.bin'
    outcome = call_within(20.0, lambda: open(path, 'rb').read())
    assert not outcome.hung
    assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO, outcome.error
    assert outcome.elapsed < 10.0
    assert (mounted.path / 'labels/classes.txt').read_bytes() == \
        (source.local_root / 'labels/classes.txt').read_bytes()
    answers = object_answers(range_ignored, 'shard-2.bin', 1)
    assert answers and all(sent < BLOCK_SIZE for status, sent in answers if status == 200)


@pytest.mark.parametrize('offset', [0, BLOCK_SIZE])
def test_an_oss_store_that_ignores_range_is_refused_without_reading_the_object(
        private_oss_source, monkeypatch, offset):
    server = private_oss_source.extra['server']
    for name, value in private_oss_source.env.items():
        if name.startswith('OSS_'):
            monkeypatch.setenv(name, value)
    store = OssStore(OSS_BUCKET, 'data/', endpoint_url=server.endpoint)
    obj = {o.key: o for o in store.list_objects()}['shard-2.bin']
    server.ignore_range = True
    with pytest.raises(StoreError, match='ignored the Range') as refused:
        store.read(obj.key, obj.etag, offset, BLOCK_SIZE)
    assert not refused.value.retryable
    small = {o.key: o for o in store.list_objects()}['labels/classes.txt']
    assert store.read(small.key, small.etag, 0, small.size) == \
        (private_oss_source.local_root / 'labels/classes.txt').read_bytes()
