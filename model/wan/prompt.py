"""LiveTalk's prompt: the umT5-xxl embedding of one fixed sentence, computed once.

    python -m model.wan.prompt DIR [--prompt TEXT] [--device cuda]

reads Wan's text encoder from a LiveTalk folder (`Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth`,
Wan's own parameter names, and its tokenizer `Wan2.1-T2V-1.3B/google/umt5-xxl/`), runs
the prompt through transformers' `UMT5EncoderModel` (the same network: T5 layer norms,
unscaled attention with a relative position bias per layer, gated tanh-GELU feed-forward)
and writes `DIR/prompt_embedding.safetensors`, which `model.wan.load` reads. The encoder
(5.7B parameters) is loaded only here, never by a serving process.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor

from model.wan.audio import require_transformers
from model.wan.checkpoints import assign_weights, read_state_dict

# LiveTalk's prompt (configs/causal_inference.yaml there).
LIVETALK_PROMPT = ("A realistic video of a person speaking directly to the camera. The individual maintains steady "
                   "eye contact with clear, expressive facial features. Their facial expressions are naturally "
                   "animated and emotionally engaging, with precise lip movements perfectly synchronized to their "
                   "speech.")
T5_FILE = "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "Wan2.1-T2V-1.3B/google/umt5-xxl"
# Wan's umt5_xxl encoder (wan/modules/t5.py there), in transformers' UMT5Config fields.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)

# Wan's T5 encoder names -> transformers' UMT5EncoderModel names.
_T5_RULES = [
    (r"^token_embedding\.", "shared."),
    (r"^norm\.", "encoder.final_layer_norm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),  # through the GELU
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]


def wan_t5_to_umt5(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan's T5 encoder state dict -> UMT5EncoderModel's (the embedding is shared with the encoder's)."""
    out = {}
    for name, tensor in state.items():
        new = name
        for pattern, repl in _T5_RULES:
            new = re.sub(pattern, repl, new)
        if new == name:
            raise ValueError(f"{name}: not a parameter of Wan's umT5 encoder")
        out[new] = tensor
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def load_wan_t5(path: str | Path, config: dict | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16):
    """Wan's T5 encoder file -> transformers UMT5EncoderModel (built on the meta device)."""
    transformers = require_transformers()
    cfg = transformers.UMT5Config(**(config or UMT5_XXL))
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(cfg)
    assign_weights(model, wan_t5_to_umt5(read_state_dict(path)), path)
    model.encoder.embed_tokens = model.shared  # one table, as in the file
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompt(encoder, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Token ids (1, L) padded to the text length, mask (1, L) -> (tokens, d_model): the
    encoder's output for the real tokens only (Wan keeps those and zero-pads the rest)."""
    p = next(encoder.parameters())
    out = encoder(input_ids=input_ids.to(p.device), attention_mask=attention_mask.to(p.device)).last_hidden_state
    return out[0, : int(attention_mask.sum())].float().cpu()


def tokenize(tokenizer, text: str, text_len: int = 512) -> tuple[Tensor, Tensor]:
    """Wan's tokenisation: whitespace collapsed, special tokens, padded/truncated to text_len."""
    text = " ".join(text.split())
    t = tokenizer([text], padding="max_length", truncation=True, max_length=text_len,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return t.input_ids, t.attention_mask


def main() -> None:
    from model.wan.load import PROMPT_FILE, save_prompt_embedding

    ap = argparse.ArgumentParser(description="Write a LiveTalk folder's prompt_embedding.safetensors once.")
    ap.add_argument("dir", type=Path, help="the LiveTalk folder (pretrained_checkpoints)")
    ap.add_argument("--prompt", default=LIVETALK_PROMPT)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    transformers = require_transformers()
    for need in (args.dir / T5_FILE, args.dir / TOKENIZER_DIR):
        if not need.exists():
            raise SystemExit(f"missing {need} (part of huggingface.co/Wan-AI/Wan2.1-T2V-1.3B)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.dir / TOKENIZER_DIR), local_files_only=True)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    encoder = load_wan_t5(args.dir / T5_FILE, device=args.device, dtype=dtype)
    emb = encode_prompt(encoder, *tokenize(tokenizer, args.prompt))
    save_prompt_embedding(args.dir / PROMPT_FILE, emb)
    print(f"wrote {args.dir / PROMPT_FILE}: {tuple(emb.shape)}")


if __name__ == "__main__":
    main()
