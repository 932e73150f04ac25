"""`python -m daemon` is `postbackd`."""

from daemon.cli import main

main()
