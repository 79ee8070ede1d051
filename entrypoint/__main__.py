"""`python -m entrypoint` is `phoenix`."""

from entrypoint.cli import main

main()
