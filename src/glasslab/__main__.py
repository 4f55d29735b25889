"""`python -m glasslab` is the `glasslab` command."""

from glasslab.cli import main

main()
