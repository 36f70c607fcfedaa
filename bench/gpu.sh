#!/usr/bin/env bash
# The prepared GPU benchmark run: bench/gpu.py (engine at wan-1.3b geometry, 832x480, 1/2/4/8
# sessions, the Self-Forcing-style baseline; then the photoreal recipes, LiveTalk and FlashHead
# at 512x512 next to each family's own cache policy, bench/photoreal.py; then
# bench/attention.py), capped at 8 minutes.
#
#   bench/gpu.sh --out gpu-bench.md            # on a GPU host (sized for one H200, < 8 minutes)
#   bench/gpu.sh --cpu-smoke                   # the CPU check (seconds)
#
# Arguments go to bench/gpu.py (see `python bench/gpu.py --help`). Python: $PYTHON, else the
# first of .venv/bin/python and python3 whose torch sees a CUDA device, else .venv/bin/python
# (then bench/gpu.py exits 2 with a message, unless --cpu-smoke). The GPU host's Python
# needs torch (CUDA build), triton, numpy, scipy, safetensors, opencv-python-headless and, for the
# photoreal rows, transformers (`--families ''` skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      py=$cand
      break
    fi
  done
  if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
  fi
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
fi
echo "[gpu.sh] $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda)')"
# 8 minutes at most; bench/gpu.py keeps its own budget (--budget-s) for the attention part.
exec timeout 480 "$py" bench/gpu.py "$@"
