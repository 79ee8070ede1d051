"""`python -m entrypoint.localhub --data DIR --port 0 --token TOKEN[:USER]`: run the local Hub standalone."""

from entrypoint.localhub.server import main

main()
