"""Is this checkout's engine slower than another revision's? `knotstream bench engine` of
both, in one run, interleaved round by round, so that a machine whose load changes during
the run (other jobs, thermal limits) slows both sides alike.

    python bench/engine_ab.py --before 3d48736 [--rounds 5] [--lengths 30] [--threads 1]

The revision is checked out into a temporary git worktree and imported through PYTHONPATH
with this checkout's virtual environment (so both sides run the same torch). Prints each
round's ms/chunk and the ratio of the medians, before / after (> 1: this checkout is
faster).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \|", re.M)  # | length | ours ms/chunk | ...


def bench_ms(checkout: Path, args: argparse.Namespace) -> dict[int, float]:
    """ms/chunk per stream length of `knotstream bench engine` run from `checkout`."""
    cmd = [sys.executable, "-m", "server.cli", "bench", "engine", "--model", args.model,
           "--lengths", args.lengths, "--repeats", str(args.repeats), "--baseline-max-chunks", "0",
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"engine_ab: the benchmark failed in {checkout}:\n{out.stderr[-2000:]}")
    rows = {int(n): float(ms) for n, ms in ROW.findall(out.stdout)}
    if not rows:
        raise SystemExit(f"engine_ab: no result rows in the output of {checkout}:\n{out.stdout[-2000:]}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision to compare against (e.g. a commit before a change)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lengths", default="30", help="stream lengths in chunks, as bench engine takes them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--model", default="tiny")
    args = p.parse_args()
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be in [1, 50]")
    with tempfile.TemporaryDirectory(prefix="engine-ab-") as tmp:
        before = Path(tmp) / "before"
        add = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                             capture_output=True, text=True)
        if add.returncode != 0:
            p.error(f"cannot check out {args.before!r}: {add.stderr.strip()}")
        try:
            runs: dict[str, list[dict[int, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for side, checkout in (("before", before), ("after", ROOT)) if r % 2 == 0 else (
                        ("after", ROOT), ("before", before)):
                    runs[side].append(bench_ms(checkout, args))
                print(f"round {r + 1}/{args.rounds}: before {runs['before'][-1]} ms/chunk, "
                      f"after {runs['after'][-1]} ms/chunk", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    print(f"\nbench engine, {args.model}, torch threads {args.threads or 'default'}, {args.rounds} rounds "
          f"(before = {args.before}, after = this checkout)\n")
    print("| stream length (chunks) | before ms/chunk (median) | after ms/chunk (median) | before / after |")
    print("|---|---|---|---|")
    for n in sorted(runs["after"][0]):
        b = statistics.median(x[n] for x in runs["before"])
        a = statistics.median(x[n] for x in runs["after"])
        print(f"| {n} | {b:.1f} | {a:.1f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
