"""`python -m gateway`: the same command line as the `callgate` console script."""

from gateway.cli import main

main()
