"""``python -m bench``: the whole benchmark suite (see bench/suite.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main

sys.exit(main())
