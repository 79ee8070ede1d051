#!/usr/bin/env bash
# The checks left out of the default test run (marked `long`: they repeat what faster tests cover, and
# the default run stays near 12 min on 2 cores). Run by hand before a GPU session or a release.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pytest -q -m long "$@"
