"""`python -m lungdet …` is the `lungdet` command."""

import sys

from lungdet.cli import main

sys.exit(main())
