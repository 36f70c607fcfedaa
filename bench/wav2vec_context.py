"""How much audio context the streaming wav2vec2 encoder needs (model/wan/audio.py).

    nice -n 10 .venv/bin/python bench/wav2vec_context.py [--weights DIR] [--family livetalk]

Encodes ~20 s of offline TTS speech once as a whole clip (the families' offline recipe)
and then chunk by chunk through `StreamingWav2Vec` with a bounded window (context before
the chunk, lookahead after it), and prints, per (context, lookahead), the relative error
||stream - offline|| / ||offline|| of each chunk's first frame (the context edge), last
frame (the lookahead edge) and worst frame, as the maximum over chunks.

The yardstick for "moves a frame" is the relative change between neighbouring video
frames' offline features (median over the clip): an error that size is worth a whole
frame of lip-sync. Without --weights the encoder is wav2vec2-base's geometry with random
weights (no hub access here): it shows the method and the size of the window effects,
not the numbers of the trained model; rerun with the real folder on a host that has it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.train.speech import VOICES, synthesize  # noqa: E402
from model.wan.audio import AudioLayout, Wav2VecDriving, require_transformers  # noqa: E402

CHUNK = {"livetalk": (16, 12), "flashhead": (25, 28)}  # fps, new video frames per chunk
SENTENCES = ["The quick brown fox jumps over the lazy dog near the quiet river bank.",
             "Could you tell me where the nearest train station is, please?",
             "We measured the difference at the window edges against the offline encode.",
             "Seven silver swans swam silently seaward at sunrise on a Sunday.",
             "Streaming avatars must keep their lips in time with every syllable they hear."]


def speech(seconds: float, rate: int = 16000) -> torch.Tensor:
    parts, n, i = [], 0, 0
    while n < seconds * rate:
        voice = VOICES[i % len(VOICES)]
        clip = synthesize(SENTENCES[i % len(SENTENCES)], voice=voice, sample_rate=rate)
        gap = np.zeros(int(0.15 * rate * (1 + i % 3)), dtype=np.float32)  # pauses of varied length
        parts += [clip, gap]
        n += len(clip) + len(gap)
        i += 1
    return torch.tensor(np.concatenate(parts)[: int(seconds * rate)])


def encoder(weights: str | None, family: str) -> Wav2VecDriving:
    fps = CHUNK[family][0]
    if weights:
        return Wav2VecDriving.from_pretrained(weights, AudioLayout(family, fps))
    transformers = require_transformers()
    torch.manual_seed(0)
    return Wav2VecDriving(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()), AudioLayout(family, fps))


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame relative difference of (n, L, H) features."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-8)


def measure(enc: Wav2VecDriving, audio: torch.Tensor, contexts: list[float], lookaheads: list[int]) -> None:
    layout = enc.layout
    fps, step = CHUNK[layout.family]
    offline = enc.encode(audio)[0]  # (T, L, H)
    T = offline.shape[0]
    neighbour = rel(offline[1:], offline[:-1]).median().item()
    print(f"{layout.family}: {T} frames at {fps} fps; neighbouring frames differ by {neighbour:.3f} (median)")
    print(f"{'context s':>9} {'lookahead':>9} {'first frame':>11} {'last frame':>10} {'worst':>7} {'worst/neighbour':>15}")
    starts = list(range(step, T - step - max(lookaheads), step))
    for ctx_s in contexts:
        for la in lookaheads:
            stream = enc.stream(context_frames=round(ctx_s * fps), lookahead_frames=la)
            first_err = last_err = worst = 0.0
            for s in starts:
                a, b = stream.span(s, step)
                feats = stream.features(audio[layout.samples_per_frame * a: layout.samples_per_frame * a
                                              + layout.samples_for(b - a)], a, s, step)[0]
                err = rel(feats, offline[s:s + step])
                first_err, last_err = max(first_err, err[0].item()), max(last_err, err[-1].item())
                worst = max(worst, err.max().item())
            print(f"{ctx_s:>9.2f} {la:>9d} {first_err:>11.4f} {last_err:>10.4f} {worst:>7.4f} {worst / neighbour:>15.3f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="a local wav2vec2-base-960h folder (default: random weights)")
    ap.add_argument("--family", choices=sorted(CHUNK), default="livetalk")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--contexts", default="0.5,1,2,4,8")
    ap.add_argument("--lookaheads", default="0,2,4,8")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    measure(encoder(args.weights, args.family), speech(args.seconds),
            [float(c) for c in args.contexts.split(",")], [int(la) for la in args.lookaheads.split(",")])


if __name__ == "__main__":
    main()
