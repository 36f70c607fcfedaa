"""Is this checkout's engine slower than another revision's? `knotstream bench engine` of
both, in one run, interleaved round by round, so that a machine whose load changes during
the run (other jobs, thermal limits) slows both sides alike.

    python bench/engine_ab.py --before 3d48736 [--rounds 5] [--lengths 30] [--threads 1]

The revision is checked out into a temporary git worktree and imported through PYTHONPATH
with this checkout's virtual environment (so both sides run the same torch). Prints each
round's ms/chunk and the ratios before / after (> 1: this checkout is faster) of the
medians and of the best rounds (on a shared machine the best round is the one least
disturbed by other jobs), and of the CPU seconds each whole run took.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \|", re.M)  # | length | ours ms/chunk | ...


def bench_ms(checkout: Path, args: argparse.Namespace) -> tuple[dict[int, float], float]:
    """ms/chunk per stream length of `knotstream bench engine` run from `checkout`, and the
    CPU seconds the whole run took (loading included: the same for both sides)."""
    cmd = [sys.executable, "-m", "server.cli", "bench", "engine", "--model", args.model,
           "--lengths", args.lengths, "--repeats", str(args.repeats), "--baseline-max-chunks", "0",
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"engine_ab: the benchmark failed in {checkout}:\n{out.stderr[-2000:]}")
    rows = {int(n): float(ms) for n, ms in ROW.findall(out.stdout)}
    if not rows:
        raise SystemExit(f"engine_ab: no result rows in the output of {checkout}:\n{out.stdout[-2000:]}")
    return rows, cpu


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
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for side, checkout in (("before", before), ("after", ROOT)) if r % 2 == 0 else (
                        ("after", ROOT), ("before", before)):
                    ms, seconds = bench_ms(checkout, args)
                    runs[side].append(ms)
                    cpu[side].append(seconds)
                print(f"round {r + 1}/{args.rounds}: before {runs['before'][-1]} ms/chunk, {cpu['before'][-1]:.1f} CPU s; "
                      f"after {runs['after'][-1]} ms/chunk, {cpu['after'][-1]:.1f} CPU s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    print(f"\nbench engine, {args.model}, torch threads {args.threads or 'default'}, {args.rounds} rounds "
          f"(before = {args.before}, after = this checkout)\n")
    print("| stream length (chunks) | before ms/chunk median / best | after ms/chunk median / best | "
          "before / after (medians) | before / after (best) |")
    print("|---|---|---|---|---|")
    for n in sorted(runs["after"][0]):
        b = [x[n] for x in runs["before"]]
        a = [x[n] for x in runs["after"]]
        bm, am = statistics.median(b), statistics.median(a)
        print(f"| {n} | {bm:.1f} / {min(b):.1f} | {am:.1f} / {min(a):.1f} | {bm / am:.3f} | {min(b) / min(a):.3f} |")
    cb, ca = statistics.median(cpu["before"]), statistics.median(cpu["after"])
    print(f"\nCPU seconds per whole benchmark run (median): before {cb:.1f}, after {ca:.1f}, before / after "
          f"{cb / ca:.3f} (CPU time is what other jobs on a shared machine take least of)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
