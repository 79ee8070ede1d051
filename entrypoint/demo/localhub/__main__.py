"""`python -m entrypoint.demo.localhub --data DIR --port 0 --token TOKEN[:USER]`: a standalone local Hub."""

from entrypoint.demo.localhub.server import main

main()
