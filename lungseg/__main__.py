"""``python -m lungseg …`` = the ``lungseg`` console script (fit / validate / test / predict / complexity)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
