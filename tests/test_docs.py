"""The README documents every mount option and every exit code the code defines."""

from pathlib import Path

from cachefs.config import MOUNT_OPTIONS
from cachefs.errors import EXIT_CODES

README = (Path(__file__).parent.parent / 'README.md').read_text()


def test_readme_documents_every_mount_option():
    missing = [o.name for o in MOUNT_OPTIONS if f'`--{o.name}`' not in README]
    assert missing == []


def test_readme_documents_every_exit_code():
    missing = [code for code in EXIT_CODES if f'\n| {code} |' not in README]
    assert missing == []
