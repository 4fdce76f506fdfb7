"""PaLI: "PaLI: A Jointly-Scaled Multilingual Language-Image Model"
(Chen et al., ICLR 2023), https://arxiv.org/abs/2209.06794

The key trick: reuse a ViT and an mT5 encoder-decoder and make every vision-language task
"image + prompt text -> text". The ViT's patch outputs (no class token, no pooling, no head) are the
"visual tokens"; a linear map takes them to the text width and they are put in front of the embedded
prompt at the input of the T5 encoder, which attends over both; the T5 decoder writes the answer:

    v = W_proj ViT(img) + b         (N, d_model)        N = (image_size / patch_size)^2
    e = [v ; Embed(prompt)]         (N + L, d_model)    the visual tokens take the first N positions
    h = Enc_T5(e, mask = [1..1 ; prompt != pad])
    p(y_t | y_<t, img, prompt) = Dec_T5(y_<t, h)        loss: cross-entropy on the target tokens only

The tasks are told apart by the prompt alone (the paper's style, ending in the sentinel <extra_id_0>):
"Generate the caption in fr: <extra_id_0>", "Answer in de: wie viele Sterne gibt es? <extra_id_0>",
counting as VQA, and detection as text ("Detect all objects: <extra_id_0>" -> "<loc0003><loc0010>
<loc0012><loc0019> red circle ; ...": Pix2Seq / PaliGemma quantised coordinates y0 x0 y1 x1, one token
per coordinate). One model is trained on a weighted mixture of them in four languages (`--mixture`).
The ViT can be frozen (`--freeze_vit true`, as the paper's main pre-training) and both halves can
start from checkpoints of this project (`--init_vision out/vit-.../ckpt.pt` from vit.py,
`--init_text out/ul2-.../ckpt.pt` from ul2.py). With the image tokens given as input embeddings the
text side equals Hugging Face `MT5ForConditionalGeneration` (tested).

The ViT classes are vit.py's and the T5 classes (with the key/value-cache decoding and beam search) are
ul2.py's, copied unchanged; the T5 ones carry a `T5` prefix where vit.py uses the same class name.

Train:    python train.py pali
Predict:  python train.py pali --init out/pali-shapes/ckpt.pt --predict shapes:3 "Answer in fr: combien d'objets y a-t-il ?"
          (an image file instead of shapes:N, the N-th test scene; options beams=K, max_len=N)
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, EOS = 0, 1  # T5 convention (also the project's ByteTokenizer); the decoder starts from PAD


@dataclass
class Config:
    # the vision side: vit.py's field names
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    width: int = 96              # D of the ViT
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 384
    posemb: str = "learn"        # "learn" | "sincos2d"
    dropout: float = 0.0         # both sides (ViT: after positions, attention, MLP; T5: its usual places)
    ln_eps: float = 1e-6         # both sides: flax LayerNorm in the ViT, T5's RMSNorm
    qkv_bias: bool = True
    freeze_vit: bool = False     # the paper freezes the ViT during the main pre-training
    # the text side: ul2.py's field names (T5 v1.1 / mT5); `dropout` and `ln_eps` above serve both sides
    vocab_size: int = 422        # 262 + n_locations + 128 sentinels (the byte tokenizer with location tokens)
    d_model: int = 128
    d_kv: int = 32
    d_ff: int = 256
    num_heads: int = 4
    num_layers: int = 3          # encoder blocks
    num_decoder_layers: int = 3
    num_buckets: int = 32        # relative position buckets
    max_distance: int = 128
    activation: str = "gelu_tanh"  # mT5 / T5 v1.1 gated-GELU ("silu": UL2-20B)
    tie_embeddings: bool = False
    scale_logits: bool = False
    # PaLI: initialisation, tasks, tokens
    init_vision: str = ""        # a vit.py checkpoint (train.py ckpt.pt) for the ViT
    init_text: str = ""          # a ul2.py checkpoint for the encoder-decoder
    mixture: str = "caption:1,vqa:1,count:1,detect:1"   # task:weight,...
    langs: str = "en,fr,de,es"
    n_locations: int = 32        # coordinate tokens <loc0000>..: bins of the image side
    max_prompt_len: int = 96     # tokens after the visual ones
    max_target_len: int = 112
    eval_images: int = 100       # test scenes scored by evaluate (every task and language)


DATA = "scenes"
TRAIN = dict(steps=1200, batch_size=32, lr=2e-3, warmup=100, weight_decay=0.05)  # train.py defaults for this file (README)

MT5_VOCAB = 250_112
_MT5_LARGE = dict(vocab_size=MT5_VOCAB, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16)
_MT5_XXL = dict(vocab_size=MT5_VOCAB, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64)
_VIT_G14 = dict(image_size=224, patch_size=14, width=1664, depth=48, heads=16, mlp_dim=8192)  # big_vision "G"
_VIT_E14 = dict(image_size=224, patch_size=14, width=1792, depth=56, heads=16, mlp_dim=15360)  # "e", trained for PaLI
# name -> Config overrides. Paper sizes (Table 1: ViT-G 1.8B + mT5-Large 1.2B = PaLI-3B; + mT5-XXL 13B =
# PaLI-15B; ViT-e 3.9B + mT5-XXL = PaLI-17B), 224 px -> 256 visual tokens. "tiny" is the tests' size.
PRESETS = {
    "tiny": dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64,
                 d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4),
    "3b": dict(**_VIT_G14, **_MT5_LARGE),
    "15b": dict(**_VIT_G14, **_MT5_XXL),
    "17b": dict(**_VIT_E14, **_MT5_XXL),
}


# ============================================================================ the vision side (vit.py)

def lecun_normal_(w, fan_in):
    """flax's default kernel init: truncated normal (2 std) with variance 1/fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo the truncation's variance loss
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """big_vision's fixed 2-D positions: [sin(x w), cos(x w), sin(y w), cos(y w)] per grid point."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    omega = 1.0 / temperature ** (torch.arange(width // 4) / (width // 4 - 1))  # (D/4,)
    x = x.flatten()[:, None] * omega[None, :]  # (N, D/4)
    y = y.flatten()[:, None] * omega[None, :]  # (N, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None].float()  # (1, N, D)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v, per head; q, k, v: (B, h, T, d).
    SDPA (flash kernels on GPU) everywhere but bf16 on the CPU, where SDPA's backward is ~3x slower
    than the same three ops written out (bench.py measures it)."""
    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention: fused q,k,v projection (rows [q; k; v]), SDPA, output projection."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # xavier_uniform of each (D, D) q/k/v kernel (flax keeps them separate), zero biases
        bound = math.sqrt(6 / (dim + dim))
        nn.init.uniform_(self.qkv.weight, -bound, bound)
        nn.init.xavier_uniform_(self.proj.weight)
        if qkv_bias:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # x: (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, d) each
        x = attention(q, k, v)  # (B, h, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    """Dense(M) -> GELU -> Dropout -> Dense(D) -> Dropout."""

    def __init__(self, dim, mlp_dim, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.act = nn.GELU()  # exact erf GELU (as HF/timm; flax's nn.gelu is the tanh approximation)
        self.drop = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):  # vit_jax MlpBlock init
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x):  # x: (B, T, D)
        x = self.drop(self.act(self.fc1(x)))  # (B, T, M)
        return self.drop(self.fc2(x))  # (B, T, D)


class Block(nn.Module):
    """Pre-LN encoder block: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # x: (B, T, D)
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """vit.py's Model without class token, pooling or head: images (B, C, H, W) -> all N patch
    outputs after the final LayerNorm, the visual tokens (B, N, D). Same parameter names as vit.py."""

    def __init__(self, cfg: Config):
        super().__init__()
        D, P, C = cfg.width, cfg.patch_size, cfg.channels
        g = cfg.image_size // P  # grid side; N = g*g patches
        self.patch_embed = nn.Conv2d(C, D, kernel_size=P, stride=P)
        lecun_normal_(self.patch_embed.weight, fan_in=C * P * P)
        nn.init.zeros_(self.patch_embed.bias)
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.empty(1, g * g, D).normal_(std=0.02))
        else:
            self.register_buffer("pos_embed", posemb_sincos_2d(g, g, D), persistent=False)  # (1, N, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, images):  # images: (B, C, H, W) in [-1, 1]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N, D)


def resize_pos_embed(pos_embed, old_grid, new_grid, num_prefix_tokens):
    """(1, prefix + old_h*old_w, D) -> (1, prefix + new_h*new_w, D): bicubic 2-D interpolation of the
    patch grid (as HF/timm fine-tuning at a higher resolution); prefix (class) entries untouched.
    Grids are ints (square) or (h, w)."""
    old = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
    new = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if old == new:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.float().reshape(1, *old, D).permute(0, 3, 1, 2)  # (1, D, old_h, old_w)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos_embed.dtype)  # (1, N', D)
    return torch.cat([prefix, grid], dim=1)


# ============================================================================ the text side (ul2.py)
# >>> T5: ul2.py verbatim (a T5 prefix where vit.py has the same name)
class RMSNorm(nn.Module):
    """T5LayerNorm: y = w * x / sqrt(mean(x^2) + eps); no mean subtraction, no bias, statistics in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (..., D)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def relative_position_bucket(relative, bidirectional, num_buckets=32, max_distance=128):
    """relative = key position - query position (int tensor) -> bucket ids in [0, num_buckets).
    Offsets below max_exact = buckets/2 get their own bucket, larger ones log-spaced buckets up to
    max_distance. Bidirectional (encoder): half the buckets per sign, keys to the right get +buckets/2.
    Causal (decoder): only the past counts, every future offset lands in bucket 0."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative > 0).long() * num_buckets
        n = relative.abs()
    else:
        n = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    log_bucket = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()  # n = 0 gives -inf here, unused
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, log_bucket)


def t5_attention(q, k, v, bias, dropout=0.0):
    """softmax(q k^T + bias) v per head, with no 1/sqrt(d) (T5 folds it into q's init).
    q: (B, H, T, d), k, v: (B, H, S, d), bias: additive (1 or B, H or 1, T, S), position bias + masks.
    SDPA everywhere but bf16/fp16 on the CPU, where the written-out form (softmax in fp32) is faster."""
    if bias.dtype != q.dtype:  # autocast: the fp32 mask value must stay finite in bf16/fp16
        bias = bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)
    w = (q @ k.transpose(-2, -1) + bias).float().softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
    return F.dropout(w, dropout) @ v


class T5Attention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections (no biases), d_kv per head.
    Self-attention when `source` is None, else cross-attention over `source` (the encoder output).
    `cache` (a dict, for incremental decoding): self-attention appends this step's keys and values to it;
    cross-attention computes the keys and values of the source once and reuses them."""

    def __init__(self, cfg):
        super().__init__()
        self.heads, self.d_kv, self.dropout = cfg.num_heads, cfg.d_kv, cfg.dropout
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        # T5 init (mesh-tensorflow / HF _init_weights): the 1/sqrt(d_kv) of attention lives in q's std
        nn.init.normal_(self.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
        nn.init.normal_(self.k.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.v.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.o.weight, std=inner ** -0.5)

    def split(self, x):  # (B, T, H*d) -> (B, H, T, d)
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def forward(self, x, bias, source=None, cache=None):  # x: (B, T, D)
        B, T, _ = x.shape
        q = self.split(self.q(x))  # (B, H, T, d)
        if source is None:
            k, v = self.split(self.k(x)), self.split(self.v(x))  # (B, H, T, d)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, t+T, d)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # (B, H, S, d), computed at the first step
        else:
            k, v = self.split(self.k(source)), self.split(self.v(source))  # (B, H, S, d)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        y = t5_attention(q, k, v, bias, self.dropout if self.training else 0.0)  # (B, H, T, d)
        return self.o(y.transpose(1, 2).reshape(B, T, self.heads * self.d_kv))  # (B, T, D)


class T5MLP(nn.Module):
    """Gated feed-forward (T5 v1.1 DenseGatedActDense): wo(dropout(act(wi_0 x) * wi_1 x))."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {cfg.activation!r}: use 'gelu_tanh' (T5 v1.1) or 'silu' (UL2-20B)")
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # gate, goes through the activation
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # linear
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.activation = cfg.activation
        nn.init.normal_(self.wi_0.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.wi_1.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.wo.weight, std=cfg.d_ff ** -0.5)

    def forward(self, x):  # x: (B, T, D)
        gate = self.wi_0(x)  # (B, T, F)
        # "gelu_new" of HF = the tanh approximation (exact-erf GELU differs by up to ~5e-4)
        gate = F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)
        return self.wo(self.drop(gate * self.wi_1(x)))  # (B, T, D)


class T5Block(nn.Module):
    """Pre-norm T5 block: x += drop(attn(norm1 x)); [x += drop(cross_attn(norm_cross x, encoder))];
    x += drop(mlp(norm2 x)). The cross-attention sub-layer only in decoder blocks."""

    def __init__(self, cfg, cross=False):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.attn = T5Attention(cfg)
        self.norm_cross = RMSNorm(cfg.d_model, cfg.ln_eps) if cross else None
        self.cross_attn = T5Attention(cfg) if cross else None
        self.norm2 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = T5MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, source=None, source_bias=None, cache=None):  # x: (B, T, D)
        x = x + self.drop(self.attn(self.norm1(x), bias, cache=None if cache is None else cache.setdefault("self", {})))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), source_bias, source=source,
                                              cache=None if cache is None else cache.setdefault("cross", {})))
        return x + self.drop(self.mlp(self.norm2(x)))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal + cross-attention): embeddings -> dropout ->
    blocks -> final RMSNorm -> dropout. One relative position bias table per stack (T5 keeps it in block 0):
    the bias (1, H, T, S) is computed once and added in every block's self-attention."""

    def __init__(self, cfg, depth, causal):
        super().__init__()
        self.causal, self.num_buckets, self.max_distance = causal, cfg.num_buckets, cfg.max_distance
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
        nn.init.normal_(self.relative_attention_bias.weight, std=cfg.d_model ** -0.5)
        self.blocks = nn.ModuleList([T5Block(cfg, cross=causal) for _ in range(depth)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def position_bias(self, q_pos, k_pos):  # (T,), (S,) absolute positions -> (1, H, T, S)
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], not self.causal,
                                           self.num_buckets, self.max_distance)  # (T, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None].float()

    def forward(self, x, mask=None, source=None, source_mask=None, cache=None):
        """x: (B, T, D) input embeddings; mask: (B, T) True at real tokens (keys), None = all;
        source: (B, S, D) encoder output and source_mask (B, S) for the decoder's cross-attention;
        cache: a list of one dict per block for incremental decoding (x holds only the new positions)."""
        B, T, _ = x.shape
        neg = torch.finfo(torch.float32).min  # T5's additive mask value (finite: no NaN on empty rows)
        offset = cache[0]["self"]["k"].shape[2] if cache and "self" in cache[0] else 0  # tokens already decoded
        q_pos = torch.arange(offset, offset + T, device=x.device)
        k_pos = torch.arange(offset + T, device=x.device)
        bias = self.position_bias(q_pos, k_pos)  # (1, H, T, t+T)
        if self.causal:
            bias = bias.masked_fill(k_pos[None, :] > q_pos[:, None], neg)
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None, None, :], neg)  # (B, H, T, t+T)
        source_bias = None
        if source is not None:  # cross-attention: no position bias, only the encoder's padding
            source_bias = torch.zeros(source.shape[0], 1, 1, source.shape[1], device=x.device)
            if source_mask is not None:
                source_bias = source_bias.masked_fill(~source_mask[:, None, None, :], neg)  # (B, 1, 1, S)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, source, source_bias, cache=None if cache is None else cache[i])
        return self.drop(self.final_norm(x))  # (B, T, D)


def shift_right(targets):
    """Decoder inputs: targets shifted one to the right behind the start token (PAD); (B, T) -> (B, T)."""
    return F.pad(targets[:, :-1], (1, 0), value=PAD)
# <<< T5


# ============================================================================ PaLI

class Model(nn.Module):
    """PaLI: images (B, C, H, W) in [-1, 1], prompt ids (B, L), decoder input ids (B, T) -> logits (B, T, V).
    The encoder reads [W_proj ViT(images) ; shared(prompt)]; the rest is ul2.py's T5 (same parameter names:
    shared, encoder, decoder, lm_head), with its key/value-cache greedy decoding and beam search."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        if cfg.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"unknown posemb {cfg.posemb!r}: use 'learn' or 'sincos2d'")
        if cfg.posemb == "sincos2d" and cfg.width % 4:
            raise ValueError(f"posemb 'sincos2d' needs width divisible by 4, got {cfg.width}")
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_buckets"):  # ul2.Model's checks
            if getattr(cfg, f) < 1:
                raise ValueError(f"{f} must be positive, got {getattr(cfg, f)}")
        if cfg.num_buckets < 4 or cfg.max_distance <= cfg.num_buckets // 4:
            raise ValueError(f"need num_buckets >= 4 and max_distance > num_buckets/4, got {cfg.num_buckets}, {cfg.max_distance}")
        if not 0 <= cfg.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.n_locations == 1:
            raise ValueError("n_locations must be 0 (no detection) or at least 2")
        parse_mixture(cfg.mixture)
        parse_langs(cfg.langs)
        self.cfg = cfg
        self.vit = ViT(cfg)
        self.img_proj = nn.Linear(cfg.width, cfg.d_model)  # W_proj: visual tokens -> the text width
        lecun_normal_(self.img_proj.weight, fan_in=cfg.width)
        nn.init.zeros_(self.img_proj.bias)
        # the T5 encoder-decoder, as ul2.Model builds it
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # read by both stacks (and the head if tied)
        nn.init.normal_(self.shared.weight, std=1.0)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model ** -0.5)  # t5x's variance_scaling(1, fan_in)
        if cfg.freeze_vit:  # here, not in the optimizer: the freezing also holds on --resume
            for p in self.vit.parameters():
                p.requires_grad = False

    def embed(self, images, prompt):  # images: (B, C, H, W), prompt: (B, L) ids
        v = self.img_proj(self.vit(images))  # (B, N, d_model): the visual tokens
        e = torch.cat([v, self.shared(prompt)], dim=1)  # (B, N + L, d_model): image tokens first, then the prompt
        mask = torch.cat([torch.ones_like(prompt[:, :1], dtype=torch.bool).expand(-1, v.shape[1]), prompt != PAD], dim=1)
        return e, mask  # mask (B, N + L): True at real tokens

    def encode(self, images, prompt):  # -> encoder output (B, N + L, D), mask (B, N + L)
        e, mask = self.embed(images, prompt)
        return self.encoder(e, mask), mask

    def forward(self, images, prompt, decoder_input_ids):  # -> (B, T, V)
        enc, mask = self.encode(images, prompt)
        return self.decode(decoder_input_ids, enc, mask)

    def token_logprobs(self, images, prompt, ids):
        """log p(ids_t | ids_<t, image, prompt) per token (B, T), 0 at padding: the scores of generated answers,
        under the decoding distribution (PAD is never generated, as in generate and beam_search)."""
        logits = self(images, prompt, shift_right(ids)).float()  # (B, T, V)
        logits[..., PAD] = float("-inf")
        return logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0].masked_fill(ids == PAD, 0.0)

    # ------------------------------------------------------------------------------------------ decoding

    # >>> decoding: ul2.py's Model methods verbatim (the encoder input is images + prompt)
    def decode(self, decoder_input_ids, enc, enc_mask, cache=None):  # (B, T) -> logits (B, T, V)
        h = self.decoder(self.shared(decoder_input_ids), source=enc, source_mask=enc_mask, cache=cache)  # (B, T, D)
        if self.cfg.scale_logits:
            h = h * self.cfg.d_model ** -0.5
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.shared.weight)

    def new_cache(self):
        """Per decoder block: {"self": {k, v}} growing by one position per step, {"cross": {k, v}} of the encoder."""
        return [{} for _ in self.decoder.blocks]

    @torch.no_grad()
    def generate(self, images, prompt, max_new_tokens=64, temperature=0.0, top_k=0, generator=None,
                 logits_processor=None, use_cache=True):
        """Greedy (temperature 0) or sampled decoding -> (B, max_new_tokens) ids, PAD after each EOS.
        top_k > 0 samples among the k most likely tokens. logits_processor(prefix (B, t), logits (B, V))
        -> logits may mask tokens (e.g. constrained decoding). use_cache=False recomputes the whole
        decoder every step (the slow reference that the cached path must equal)."""
        enc, mask = self.encode(images, prompt)
        B = prompt.shape[0]
        tokens = torch.full((B, 1), PAD, dtype=torch.long, device=prompt.device)  # the start token
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        cache = self.new_cache() if use_cache else None
        for _ in range(max_new_tokens):
            logits = self.decode(tokens[:, -1:] if use_cache else tokens, enc, mask, cache)[:, -1].float()  # (B, V)
            logits[:, PAD] = float("-inf")  # PAD is no output: it only fills the rows after EOS
            if logits_processor is not None:
                logits = logits_processor(tokens[:, 1:], logits)
            if temperature <= 0:
                nxt = logits.argmax(-1)  # (B,)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            nxt = nxt.masked_fill(done, PAD)
            done |= nxt == EOS
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if done.all():
                break
        out = tokens[:, 1:]
        return F.pad(out, (0, max_new_tokens - out.shape[1]), value=PAD)  # (B, max_new_tokens)

    @torch.no_grad()
    def beam_search(self, images, prompt, max_new_tokens=64, num_beams=4, length_penalty=0.0, logits_processor=None):
        """Beam search -> (sequences (B, K, max_new_tokens), scores (B, K)), best first. A score is the sum of
        log-probabilities divided by ((5 + length) / 6) ** length_penalty (GNMT/T5; 0 = no normalisation).
        A finished beam (it produced EOS) keeps its score and only extends with PAD."""
        B, K = prompt.shape[0], num_beams
        enc, mask = self.encode(images, prompt)
        enc, mask = enc.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B*K, S, D), (B*K, S)
        dev = prompt.device
        tokens = torch.full((B * K, 1), PAD, dtype=torch.long, device=dev)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start equal: keep one alive at first
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B * K, device=dev)
        cache = self.new_cache()
        for _ in range(max_new_tokens):
            logits = self.decode(tokens[:, -1:], enc, mask, cache)[:, -1].float()  # (B*K, V)
            logits[:, PAD] = float("-inf")
            if logits_processor is not None:
                logits = logits_processor(tokens[:, 1:], logits)
            logp = logits.log_softmax(-1)
            V = logp.shape[-1]
            logp[done] = float("-inf")
            logp[done, PAD] = 0.0  # a finished beam continues with PAD at no cost
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
            scores, idx = cand.topk(K, dim=-1)  # (B, K)
            beam = (idx // V + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,) rows to continue
            nxt = (idx % V).view(-1)
            tokens = torch.cat([tokens[beam], nxt[:, None]], dim=1)
            lengths = lengths[beam] + (~done[beam]).float()
            done = done[beam] | (nxt == EOS)
            for c in cache:
                c["self"]["k"], c["self"]["v"] = c["self"]["k"][beam], c["self"]["v"][beam]
            if done.all():
                break
        final = scores / (((5 + lengths.view(B, K)) / 6) ** length_penalty)
        final, order = final.sort(dim=-1, descending=True)
        seqs = tokens[:, 1:].view(B, K, -1).gather(1, order[:, :, None].expand(-1, -1, tokens.shape[1] - 1))
        return F.pad(seqs, (0, max_new_tokens - seqs.shape[-1]), value=PAD), final
    # <<< decoding


# ============================================================================ prompts and coordinates

TASKS = ("caption", "vqa", "count", "detect")
SENTINEL = "<extra_id_0>"


def parse_mixture(text):
    """'caption:1,vqa:2' -> {'caption': 1.0, 'vqa': 2.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition(":")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in mixture {text!r}: tasks are {', '.join(TASKS)}")
        try:
            out[name] = float(w or 1)
        except ValueError:
            raise ValueError(f"task weight {w!r} in mixture {text!r} is not a number") from None
        if out[name] < 0:
            raise ValueError(f"negative weight for {name} in mixture {text!r}")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"mixture {text!r} has no task with a positive weight (e.g. 'caption:1,vqa:1')")
    return out


def parse_langs(text):
    langs = tuple(filter(None, (l.strip() for l in text.split(","))))
    if not langs:
        raise ValueError("langs is empty: e.g. 'en,fr,de,es'")
    return langs


def caption_prompt(lang):
    return f"Generate the caption in {lang}: {SENTINEL}"


def vqa_prompt(question, lang):
    return f"Answer in {lang}: {question} {SENTINEL}"


def detect_prompt():
    return f"Detect all objects: {SENTINEL}"


def quantize(v, image_size, n_locations):
    """A pixel coordinate in [0, image_size] -> its bin 0..n_locations-1 (the ends exact)."""
    return int(min(n_locations - 1, max(0, round(v / image_size * (n_locations - 1)))))


def dequantize(i, image_size, n_locations):
    return i * image_size / (n_locations - 1)


def box_to_text(box, image_size, n_locations):
    """(x0, y0, x1, y1) pixels -> '<locY0><locX0><locY1><locX1>' (PaliGemma order: y before x)."""
    x0, y0, x1, y1 = box
    return "".join(f"<loc{quantize(v, image_size, n_locations):04d}>" for v in (y0, x0, y1, x1))


def detection_target(scene, image_size, n_locations):
    """'<loc..>x4 red circle ; <loc..>x4 blue star', objects in reading order (top to bottom, left to right)."""
    objs = sorted(scene, key=lambda o: (o["box"][1], o["box"][0]))
    return " ; ".join(f"{box_to_text(o['box'], image_size, n_locations)} {o['name']}" for o in objs)


def parse_detections(ids, tokenizer, image_size, n_locations, logprobs=None):
    """Generated ids -> [(box (x0, y0, x1, y1) pixels, name, score)]: four location tokens then the name,
    up to the next location token or the end; score = exp(mean log-prob of the object's tokens)."""
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    lp = logprobs.tolist() if torch.is_tensor(logprobs) else (logprobs or [0.0] * len(ids))
    loc0 = tokenizer.location(0) if n_locations else -1
    is_loc = [loc0 <= i < loc0 + n_locations for i in ids]
    out, t = [], 0
    while t + 4 <= len(ids) and ids[t] != tokenizer.eos:
        if not all(is_loc[t:t + 4]):
            t += 1
            continue
        y0, x0, y1, x1 = (dequantize(i - loc0, image_size, n_locations) for i in ids[t:t + 4])
        e = t + 4
        while e < len(ids) and not is_loc[e] and ids[e] != tokenizer.eos:
            e += 1
        name = tokenizer.decode(ids[t + 4:e]).strip(" ;")
        out.append(((x0, y0, x1, y1), name, math.exp(sum(lp[t:e]) / (e - t))))
        t = e
    return out


# ============================================================================ metrics

def normalize_answer(s):
    return " ".join(s.lower().replace("?", " ").replace(".", " ").split())


def bleu4(hypotheses, references):
    """Corpus BLEU-4 (Papineni et al. 2002): geometric mean of the clipped 1..4-gram precisions times
    the brevity penalty exp(1 - r/c) when the candidate length c is below the closest reference length r.
    hypotheses: [str]; references: [[str, ...]] per hypothesis. Lower-cased, split on spaces."""
    match, total, c, r = [0] * 4, [0] * 4, 0, 0
    for hyp, refs in zip(hypotheses, references):
        h = hyp.lower().split()
        rs = [x.lower().split() for x in refs]
        c += len(h)
        r += min((abs(len(x) - len(h)), len(x)) for x in rs)[1]  # closest length, the shorter on ties
        for n in range(1, 5):
            grams = _ngrams(h, n)
            best = {}
            for x in rs:
                for g, k in _ngrams(x, n).items():
                    best[g] = max(best.get(g, 0), k)
            match[n - 1] += sum(min(k, best.get(g, 0)) for g, k in grams.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if c == 0 or min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def _ngrams(words, n):
    out = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def box_iou(a, b):
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def average_precision(detections, ground_truth, iou_threshold=0.5):
    """Mean over classes (names) of the VOC all-point AP at IoU >= iou_threshold.
    detections: per image [(box, name, score)]; ground_truth: per image [(box, name)]."""
    classes = sorted({n for gt in ground_truth for _, n in gt})
    aps = []
    for c in classes:
        n_gt = sum(n == c for gt in ground_truth for _, n in gt)
        dets = sorted(((s, i, b) for i, d in enumerate(detections) for b, n, s in d if n == c), key=lambda x: -x[0])
        used = [[False] * len(gt) for gt in ground_truth]
        tp = []
        for _, i, b in dets:
            best, j_best = iou_threshold, -1
            for j, (g, n) in enumerate(ground_truth[i]):
                iou = box_iou(b, g)
                if n == c and not used[i][j] and iou >= best:
                    best, j_best = iou, j
            if j_best >= 0:
                used[i][j_best] = True
            tp.append(j_best >= 0)
        tp = np.array(tp, dtype=np.float64)
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(tp) + 1)
        # all-point interpolation: area under the precision envelope
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        aps.append(float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:])))
    return float(np.mean(aps)) if aps else 0.0


# ============================================================================ the task mixture (train.py hooks)

def tokenizer(data, cfg):
    """The data's byte tokenizer, with cfg.n_locations coordinate tokens (same class, same sentinels)."""
    tok = data.tokenizer
    if getattr(tok, "n_locations", 0) != cfg.n_locations:
        tok = type(tok)(n_sentinels=tok.n_sentinels, n_locations=cfg.n_locations)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids (with {cfg.n_locations} location tokens) "
                         f"but vocab_size is {cfg.vocab_size}: pass --vocab_size {tok.vocab_size}")
    return tok


def _tasks_and_langs(data, cfg):
    mix = parse_mixture(cfg.mixture)
    have = getattr(data, "tasks", TASKS)  # captioned photos (CIFAR) have caption and vqa only
    mix = {t: w for t, w in mix.items() if t in have and w > 0}
    if not mix:
        raise ValueError(f"mixture {cfg.mixture!r} has no task that data '{data.name}' supports ({', '.join(have)})")
    if "detect" in mix and cfg.n_locations < 2:
        raise ValueError("the detect task writes boxes as location tokens: set --n_locations (e.g. 32)")
    langs = parse_langs(cfg.langs)
    missing = [l for l in langs if l not in data.langs]
    if missing:
        raise ValueError(f"data '{data.name}' has no language {', '.join(missing)} (it has {', '.join(data.langs)})")
    return mix, langs


def examples(data, scene, task, lang, rng, n_locations, every=False):
    """[(prompt, target, qtype)] for one scene: one example (random question), or with every=True all
    questions of the task (evaluation). qtype: the VQA question type, else the task name."""
    if task == "caption":
        return [(caption_prompt(lang), data.caption(scene, lang), "caption")]
    if task == "detect":
        size = scene[0].get("image_size", 0) if scene else 0
        return [(detect_prompt(), detection_target(scene, size, n_locations), "detect")]
    pairs = [(q, a, t) for q, a, t in data.vqa(scene, lang, rng) if (t == "count") == (task == "count")]
    if not every and pairs:
        pairs = [pairs[rng.integers(len(pairs))]]
    return [(vqa_prompt(q, lang), a, t) for q, a, t in pairs]


def _images(x, cfg):
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 (B, H, W, C) -> (B, C, H, W) in [-1, 1]
    if x.shape[-1] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    return x


def collate(images, rows, tok, cfg):
    """images uint8 (B, H, W, C); rows [(prompt, target, qtype, task, lang)] -> a batch dict."""
    def pad(seqs, limit):
        L = min(limit, max(len(s) for s in seqs))
        out = torch.zeros(len(seqs), L, dtype=torch.long)  # (B, L), pad 0
        for i, s in enumerate(seqs):
            s = s[:L]
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return out
    prompt = pad([tok.encode(r[0]) for r in rows], cfg.max_prompt_len)  # (B, L)
    target = pad([tok.encode(r[1], eos=True) for r in rows], cfg.max_target_len)  # (B, T), eos kept if it fits
    dev = images.device
    return {"image": _images(images, cfg), "prompt": prompt.to(dev), "decoder_input": shift_right(target).to(dev),
            "target": target.to(dev), "task": [r[3] for r in rows], "lang": [r[4] for r in rows],
            "qtype": [r[2] for r in rows], "answer": [r[1] for r in rows]}


def batches(data, cfg, split, batch_size, step=0, seed=0):
    """train: endless; step s draws its images, tasks (by the mixture's weights), languages and questions
    from a numpy generator seeded by (seed, s). test: one pass over cfg.eval_images test scenes, every
    task of the mixture and every language."""
    tok = tokenizer(data, cfg)
    mix, langs = _tasks_and_langs(data, cfg)
    names, p = list(mix), np.array(list(mix.values())) / sum(mix.values())
    if split != "train":
        rows, idx = [], []
        for i, scene in enumerate(data.scenes_test[:cfg.eval_images]):
            for task in names:
                for lang in (langs[:1] if task == "detect" else langs):  # detection prompts have no language
                    ex = examples(data, scene, task, lang, np.random.default_rng([i, langs.index(lang)]), cfg.n_locations, every=True)
                    rows += [(*e, task, lang) for e in ex]
                    idx += [i] * len(ex)
        for s in range(0, len(rows), batch_size):
            x = data.x_test[torch.tensor(idx[s:s + batch_size]).to(data.x_test.device)]
            yield collate(x, rows[s:s + batch_size], tok, cfg)
        return
    n = len(data.x_train)
    while True:
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, n, batch_size)
        rows = []
        for i in idx:
            task, lang = names[rng.choice(len(names), p=p)], langs[rng.integers(len(langs))]
            ex = examples(data, data.scenes_train[i], task, lang, rng, cfg.n_locations)
            if not ex:  # no such question for this scene (rare): caption it instead
                task, ex = "caption", examples(data, data.scenes_train[i], "caption", lang, rng, cfg.n_locations)
            rows.append((*ex[0], task, lang))
        yield collate(data.x_train[torch.from_numpy(idx).to(data.x_train.device)], rows, tok, cfg)
        step += 1


def loss(model, batch):
    """Teacher-forced cross-entropy on the target tokens only (the prompt is input, never a target)."""
    logits = model(batch["image"], batch["prompt"], batch["decoder_input"])  # (B, T, V)
    target = batch["target"]  # (B, T), 0 = pad
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=0)
    mask = target != 0
    acc = ((logits.argmax(-1) == target) & mask).sum() / mask.sum()
    return loss, {"tok_acc": acc, "tokens": int(mask.sum())}


def _unwrap(model):
    m = getattr(model, "module", model)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


@torch.no_grad()
def evaluate(model, data, cfg, batch_size=250):
    """Greedy answers for cfg.eval_images test scenes, every task of the mixture in every language:
    VQA exact match per language and question type (count = the counting task), caption BLEU-4 and
    exact match per language, detection AP@0.5 from the boxes parsed back out of the text."""
    raw = _unwrap(model)
    tok = tokenizer(data, cfg)
    mix, langs = _tasks_and_langs(data, cfg)
    size = data.x_test.shape[2]
    res, loss_sum, n_tok = {}, 0.0, 0
    per = {}  # (task, lang, qtype) -> list of (prediction text, answer, ids, logprobs)
    for batch in batches(data, cfg, "test", batch_size):
        logits = raw(batch["image"], batch["prompt"], batch["decoder_input"]).float()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=0, reduction="sum").item()
        n_tok += int((batch["target"] != 0).sum())
        for task in sorted(set(batch["task"])):
            rows = [i for i, t in enumerate(batch["task"]) if t == task]
            sel = torch.tensor(rows, device=batch["prompt"].device)
            prompt = batch["prompt"][sel]
            prompt = prompt[:, :int((prompt != 0).sum(1).max())]
            max_len = 16 if task in ("vqa", "count") else cfg.max_target_len
            ids = raw.generate(batch["image"][sel], prompt, max_new_tokens=max_len)  # (b, max_len)
            lps = raw.token_logprobs(batch["image"][sel], prompt, ids) if task == "detect" else ids.float()
            for j, r in enumerate(rows):
                key = (task, batch["lang"][r], batch["qtype"][r])
                per.setdefault(key, []).append((tok.decode(ids[j]), batch["answer"][r], ids[j].cpu(), lps[j].cpu()))
    res["test_loss"] = loss_sum / max(1, n_tok)
    for task in mix:
        if task in ("vqa", "count"):
            right = {k: [normalize_answer(p) == normalize_answer(a) for p, a, _, _ in v] for k, v in per.items() if k[0] == task}
            res[f"{task}_acc"] = float(np.mean(sum(right.values(), [])))
            for lang in langs:
                res[f"{task}_acc_{lang}"] = float(np.mean(sum((v for k, v in right.items() if k[1] == lang), [])))
            for qt in sorted({k[2] for k in right}):
                if task == "vqa":
                    res[f"vqa_acc_{qt}"] = float(np.mean(sum((v for k, v in right.items() if k[2] == qt), [])))
        elif task == "caption":
            for lang in langs:
                v = per.get(("caption", lang, "caption"), [])
                res[f"caption_bleu4_{lang}"] = bleu4([p for p, *_ in v], [[a] for _, a, *_ in v])
                res[f"caption_em_{lang}"] = float(np.mean([normalize_answer(p) == normalize_answer(a) for p, a, *_ in v]))
            res["caption_bleu4"] = float(np.mean([res[f"caption_bleu4_{l}"] for l in langs]))
        elif task == "detect":
            v = per.get(("detect", langs[0], "detect"), [])
            dets = [parse_detections(ids, tok, size, cfg.n_locations, lp) for _, _, ids, lp in v]
            gts = [[(o["box"], o["name"]) for o in sc] for sc in data.scenes_test[:len(v)]]  # in image order
            res["det_ap50"] = average_precision(dets, gts)
    return res


# ============================================================================ initialisation and predict

VIT_FIELDS = ("patch_size", "channels", "width", "depth", "heads", "mlp_dim", "qkv_bias")
T5_FIELDS = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "num_buckets",
             "max_distance", "activation", "tie_embeddings", "scale_logits")
T5_PREFIXES = ("shared.", "encoder.", "decoder.", "lm_head.")
FIRST_SENTINEL_FREE = 262  # byte tokenizer ids below this (pad, eos, unk, bytes, [R] [X] [S]) mean the same everywhere


def _mismatch(theirs, cfg, names, path):
    bad = [f"{k} {theirs.get(k)} (ours {getattr(cfg, k)})" for k in names if theirs.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    if bad:
        raise ValueError(f"{path} does not fit this PaLI: " + ", ".join(bad) + "; set the same values")


def vision_state_dict(sd, their_cfg, cfg):
    """A vit.py state dict -> ours for `Model.vit`: the class token, its position and the heads are
    dropped (PaLI uses every patch output), the position grid is resized to cfg.image_size."""
    out = {k: v for k, v in sd.items() if k.startswith(("patch_embed.", "blocks.", "norm.", "pos_embed"))}
    pe = out.get("pos_embed")
    if pe is not None and cfg.posemb == "learn":
        pe = pe[:, 1:] if their_cfg.get("pool", "cls") == "cls" else pe
        old_g = math.isqrt(pe.shape[1])
        out["pos_embed"] = resize_pos_embed(pe, old_g, cfg.image_size // cfg.patch_size, 0)
    elif pe is not None:
        out.pop("pos_embed")
    return out


def _remap_vocab(theirs, ours):
    """(V_theirs, D) rows -> (V_ours, D): the first 262 rows and the top sentinel rows copied, the rest kept."""
    out = ours.clone()
    out[:FIRST_SENTINEL_FREE] = theirs[:FIRST_SENTINEL_FREE]
    k = min(theirs.shape[0], ours.shape[0]) - FIRST_SENTINEL_FREE  # sentinels both have (top-aligned)
    if k > 0:
        out[-k:] = theirs[-k:]
    return out


def setup(model, cfg, load_checkpoint):
    """train.py calls this once for a fresh run: load --init_vision (vit.py) and --init_text (ul2.py)."""
    if cfg.init_vision:
        ck = load_checkpoint(cfg.init_vision, "vit")
        _mismatch(ck["config"], cfg, VIT_FIELDS, cfg.init_vision)
        sd = vision_state_dict(ck["model"], ck["config"], cfg)
        missing, unexpected = model.vit.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{cfg.init_vision}: missing {missing}, unexpected {unexpected}")
    if cfg.init_text:
        ck = load_checkpoint(cfg.init_text, "ul2")
        _mismatch(ck["config"], cfg, T5_FIELDS, cfg.init_text)
        own = {k: v for k, v in model.state_dict().items() if k.startswith(T5_PREFIXES)}
        sd = dict(ck["model"])
        for k in list(sd):
            if k in own and sd[k].shape != own[k].shape and sd[k].shape[1:] == own[k].shape[1:] and own[k].shape[0] == cfg.vocab_size:
                sd[k] = _remap_vocab(sd[k], own[k])  # another vocabulary size: map the rows id by id
        bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{cfg.init_text}: shapes differ for {', '.join(bad)}")
        missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
        if missing or unexpected:
            raise ValueError(f"{cfg.init_text}: missing {missing}, unexpected {unexpected}")
        model.load_state_dict(sd, strict=False)


def predict(model, data, cfg, args):
    """python train.py pali --init CKPT --predict IMAGE PROMPT [beams=K] [max_len=N]
    IMAGE: an image file (data.read_image: PNG/PPM) or shapes:N, the N-th test scene. PROMPT: a full
    prompt ("Answer in fr: combien d'objets y a-t-il ?", "Generate the caption in de:", "Detect all
    objects:"); the sentinel <extra_id_0> is added if missing. Returns the answer (and boxes if any)."""
    opt = re.compile(r"(beams|max_len)=(\d+)")
    opts = {m.group(1): int(m.group(2)) for m in map(opt.fullmatch, args) if m}
    pos = [a for a in args if not opt.fullmatch(a)]
    if len(pos) != 2 or opts.get("beams", 1) < 1 or opts.get("max_len", 1) < 1:
        raise ValueError("predict takes IMAGE (a file or shapes:N) and a PROMPT, e.g. shapes:3 "
                         "\"Answer in fr: combien d'objets y a-t-il ?\" (options beams=K max_len=N)")
    src, prompt = pos
    raw = _unwrap(model)
    out = {"image": src}
    m = re.fullmatch(r"shapes:(\d+)", src)
    if m:
        i = int(m.group(1))
        if i >= len(data.x_test):
            raise ValueError(f"shapes:{i}: the test set has {len(data.x_test)} scenes")
        x = data.x_test[i:i + 1]
        out["objects"] = [f"{o['name']} {list(o['box'])}" for o in data.scenes_test[i]]
    else:
        x = torch.as_tensor(np.asarray(data.read_image(src)))[None]  # (1, H, W, 3) uint8
    device = next(raw.parameters()).device
    tok = tokenizer(data, cfg)
    if SENTINEL not in prompt:
        prompt = prompt.rstrip() + " " + SENTINEL
    images, prompt_ids = _images(x.to(device), cfg), torch.tensor([tok.encode(prompt)], device=device)
    max_len, beams = opts.get("max_len", cfg.max_target_len), opts.get("beams", 1)
    if beams > 1:
        ids = raw.beam_search(images, prompt_ids, max_new_tokens=max_len, num_beams=beams)[0][:, 0]  # (1, T): best beam
    else:
        ids = raw.generate(images, prompt_ids, max_new_tokens=max_len)  # (1, T)
    lps = raw.token_logprobs(images, prompt_ids, ids)
    ids, lps = ids.cpu(), lps.cpu()
    out.update(prompt=prompt, answer=tok.decode(ids[0]))
    boxes = parse_detections(ids[0], tok, x.shape[2], cfg.n_locations, lps[0])
    if boxes:
        out["boxes"] = [dict(box=[round(v, 1) for v in b], name=n, score=round(s, 3)) for b, n, s in boxes]
    return out
