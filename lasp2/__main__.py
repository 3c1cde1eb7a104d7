"""``python -m lasp2 ...`` is the ``lasp2`` command (see lasp2/cli.py)."""
import sys

from lasp2.cli import main

if __name__ == "__main__":
    sys.exit(main())
