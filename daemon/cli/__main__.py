"""``python -m daemon.cli``: the ``sprout`` command, where no console script is installed (tests, benchmarks)."""

import sys

from daemon.cli import main

sys.exit(main())
