"""Parts of the open photoreal Wan2.1-1.3B avatar families (LiveTalk, FlashHead).

- `vae`: the Wan2.1 video VAE, with a streaming decoder (snapshot/restore for rewinds);
- `vae_names`: Wan2.1 original <-> diffusers parameter names of that VAE;
- `audio`: the wav2vec2 driving encoder and each family's feature recipe, offline and streaming;
- `dit`: the families' DiT deltas on top of `model.dit.DiT` (condition layouts, audio paths);
- `families`: geometry presets (`livetalk-1.3b`, `flashhead-1.3b`, `livetalk-random`, ...);
- `checkpoints`: reading state dicts and the VAE file, the names/shapes fingerprint;
- `load`: a family from its download folder (FlashHead's names, missing-file errors);
- `prompt`: LiveTalk's umT5 prompt embedding, computed once from Wan's encoder file.

The chunk loop of each family (its recipe) is not here: it calls these parts.
"""
