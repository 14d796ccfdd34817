"""`python -m lungcad …` is the `lungcad` command."""

import sys

from lungcad.cli import main

sys.exit(main())
