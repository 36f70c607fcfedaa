"""The open photoreal Wan2.1-1.3B avatar families (LiveTalk, FlashHead): parts and recipes.

Parts:
- `vae`: the Wan2.1 video VAE, with a streaming decoder (snapshot/restore for rewinds);
- `vae_names`: Wan2.1 original <-> diffusers parameter names of that VAE;
- `audio`: the wav2vec2 driving encoder and each family's feature recipe, offline and streaming;
- `dit`: the families' DiT deltas on top of `model.dit.DiT` (condition layouts, audio paths);
- `families`: geometry presets (`livetalk-1.3b`, `flashhead-1.3b`, `livetalk-random`, ...);
- `checkpoints`: reading state dicts and the VAE file, the names/shapes fingerprint;
- `load`: a family from its download folder (FlashHead's names, missing-file errors);
- `prompt`: LiveTalk's umT5 prompt embedding, computed once from Wan's encoder file.

Chunk loops (recipes of model/recipe.py) and what they use:
- `photoreal`: a family as an engine model (`PhotorealModel`, its `ModelConfig`), `--model` names;
- `livetalk` + `sink`: LiveTalk's blocks over a pinned sink and a rolling window;
- `flashhead` + `motion` + `colour`: FlashHead's chunks, motion latents, colour correction;
- `sampling`: both families' x0 + fresh-noise samplers;
- `baselines`: LiveTalk's own cache policy, for the tests and the GPU benchmark.
"""
