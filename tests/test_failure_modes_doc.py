"""docs/failure-modes.md stays true: every row of its table names tests that exist, and no row
still calls itself a bug."""

import re
from pathlib import Path

TESTS = Path(__file__).parent
DOC = (TESTS.parent / 'docs' / 'failure-modes.md').read_text()
REFERENCE = re.compile(r'`(?:tests/)?(test_\w+\.py)::(test_\w+)`')


def table_rows():
    table = DOC.split('## The table', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in table.splitlines() if line.startswith('|')]
    return rows[2:]                   # the header and its separator


def test_the_failure_table_has_rows():
    assert len(table_rows()) > 20


def test_every_row_names_a_test_or_points_to_the_row_above():
    for row in table_rows():
        cells = [cell.strip() for cell in row.strip('|').split('|')]
        assert REFERENCE.search(cells[-1]) or cells[-1].startswith('same test'), row


def test_every_named_test_exists():
    missing = []
    for file_name, test_name in REFERENCE.findall(DOC):
        path = TESTS / file_name
        if not path.exists() or not re.search(rf'^(async )?def {test_name}\(',
                                              path.read_text(), re.MULTILINE):
            missing.append(f'{file_name}::{test_name}')
    assert missing == []


def test_no_row_is_left_marked_as_a_known_bug():
    assert [row for row in table_rows() if 'xfail' in row or '**bug**' in row] == []
