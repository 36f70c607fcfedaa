"""How much audio context the streaming wav2vec2 encoder needs (model/wan/audio.py).

    nice -n 10 .venv/bin/python bench/wav2vec_context.py                       # weight-free parts
    nice -n 10 .venv/bin/python bench/wav2vec_context.py --weights DIR --family livetalk

A stream encodes a bounded window of audio (context before the chunk, lookahead after
it) as a clip of its own; the families' offline recipe encodes the whole clip. Three
things differ, measured on ~20 s of offline TTS speech:

1. alignment: the offline recipe spreads the CNN's 50 Hz frames over the clip's video
   frames end to end (align_corners=True), which depends on the clip's length; a stream
   uses one fixed alignment (`Wav2VecDriving.stream_positions`); printed: the largest
   shift (ms) of a frame between the two, for clips of several lengths;
2. the statistics of wav2vec2's first conv layer, normalised over time (GroupNorm) per
   channel over whatever it sees: printed, per window length, how far the per-channel
   mean/std over the window are from the whole clip's (in units of the clip's std). The
   filters here are random (a linear filterbank: the spread of the statistics, not the
   trained filters' exact values); the input normalisation (zero mean, unit variance)
   cancels in this layer and is checked to;
3. with --weights DIR (a local wav2vec2-base-960h folder): the whole encoder, chunk by
   chunk: the error of each chunk's first frame (context edge), last frame (lookahead
   edge) and worst frame, relative to the clip's mean feature norm, next to the median
   change between neighbouring frames (a change that size is a whole frame of lip-sync).
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
        clip = synthesize(SENTENCES[i % len(SENTENCES)], voice=VOICES[i % len(VOICES)], sample_rate=rate)
        gap = np.zeros(int(0.15 * rate * (1 + i % 3)), dtype=np.float32)  # pauses of varied length
        parts += [clip, gap]
        n += len(clip) + len(gap)
        i += 1
    return torch.tensor(np.concatenate(parts)[: int(seconds * rate)])


def alignment_shift_ms(enc: Wav2VecDriving, clip_frames: int) -> float:
    """Largest shift between a frame's CNN position under the stream alignment and under
    the offline recipe for a clip of `clip_frames`, in ms (one CNN frame = 20 ms)."""
    layout = enc.layout
    n_cnn = enc.cnn_frames(layout.samples_for(clip_frames))
    offline = np.arange(clip_frames) * (n_cnn - 1) / (clip_frames - 1)
    stream = enc.stream_positions(0, clip_frames).clamp(min=0).numpy()
    return 20.0 * float(np.abs(stream - offline).max())


def conv0_statistics(audio: torch.Tensor, windows_s: list[float], rate: int = 16000) -> None:
    transformers = require_transformers()
    torch.manual_seed(0)
    conv0 = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).feature_extractor.conv_layers[0].conv

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # the feature extractor's step
        y = conv0(x[None, None])[0]  # (512, T)
        return y.mean(dim=1), y.std(dim=1)

    mean_c, std_c = stats(audio)
    m2, s2 = stats(3.0 * audio + 0.01)
    print(f"input normalisation cancels: clip statistics change by {((s2 - std_c).abs() / std_c).max():.1e} "
          f"(std) under x -> 3x + 0.01")
    print(f"{'window s':>8} {'std off (median)':>16} {'std off (p95)':>13} {'mean off (p95)':>14}")
    for w in windows_s:
        n = int(w * rate)
        d_std, d_mean = [], []
        for start in range(0, len(audio) - n + 1, max(n // 2, rate // 2)):
            m, s = stats(audio[start:start + n])
            d_std.append((s / std_c - 1).abs())
            d_mean.append((m - mean_c).abs() / std_c)
        d_std, d_mean = torch.cat(d_std), torch.cat(d_mean)
        print(f"{w:>8.1f} {d_std.median():>16.3f} {d_std.quantile(0.95):>13.3f} {d_mean.quantile(0.95):>14.3f}")


def rms_relative(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / scale


def whole_encoder(enc: Wav2VecDriving, audio: torch.Tensor, contexts: list[float], lookaheads: list[int]) -> None:
    layout = enc.layout
    fps, step = CHUNK[layout.family]
    offline = enc.encode(audio)[0]  # (T, L, H)
    T = offline.shape[0]
    scale = offline.flatten(1).norm(dim=1).mean().item()
    neighbour = rms_relative(offline[1:], offline[:-1], scale).median().item()
    print(f"{layout.family}: {T} frames at {fps} fps; neighbouring frames differ by {neighbour:.3f} (median)")
    print(f"{'context s':>9} {'lookahead':>9} {'first':>7} {'last':>7} {'worst':>7} {'worst/neighbour':>15}")
    starts = list(range(step, T - step - max(lookaheads), step))
    for ctx_s in contexts:
        for la in lookaheads:
            stream = enc.stream(context_frames=round(ctx_s * fps), lookahead_frames=la)
            errs = []
            for s in starts:
                a, b = stream.span(s, step)
                window = audio[layout.samples_per_frame * a: layout.samples_per_frame * a + layout.samples_for(b - a)]
                errs.append(rms_relative(stream.features(window, a, s, step)[0], offline[s:s + step], scale))
            e = torch.stack(errs)
            print(f"{ctx_s:>9.2f} {la:>9d} {e[:, 0].max():>7.4f} {e[:, -1].max():>7.4f} {e.max():>7.4f} "
                  f"{e.max() / neighbour:>15.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="a local wav2vec2-base-960h folder: measure the whole encoder")
    ap.add_argument("--family", choices=sorted(CHUNK), default="livetalk")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--contexts", default="0.5,1,2,4,8")
    ap.add_argument("--lookaheads", default="0,2,4,8")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    audio = speech(args.seconds)
    contexts = [float(c) for c in args.contexts.split(",")]
    transformers = require_transformers()
    base = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config())  # geometry only: its CNN's frame rate
    for family, (fps, _) in CHUNK.items():
        enc = Wav2VecDriving(base, AudioLayout(family, fps))
        shifts = ", ".join(f"{s:g} s: {alignment_shift_ms(enc, round(s * fps)):.1f} ms" for s in (1, 5, 20, 60))
        print(f"{family}: stream alignment vs the offline recipe of a clip of {shifts}")
    conv0_statistics(audio, contexts)
    if args.weights:
        enc = Wav2VecDriving.from_pretrained(args.weights, AudioLayout(args.family, CHUNK[args.family][0]))
        whole_encoder(enc, audio, contexts, [int(la) for la in args.lookaheads.split(",")])


if __name__ == "__main__":
    main()
