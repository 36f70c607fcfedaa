#!/usr/bin/env bash
# Install everything the tests need, then run them. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the long sweeps, `-m soak` for the soak test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
