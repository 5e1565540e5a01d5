"""`python -m cachefs`: the same as the `cachefs` command."""

import sys

from .cli import main

sys.exit(main())
