"""DSI: "Transformer Memory as a Differentiable Search Index" (Tay et al., NeurIPS 2022),
https://arxiv.org/abs/2202.06991, and DSI++: "DSI++: Updating Transformer Memory with New Documents"
(Mehta et al., EMNLP 2023), https://arxiv.org/abs/2212.09744

The key trick: one seq2seq Transformer *is* the search index. It is trained on two tasks at once,

    indexing    "index: " + the first L tokens of document d   ->  docid(d)
    retrieval   "query: " + a query about d                    ->  docid(d)

mixed r : 1 (r = 32 in the paper), and at test time it *generates* docids for a query: beam search over
the prefix trie of valid docids gives a ranked list, scored by Hits@1 / Hits@10. Three kinds of docid:
  atomic     one new output row per document; logits = [W_tokens; W_docs]^T h; retrieval is one decoder
             step and a sort of the document logits
  naive      an arbitrary unique integer written as digit tokens, e.g. "217" + eos
  semantic   recursive k-means (k = 10) of document embeddings; a cluster of more than c documents is
             clustered again; docid = the cluster digits along the path + the index in the leaf. Here the
             embedding is TF-IDF + LSA (truncated SVD, 64 dims) computed in numpy on the indexed corpus:
             the paper's 8-layer BERT is not available offline, and LSA gives dense vectors whose cosine
             follows shared vocabulary (topics) rather than the rare document-unique words.
DSI++ (continual indexing): after D0 (indexing + retrieval), new corpora D1..DK arrive without queries
and are indexed one after the other (Config.stage = t). Forgetting is measured by the matrix P[t, o]
(Hits on corpus o after stage t), A_n, F_n, LA_n and per-document forgetting events; two mitigations:
sharpness-aware minimisation (train.py --sam RHO) and a generative memory: a doc -> query generator
trained on D0 (`--task qgen`) samples pseudo-queries for the new documents and replays pseudo-queries
for the old ones (fractions mem_new, mem_old of every batch). BM25 (Okapi, k1 = 1.2, b = 0.75, numpy)
is evaluated on the same documents and queries, so every evaluation prints DSI and BM25 side by side.

The encoder-decoder is T5 v1.1 (pre-RMSNorm, relative position buckets, gated-GELU, no biases), the same
classes and names as ul2.py.

Train:  python train.py dsi                                   (embedded corpus, 300 documents, ~5 min on a CPU)
        python train.py dsi --data my_corpus.jsonl            (documents + queries, see data.py)
        python train.py dsi --init out/dsi-0-corpus --predict "some query"      (top-10 of DSI and BM25)
DSI++:  python train.py dsi --task qgen --out out/qgen        (the query generator, on D0)
        python train.py dsi --stage 1 --init out/dsi-0-corpus [--sam 0.05] [--qgen out/qgen]
        python experiments/dsi_continual.py --continual 3     (all arms, the P matrices, A/F/LA, updates)
"""

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, EOS = 0, 1  # T5 convention (also the project's ByteTokenizer); the decoder starts from PAD


@dataclass
class Config:
    # the T5 v1.1 encoder-decoder (ul2.py's fields)
    vocab_size: int = 390            # the byte tokenizer: 3 specials + 256 bytes + 3 mode tokens + 128 sentinels
    d_model: int = 64
    d_kv: int = 16                   # per-head size, its own hyper-parameter in T5
    d_ff: int = 192                  # gated: wi_0, wi_1 (d_model -> d_ff), wo (d_ff -> d_model)
    num_heads: int = 4
    num_layers: int = 2              # encoder blocks
    num_decoder_layers: int = 2
    num_buckets: int = 32            # relative position buckets
    max_distance: int = 128          # beyond this distance all offsets share the last bucket
    dropout: float = 0.0
    ln_eps: float = 1e-6
    activation: str = "gelu_tanh"    # "gelu_tanh" (T5 v1.1 gated-gelu) | "silu" (UL2-20B gated-silu)
    tie_embeddings: bool = False     # output head = the shared embedding (original T5)
    scale_logits: bool = False       # decoder output * d_model^-0.5 before the head (original T5, with tying)
    # DSI
    task: str = "dsi"                # "dsi" | "qgen" (the DSI++ query generator: document -> query)
    docid: str = "semantic"          # "atomic" | "naive" | "semantic"
    num_docs: int = 1024             # atomic docids: output rows (>= documents in the corpus)
    k: int = 10                      # semantic docids: clusters per level
    c: int = 10                      # semantic docids: most documents in a leaf (paper 100, scaled to N = 300)
    doc_len: int = 64                # L: tokens (bytes) of a document for indexing (direct indexing)
    query_len: int = 64              # most tokens of a query
    ratio: float = 1.0               # r: indexing examples per retrieval example (paper: 32; 1 is best at this size)
    beam: int = 10                   # beam size of the trie-constrained search (>= 10 for Hits@10)
    # DSI++
    stage: int = 0                   # 0: train on D0; t >= 1: index the new corpus D_t (continual)
    retrain: bool = False            # stage t from scratch on D0..D_t (the upper bound)
    qgen: str = ""                   # checkpoint of a --task qgen run: enables the generative memory
    mem_new: float = 0.33            # fraction of a continual batch: pseudo-queries for D_t documents
    mem_old: float = 0.33            # ... replayed pseudo-queries for D_0..D_{t-1} documents
    qgen_top_k: int = 10             # sampling of pseudo-queries: top-k


# train.py's defaults for this file (see the README for what they reach)
TRAIN = dict(steps=2000, batch_size=32, lr=2e-3, warmup=100, weight_decay=0.01, eval_every=500)
DATA = "corpus"

_T5 = dict(vocab_size=32128, d_kv=64, activation="gelu_tanh")
# name -> Config overrides: the T5 v1.1 sizes (google/t5-v1_1-*, as ul2.py) that DSI starts from (the paper:
# Base 0.2B, Large 0.8B, XL 3B, XXL 11B), and two CPU sizes ("tiny" = the defaults)
PRESETS = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=192, num_heads=4, num_layers=2, num_decoder_layers=2),
    "mini": dict(d_model=128, d_kv=32, d_ff=384, num_heads=4, num_layers=3, num_decoder_layers=3),
    "small": dict(_T5, d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "base": dict(_T5, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "large": dict(_T5, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "xl": dict(_T5, d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "xxl": dict(_T5, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


# ----------------------------------------------------------------------------------------------------------------
# The T5 v1.1 encoder-decoder (ul2.py's classes, copied; DSI adds two things to Model, marked DSI)

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
    Id 0 is padding (masked in the encoder) and the decoder's start token; 1 is EOS.
    DSI (the lines marked DSI, the rest is ul2.py's Model): atomic docids add one output row per document,
    logits (B, T, V + num_docs); the generative memory holds a frozen query generator `qgen`."""

    def __init__(self, cfg: Config):
        super().__init__()
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_buckets"):
            if getattr(cfg, f) < 1:
                raise ValueError(f"{f} must be positive, got {getattr(cfg, f)}")
        if cfg.num_buckets < 4 or cfg.max_distance <= cfg.num_buckets // 4:
            raise ValueError(f"need num_buckets >= 4 and max_distance > num_buckets/4, got {cfg.num_buckets}, {cfg.max_distance}")
        if not 0 <= cfg.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
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
        _check_dsi(cfg)  # DSI
        self.docid_embed = None  # DSI: atomic docids, W_docs: one extra output row per document
        if cfg.task == "dsi" and cfg.docid == "atomic":
            self.docid_embed = nn.Parameter(torch.randn(cfg.num_docs, cfg.d_model) * cfg.d_model ** -0.5)
        self.qgen = None  # DSI++: the generative memory, a frozen doc -> query generator (setup() loads it)
        if cfg.qgen:
            self.qgen = Model(replace(cfg, task="qgen", qgen=""))
            self.qgen.requires_grad_(False)

    def encode(self, input_ids):  # (B, S) -> encoder output (B, S, D), mask (B, S)
        mask = input_ids != PAD
        return self.encoder(self.shared(input_ids), mask), mask

    def decode(self, decoder_input_ids, enc, enc_mask, cache=None):  # (B, T) -> logits (B, T, V)
        h = self.decoder(self.shared(decoder_input_ids), source=enc, source_mask=enc_mask, cache=cache)  # (B, T, D)
        if self.cfg.scale_logits:
            h = h * self.cfg.d_model ** -0.5
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.shared.weight)
        if self.docid_embed is not None:  # DSI atomic: logits = [W_tokens; W_docs]^T h
            logits = torch.cat([logits, F.linear(h, self.docid_embed)], dim=-1)  # (B, T, V + num_docs)
        return logits

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
# Docids

def _check_dsi(cfg):
    """The DSI fields of Config (the T5 fields are checked by the copied classes)."""
    if cfg.task not in ("dsi", "qgen"):
        raise ValueError(f"unknown task {cfg.task!r}: use 'dsi' or 'qgen'")
    if cfg.docid not in ("atomic", "naive", "semantic"):
        raise ValueError(f"unknown docid {cfg.docid!r}: use 'atomic', 'naive' or 'semantic'")
    if cfg.k < 2 or cfg.c < 1:
        raise ValueError(f"semantic docids need k >= 2 and c >= 1, got k={cfg.k}, c={cfg.c}")
    if cfg.stage < 0 or cfg.ratio < 0 or cfg.beam < 1 or cfg.num_docs < 1:
        raise ValueError(f"need stage >= 0, ratio >= 0, beam >= 1, num_docs >= 1; got {cfg.stage}, {cfg.ratio}, "
                         f"{cfg.beam}, {cfg.num_docs}")
    if cfg.mem_new < 0 or cfg.mem_old < 0 or cfg.mem_new + cfg.mem_old >= 1:
        raise ValueError(f"mem_new + mem_old must be in [0, 1) (the rest of a batch indexes D_t), got "
                         f"{cfg.mem_new} + {cfg.mem_old}")
    if cfg.qgen and cfg.task != "dsi":
        raise ValueError("--qgen (the generative memory) is for --task dsi")


def tfidf_lsa(texts, dims=64, fit=None, seed=0):
    """Document embeddings for semantic docids: TF-IDF (sublinear tf, smooth idf, l2 rows) of the
    lower-cased words, projected on the top `dims` right singular vectors (LSA), rows l2-normalised.
    `fit`: the (vocab, idf, basis) of an earlier call, to embed new documents in the same space.
    Returns (embeddings (N, dims), fit)."""
    docs = [_words(t) for t in texts]
    if fit is None:
        vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
        df = np.zeros(len(vocab))
        for d in docs:
            for w in set(d):
                df[vocab[w]] += 1
        idf = np.log((1 + len(docs)) / (1 + df)) + 1
    else:
        vocab, idf, basis = fit
    X = np.zeros((len(docs), len(vocab)))
    for i, d in enumerate(docs):
        for w in d:
            if w in vocab:
                X[i, vocab[w]] += 1
    X = np.where(X > 0, 1 + np.log(np.maximum(X, 1)), 0) * idf
    X /= np.linalg.norm(X, axis=1, keepdims=True) + 1e-12
    if fit is None:
        _, _, vt = np.linalg.svd(X, full_matrices=False)
        basis = vt[:dims].T  # (V, dims)
    Z = X @ basis
    return Z / (np.linalg.norm(Z, axis=1, keepdims=True) + 1e-12), (vocab, idf, basis)


def kmeans(X, k, seed=0, iters=30):
    """Lloyd's k-means with k-means++ seeding (numpy). Returns labels (N,) in 0..k-1, centroids (k, D)."""
    rng = np.random.RandomState(seed)
    C = [X[rng.randint(len(X))]]
    for _ in range(1, k):
        d2 = np.min(((X[:, None] - np.array(C)[None]) ** 2).sum(-1), axis=1)
        C.append(X[rng.choice(len(X), p=d2 / d2.sum())] if d2.sum() > 0 else X[rng.randint(len(X))])
    C = np.array(C)
    for _ in range(iters):
        labels = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)
        new = np.array([X[labels == j].mean(0) if (labels == j).any() else C[j] for j in range(k)])
        if np.allclose(new, C):
            break
        C = new
    return ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1), C


def semantic_docids(X, k=10, c=10, seed=0):
    """The paper's hierarchical clustering: k-means (k) on the embeddings X (N, D); a cluster with more
    than c documents is clustered again, a cluster with at most c numbers its members 0..size-1 (fixed
    width). Returns (docids: list of digit strings, tree) where tree records the centroids of every
    level, for placing new documents (`place_semantic`)."""
    width = len(str(k - 1))
    leaf_width = len(str(max(c - 1, 0)))
    ids = [""] * len(X)

    def split(idx, prefix, depth):
        if len(idx) <= c:
            for j, i in enumerate(idx):
                ids[i] = prefix + str(j).zfill(leaf_width)
            return {"leaf": len(idx)}
        labels, C = kmeans(X[idx], min(k, len(idx)), seed=seed + depth)
        used = [j for j in range(len(C)) if (labels == j).any()]
        if len(used) == 1:  # identical embeddings: split in order instead
            labels, used = np.arange(len(idx)) * k // len(idx), list(range(k))
            C = np.array([X[idx][labels == j].mean(0) for j in used])
        else:
            C = C[used]
        node = {"centroids": C, "children": []}
        for new_j, j in enumerate(used):
            node["children"].append(split(idx[labels == j], prefix + str(new_j).zfill(width), depth + 1))
        return node

    tree = split(np.arange(len(X)), "", 0)
    return ids, {"root": tree, "width": width, "leaf_width": leaf_width}


def place_semantic(x, tree):
    """DSI++ with semantic ids: a new document follows the nearest centroid down to a leaf and takes
    the next free index there (the leaf may grow past c; eos still ends every docid)."""
    node, prefix = tree["root"], ""
    while "leaf" not in node:
        j = int(((node["centroids"] - x[None]) ** 2).sum(-1).argmin())
        prefix += str(j).zfill(tree["width"])
        node = node["children"][j]
    j = node["leaf"]
    node["leaf"] += 1
    return prefix + str(j).zfill(tree["leaf_width"])


def docid_strings(data, cfg):
    """Docid text of every document of the corpus (naive or semantic). Built on D0 (clustering) and
    extended corpus by corpus, so a document's id is the same at every DSI++ stage."""
    n = len(data.docs)
    if cfg.docid == "naive":  # a fixed random permutation of 0..N-1
        return [str(i) for i in np.random.RandomState(0).permutation(n)]
    order = sorted(range(n), key=lambda i: data.docs[i]["corpus"])
    d0 = [i for i in order if data.docs[i]["corpus"] == 0]
    X0, fit = tfidf_lsa([data.docs[i]["text"] for i in d0])
    ids0, tree = semantic_docids(X0, cfg.k, cfg.c)
    out = [None] * n
    for i, s in zip(d0, ids0):
        out[i] = s
    rest = [i for i in order if data.docs[i]["corpus"] > 0]
    if rest:
        Xr, _ = tfidf_lsa([data.docs[i]["text"] for i in rest], fit=fit)
        for i, x in zip(rest, Xr):
            out[i] = place_semantic(x, tree)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Trie-constrained beam search

def build_trie(sequences):
    """Prefix trie of token sequences (each ends with eos): nested dicts token -> child; the node after
    the last token holds {None: index of the sequence}."""
    root = {}
    for n, seq in enumerate(sequences):
        node = root
        for t in seq:
            node = node.setdefault(t, {})
        if None in node:
            raise ValueError(f"duplicate docid sequence {seq}")
        node[None] = n
    return root


def trie_processor(trie):
    """logits_processor for Model.generate / Model.beam_search: after a prefix in the trie only its
    children are allowed (every other token -inf), so a finished hypothesis is always a valid docid.
    Rows whose prefix is not in the trie (finished beams, dead beams of score -inf) are left alone."""
    def process(prefix, logits):  # prefix (N, t) without the start token, logits (N, V)
        allowed = torch.full_like(logits, float("-inf"))
        rows, cols = [], []
        for n, seq in enumerate(prefix.tolist()):
            node = trie
            for t in seq:
                node = node.get(t) if node is not None else None
            if node is None or not any(t is not None for t in node):
                allowed[n] = 0.0
                continue
            toks = [t for t in node if t is not None]
            rows += [n] * len(toks)
            cols += toks
        allowed[rows, cols] = 0.0
        return logits + allowed
    return process


def trie_lookup(trie, seq):
    """The sequence index of a generated docid (ids, eos then pads), or None if it is not complete."""
    node = trie
    for t in seq:
        node = node.get(t)
        if node is None:
            return None
        if t == EOS:
            return node.get(None)
    return None


def _depth(trie):
    return 0 if not trie else max(0 if t is None else 1 + _depth(c) for t, c in trie.items())


@torch.no_grad()
def constrained_beam_search(model, input_ids, trie, beam=10):
    """Model.beam_search restricted to the trie of docids (eos-terminated): per input row a list of
    (sequence index, score), best first, at most `beam`, every one a valid docid. The score is the sum of
    the per-step log-probabilities renormalised over the allowed tokens (ul2's beam_search applies the
    mask before its log-softmax)."""
    seqs, scores = _unwrap(model).beam_search(input_ids, max_new_tokens=_depth(trie), num_beams=beam,
                                              logits_processor=trie_processor(trie))  # (B, K, T), (B, K)
    out = []
    for row, sc in zip(seqs.tolist(), scores.tolist()):
        hyps = [(trie_lookup(trie, s), v) for s, v in zip(row, sc)]
        out.append([(j, v) for j, v in hyps if j is not None and v > float("-inf")])
    return out


# ----------------------------------------------------------------------------------------------------------------
# BM25 (the baseline)

def _words(text):
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a list of texts (lower-cased \\w+ words):
        score(q, d) = sum_{t in q} IDF(t) * tf(t,d) (k1 + 1) / (tf(t,d) + k1 (1 - b + b |d| / avgdl))
        IDF(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))      (non-negative; n_t = documents containing t)
    k1 = 1.2, b = 0.75 (the textbook values; the DSI paper used gensim's k1 = 1.5). Postings in numpy."""

    def __init__(self, texts, k1=1.2, b=0.75):
        self.k1, self.b, self.N = k1, b, len(texts)
        docs = [_words(t) for t in texts]
        self.len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = self.len.mean() if self.N else 0.0
        postings = {}
        for i, d in enumerate(docs):
            for w, tf in zip(*np.unique(d, return_counts=True)) if d else ():
                postings.setdefault(w, ([], []))
                postings[w][0].append(i), postings[w][1].append(tf)
        self.postings = {w: (np.array(ix), np.array(tf, dtype=np.float64)) for w, (ix, tf) in postings.items()}

    def idf(self, word):
        n = len(self.postings[word][0]) if word in self.postings else 0
        return math.log(1 + (self.N - n + 0.5) / (n + 0.5))

    def scores(self, query):  # -> (N,) scores of every document
        out = np.zeros(self.N)
        for w in _words(query):  # a repeated query word counts again, as in gensim
            if w in self.postings:
                ix, tf = self.postings[w]
                norm = self.k1 * (1 - self.b + self.b * self.len[ix] / self.avgdl)
                out[ix] += self.idf(w) * tf * (self.k1 + 1) / (tf + norm)
        return out

    def rank(self, query, n=10):  # -> indices of the n best documents (ties: lower index first)
        s = self.scores(query)
        return [int(i) for i in np.argsort(-s, kind="stable")[:n]]


def hits(ranked, gold, n):
    """Hits@n: 1.0 if the gold document is among the first n of the ranking."""
    return float(gold in list(ranked)[:n])


# ----------------------------------------------------------------------------------------------------------------
# The examples

PREFIX = {"index": "index: ", "query": "query: "}  # the task prompts (T5 style)
_CACHE = {}


def prepare(data, cfg):
    """Token ids of every example the file needs, and the docid machinery; cached per (data, docid
    settings). Documents and queries are lower-cased (as the paper); documents are cut to doc_len
    tokens after the prompt (direct indexing)."""
    key = (id(data), cfg.task, cfg.docid, cfg.k, cfg.c, cfg.doc_len, cfg.query_len)
    if key in _CACHE and _CACHE[key]["data"] is data:
        return _CACHE[key]
    tok = data.tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the data's tokenizer has {tok.vocab_size} ids, the model's vocab_size is {cfg.vocab_size}")
    n = len(data.docs)
    if cfg.task == "dsi" and cfg.docid == "atomic" and n > cfg.num_docs:
        raise ValueError(f"atomic docids: the corpus has {n} documents but the model {cfg.num_docs} rows; pass --num_docs {n}")
    prompt = tok.encode(PREFIX["index"])
    doc_in = [prompt + tok.encode(d["text"].lower(), specials=False)[:cfg.doc_len] + [tok.eos] for d in data.docs]
    q_in = [tok.encode(PREFIX["query"]) + tok.encode(q["text"].lower(), specials=False)[:cfg.query_len] + [tok.eos]
            for q in data.queries]
    q_out = [tok.encode(q["text"].lower(), specials=False)[:cfg.query_len] + [tok.eos] for q in data.queries]
    if cfg.docid == "atomic":
        strings = [str(i) for i in range(n)]
        targets = [[cfg.vocab_size + i] for i in range(n)]  # one step: the document's own output row
    else:
        strings = docid_strings(data, cfg)
        targets = [tok.encode(s, specials=False) + [tok.eos] for s in strings]
    corpus = np.array([d["corpus"] for d in data.docs])
    p = {"data": data, "doc_in": doc_in, "q_in": q_in, "q_out": q_out, "docid": strings, "target": targets,
         "corpus": corpus, "prefix_query": tok.encode(PREFIX["query"]),
         "train_q": [i for i, q in enumerate(data.queries) if q["split"] == "train" and data.docs[q["doc"]]["corpus"] == 0],
         "test_q": [i for i, q in enumerate(data.queries) if q["split"] == "test"]}
    _CACHE.clear()  # one corpus at a time
    _CACHE[key] = p
    return p


def _pad(rows, length=None):
    length = length or max(len(r) for r in rows)
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r[:length], dtype=torch.long)
    return out


def _batch(inputs, targets, pseudo=None):
    """Encoder ids (B, S); decoder inputs = targets shifted right after the start id 0; labels with
    -100 on padding; `pseudo` (B,) marks rows whose query the generative memory samples in loss()."""
    labels = _pad(targets)
    labels[labels == 0] = -100
    dec = torch.cat([torch.zeros(len(targets), 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    b = {"input_ids": _pad(inputs), "decoder_input_ids": dec, "labels": labels}
    if pseudo is not None:
        b["pseudo"] = torch.tensor(pseudo, dtype=torch.bool)
    return b


def _check_stage(data, cfg):
    K = 1 + int(max(d["corpus"] for d in data.docs))
    if cfg.stage >= K:
        raise ValueError(f"stage {cfg.stage} asked, but the corpus has D0..D{K - 1}")


def batches(data, cfg, split, batch_size, step=0, seed=0):
    """train: endless; the batch of step s is drawn with numpy seeded by (seed, s).
    task dsi, stage 0 (or retrain): indexing of D0 (.. D_stage) and retrieval with D0's training queries,
      r : 1 per batch (ratio); stage t >= 1: indexing of D_t, plus (with --qgen) pseudo-query rows for D_t
      (mem_new) and for D_0..D_{t-1} (mem_old), their queries sampled in loss().
    task qgen: D0's (document -> training query) pairs.
    other splits: one pass over the indexed documents (indexing)."""
    _check_stage(data, cfg)
    p = prepare(data, cfg)
    old = np.flatnonzero(p["corpus"] < cfg.stage)
    new = np.flatnonzero(p["corpus"] == cfg.stage)
    indexed = np.flatnonzero(p["corpus"] <= cfg.stage)
    if split != "train":
        for i in range(0, len(indexed), batch_size):
            ix = indexed[i:i + batch_size]
            yield _batch([p["doc_in"][j] for j in ix], [p["target"][j] for j in ix])
        return
    queries = p["train_q"]
    if cfg.task == "qgen" and not queries:
        raise ValueError("the query generator needs training queries of D0; this corpus has none")
    while True:
        rng = np.random.RandomState((seed * 1_000_003 + step) % 2 ** 32)
        if cfg.task == "qgen":
            qs = rng.choice(queries, batch_size)
            yield _batch([p["doc_in"][data.queries[q]["doc"]] for q in qs], [p["q_out"][q] for q in qs])
        elif cfg.stage == 0 or cfg.retrain:
            docs = indexed if cfg.retrain else new
            n_ret = int(round(batch_size / (cfg.ratio + 1))) if queries else 0
            n_ret = max(n_ret, 1) if queries and cfg.ratio < 1e9 else n_ret
            ix = rng.choice(docs, batch_size - n_ret)
            qs = rng.choice(queries, n_ret) if n_ret else []
            yield _batch([p["doc_in"][j] for j in ix] + [p["q_in"][q] for q in qs],
                         [p["target"][j] for j in ix] + [p["target"][data.queries[q]["doc"]] for q in qs])
        else:  # continual indexing of D_t: no queries, maybe the generative memory
            n_new = int(round(batch_size * cfg.mem_new)) if cfg.qgen else 0
            n_old = int(round(batch_size * cfg.mem_old)) if cfg.qgen else 0
            ix = list(rng.choice(new, batch_size - n_new - n_old))
            ps = list(rng.choice(new, n_new)) + (list(rng.choice(old, n_old)) if n_old else [])
            b = _batch([p["doc_in"][j] for j in ix + ps], [p["target"][j] for j in ix + ps],
                       pseudo=[False] * len(ix) + [True] * len(ps))
            b["seed"] = torch.full((batch_size,), (seed * 1_000_003 + step) % 2 ** 31, dtype=torch.long)
            b["prefix"] = p["prefix_query"]
            yield b
        step += 1


# ----------------------------------------------------------------------------------------------------------------
# Loss, generative memory

def _unwrap(model):
    """The Model behind a torch.compile / DDP wrapper (for encode/decode and the query generator)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def pseudo_queries(model, batch):
    """Generative memory (DSI++): replace the document input of every `pseudo` row by "query: " + a
    query the frozen generator samples for that document; the target stays the document's docid."""
    raw = _unwrap(model)
    if raw.qgen is None:
        raise ValueError("pseudo-query rows need the query generator: --qgen CKPT")
    rows = batch["pseudo"].nonzero()[:, 0]
    g = torch.Generator(device=batch["input_ids"].device).manual_seed(int(batch["seed"][0]))
    q = raw.qgen.generate(batch["input_ids"][rows], max_new_tokens=raw.cfg.query_len, temperature=1.0,
                          top_k=raw.cfg.qgen_top_k, generator=g)  # (P, T): sampled queries, PAD after EOS
    inputs = [r[r != 0].tolist() for r in batch["input_ids"]]
    for j, row in enumerate(rows.tolist()):
        ids = [t for t in q[j].tolist() if t != PAD]
        ids = ids[:ids.index(EOS)] if EOS in ids else ids  # cut at the first EOS (or at query_len)
        inputs[row] = list(batch["prefix"]) + ids + [EOS]
    return {**batch, "input_ids": _pad(inputs).to(batch["input_ids"].device)}


def loss(model, batch):
    if "pseudo" in batch and batch["pseudo"].any():
        batch = pseudo_queries(model, batch)
    logits = model(batch["input_ids"], batch["decoder_input_ids"])  # (B, T, V [+ N])
    labels = batch["labels"]  # (B, T), -100 on padding
    l = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    exact = ((logits.argmax(-1) == labels) | (labels == -100)).all(1).float().mean()  # whole docid right
    return l, {"acc": exact, "tokens": int((batch["input_ids"] != 0).sum() + (labels != -100).sum())}


def setup(model, cfg, load_checkpoint):
    """A fresh run with --qgen CKPT: load the frozen query generator (a `--task qgen` run of this file
    with the same architecture)."""
    if not cfg.qgen:
        return
    ckpt = load_checkpoint(cfg.qgen)
    c = ckpt["config"]
    if c.get("task") != "qgen":
        raise ValueError(f"--qgen {cfg.qgen} is not a query generator (task {c.get('task')!r}); train one with --task qgen")
    arch = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
            "num_buckets", "max_distance", "activation", "tie_embeddings", "scale_logits")
    diff = [f"{k} {c.get(k)} vs {getattr(cfg, k)}" for k in arch if c.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--qgen {cfg.qgen} has another architecture: {', '.join(diff)}")
    model.qgen.load_state_dict(ckpt["model"])


# ----------------------------------------------------------------------------------------------------------------
# Retrieval and evaluation

@torch.no_grad()
def retrieve(model, inputs, docs, p, cfg, beam=None, batch_size=200):
    """Ranked documents (indices into data.docs, best first, at most `beam`) for each encoder input,
    among the documents `docs`. Atomic: one decoder step, sort the document rows' logits; string
    docids: beam search constrained by the trie of the docids of `docs`."""
    raw = _unwrap(model)
    beam = beam or cfg.beam
    dev = next(raw.parameters()).device
    out = []
    docs = list(docs)
    trie = None if cfg.docid == "atomic" else build_trie([p["target"][d] for d in docs])
    for i in range(0, len(inputs), batch_size):
        x = _pad(inputs[i:i + batch_size]).to(dev)
        if cfg.docid == "atomic":
            enc, mask = raw.encode(x)
            start = torch.zeros(len(x), 1, dtype=torch.long, device=dev)
            rows = raw.decode(start, enc, mask)[:, 0, cfg.vocab_size:].float()  # (B, num_docs)
            top = rows[:, docs].topk(min(beam, len(docs)), dim=1).indices.tolist()
            out += [[docs[j] for j in r] for r in top]
        else:
            for hyps in constrained_beam_search(raw, x, trie, beam):
                out.append([docs[j] for j, _ in hyps])
    return out


@torch.no_grad()
def evaluate(model, data, cfg):
    """Hits@1 / Hits@10 of DSI and of BM25 on the test queries of every indexed corpus (D0..D_stage),
    split into lexical / paraphrased queries and documents with / without training queries; indexing
    accuracy (the docid from the document's own first L tokens, greedy) per corpus, and per document as
    lists (`index_correct_D0`, ..., for forgetting events). Prints the two systems side by side."""
    import sys
    if cfg.task == "qgen":
        return evaluate_qgen(model, data, cfg)
    _check_stage(data, cfg)
    p = prepare(data, cfg)
    indexed = [int(i) for i in np.flatnonzero(p["corpus"] <= cfg.stage)]
    qs = [q for q in p["test_q"] if p["corpus"][data.queries[q]["doc"]] <= cfg.stage]
    dsi = retrieve(model, [p["q_in"][q] for q in qs], indexed, p, cfg)
    bm25 = p.setdefault("bm25", {}).get(cfg.stage)
    if bm25 is None:
        bm25 = p["bm25"][cfg.stage] = BM25([data.docs[d]["text"] for d in indexed])
    ranked_bm25 = [[indexed[j] for j in bm25.rank(data.queries[q]["text"], max(10, cfg.beam))] for q in qs]
    groups = {}
    for q, r_dsi, r_bm25 in zip(qs, dsi, ranked_bm25):
        query = data.queries[q]
        doc = data.docs[query["doc"]]
        kind = "paraphrased" if query["paraphrased"] else "lexical"
        seen = "seen" if doc["train_queries"] else "zeroshot"
        names = ["all", kind, seen, f"{kind}_{seen}", f"D{doc['corpus']}"]
        for g in names:
            groups.setdefault(g, []).append([hits(r_dsi, query["doc"], 1), hits(r_dsi, query["doc"], 10),
                                             hits(r_bm25, query["doc"], 1), hits(r_bm25, query["doc"], 10)])
    res = {}
    for g, rows in groups.items():
        m = np.mean(rows, axis=0)
        sfx = "" if g == "all" else "_" + g
        res.update({f"hits1{sfx}": m[0], f"hits10{sfx}": m[1], f"bm25_hits1{sfx}": m[2], f"bm25_hits10{sfx}": m[3],
                    f"n{sfx}": len(rows)})
    top1 = retrieve(model, [p["doc_in"][d] for d in indexed], indexed, p, cfg, beam=1)
    correct = [float(bool(r) and r[0] == d) for r, d in zip(top1, indexed)]
    res["index_acc"] = float(np.mean(correct))
    for o in range(cfg.stage + 1):
        mine = [c for c, d in zip(correct, indexed) if p["corpus"][d] == o]
        res[f"index_acc_D{o}"] = float(np.mean(mine))
        res[f"index_correct_D{o}"] = mine  # per document of D_o (data.docs order): forgetting events
    lines = [f"{'queries':<20} {'n':>5}   DSI hits@1 hits@10   BM25 hits@1 hits@10"]
    for g in groups:
        sfx = "" if g == "all" else "_" + g
        lines.append(f"{g:<20} {res['n' + sfx]:>5}   {res['hits1' + sfx]:10.3f} {res['hits10' + sfx]:7.3f}"
                     f"   {res['bm25_hits1' + sfx]:11.3f} {res['bm25_hits10' + sfx]:7.3f}")
    print(f"\n[dsi eval, {cfg.docid} docids, stage {cfg.stage}] indexing accuracy {res['index_acc']:.3f}\n"
          + "\n".join(lines), file=sys.stderr, flush=True)
    return res


@torch.no_grad()
def evaluate_qgen(model, data, cfg):
    """Query generator: teacher-forced loss and token accuracy on D0's test (document, query) pairs."""
    p = prepare(data, cfg)
    qs = [q for q in p["test_q"] if p["corpus"][data.queries[q]["doc"]] == 0]
    raw = _unwrap(model)
    dev = next(raw.parameters()).device
    tot, correct, n = 0.0, 0, 0
    for i in range(0, len(qs), 200):
        part = qs[i:i + 200]
        b = _batch([p["doc_in"][data.queries[q]["doc"]] for q in part], [p["q_out"][q] for q in part])
        logits = raw(b["input_ids"].to(dev), b["decoder_input_ids"].to(dev)).float()
        labels = b["labels"].to(dev)
        tot += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        correct += ((logits.argmax(-1) == labels) & (labels != -100)).sum().item()
        n += (labels != -100).sum().item()
    return {"test_loss": tot / n, "token_acc": correct / n}


def predict(model, data, cfg, args):
    """--predict "query one" "query two": the top-10 documents of DSI and of BM25 for each query."""
    p = prepare(data, cfg)
    indexed = [int(i) for i in np.flatnonzero(p["corpus"] <= cfg.stage)]
    tok = data.tokenizer
    inputs = [tok.encode(PREFIX["query"]) + tok.encode(a.lower(), specials=False)[:cfg.query_len] + [tok.eos] for a in args]
    ranked = retrieve(model, inputs, indexed, p, cfg, beam=max(10, cfg.beam))
    bm25 = BM25([data.docs[d]["text"] for d in indexed])
    return {"results": [{"query": a, "dsi": [data.docs[d]["docid"] for d in r[:10]],
                         "bm25": [data.docs[indexed[j]]["docid"] for j in bm25.rank(a, 10)]}
                        for a, r in zip(args, ranked)]}


# ----------------------------------------------------------------------------------------------------------------
# DSI++ metrics

def continual_metrics(P):
    """P[t][o]: performance on corpus o after learning corpus t (t >= o; entries t < o are ignored).
        A_n  = mean_o P[n, o]                                        (average performance at the end)
        F_n  = mean_{o < n} ( max_{t' in o..n-1} P[t', o] - P[n, o] )  (forgetting: best ever minus final)
        LA_n = mean_o P[o, o]                                        (learning accuracy: right when learned)"""
    P = np.asarray(P, dtype=np.float64)
    n = len(P) - 1
    A = P[n, :n + 1].mean()
    F_ = np.mean([P[o:n, o].max() - P[n, o] for o in range(n)]) if n > 0 else 0.0
    LA = np.mean([P[o, o] for o in range(n + 1)])
    return {"A": float(A), "F": float(F_), "LA": float(LA)}


def forgetting_events(history):
    """history: per evaluation, the 0/1 correctness of each document (Toneva et al. 2019). A forgetting
    event is correct at one evaluation and wrong at the next. Returns (events per document (N,), the
    fraction of documents ever learned that were forgotten at least once)."""
    H = np.asarray(history, dtype=bool)  # (evals, N)
    events = (H[:-1] & ~H[1:]).sum(0) if len(H) > 1 else np.zeros(H.shape[1], dtype=int)
    learned = H.any(0)
    frac = float((events[learned] > 0).mean()) if learned.any() else 0.0
    return events, frac
