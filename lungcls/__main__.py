"""`python -m lungcls …` runs the `lungcls` command (`lungcls.cli.main`)."""

import sys

from lungcls.cli import main

sys.exit(main())
