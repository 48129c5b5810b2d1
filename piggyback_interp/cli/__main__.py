"""``python -m piggyback_interp.cli``: the ``piggyback`` command."""

import sys

from piggyback_interp.cli import main

if __name__ == "__main__":
    sys.exit(main())
