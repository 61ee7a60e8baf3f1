"""pytest-benchmark suites; not part of the default run (``testpaths = tests``).

Run with ``pytest benchmarks/ --benchmark-only``. The suites import the case builders of the table
scripts in this folder, which is not a package, so the folder goes on ``sys.path`` whatever pytest's
import mode.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
