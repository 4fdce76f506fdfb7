"""UL2: "UL2: Unifying Language Learning Paradigms" (Tay et al., ICLR 2023), https://arxiv.org/abs/2205.05131
on the T5 v1.1 encoder-decoder of "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (Raffel et al., JMLR 2020), https://arxiv.org/abs/1910.10683

The key trick: one model, one objective made of several denoisers (Mixture-of-Denoisers), and a mode
token that tells the model which denoiser made the example:

    R  regular span corruption   mu = 3 or 8 tokens per span, rate r = 15%        mode token [R]
    X  extreme span corruption   mu = 3 or 8 with r = 50%, or mu = 64 with r = 15% or 50%   [X]
    S  sequential (prefix LM)    a random prefix is the input, the rest the target           [S]

    span corruption:  x = "The cat sat on the mat"  ->  inputs  = [R] The <extra_id_0> on <extra_id_1> mat </s>
                                                       targets = <extra_id_0> cat sat <extra_id_1> the </s>
    loss = - sum_t log p(targets_t | targets_<t, inputs)        (teacher-forced cross-entropy)

At inference the mode token picks the behaviour ("mode switching"): [S] for left-to-right continuation,
[R] / [X] for infilling of <extra_id_k> holes.

The network is T5 v1.1 exactly (numerically equal to Hugging Face `T5ForConditionalGeneration`): pre-norm
RMSNorm without mean or bias, no biases anywhere, no 1/sqrt(d) in attention (it is folded into q's init),
a learned relative position bias (log-spaced buckets) computed once per stack and shared by all its blocks,
gated-GELU feed-forward (gated-SiLU for UL2-20B), one embedding shared by encoder and decoder, an untied
output head. `from_hf` loads Hugging Face T5 v1.1 / UL2 folders (config.json + safetensors shards).

Train:     python train.py ul2                         (Python's docstrings, 1000 steps; ~2 min on 2 CPU cores)
Generate:  python train.py ul2 --out out/ul2-stdlib --predict "[S] Return the number of"   (or "[R] a <extra_id_0> c")
Ablate:    python train.py ul2 --mixture R1 --mode_tokens false       (T5 span corruption only)
"""

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, EOS = 0, 1  # T5 convention (also the project's ByteTokenizer); the decoder starts from PAD


@dataclass
class Config:
    vocab_size: int = 390            # the byte tokenizer: 3 specials + 256 bytes + 3 mode tokens + 128 sentinels
    d_model: int = 128
    d_kv: int = 32                   # per-head size, its own hyper-parameter in T5
    d_ff: int = 256                  # gated: wi_0, wi_1 (d_model -> d_ff), wo (d_ff -> d_model)
    num_heads: int = 4
    num_layers: int = 2              # encoder blocks
    num_decoder_layers: int = 2
    num_buckets: int = 32            # relative position buckets
    max_distance: int = 128          # beyond this distance all offsets share the last bucket
    dropout: float = 0.0             # T5 v1.1 / UL2 pre-train with 0; 0.1 for fine-tuning
    ln_eps: float = 1e-6
    activation: str = "gelu_tanh"    # "gelu_tanh" (T5 v1.1 gated-gelu) | "silu" (UL2-20B gated-silu)
    tie_embeddings: bool = False     # output head = the shared embedding (original T5)
    scale_logits: bool = False       # decoder output * d_model^-0.5 before the head (original T5, with tying)
    # the objective
    seq_len: int = 128               # raw tokens (bytes) per example before corruption
    mixture: str = "R1,R2,X1,X2,X3,X4,S"  # denoisers (see DENOISERS), optional weights: "R1=2,S=1"
    mode_tokens: bool = True         # prepend [R] / [X] / [S] to the corrupted inputs
    eval_examples: int = 64          # held-out chunks per denoiser and metric in evaluate()


# train.py's defaults for this file: = the MoD arm of the miniature (0.5 s per step on one CPU thread; README)
TRAIN = dict(steps=1000, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.0)

_T5_V11 = dict(vocab_size=32128, d_kv=64, activation="gelu_tanh", seq_len=512)
# name -> Config overrides: T5 v1.1 (google/t5-v1_1-*) and UL2 20B (google/ul2) sizes
PRESETS = {
    "small": dict(_T5_V11, d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "base": dict(_T5_V11, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "large": dict(_T5_V11, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "xl": dict(_T5_V11, d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "xxl": dict(_T5_V11, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
    "20b": dict(_T5_V11, d_model=4096, d_ff=16384, d_kv=256, num_heads=16, num_layers=32, num_decoder_layers=32,
                activation="silu"),
}

# UL2's seven denoisers (paper Table 1): name -> (mode, mean span length mu, corruption rate r)
DENOISERS = {
    "R1": ("R", 3, 0.15), "R2": ("R", 8, 0.15),
    "X1": ("X", 3, 0.5), "X2": ("X", 8, 0.5), "X3": ("X", 64, 0.15), "X4": ("X", 64, 0.5),
    "S": ("S", None, None),
}


# ----------------------------------------------------------------------------------------------------------------
# The T5 v1.1 encoder-decoder

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


def attention(q, k, v, bias, dropout=0.0):
    """softmax(q k^T + bias) v per head, with no 1/sqrt(d) (T5 folds it into q's init).
    q: (B, H, T, d), k, v: (B, H, S, d), bias: additive (1 or B, H or 1, T, S), position bias + masks.
    SDPA everywhere but bf16/fp16 on the CPU, where the written-out form (softmax in fp32) is faster."""
    if bias.dtype != q.dtype:  # autocast: the fp32 mask value must stay finite in bf16/fp16
        bias = bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)
    w = (q @ k.transpose(-2, -1) + bias).float().softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
    return F.dropout(w, dropout) @ v


class Attention(nn.Module):
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
        y = attention(q, k, v, bias, self.dropout if self.training else 0.0)  # (B, H, T, d)
        return self.o(y.transpose(1, 2).reshape(B, T, self.heads * self.d_kv))  # (B, T, D)


class MLP(nn.Module):
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


class Block(nn.Module):
    """Pre-norm T5 block: x += drop(attn(norm1 x)); [x += drop(cross_attn(norm_cross x, encoder))];
    x += drop(mlp(norm2 x)). The cross-attention sub-layer only in decoder blocks."""

    def __init__(self, cfg, cross=False):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm_cross = RMSNorm(cfg.d_model, cfg.ln_eps) if cross else None
        self.cross_attn = Attention(cfg) if cross else None
        self.norm2 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
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
        self.blocks = nn.ModuleList([Block(cfg, cross=causal) for _ in range(depth)])
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


class Model(nn.Module):
    """T5 v1.1 / UL2 encoder-decoder: (input ids (B, S), decoder input ids (B, T)) -> logits (B, T, V).
    Id 0 is padding (masked in the encoder) and the decoder's start token; 1 is EOS."""

    def __init__(self, cfg: Config):
        super().__init__()
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_buckets"):
            if getattr(cfg, f) < 1:
                raise ValueError(f"{f} must be positive, got {getattr(cfg, f)}")
        if cfg.num_buckets < 4 or cfg.max_distance <= cfg.num_buckets // 4:
            raise ValueError(f"need num_buckets >= 4 and max_distance > num_buckets/4, got {cfg.num_buckets}, {cfg.max_distance}")
        if not 0 <= cfg.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        parse_mixture(cfg.mixture)
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # read by both stacks (and the head if tied)
        nn.init.normal_(self.shared.weight, std=1.0)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            # t5x's variance_scaling(1, fan_in) (HF draws N(0, 1), which starts training at logits of std ~sqrt(D))
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model ** -0.5)

    def encode(self, input_ids):  # (B, S) -> encoder output (B, S, D), mask (B, S)
        mask = input_ids != PAD
        return self.encoder(self.shared(input_ids), mask), mask

    def decode(self, decoder_input_ids, enc, enc_mask, cache=None):  # (B, T) -> logits (B, T, V)
        h = self.decoder(self.shared(decoder_input_ids), source=enc, source_mask=enc_mask, cache=cache)  # (B, T, D)
        if self.cfg.scale_logits:
            h = h * self.cfg.d_model ** -0.5
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.shared.weight)

    def forward(self, input_ids, decoder_input_ids):  # (B, S), (B, T) -> (B, T, V)
        enc, mask = self.encode(input_ids)
        return self.decode(decoder_input_ids, enc, mask)

    # ------------------------------------------------------------------------------------------ decoding

    def new_cache(self):
        """Per decoder block: {"self": {k, v}} growing by one position per step, {"cross": {k, v}} of the encoder."""
        return [{} for _ in self.decoder.blocks]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=64, temperature=0.0, top_k=0, generator=None,
                 logits_processor=None, use_cache=True):
        """Greedy (temperature 0) or sampled decoding -> (B, max_new_tokens) ids, PAD after each EOS.
        top_k > 0 samples among the k most likely tokens. logits_processor(prefix (B, t), logits (B, V))
        -> logits may mask tokens (e.g. constrained decoding). use_cache=False recomputes the whole
        decoder every step (the slow reference that the cached path must equal)."""
        enc, mask = self.encode(input_ids)
        B = input_ids.shape[0]
        tokens = torch.full((B, 1), PAD, dtype=torch.long, device=input_ids.device)  # the start token
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
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
    def beam_search(self, input_ids, max_new_tokens=64, num_beams=4, length_penalty=0.0, logits_processor=None):
        """Beam search -> (sequences (B, K, max_new_tokens), scores (B, K)), best first. A score is the sum of
        log-probabilities divided by ((5 + length) / 6) ** length_penalty (GNMT/T5; 0 = no normalisation).
        A finished beam (it produced EOS) keeps its score and only extends with PAD."""
        B, K = input_ids.shape[0], num_beams
        enc, mask = self.encode(input_ids)
        enc, mask = enc.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B*K, S, D), (B*K, S)
        dev = input_ids.device
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


def shift_right(targets):
    """Decoder inputs: targets shifted one to the right behind the start token (PAD); (B, T) -> (B, T)."""
    return F.pad(targets[:, :-1], (1, 0), value=PAD)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face T5 v1.1 / UL2 weights

_HF_RENAMES = [  # (HF regex, ours); Linear weights are (out, in) in both
    (r"^(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"\1.relative_attention_bias."),
    (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"\1.blocks.\2.attn."),
    (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.", r"\1.blocks.\2.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"encoder.blocks.\1.mlp."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"encoder.blocks.\1.norm2."),
    (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.", r"decoder.blocks.\1.cross_attn."),
    (r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"decoder.blocks.\1.norm_cross."),
    (r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.", r"decoder.blocks.\1.mlp."),
    (r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm\.", r"decoder.blocks.\1.norm2."),
    (r"^(encoder|decoder)\.final_layer_norm\.", r"\1.final_norm."),
]


def load_hf_state_dict(sd):
    """A Hugging Face T5ForConditionalGeneration state dict -> ours (same tensors, our names). The stack
    aliases of the shared embedding and HF's unused cross-attention position table are dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith("embed_tokens.weight") or "EncDecAttention.relative_attention_bias" in k:
            continue
        for pattern, repl in _HF_RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def config_from_hf(c: dict, **overrides) -> Config:
    """A Hugging Face T5/UL2 config.json dict -> Config. HF ties (and rescales) when tie_word_embeddings is
    absent (google/ul2's config has no such key); transformers 5 stores the rescale as scale_decoder_outputs."""
    proj = c.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu", "gated-silu"):
        raise ValueError(f"feed_forward_proj {proj!r}: only the gated T5 v1.1 / UL2 feed-forward "
                         "('gated-gelu', 'gated-silu') is implemented (original T5 uses 'relu')")
    tie = c.get("tie_word_embeddings", True)
    kw = dict(vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
              num_heads=c["num_heads"], num_layers=c["num_layers"],
              num_decoder_layers=c.get("num_decoder_layers") or c["num_layers"],
              num_buckets=c.get("relative_attention_num_buckets", 32),
              max_distance=c.get("relative_attention_max_distance", 128),
              dropout=c.get("dropout_rate", 0.1), ln_eps=c.get("layer_norm_epsilon", 1e-6),
              activation="gelu_tanh" if proj == "gated-gelu" else "silu",
              tie_embeddings=tie, scale_logits=c.get("scale_decoder_outputs", tie))
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        raise ValueError(f"unknown Config fields: {', '.join(sorted(unknown))}")
    return Config(**{**kw, **overrides})


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_safetensors(path):
    """Read a .safetensors file: 8-byte little-endian header length, JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: {list(_ST_DTYPES)}")
        start, end = info["data_offsets"]
        data = torch.from_numpy(np.array(raw[start:end]))  # (bytes,) uint8, copied out of the file
        out[name] = data.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def from_hf(folder, dtype=torch.float32, **overrides) -> Model:
    """Build a Model from a Hugging Face T5 v1.1 / UL2 folder: config.json + model.safetensors, or
    sharded model-0000x-of-0000n.safetensors with model.safetensors.index.json (google/ul2), or
    pytorch_model.bin. Returns eval mode. Note: those checkpoints use T5's SentencePiece vocabulary
    (32128 ids), not this project's byte tokenizer: tokenize with their tokenizer to run them."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: pass a Hugging Face T5/UL2 folder")
    c = json.loads((folder / "config.json").read_text())
    if c.get("model_type", "t5") != "t5":
        raise ValueError(f"{folder}: model_type {c.get('model_type')!r}, expected 't5'")
    if (folder / "model.safetensors").is_file():
        sd = load_safetensors(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        sd = {k: v for shard in sorted(shards) for k, v in load_safetensors(folder / shard).items()}
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin in {folder}")
    cfg = config_from_hf(c, **overrides)
    ours = {k: v.to(dtype) for k, v in load_hf_state_dict(sd).items()}
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    elif "lm_head.weight" not in ours:
        raise ValueError(f"{folder}: tie_word_embeddings is false but the weights have no lm_head.weight")
    with torch.device("meta"):
        model = Model(cfg)
    missing = set(model.state_dict()) - set(ours)
    extra = set(ours) - set(model.state_dict())
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match the config (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]})")
    model.load_state_dict(ours, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-Denoisers

def parse_mixture(spec):
    """"R1,R2,S=2" -> (["R1", "R2", "S"], normalised weights). Names from DENOISERS; weight 1 unless given."""
    names, weights = [], []
    for part in spec.replace(" ", "").split(","):
        name, _, w = part.partition("=")
        if name not in DENOISERS:
            raise ValueError(f"unknown denoiser {name!r} in mixture {spec!r}; choose from {', '.join(DENOISERS)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"mixture weight {w!r} of {name} is not a number") from None
        if weight < 0 or name in names:
            raise ValueError(f"mixture {spec!r}: negative weight or {name} given twice")
        names.append(name)
        weights.append(weight)
    if sum(weights) <= 0:
        raise ValueError(f"mixture {spec!r} has no positive weight")
    return names, np.array(weights) / sum(weights)


def random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng):
    """T5's span-corruption mask (t5.data.preprocessors.random_spans_noise_mask) -> bool (length,), True = noise.
    round(length * density) noise tokens in round(noise / mean_span) spans; the noise and the clean tokens are
    each cut into that many non-empty spans uniformly over all compositions; spans alternate clean, noise,
    clean, ... (a sequence always starts clean). rng: numpy Generator."""
    if noise_density == 0:
        return np.zeros(length, dtype=bool)
    orig_length, length = length, max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_clean = length - num_noise
    num_spans = min(num_spans, num_clean)  # T5 assumes this (it holds for every mu >= 1 at rate <= 0.5)

    def segment(n, k):  # n items in k non-empty segments, uniform over compositions: choose k-1 of n-1 cuts
        first = np.zeros(n, dtype=bool)
        first[1 + rng.permutation(n - 1)[:k - 1]] = True
        return np.bincount(np.cumsum(first), minlength=k)  # lengths, sum n

    interleaved = np.stack([segment(num_clean, num_spans), segment(num_noise, num_spans)], axis=1).reshape(-1)
    span_id = np.repeat(np.arange(2 * num_spans), interleaved)  # clean0 noise0 clean1 noise1 ...
    return (span_id % 2 == 1)[:orig_length]


def span_corrupt(tokens, noise, sentinel):
    """Sentinel replacement (T5 noise_span_to_unique_sentinel): tokens (L,) int, noise (L,) bool,
    sentinel(k) -> the id of <extra_id_k>. Returns (inputs, targets) without EOS:
    inputs = clean tokens with the k-th noise span replaced by sentinel k,
    targets = sentinel 0, span 0, sentinel 1, span 1, ... (every clean run dropped)."""
    tokens = np.asarray(tokens)
    starts = noise & ~np.concatenate([[False], noise[:-1]])  # first token of each noise span
    sentinels = np.array([sentinel(k) for k in range(int(starts.sum()))], dtype=tokens.dtype)
    inputs = np.where(starts, sentinels[np.cumsum(starts) - 1] if len(sentinels) else 0, tokens)[~noise | starts]
    targets = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinels)
    return inputs, targets


def mean_span_length(mu, length):
    """UL2's span lengths are for 512-token inputs: cap mu at a quarter of the sequence, so that a long-span
    denoiser still makes several spans on short sequences (64 -> 32 at 128 bytes, as the card's miniature)."""
    return min(mu, max(1.0, length / 4))


def denoise(tokens, name, rng, tokenizer, mode_tokens=True):
    """One UL2 example from token ids (L,) with denoiser `name` -> (inputs, targets) int arrays, both ending
    in EOS; inputs start with the mode token [R] / [X] / [S] when mode_tokens. S (prefix LM): a prefix of
    uniform length in [1, L-1] is the input, the rest the target (no sentinel, as seqio's prefix_lm)."""
    kind, mu, rate = DENOISERS[name]
    tokens = np.asarray(tokens, dtype=np.int64)
    if kind == "S":
        split = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else 1
        inputs, targets = tokens[:split], tokens[split:]
    else:
        noise = random_spans_noise_mask(len(tokens), rate, mean_span_length(mu, len(tokens)), rng)
        inputs, targets = span_corrupt(tokens, noise, tokenizer.sentinel)
    mode = [tokenizer.mode[kind]] if mode_tokens else []
    return np.concatenate([mode, inputs, [EOS]]).astype(np.int64), np.concatenate([targets, [EOS]]).astype(np.int64)


def max_spans(cfg):
    """The most sentinels one example of the mixture can need (at seq_len)."""
    return max([max(1, round(round(cfg.seq_len * DENOISERS[n][2]) / mean_span_length(DENOISERS[n][1], cfg.seq_len)))
                for n in parse_mixture(cfg.mixture)[0] if DENOISERS[n][0] != "S"] + [0])


def pad(rows, multiple=8):
    """List of 1-D int arrays -> (B, T) LongTensor padded with PAD, T rounded up to a multiple (fewer shapes)."""
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    out = torch.full((len(rows), T), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.from_numpy(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# train.py task hooks

DATA = "text"


def _check(data, cfg):
    tok = data.tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} (--vocab_size)")
    if max_spans(cfg) > tok.n_sentinels:
        raise ValueError(f"seq_len {cfg.seq_len} needs {max_spans(cfg)} sentinels, the tokenizer has {tok.n_sentinels}")
    if cfg.seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {cfg.seq_len}")


def _chunks(ids, starts, L):  # a flat (N,) id tensor -> (n, L) int64 numpy rows starting at `starts`
    if len(ids) < L:  # a text shorter than one chunk: pad it
        ids = torch.cat([ids, ids.new_full((L - len(ids),), PAD)])
    return ids.numpy()[np.asarray(starts)[:, None] + np.arange(L)].astype(np.int64)


def _val_starts(data, cfg):
    n = len(data.val) - cfg.seq_len
    return np.linspace(0, max(n, 0), cfg.eval_examples).astype(np.int64)  # evenly spread, fixed


def batches(data, cfg, split, batch_size, step=0, seed=0):
    """MoD batches: {"inputs": (B, S), "targets": (B, T)} padded with 0. Train: chunks of seq_len tokens at random
    offsets of the training stream, each corrupted by a denoiser drawn from the mixture; batch s is a pure function
    of (seed, s). Other splits: one pass over the fixed validation chunks (fixed masks)."""
    _check(data, cfg)
    names, weights = parse_mixture(cfg.mixture)
    L, dev = cfg.seq_len, data.device
    if split != "train":
        rng = np.random.default_rng([seed, 1])
        starts = _val_starts(data, cfg)
        for i in range(0, len(starts), batch_size):
            ex = [denoise(c, names[rng.choice(len(names), p=weights)], rng, data.tokenizer, cfg.mode_tokens)
                  for c in _chunks(data.val, starts[i:i + batch_size], L)]
            yield {"inputs": pad([e[0] for e in ex]).to(dev), "targets": pad([e[1] for e in ex]).to(dev)}
        return
    n = max(1, len(data.train) - L + 1)
    while True:
        rng = np.random.default_rng([seed, step, 0])
        rows = _chunks(data.train, rng.integers(0, n, size=batch_size), L)  # (B, L)
        which = rng.choice(len(names), size=batch_size, p=weights)
        ex = [denoise(c, names[w], rng, data.tokenizer, cfg.mode_tokens) for c, w in zip(rows, which)]
        yield {"inputs": pad([e[0] for e in ex]).to(dev), "targets": pad([e[1] for e in ex]).to(dev)}
        step += 1


def loss(model, batch):
    targets = batch["targets"]  # (B, T)
    logits = model(batch["inputs"], shift_right(targets)).float()  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)
    real = targets != PAD
    acc = (logits.argmax(-1) == targets)[real].float().mean()
    return loss, {"acc": acc, "tokens": int(real.sum()) + int((batch["inputs"] != PAD).sum())}


def _raw(model):  # the Model inside a torch.compile / DDP wrapper (for generate)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _is_sentinel(ids, tok):  # bool mask: the tokenizer's <extra_id_k> ids (top of its vocabulary)
    return (ids >= tok.vocab_size - tok.n_sentinels) & (ids < tok.vocab_size)


def spans_of(ids, tok):
    """Decoder output of span corruption -> {sentinel id: [span ids]} (read up to EOS/PAD)."""
    spans, current = {}, None
    for t in (ids.tolist() if torch.is_tensor(ids) else list(ids)):
        if t in (EOS, PAD):
            break
        if _is_sentinel(t, tok):
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    return spans


def fill_in(inputs, outputs, tok):
    """Infilling result: the corrupted inputs with each sentinel replaced by its span from the outputs;
    mode tokens and EOS dropped. Lists of ids in, list of ids out."""
    spans, out = spans_of(outputs, tok), []
    for t in (inputs.tolist() if torch.is_tensor(inputs) else list(inputs)):
        if t in (EOS, PAD):
            break
        if _is_sentinel(t, tok):
            out += spans.get(t, [])
        elif t not in tok.mode.values():
            out.append(t)
    return out


@torch.no_grad()
def _nll(model, examples, dev, keep=None):
    """Teacher-forced cross-entropy of a list of (inputs, targets): (sum of -log p, number of tokens) over the
    target tokens where keep(targets) is True (default: every non-PAD token)."""
    inputs, targets = pad([e[0] for e in examples]).to(dev), pad([e[1] for e in examples]).to(dev)
    logits = model(inputs, shift_right(targets)).float()  # (B, T, V)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")  # (B, T)
    mask = (targets != PAD) if keep is None else keep(targets)
    return (nll * mask).sum().item(), mask.sum().item()


@torch.no_grad()
def paper_metrics(model, data, cfg, infill_mode="R", continue_mode="S", continue_sentinel=False):
    """The miniature's two held-out metrics (papers/text.md B5), on cfg.eval_examples fixed validation chunks:
    infilling   R(3, .15) corruption with fixed masks: infill_nll = NLL per target byte (sentinels and EOS excluded),
                infill_em = fraction of spans decoded exactly by greedy decoding;
    continuation the first half as input: cont_nll = NLL per byte of the true second half, cont_acc = fraction of
                the first 32 greedily generated bytes equal to the truth.
    infill_mode / continue_mode: the mode token prepended ("R", "X", "S") or None (none). continue_sentinel: ask for
    the continuation as T5 asks a span-corruption model, prefix + <extra_id_0> -> <extra_id_0> continuation."""
    tok, dev, L = data.tokenizer, data.device, cfg.seq_len
    raw = _raw(model)
    chunks = _chunks(data.val, _val_starts(data, cfg), L)  # (n, L)
    rng = np.random.default_rng(12345)
    mode = lambda m: [tok.mode[m]] if m else []
    ex = []
    for c in chunks:
        noise = random_spans_noise_mask(L, 0.15, 3, rng)
        i, t = span_corrupt(c, noise, tok.sentinel)
        ex.append((np.array(mode(infill_mode) + list(i) + [EOS]), np.append(t, EOS)))
    s, n = _nll(model, ex, dev, keep=lambda t: (t != PAD) & (t != EOS) & ~_is_sentinel(t, tok))
    out = raw.generate(pad([e[0] for e in ex]).to(dev), max(len(e[1]) for e in ex) + 8).cpu()
    right = total = 0
    for e, o in zip(ex, out):
        truth, guess = spans_of(e[1], tok), spans_of(o, tok)
        right += sum(guess.get(k) == v for k, v in truth.items())
        total += len(truth)
    metrics = {"infill_nll": s / n, "infill_em": right / total}
    half, n_gen, s0 = L // 2, min(32, L - L // 2), tok.sentinel(0)
    hole = [s0] if continue_sentinel else []
    ex = [(np.array(mode(continue_mode) + list(c[:half]) + hole + [EOS]), np.array(hole + list(c[half:]) + [EOS]))
          for c in chunks]
    s, n = _nll(model, ex, dev, keep=lambda t: (t != PAD) & (t != EOS) & ~_is_sentinel(t, tok))
    out = raw.generate(pad([e[0] for e in ex]).to(dev), n_gen + len(hole)).cpu()
    if continue_sentinel:  # the bytes after <extra_id_0>, up to the next sentinel / EOS
        out = torch.tensor([(spans_of(o, tok).get(s0, []) + [PAD] * n_gen)[:n_gen] for o in out])
    truth = torch.from_numpy(chunks[:, half:half + n_gen])
    metrics.update(cont_nll=s / n, cont_acc=(out == truth).float().mean().item())
    return metrics


@torch.no_grad()
def evaluate(model, data, cfg):
    """Validation loss per denoiser (all seven, teacher-forced, fixed masks: val_loss_R1 ... val_loss_S), their
    mixture-weighted mean (val_loss), and the miniature's infilling / continuation metrics (paper_metrics)."""
    _check(data, cfg)
    chunks = _chunks(data.val, _val_starts(data, cfg), cfg.seq_len)
    out = {}
    for i, name in enumerate(DENOISERS):
        rng = np.random.default_rng([777, i])
        s, n = _nll(model, [denoise(c, name, rng, data.tokenizer, cfg.mode_tokens) for c in chunks], data.device)
        out[f"val_loss_{name}"] = s / n
    names, weights = parse_mixture(cfg.mixture)
    out["val_loss"] = float(sum(w * out[f"val_loss_{n}"] for n, w in zip(names, weights)))
    modes = ("R", "S") if cfg.mode_tokens else (None, None)
    out.update(paper_metrics(model, data, cfg, *modes))
    return out


def predict(model, data, cfg, args):
    """python train.py ul2 --out DIR --predict "[S] Return the" [beam=4 | sample] [temperature=0.8] [top_k=40]
    [max_new_tokens=128] [seed=0]       (options without leading dashes: train.py's parser owns --flags)
    The prompt is encoded as in training (mode token written literally, the one space after it dropped, EOS
    appended): "[S] text" continues
    the text, "[R] a <extra_id_0> c <extra_id_1>" fills the holes (the "filled" field)."""
    if not args or args[0].startswith("--"):
        raise ValueError('predict needs a prompt first, e.g. "[S] Return the number of" or "[R] The <extra_id_0> of"')
    opts = dict(beam=0, sample=False, temperature=1.0, top_k=0, max_new_tokens=128, seed=0)
    for a in args[1:]:
        key, _, val = a.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if key not in opts:
            raise ValueError(f"unknown predict option {a!r}; options: {', '.join(opts)} (e.g. beam=4)")
        try:
            opts[key] = True if key == "sample" and not val else type(opts[key])(val)
        except ValueError:
            raise ValueError(f"predict option {a!r} needs a {type(opts[key]).__name__}") from None
    tok, raw = data.tokenizer, _raw(model)
    raw.eval()
    dev = next(raw.parameters()).device
    ids = tok.encode(re.sub(r"^(\[[RXS]\]) ", r"\1", args[0]), eos=True)  # "[S] It" = [S] + "It" (no space)
    inputs = torch.tensor([ids], device=dev)
    result = {"prompt": args[0]}
    if opts["beam"] > 0:
        seqs, scores = raw.beam_search(inputs, opts["max_new_tokens"], num_beams=opts["beam"])
        out = seqs[0, 0].cpu()
        result["beams"] = [[tok.decode(s.cpu()), round(float(sc), 3)] for s, sc in zip(seqs[0], scores[0])]
    else:
        g = torch.Generator(device=dev).manual_seed(opts["seed"])
        out = raw.generate(inputs, opts["max_new_tokens"], temperature=opts["temperature"] if opts["sample"] else 0.0,
                           top_k=opts["top_k"], generator=g)[0].cpu()
    result["output"] = tok.decode(out)
    if any(_is_sentinel(t, tok) for t in ids):
        result["filled"] = tok.decode(fill_in(ids, out, tok))
    return result
