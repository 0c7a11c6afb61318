"""``python -m analysis.notebooks render [--out DIR]``: see :mod:`analysis.notebooks`."""

import sys

from analysis.notebooks import main

if __name__ == "__main__":
    sys.exit(main())
