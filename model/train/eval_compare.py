"""Two evaluations of the same clips compared (`knotstream eval --compare OLD NEW`): new
weights against old, paired clip by clip.

Each run's `scores.json` holds every clip's metrics per system. Clips are matched by seed
(a seed fixes the identity, sentences, motion and the engine's noise, so both runs streamed
the same material from the same noise); for every system both runs scored under the same
name, the table gives new - old with the paired t-interval over the matched clips. A "model"
row compares each run's shipped defaults, whatever they were.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.train.eval_report import difference_cell
from model.train.eval_results import METRICS
from model.train.stats import paired_difference


def load(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "clips" not in data:
        raise ValueError(f"{path}: not a scores.json of knotstream eval (no 'clips')")
    return data


def compare(old: dict, new: dict) -> str:
    """Markdown: per system both runs scored, new - old per metric (* = interval excludes 0)."""
    old_clips = {c["seed"]: c for c in old["clips"]}
    pairs = [(old_clips[c["seed"]], c) for c in new["clips"] if c["seed"] in old_clips]
    if not pairs:
        raise ValueError("the two runs share no clip seed: nothing to pair")
    for a, b in pairs:
        if a["frames"] != b["frames"]:
            raise ValueError(f"clip seed {a['seed']}: {a['frames']} frames in the old run, {b['frames']} in the new")
    systems = [s for s in pairs[0][1]["scores"] if all(s in a["scores"] and s in b["scores"] for a, b in pairs)]
    lines = [f"Old: `{old.get('command', '?')}`", "", f"New: `{new.get('command', '?')}`", "",
             f"Paired over {len(pairs)} clips (seeds {', '.join(str(a['seed']) for a, _ in pairs)}); "
             "each cell new - old, mean ± half-width of the 95 % t-interval (* = excludes 0).", "",
             "| system (new - old) | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in systems:
        cells = [difference_cell(paired_difference([b["scores"][name][m] for _, b in pairs],
                                                   [a["scores"][name][m] for a, _ in pairs]), m) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
