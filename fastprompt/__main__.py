"""``python -m fastprompt``: the same command as the ``fastprompt`` console script."""

import sys

from fastprompt.cli import main

if __name__ == "__main__":
    sys.exit(main())
