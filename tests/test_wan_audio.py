"""wav2vec2 driving features: parity with transformers' Wav2Vec2Model and the families'
feature recipes (tiny random wav2vec2 with wav2vec2-base's 50 Hz CNN, no weights)."""

import numpy as np
import pytest
import torch

from model.wan import audio as wan_audio
from model.wan.audio import (
    AudioLayout,
    Wav2VecDriving,
    flashhead_audio_windows,
    livetalk_audio_groups,
    require_transformers,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def tiny_wav2vec():
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2Model(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_wav2vec()


def speechlike(seconds, seed=0, rate=16000):
    """Amplitude-modulated tones plus noise: varied enough that every frame differs."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    x = env * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 710 * t)) + 0.1 * g.standard_normal(len(t))
    return torch.tensor(0.3 * x, dtype=torch.float32)


def test_normalisation_matches_wav2vec2_feature_extractor(model):
    audio = speechlike(0.5)
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    want = torch.tensor(np.asarray(fe(audio.numpy(), sampling_rate=16000).input_values[0]))
    enc = Wav2VecDriving(model, AudioLayout("flashhead", 25))
    seen = {}
    hook = model.feature_extractor.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        enc.encode(audio)
    finally:
        hook.remove()
    assert (seen["x"][0] - want).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["livetalk", "flashhead"])
def test_without_resampling_equals_the_plain_forward(model, family):
    """When the video frame count equals the CNN frame count, the interpolation is the
    identity: the features must be exactly transformers' own hidden states."""
    audio = speechlike(1.0)
    enc = Wav2VecDriving(model, AudioLayout(family, 25), normalize=False)
    with torch.no_grad():
        ref = model(audio[None], output_hidden_states=True)
    n_cnn = ref.last_hidden_state.shape[1]
    got = enc.encode(audio, n_cnn)
    states = list(ref.hidden_states)
    want = [ref.last_hidden_state] + states if family == "livetalk" else states[1:]
    assert got.shape == (1, n_cnn, len(want), 32) and enc.layers == len(want)
    assert (got - torch.stack(want, dim=2)).abs().max() < TOL


@pytest.mark.parametrize("family,fps,seconds,frames", [("livetalk", 16, 2.0, 33), ("flashhead", 25, 1.32, 33)])
def test_cnn_features_are_interpolated_to_the_video_frames(model, family, fps, seconds, frames):
    audio = speechlike(seconds)
    layout = AudioLayout(family, fps)
    assert layout.frames_in(audio.shape[0]) == frames and layout.samples_for(frames) == audio.shape[0]
    enc = Wav2VecDriving(model, layout, normalize=False)
    seen = {}
    hook = model.feature_projection.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        feats = enc.encode(audio)
    finally:
        hook.remove()
    with torch.no_grad():
        cnn = model.feature_extractor(audio[None])[0].numpy()  # (C, T_cnn)
    pos = np.linspace(0, cnn.shape[1] - 1, frames)  # align_corners=True
    want = np.stack([np.interp(pos, np.arange(cnn.shape[1]), c) for c in cnn], axis=1)
    assert feats.shape[:2] == (1, frames)
    assert np.abs(seen["x"][0].numpy() - want).max() < 1e-5


def test_livetalk_groups_match_audio_pack_layout():
    """Frame 0 three times in front, then 4 frames per latent, flattened as AudioPack's
    rearrange 'b c (T t) 1 1 -> b T (t c)' of the channel-concatenated layers."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 9, 3, 5, generator=g)  # 9 = 1 + 4 * 2 video frames, 3 layers of width 5
    emb = feats.flatten(2).permute(0, 2, 1)  # (B, c, T) as LiveTalk's audio_emb
    emb = torch.cat([emb[:, :, :1].repeat(1, 1, 3), emb], dim=2)
    B, c, T = emb.shape
    want = emb.view(B, c, T // 4, 4).permute(0, 2, 3, 1).reshape(B, T // 4, 4 * c)
    assert torch.equal(livetalk_audio_groups(feats, first_chunk=True), want)
    later = torch.randn(2, 8, 3, 5, generator=g)
    assert torch.equal(livetalk_audio_groups(later, first_chunk=False)[:, 1], later[:, 4:].flatten(1))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        livetalk_audio_groups(later, first_chunk=True)


@pytest.mark.parametrize("start,end", [(0, 33), (28, 61), (30, 63)])
def test_flashhead_windows_match_its_indexing(start, end):
    """FlashHead: per frame a 5-frame window clamped to the known frames; a chunk's first
    latent takes its frame's whole window, each later latent [w0[:3], w1[2], w2[2], w3[2:]]."""
    T = end  # features known up to the chunk's end (FlashHead's streaming buffer)
    feats = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1).expand(1, T, 2, 3).clone()
    centers = torch.arange(start, end)[:, None] + (torch.arange(5) - 2)[None]
    windows = feats[0][centers.clamp(0, T - 1)]  # (33, 5, 2, 3)
    groups = windows[1:].view(8, 4, 5, 2, 3)
    want_later = torch.cat([groups[:, 0, :3], groups[:, 1:3, 2], groups[:, 3, 2:]], dim=1)
    first, later = flashhead_audio_windows(feats, start, n_latents=9)
    assert first.shape == (1, 1, 5, 2, 3) and later.shape == (1, 8, 8, 2, 3)
    assert torch.equal(first[0, 0], windows[0])
    assert torch.equal(later[0], want_later)


@pytest.mark.parametrize("family,fps", [("livetalk", 16), ("flashhead", 25)])
def test_streaming_window_covering_the_clip_equals_offline(model, family, fps):
    layout = AudioLayout(family, fps)
    enc = Wav2VecDriving(model, layout)
    n = 21
    audio = speechlike(layout.samples_for(n) / 16000, seed=1)
    offline = enc.encode(audio, positions=enc.stream_positions(0, n))
    stream = enc.stream(context_frames=100, lookahead_frames=100)
    first, end = stream.span(8, 4)
    assert (first, end) == (0, 112)
    got = stream.features(audio[: layout.samples_for(min(end, n))], first, 8, 4)
    assert (got - offline[:, 8:12]).abs().max() < TOL


def test_stream_alignment_is_the_recipes_own_at_a_clips_middle(model):
    """FlashHead's offline spread is 2 CNN frames per video frame at any clip length: the
    stream alignment is exactly it. LiveTalk's falls 1.25-2.25 CNN frames short over a
    clip: the stream sits half of that behind frame j * 3.125, the same in every window."""
    fh = Wav2VecDriving(model, AudioLayout("flashhead", 25))
    assert torch.equal(fh.stream_positions(40, 5), torch.arange(5, dtype=torch.float64) * 2)
    audio = speechlike(fh.layout.samples_for(17) / 16000)
    assert (fh.encode(audio) - fh.encode(audio, positions=fh.stream_positions(0, 17))).abs().max() < TOL
    lt = Wav2VecDriving(model, AudioLayout("livetalk", 16))
    pos = lt.stream_positions(10, 6)
    assert torch.allclose(pos[1:] - pos[:-1], torch.full((5,), 3.125, dtype=torch.float64))
    assert 0.625 < -pos[0] < 1.125 and torch.equal(lt.stream_positions(500, 6), pos)


def test_streaming_window_is_bounded_and_checked(model):
    layout = AudioLayout("flashhead", 25)
    stream = Wav2VecDriving(model, layout).stream(context_frames=50, lookahead_frames=3)
    first, end = stream.span(1000, 8)
    assert (first, end) == (950, 1011)  # the audio asked for never depends on the stream's age
    audio = speechlike(layout.samples_for(end - first) / 16000)
    assert stream.features(audio, first, 1000, 8).shape == (1, 8, 2, 32)
    with pytest.raises(ValueError, match="does not cover"):
        stream.features(audio[: layout.samples_for(55)], first, 1000, 8)


def test_bad_audio_is_refused(model):
    enc = Wav2VecDriving(model, AudioLayout("flashhead", 25))
    with pytest.raises(ValueError, match="N >= 400"):
        enc.encode(torch.zeros(100))
    with pytest.raises(ValueError, match="unknown family"):
        AudioLayout("sadtalker", 25)


def test_missing_transformers_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="knotstream\\[photoreal\\]"):
        require_transformers()


def test_from_pretrained_reads_a_local_folder(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": false}')
    enc = Wav2VecDriving.from_pretrained(tmp_path, AudioLayout("livetalk", 16))
    assert enc.normalize is False
    audio = speechlike(0.5)
    assert (enc.encode(audio) - Wav2VecDriving(model, enc.layout, normalize=False).encode(audio)).abs().max() < TOL
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Wav2VecDriving.from_pretrained(tmp_path / "missing", enc.layout)


def test_a_clashing_kernels_module_is_named_before_transformers_is_imported(monkeypatch):
    # Hugging Face's `kernels` (required by transformers >= 5.25) installs a module of our
    # `kernels` package's name: say which distribution to remove, not a deep ImportError.
    monkeypatch.setattr(wan_audio, "packages_distributions",
                        lambda: {"kernels": ["knotstream", "kernels"]})
    with pytest.raises(ImportError, match="kernels installs a `kernels` module"):
        require_transformers()
    monkeypatch.setattr(wan_audio, "packages_distributions", lambda: {"kernels": ["knotstream"]})
    assert require_transformers().__name__ == "transformers"
