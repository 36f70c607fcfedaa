#!/usr/bin/env bash
# Install knotstream and start the server with the bundled model: http://127.0.0.1:8000/
# Extra arguments go to `knotstream serve` (see `knotstream serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/knotstream serve "$@"
