"""`knotstream bench engine`: the table it prints, and `--size` (another frame size at the
model's architecture)."""

import argparse

import pytest

from model import bench


def _args(**over) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["engine", "--lengths", "2", "--repeats", "1", "--baseline-max-chunks", "2", "--threads", "1"])
    vars(args).update(over)
    return args


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| 2 ")]


def test_bench_engine_prints_ours_and_the_baseline(capsys):
    assert bench.run(_args()) == 0
    out = capsys.readouterr().out
    assert "(128x128, 25 fps)" in out
    (row,) = _rows(out)
    ms, cpu, fps, factor, base_ms = (float(row[i].rstrip("x")) for i in range(1, 6))
    assert ms > 0 and cpu > 0 and base_ms > 0
    assert fps == pytest.approx(8 / (ms / 1000), rel=0.01) and factor == pytest.approx(fps / 25, abs=0.01)


def test_bench_engine_size_measures_another_frame_size(capsys):
    assert bench.run(_args(size=64)) == 0
    out = capsys.readouterr().out
    assert "(64x64, 25 fps)" in out and "seeded random weights" in out
    assert len(_rows(out)) == 1


@pytest.mark.parametrize("size", [100, 2048, -16])
def test_bench_engine_size_must_fit_the_patch_grid(size):
    with pytest.raises(ValueError, match="--size"):
        bench.run(_args(size=size))
