"""LiveTalk's prompt embedding: Wan's umT5 encoder file, read into transformers'
UMT5EncoderModel, gives what Wan's own T5 code computes (re-expressed here)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.wan.prompt import encode_prompt, load_wan_t5, tokenize

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


def wan_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    d, f, h, nb = 16, 24, 4, 8
    state = {"token_embedding.weight": r(40, d), "norm.weight": 1 + r(d) * 0.1}
    for i in range(2):
        state |= {f"blocks.{i}.norm1.weight": 1 + r(d) * 0.1, f"blocks.{i}.norm2.weight": 1 + r(d) * 0.1,
                  f"blocks.{i}.pos_embedding.embedding.weight": r(nb, h),
                  f"blocks.{i}.ffn.gate.0.weight": r(f, d), f"blocks.{i}.ffn.fc1.weight": r(f, d),
                  f"blocks.{i}.ffn.fc2.weight": r(d, f)}
        state |= {f"blocks.{i}.attn.{x}.weight": r(d, d) for x in "qkvo"}
    return state


def wan_t5_reference(state, ids, mask, heads=4, buckets=8, max_dist=16):
    """Wan's T5Encoder forward (wan/modules/t5.py), eval mode, float32."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel):
        half = buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    x = state["token_embedding.weight"][ids]
    L = ids.shape[1]
    rel = bucket(torch.arange(L)[None] - torch.arange(L)[:, None])
    for i in range(2):
        p = f"blocks.{i}."
        h = norm(x, state[p + "norm1.weight"])
        q, k, v = (F.linear(h, state[p + f"attn.{n}.weight"]).view(1, L, heads, -1) for n in "qkv")
        bias = state[p + "pos_embedding.embedding.weight"][rel].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(1, 1, 1, L) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)  # no 1/sqrt(d): T5
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(1, L, -1), state[p + "attn.o.weight"])
        h = norm(x, state[p + "norm2.weight"])
        ff = F.linear(h, state[p + "ffn.fc1.weight"]) * gelu(F.linear(h, state[p + "ffn.gate.0.weight"]))
        x = x + F.linear(ff, state[p + "ffn.fc2.weight"])
    return norm(x, state["norm.weight"])


def test_wan_t5_file_matches_wans_encoder(tmp_path):
    state = wan_state()
    torch.save(state, tmp_path / "t5.pth")
    encoder = load_wan_t5(tmp_path / "t5.pth", config=TINY, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 13, 2, 31, 1, 0, 0, 0, 0]])  # 6 real tokens, padded to a text length of 10
    mask = (torch.arange(10) < 6).long()[None]
    got = encode_prompt(encoder, ids, mask)
    want = wan_t5_reference(state, ids, mask)[0, :6]
    assert got.shape == (6, 16)
    assert (got - want).abs().max() < 1e-5


def test_unknown_t5_names_are_refused(tmp_path):
    torch.save({**wan_state(), "blocks.0.extra.weight": torch.zeros(1)}, tmp_path / "t5.pth")
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        load_wan_t5(tmp_path / "t5.pth", config=TINY)


def test_tokenize_pads_to_the_text_length():
    class Recorder:
        def __call__(self, texts, **kw):
            self.texts, self.kw = texts, kw
            return type("T", (), {"input_ids": torch.zeros(1, 8), "attention_mask": torch.ones(1, 8)})()

    tok = Recorder()
    tokenize(tok, "  a   speaking\tperson ", text_len=8)
    assert tok.texts == ["a speaking person"]
    assert tok.kw["padding"] == "max_length" and tok.kw["max_length"] == 8 and tok.kw["truncation"]
