#!/usr/bin/env bash
# Replay docker/Dockerfile's install steps without Docker, then start the image's CMD and
# run its HEALTHCHECK, so a machine with no Docker engine proves the image's install works.
#
#   docker/replay-install.sh            # fresh folder under /tmp, removed afterwards
#   docker/replay-install.sh --keep     # keep it (the path is printed)
#
# What is replayed, read from the Dockerfile itself (nothing is copied into this script):
# its ARG defaults, ENV, and every RUN / COPY / WORKDIR between the `# >>> install` and
# `# <<< install` markers, in order, each RUN under `sh -ec` as Docker runs it.
#
# The substitutions, and nothing else, differ from `docker build`:
#  1. The RUN that installs `torch==...` (the multi-GB CUDA wheel from PyPI) installs the
#     CPU wheel of the same version instead: `torch==$TORCH_VERSION+cpu`, triton at the
#     Dockerfile's version as written. pip finds the CPU wheel through this machine's pip
#     configuration (find-links); elsewhere set TORCH_CPU_INDEX to PyTorch's CPU wheel index.
#  2. The image's absolute paths (/opt/...) live under a fresh folder ($ROOT) in /tmp.
#  3. python3 is this machine's (the image has Ubuntu 24.04's 3.12); apt-get steps (outside
#     the install section) are not replayed.
#  4. At run time KNOTSTREAM_DEVICE=cpu and a free port override the image's ENV, and a
#     random KNOTSTREAM_API_KEYS is given, as docker/compose.yaml requires (the image binds
#     0.0.0.0, where the server refuses to start without keys); everything else
#     (KNOTSTREAM_HOST, KNOTSTREAM_MODEL, KNOTSTREAM_WEB_DIR, ...) is the image's.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DOCKERFILE=$REPO/docker/Dockerfile
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/knotstream-replay.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 0 ]; then rm -rf "$ROOT"; else echo "[replay] kept $ROOT"; fi
}
trap cleanup EXIT
T0=$(date +%s)
say() { echo "[replay +$(($(date +%s) - T0))s] $*"; }

# One instruction per line (continuations joined, comments dropped), each prefixed with
# "I " inside the install markers and "O " outside them.
instructions() {
  awk '
    /^[[:space:]]*#[[:space:]]*>>>[[:space:]]*install/ { inside = 1; next }
    /^[[:space:]]*#[[:space:]]*<<<[[:space:]]*install/ { inside = 0; next }
    /^[[:space:]]*#/ { next }
    {
      line = $0; sub(/^[[:space:]]+/, "", line)
      if (line ~ /\\$/) { sub(/\\$/, "", line); buf = buf line " "; next }
      buf = buf line
      if (buf ~ /[^[:space:]]/) print (inside ? "I " : "O ") buf
      buf = ""
    }' "$DOCKERFILE"
}

# /opt/... in the image -> $ROOT/opt/... here; other text unchanged.
map_path() { local p=$1; case $p in /opt/*) echo "$ROOT$p" ;; *) echo "$p" ;; esac; }

# ENV/ARG "K=V K2=V2" (values without spaces in our Dockerfile): export with /opt mapped
# and $VARS expanded as Docker does.
export_pairs() {
  local pair k v
  for pair in "$@"; do
    k=${pair%%=*}; v=${pair#*=}
    v=${v//\/opt\//$ROOT/opt/}
    v=$(eval "printf '%s' \"$v\"")
    export "$k=$v"
  done
}

json_argv() {  # a Dockerfile exec-form JSON array -> one argument per line
  python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$1"
}

mapfile -t LINES < <(instructions)
[ "${#LINES[@]}" -gt 0 ] || { echo "[replay] no instructions parsed from $DOCKERFILE" >&2; exit 1; }
grep -q '^I ' < <(printf '%s\n' "${LINES[@]}") || { echo "[replay] no install markers in $DOCKERFILE" >&2; exit 1; }

say "replaying $DOCKERFILE into $ROOT"
cwd=$ROOT
HEALTH=""
CMD=""
for entry in "${LINES[@]}"; do
  where=${entry%% *}; inst=${entry#* }
  op=${inst%% *}; rest=${inst#* }
  case "$where:$op" in
    *:ARG) read -ra pairs <<<"$rest"; export_pairs "${pairs[@]}" ;;
    *:ENV) read -ra pairs <<<"$rest"; export_pairs "${pairs[@]}" ;;  # in order, as the build sees them
    I:WORKDIR) cwd=$(map_path "$rest"); mkdir -p "$cwd" ;;
    I:COPY)
      read -ra args <<<"$rest"
      dest=${args[-1]}; unset 'args[-1]'
      case $dest in /*) dest=$(map_path "$dest") ;; *) dest=$cwd/$dest ;; esac
      for src in "${args[@]}"; do
        case $src in --*) echo "[replay] COPY flag $src is not supported" >&2; exit 1 ;; esac
        if [ -d "$REPO/$src" ]; then
          mkdir -p "$dest"
          (cd "$REPO/$src" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - .) | (cd "$dest" && tar -xf -)
        elif [[ $dest == */ ]]; then
          mkdir -p "$dest"; cp "$REPO/$src" "$dest"
        else
          mkdir -p "$(dirname "$dest")"; cp "$REPO/$src" "$dest"
        fi
      done
      say "COPY ${args[*]} -> ${dest#$ROOT}"
      ;;
    I:RUN)
      cmd=$rest
      if [[ $cmd == *"/opt/"* ]]; then
        echo "[replay] install RUN uses a literal /opt path (use \$VIRTUAL_ENV or WORKDIR-relative paths): $cmd" >&2
        exit 1
      fi
      if [[ $cmd == *"torch=="* ]]; then
        # Substitution 1: the CPU wheel of the same torch version in place of the CUDA wheel.
        cmd=${cmd//torch==\$\{TORCH_VERSION\}/torch==\$\{TORCH_VERSION\}+cpu}
        [[ $cmd == *"+cpu"* ]] || { echo "[replay] cannot substitute the CPU wheel in: $cmd" >&2; exit 1; }
        [ -n "${TORCH_CPU_INDEX:-}" ] && cmd=${cmd//pip install /pip install --extra-index-url $TORCH_CPU_INDEX }
        say "RUN (CUDA torch -> CPU wheel) $cmd"
      else
        say "RUN $cmd"
      fi
      (cd "$cwd" && sh -ec "$cmd")
      ;;
    O:HEALTHCHECK) HEALTH=${rest#*CMD } ;;
    O:CMD) CMD=$rest ;;
    I:*) echo "[replay] instruction $op inside the install section is not replayed" >&2; exit 1 ;;
    *) ;;  # FROM, apt-get RUN, USER, EXPOSE, ...: image plumbing, not the install
  esac
done

[ -x "${VIRTUAL_ENV:-}/bin/python" ] || { echo "[replay] the install section made no venv at \$VIRTUAL_ENV" >&2; exit 1; }
say "installed: $("$VIRTUAL_ENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

# The image's CMD and HEALTHCHECK, with the run-time substitutions (4).
[ -n "$CMD" ] && [ -n "$HEALTH" ] || { echo "[replay] Dockerfile needs CMD and HEALTHCHECK CMD" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KNOTSTREAM_API_KEYS=replay-$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export KNOTSTREAM_DEVICE=cpu KNOTSTREAM_PORT=$PORT KNOTSTREAM_API_KEYS
mapfile -t cmd_argv < <(json_argv "$CMD")
mapfile -t health_argv < <(json_argv "$HEALTH")
for i in "${!health_argv[@]}"; do health_argv[$i]=$(map_path "${health_argv[$i]}"); done
say "starting CMD ${cmd_argv[*]} on $KNOTSTREAM_HOST:$PORT (model $KNOTSTREAM_MODEL, web $KNOTSTREAM_WEB_DIR)"
(cd "$ROOT" && exec "${cmd_argv[@]}") >"$ROOT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 90); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "[replay] the server exited; its log:" >&2; cat "$ROOT/server.log" >&2; exit 1
  fi
  if out=$("${health_argv[@]}" 2>&1); then
    say "HEALTHCHECK ok: $out"
    page=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$PORT/")
    [[ $page == *"<html"* ]] || { echo "[replay] / does not serve the web demo" >&2; exit 1; }
    # Bound to the image's 0.0.0.0, creating a session needs one of the API keys.
    code=$(python3 -c '
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b"", method="POST"), timeout=10)
    print(200)
except urllib.error.HTTPError as exc:
    print(exc.code)' "http://127.0.0.1:$PORT/v1/sessions")
    [ "$code" = 401 ] || { echo "[replay] POST /v1/sessions without an API key answered $code, not 401" >&2; exit 1; }
    say "web demo served at /, sessions need an API key (401 without); replay passed"
    exit 0
  fi
  sleep 2
done
echo "[replay] HEALTHCHECK never passed; last answer: $out; server log:" >&2
cat "$ROOT/server.log" >&2
exit 1
