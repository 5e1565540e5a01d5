"""TFRecord framing, read and written without TensorFlow.

The demo data set and the training benchmarks use real TFRecord files so that
cachefs is exercised with the access pattern of a TF/PyTorch input pipeline:
long sequential reads of ~100 KiB records.  A record on disk is::

    uint64 length            (little endian)
    uint32 masked_crc32c(the 8 length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8  (mod 2**32)``
where ``c`` is the CRC-32C of ``x`` (``google_crc32c``, hardware accelerated).
"""

from __future__ import annotations

import logging
import struct
from typing import BinaryIO, Iterable, Iterator

import google_crc32c

log = logging.getLogger(__name__)

_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")   # length, masked crc of length
_FOOTER = struct.Struct("<I")    # masked crc of data

HEADER_SIZE = _HEADER.size       # 12
FOOTER_SIZE = _FOOTER.size       # 4
#: Bytes a record occupies on disk in addition to its data.
RECORD_OVERHEAD = HEADER_SIZE + FOOTER_SIZE

#: Refuse lengths beyond this: with verify=False a corrupt length must not
#: make us allocate gigabytes.
MAX_RECORD_SIZE = 1 << 30


class CorruptRecord(ValueError):
    """A record failed its CRC check or the file ended inside a record."""


def mask_crc(crc: int) -> int:
    """Apply TFRecord's CRC mask to a raw CRC-32C value."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """Masked CRC-32C of ``data`` as stored in TFRecord files.

    google_crc32c only accepts ``bytes``; other buffers are copied.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    return mask_crc(google_crc32c.value(data))


def record_header(length: int) -> bytes:
    """The 12 bytes that precede a record of ``length`` bytes."""
    packed = _LENGTH.pack(length)
    return packed + _FOOTER.pack(masked_crc32c(packed))


def record_footer(data_crc: int) -> bytes:
    """The 4 bytes that follow a record whose raw CRC-32C is ``data_crc``.

    Lets writers CRC a payload piecewise with ``google_crc32c.extend``
    instead of concatenating it first.
    """
    return _FOOTER.pack(mask_crc(data_crc))


def frame(data: bytes) -> tuple[bytes, bytes]:
    """Return the (header, footer) that surround ``data`` in a TFRecord file."""
    return record_header(len(data)), _FOOTER.pack(masked_crc32c(data))


def write_records(fileobj: BinaryIO, records: Iterable[bytes]) -> int:
    """Write each bytes object of ``records`` as one TFRecord; returns bytes written."""
    written = 0
    for data in records:
        if not isinstance(data, bytes):
            data = bytes(data)
        header, footer = frame(data)
        fileobj.write(header)
        fileobj.write(data)
        fileobj.write(footer)
        written += len(data) + RECORD_OVERHEAD
    return written


def _read_exact_into(fileobj: BinaryIO, view: memoryview) -> int:
    """readinto until ``view`` is full or EOF; returns bytes read.

    Loops because raw files, pipes and sockets may return short reads.
    """
    got = 0
    total = len(view)
    while got < total:
        # typing.BinaryIO leaves readinto out; every binary file (open(..., 'rb'), BytesIO,
        # a socket's makefile) has it
        n = fileobj.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _read_data(fileobj: BinaryIO, length: int, offset: int) -> bytes:
    # read(n) hands back a bytes object filled in place: one copy, and the
    # bytes type google_crc32c needs.  Only a short read pays for a buffer.
    data = fileobj.read(length)
    if data is None:
        data = b""
    if len(data) == length:
        return data
    buf = bytearray(length)
    buf[:len(data)] = data
    got = len(data) + _read_exact_into(fileobj, memoryview(buf)[len(data):])
    if got != length:
        raise CorruptRecord("truncated record data at offset %d: %d of %d bytes"
                            % (offset, got, length))
    return bytes(buf)


def iter_records(fileobj: BinaryIO, verify: bool = True) -> Iterator[bytes]:
    """Yield the data of each record in ``fileobj``, from its current position.

    With ``verify`` both CRCs of every record are checked.  Raises
    CorruptRecord on a CRC mismatch or when the file ends inside a record; a
    clean end of file between records just ends the iteration.
    """
    header = bytearray(HEADER_SIZE)
    header_view = memoryview(header)
    footer = bytearray(FOOTER_SIZE)
    footer_view = memoryview(footer)
    offset = 0
    while True:
        got = _read_exact_into(fileobj, header_view)
        if got == 0:
            return
        if got < HEADER_SIZE:
            raise CorruptRecord("truncated record header at offset %d (%d bytes)" % (offset, got))
        length, length_crc = _HEADER.unpack(header)
        if verify and masked_crc32c(bytes(header_view[:8])) != length_crc:
            raise CorruptRecord("bad length CRC at offset %d" % offset)
        if length > MAX_RECORD_SIZE:
            raise CorruptRecord("record length %d at offset %d exceeds %d"
                                % (length, offset, MAX_RECORD_SIZE))
        data = _read_data(fileobj, length, offset)
        if _read_exact_into(fileobj, footer_view) != FOOTER_SIZE:
            raise CorruptRecord("truncated record footer at offset %d" % offset)
        if verify and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            raise CorruptRecord("bad data CRC for record at offset %d (%d bytes)"
                                % (offset, length))
        offset += length + RECORD_OVERHEAD
        yield data


def read_records(path, verify: bool = True) -> list[bytes]:
    """All records of the TFRecord file at ``path``."""
    with open(path, "rb") as f:
        return list(iter_records(f, verify=verify))
