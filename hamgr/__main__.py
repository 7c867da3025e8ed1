"""`python -m hamgr` is the `hamgr` command."""

from hamgr.cli import main

main()
