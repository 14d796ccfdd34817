"""`python -m lungdet …` is the `lungdet` command."""

from lungdet.cli import main

main()
