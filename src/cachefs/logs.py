"""How cachefs writes its log: one record is one line, whatever a key or a store says.

Keys come from the store (any user who can write to the bucket or the source folder picks them),
and so do store error messages. A key with a newline in a log line would start a line of its own
that looks like a record cachefs wrote ("x\\n2026-01-01 00:00:00,000 ERROR cachefs: ..."). So the
formatter, not each call site, escapes every control character of the formatted line: C0 (CR, LF,
TAB, ESC, ...), DEL, C1, the Unicode line and paragraph separators, and lone surrogates (a local
file name that is not UTF-8, which would otherwise fail to encode). A traceback keeps its own line
breaks, but its exception messages are escaped the same way, since they often quote a key.

Continuation lines of a traceback never start with a timestamp: "Traceback ...", frames indented,
and the exception type (a Python name) first on its last line.
"""

import logging
import re
import traceback

log = logging.getLogger(__name__)

FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'

_UNSAFE = re.compile('[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]')
_NAMED = {'\n': '\\n', '\r': '\\r', '\t': '\\t'}


def _escape_char(match):
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}'


def one_line(text):
    """`text` with every control character escaped, so it prints as exactly one line."""
    text = str(text)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_char, text)


def _escape_messages(exception):
    """Escape the messages (and notes) of `exception` and of every exception it chains to."""
    seen = set()
    pending = [exception]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(getattr(current, '_str', None), str):
            current._str = one_line(current._str)
        notes = getattr(current, '__notes__', None)
        if isinstance(notes, list):
            current.__notes__ = [one_line(note) for note in notes]
        pending.extend((current.__cause__, current.__context__))
        pending.extend(getattr(current, 'exceptions', None) or ())


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose every record is one line, plus an escaped traceback."""

    def __init__(self, fmt=FORMAT, datefmt=None):
        super().__init__(fmt, datefmt)

    def formatMessage(self, record):
        return one_line(super().formatMessage(record))

    def formatException(self, ei):
        try:
            exception = traceback.TracebackException(*ei, capture_locals=False)
            # `_str` holds the exception's message in TracebackException since Python 3.5; where
            # it is missing the message is kept as Python wrote it.
            _escape_messages(exception)
            text = ''.join(exception.format())
        except Exception:           # never lose the record over its traceback
            text = super().formatException(ei)
        return text[:-1] if text.endswith('\n') else text
