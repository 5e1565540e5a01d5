"""Parsing of human sizes (`4M`, `100G`, `50%`) and durations (`30s`, `2h`, `inf`)."""

import logging
import math
import re

log = logging.getLogger(__name__)

_SIZE_UNITS = {'': 1, 'b': 1, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30, 't': 1 << 40, 'p': 1 << 50}
_DURATION_UNITS = {'': 1, 'ms': 0.001, 's': 1, 'm': 60, 'min': 60, 'h': 3600, 'd': 86400}
_NUMBER_WITH_UNIT = re.compile(r'^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$')


def parse_size(text):
    """`4M` -> 4194304. Binary units (K = 1024); `KiB`, `KB` and `K` all mean the same."""
    if isinstance(text, int):
        return text
    match = _NUMBER_WITH_UNIT.match(str(text))
    if not match:
        raise ValueError(f'not a size: {text!r} (examples: 4096, 512K, 4M, 100G)')
    number, unit = match.groups()
    unit = unit.lower().removesuffix('ib').removesuffix('b') if len(unit) > 1 else unit.lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f'unknown size unit in {text!r} (use K, M, G, T)')
    return int(float(number) * _SIZE_UNITS[unit])


def parse_duration(text):
    """`2h` -> 7200.0 seconds; `inf`, `never` or `-1` -> math.inf."""
    if isinstance(text, (int, float)):
        return math.inf if text < 0 else float(text)
    text = str(text).strip().lower()
    if text in ('inf', 'never', 'forever', '-1'):
        return math.inf
    match = _NUMBER_WITH_UNIT.match(text)
    if not match or match.group(2) not in _DURATION_UNITS:
        raise ValueError(f'not a duration: {text!r} (examples: 500ms, 30s, 10m, 2h, 1d, inf)')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(num_bytes):
    """4194304 -> '4.0 MiB', for logs and human output."""
    value = float(num_bytes)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(value) < 1024 or unit == 'TiB':
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    raise AssertionError('unreachable')


def format_duration(seconds):
    if math.isinf(seconds):
        return 'inf'
    return f'{seconds:g}s'
