"""OWL-ViT: "Simple Open-Vocabulary Object Detection with Vision Transformers"
(Minderer et al., ECCV 2022), https://arxiv.org/abs/2205.06230

The key trick: take a contrastively pre-trained image-text model (CLIP), drop the image tower's pooling
and projection, and give EVERY output token i a box and a class prediction whose "class weights" are
text embeddings q_j of arbitrary query strings (or image embeddings: one-shot detection):

    t_i    = LN(t_i * t_cls)                                   merge each patch token with the class token
    e_i    = W t_i + b ;  s_ij = (e_i / |e_i|) . (q_j / |q_j|)  q_j = text_projection(text tower at EOS)
    logit_ij = (s_ij + shift(t_i)) * (ELU(scale(t_i)) + 1)      shift bias = log(p / (1 - p)), p = 0.01
    box_i  = sigmoid(MLP(t_i) + bias_i)  (cx, cy, w, h)         bias_i = logit of token i's grid corner, size 1/g

Stage 1 (`--stage pretrain`): symmetric InfoNCE between pooled image and text embeddings with a learned
temperature. Stage 2 (`--stage detect`): DETR's bipartite matching (Hungarian, cost = focal class cost +
L1 + (-GIoU)), sigmoid focal loss (alpha 0.3, gamma 2) over tokens x queries with sampled negative names,
L1 and GIoU on the matched boxes. Weights load from Hugging Face OWL-ViT folders (`from_hf`) with the same
logits and boxes as `transformers.OwlViTForObjectDetection`.

On `shapes` scenes (64 px, 1-4 objects named "red circle"): some names (`held_out`) never appear as
detection labels or queries in stage 2 (images holding them are dropped); stage 1 sees them in its
texts. `evaluate` reports COCO AP@0.5 and AP@[.5:.95] for seen and held-out names, text- and
image-conditioned.

Train:   python train.py owlvit --stage pretrain                              # stage 1, ~6 min on a CPU core
         python train.py owlvit --stage detect --init out/owlvit-pretrain-shapes/ckpt.pt   # stage 2, ~15 min
Detect:  python train.py owlvit --init out/owlvit-detect-shapes/ckpt.pt --predict shapes:3 "red circle" "blue square"
         (or a .png/.ppm path instead of shapes:3; options threshold=0.1 nms=0.5 out=PATH exemplar=IMAGE box=x0,y0,x1,y1)
"""

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    stage: str = "detect"        # "pretrain" (contrastive image-text) | "detect" (per-token heads)
    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    width: int = 64              # image tower D
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 256
    text_width: int = 64         # text tower
    text_depth: int = 2
    text_heads: int = 4
    text_mlp_dim: int = 256
    vocab_size: int = 390        # the byte tokenizer's default vocabulary (CLIP's BPE: 49408)
    max_len: int = 16            # text positions (OWL-ViT: 16); "purple crescent" + EOS fits exactly
    embed_dim: int = 64          # shared image-text space (HF projection_dim; the class head's output)
    ln_eps: float = 1e-5         # CLIP towers
    merge_ln_eps: float = 1e-5   # the merge LayerNorm: HF 1e-5, scenic (flax) 1e-6
    box_gelu: str = "exact"      # box head GELU: "exact" (HF) | "tanh" (scenic, flax nn.gelu)
    box_bias: bool = True        # add the token's grid-corner box bias before the sigmoid
    prior_prob: float = 0.01     # logit_shift bias = log(p / (1 - p))
    logit_scale_init: float = 2.6592  # stage 1: log(1 / 0.07), CLIP
    closed_vocab: bool = False   # baseline: one learned query per training name instead of the text tower
    num_names: int = 80          # closed_vocab: size of the name table (shapes: 8 colours x 10 shapes)
    held_out: str = ("blue triangle,green square,red star,yellow heart,purple circle,white cross,"
                     "orange ring,black diamond")  # never detection labels/queries in stage 2
    num_negatives: int = 50      # random absent names per image in the class loss (scenic: ~50)
    focal_alpha: float = 0.3
    focal_gamma: float = 2.0
    class_loss_coef: float = 1.0
    bbox_loss_coef: float = 1.0
    giou_loss_coef: float = 1.0
    text_lr_scale: float = 1.0   # stage 2: the text tower trains at lr * this (paper: 2e-6 / 5e-5 = 0.04)


DATA = "scenes"
TRAIN = dict(steps=1500, batch_size=64, lr=1e-3, warmup=100, weight_decay=0.05, eval_every=500)

# name -> Config overrides. OWL-ViT's CLIP backbones at the detection resolutions (B/32, B/16 at 768 px,
# L/14 at 840 px; CLIP's BPE vocabulary of 49408, 16 text positions); counted against HF on `meta`.
_CLIP_B = dict(width=768, depth=12, heads=12, mlp_dim=3072, text_width=512, text_depth=12, text_heads=8,
               text_mlp_dim=2048, embed_dim=512, vocab_size=49408, image_size=768)
PRESETS = {
    "mu": dict(width=32, depth=1, heads=2, mlp_dim=64, text_width=32, text_depth=1, text_heads=2,
               text_mlp_dim=64, embed_dim=32),
    "tiny": dict(),  # the CPU default: 64 px, D 64, 4 + 2 layers
    "b/32": dict(_CLIP_B, patch_size=32),
    "b/16": dict(_CLIP_B, patch_size=16),
    "l/14": dict(width=1024, depth=24, heads=16, mlp_dim=4096, text_width=768, text_depth=12, text_heads=12,
                 text_mlp_dim=3072, embed_dim=768, vocab_size=49408, image_size=840, patch_size=14),
}


# ----------------------------------------------------------------------------------------------------------------
# The CLIP towers

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # CLIP's GELU approximation


def attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(d) [+ causal mask]) v, per head; q, k, v: (B, h, T, d).
    SDPA everywhere but bf16 on the CPU, where the written-out ops are faster (see vit.py)."""
    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, T, T)
    if causal:
        T = q.shape[-2]
        a = a.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return a.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention: fused q,k,v projection (rows [q; k; v]), output projection."""

    def __init__(self, dim, heads, depth):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.normal_(self.qkv.weight, std=dim ** -0.5 * (2 * depth) ** -0.5)  # CLIP / HF init
        nn.init.normal_(self.proj.weight, std=dim ** -0.5)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, causal=False):  # x: (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
        x = attention(q, k, v, causal)  # (B, h, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    """Dense(M) -> quick-GELU -> Dense(D)."""

    def __init__(self, dim, mlp_dim, depth):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        nn.init.normal_(self.fc1.weight, std=(2 * dim) ** -0.5)
        nn.init.normal_(self.fc2.weight, std=dim ** -0.5 * (2 * depth) ** -0.5)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):  # x: (B, T, D)
        return self.fc2(quick_gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'."""

    def __init__(self, dim, heads, mlp_dim, depth, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, depth)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, depth)

    def forward(self, x, causal=False):  # x: (B, T, D)
        x = x + self.attn(self.norm1(x), causal)
        return x + self.mlp(self.norm2(x))


class ImageTower(nn.Module):
    """CLIP ViT: bias-free conv patchify, class embedding, positions, ln_pre, blocks, ln_post on ALL tokens."""

    def __init__(self, cfg):
        super().__init__()
        D, P, g = cfg.width, cfg.patch_size, cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.channels, D, kernel_size=P, stride=P, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * D ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g + 1, D) * 0.02)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        self.ln_pre = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_dim, cfg.depth, cfg.ln_eps) for _ in range(cfg.depth)])
        self.ln_post = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, images):  # images: (B, C, H, W)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)  # (B, 1+N, D)


class TextTower(nn.Module):
    """CLIP text Transformer: token + position embeddings, causal blocks, ln_final, pooled at the EOS
    = the last non-pad token (pad id 0; HF pools at argmax(ids), CLIP's EOS being its highest id)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.text_width
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_len, D) * 0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(D, cfg.text_heads, cfg.text_mlp_dim, cfg.text_depth, cfg.ln_eps)
                                     for _ in range(cfg.text_depth)])
        self.ln_final = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, ids):  # ids: (T, L) int, 0-padded
        x = self.token_embed(ids) + self.pos_embed[:, :ids.shape[1]]  # (T, L, D)
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        eos = ((ids != 0).sum(1) - 1).clamp(min=0)  # (T,) position of the last non-pad token
        return x[torch.arange(len(x), device=x.device), eos]  # (T, D)


# ----------------------------------------------------------------------------------------------------------------
# The detection heads

class ClassHead(nn.Module):
    """e_i = dense0(t_i); logit_ij = (cos(e_i, q_j) + shift_i) * (ELU(scale_i) + 1); padded queries -1e6."""

    def __init__(self, cfg):
        super().__init__()
        self.dense0 = nn.Linear(cfg.width, cfg.embed_dim)
        self.logit_shift = nn.Linear(cfg.width, 1)
        self.logit_scale = nn.Linear(cfg.width, 1)
        nn.init.normal_(self.dense0.weight, std=1e-6)  # scenic ClassPredictor
        nn.init.zeros_(self.dense0.bias)
        for lin in (self.logit_shift, self.logit_scale):  # flax default: lecun normal
            nn.init.normal_(lin.weight, std=cfg.width ** -0.5)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.logit_shift.bias, math.log(cfg.prior_prob / (1 - cfg.prior_prob)))

    def forward(self, t, query_embeds, query_mask):  # t: (B, N, D); query_embeds: (Q, E) or (B, Q, E); mask likewise
        e = self.dense0(t)  # (B, N, E)
        e = e / (e.norm(dim=-1, keepdim=True) + 1e-6)
        q = query_embeds / (query_embeds.norm(dim=-1, keepdim=True) + 1e-6)
        s = e @ q.transpose(-1, -2)  # (B, N, Q)
        logits = (s + self.logit_shift(t)) * (F.elu(self.logit_scale(t)) + 1)  # (B, N, Q)
        return logits.masked_fill(~query_mask.unsqueeze(-2), -1e6)


class BoxHead(nn.Module):
    """3-layer MLP D -> D -> D -> 4 with GELU; the last layer zero-init (scenic PredictorMLP)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense0 = nn.Linear(cfg.width, cfg.width)
        self.dense1 = nn.Linear(cfg.width, cfg.width)
        self.dense2 = nn.Linear(cfg.width, 4)
        self.approximate = {"exact": "none", "tanh": "tanh"}[cfg.box_gelu]
        nn.init.zeros_(self.dense2.weight)
        nn.init.zeros_(self.dense2.bias)

    def forward(self, t):  # t: (B, N, D)
        x = F.gelu(self.dense0(t), approximate=self.approximate)
        x = F.gelu(self.dense1(x), approximate=self.approximate)
        return self.dense2(x)  # (B, N, 4)


def box_bias(g):
    """(g*g, 4): logit of each token's grid corner (c/g, r/g), 1-based column c and row r, and of the
    patch size 1/g; logit(x) = log(x + 1e-4) - log(1 - x + 1e-4)."""
    c = torch.arange(1, g + 1, dtype=torch.float32) / g
    y, x = torch.meshgrid(c, c, indexing="ij")  # (g, g) each, row-major tokens
    xy = torch.stack([x.flatten(), y.flatten()], dim=1).clamp(0, 1)  # (N, 2)
    wh = torch.full_like(xy, 1.0 / g)
    logit = lambda z: torch.log(z + 1e-4) - torch.log1p(-z + 1e-4)
    return torch.cat([logit(xy), logit(wh)], dim=1)  # (N, 4)


class Model(nn.Module):
    """stage "pretrain": (images, texts) -> {"logits_per_image" (B, T)}.
    stage "detect": (images, queries) -> {"logits" (B, N, Q), "boxes" (B, N, 4) cx,cy,w,h in [0, 1],
    "class_embeds" (B, N, E)}. queries: token ids (Q, L) or (B, Q, L) (0-padded; an all-pad query is
    masked), or name indices (Q,) / (B, Q) with closed_vocab (-1 = padding); or pass query_embeds (Q, E)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.stage not in ("pretrain", "detect"):
            raise ValueError(f"unknown stage {cfg.stage!r}: use 'pretrain' or 'detect'")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads or cfg.text_width % cfg.text_heads:
            raise ValueError(f"width {cfg.width} / text_width {cfg.text_width} not divisible by heads "
                             f"{cfg.heads} / text_heads {cfg.text_heads}")
        if cfg.box_gelu not in ("exact", "tanh"):
            raise ValueError(f"unknown box_gelu {cfg.box_gelu!r}: use 'exact' or 'tanh'")
        if cfg.closed_vocab and cfg.stage != "detect":
            raise ValueError("closed_vocab is a detection baseline: use it with --stage detect")
        self.cfg = cfg
        self.vision = ImageTower(cfg)
        if not cfg.closed_vocab:
            self.text = TextTower(cfg)
            self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=cfg.text_width ** -0.5)
        if cfg.stage == "pretrain":  # CLIP's pooled image embedding and temperature: stage 1 only
            self.visual_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
            nn.init.normal_(self.visual_projection.weight, std=cfg.width ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
            return
        self.merge_norm = nn.LayerNorm(cfg.width, eps=cfg.merge_ln_eps)  # HF "layer_norm"
        self.class_head = ClassHead(cfg)
        self.box_head = BoxHead(cfg)
        g = cfg.image_size // cfg.patch_size
        self.register_buffer("box_bias", box_bias(g) if cfg.box_bias else torch.zeros(g * g, 4), persistent=False)
        if cfg.closed_vocab:
            self.name_embed = nn.Parameter(torch.randn(cfg.num_names, cfg.embed_dim) * 0.02)
        elif cfg.text_lr_scale != 1.0:
            for p in itertools.chain(self.text.parameters(), self.text_projection.parameters()):
                p.lr_scale = cfg.text_lr_scale

    def embed_text(self, ids):  # ids: (..., L) -> (..., E) text embeddings (not normalised)
        return self.text_projection(self.text(ids.reshape(-1, ids.shape[-1]))).view(*ids.shape[:-1], -1)

    def image_tokens(self, images):  # images: (B, C, H, W) -> merged patch tokens t_i (B, N, D)
        x = self.vision(images)  # (B, 1+N, D)
        return self.merge_norm(x[:, 1:] * x[:, :1])  # (B, N, D): LN(t_i * t_cls), class token dropped

    def embed_queries(self, queries):
        """token ids (..., L) or (closed_vocab) name indices (...) -> embeddings (..., E), mask (...)."""
        if self.cfg.closed_vocab:
            return self.name_embed[queries.clamp(min=0)], queries >= 0
        return self.embed_text(queries), queries[..., 0] > 0

    def forward(self, images, queries=None, query_embeds=None):
        if self.cfg.stage == "pretrain":
            x = self.vision(images)[:, 0]  # (B, D) the class token after ln_post
            img = F.normalize(self.visual_projection(x), dim=-1)  # (B, E)
            txt = F.normalize(self.embed_text(queries), dim=-1)  # (T, E)
            return {"logits_per_image": self.logit_scale.exp().clamp(max=100) * img @ txt.T}  # (B, T)
        t = self.image_tokens(images)  # (B, N, D)
        boxes = torch.sigmoid(self.box_head(t) + self.box_bias)  # (B, N, 4)
        if query_embeds is None:
            query_embeds, mask = self.embed_queries(queries)
        else:
            mask = torch.ones(query_embeds.shape[:-1], dtype=torch.bool, device=query_embeds.device)
        logits = self.class_head(t, query_embeds, mask)  # (B, N, Q)
        return {"logits": logits, "boxes": boxes, "class_embeds": self.class_head.dense0(t)}


def adapt_state_dict(state_dict, cfg):
    """--init: a stage-1 checkpoint into a detector drops the CLIP temperature and pooled projection
    (the detection heads start afresh); everything else is copied by name."""
    if cfg.stage == "detect":
        return {k: v for k, v in state_dict.items() if k not in ("logit_scale", "visual_projection.weight")}
    return dict(state_dict)


# ----------------------------------------------------------------------------------------------------------------
# Boxes, matching and losses

def cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a, b):
    """a (n, 4), b (m, 4) xyxy -> IoU (n, m), union (n, m)."""
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (n, m)
    union = area(a)[:, None] + area(b)[None] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a, b):
    """GIoU = IoU - (hull - union) / hull; a (n, 4), b (m, 4) xyxy -> (n, m)."""
    iou, union = box_iou(a, b)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def hungarian(cost):
    """Minimum-cost assignment of a (n, m) cost matrix (Kuhn-Munkres with potentials, O(n^2 m), the
    shortest-augmenting-path form of Jonker-Volgenant). Returns (rows, cols): min(n, m) pairs, rows sorted."""
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # row / column potentials (index 0 is a sentinel)
    match = np.zeros(m + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:  # grow a tree of tight edges until it reaches a free column
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            j1 = 1 + int(np.argmin(np.where(free, minv[1:], np.inf)))
            delta = minv[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # augment along the alternating path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = np.flatnonzero(match[1:])
    rows = match[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def focal_loss(logits, targets, alpha, gamma):
    """Sigmoid focal loss (Lin et al. 2017), elementwise: CE * (1 - p_t)^gamma * alpha_t."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


def match(logits, boxes, labels, gt_boxes, cfg):
    """Hungarian matching per image of the N token predictions to its ground truth.
    logits (B, N, Q), boxes (B, N, 4) cxcywh, labels (B, M) query index (-1 pad), gt_boxes (B, M, 4)
    -> list of (token indices, gt indices) per image. Cost: class (focal-weighted -log sigma(l) minus
    the same for the negative) + L1 + (-GIoU), weights from cfg."""
    a, g = cfg.focal_alpha, cfg.focal_gamma
    pos = -F.logsigmoid(logits) * a * torch.sigmoid(-logits) ** g
    neg = -F.logsigmoid(-logits) * (1 - a) * torch.sigmoid(logits) ** g
    cls_cost = (pos - neg).detach().cpu()  # (B, N, Q)
    boxes, gt_boxes, labels = boxes.detach().cpu(), gt_boxes.detach().cpu(), labels.cpu()
    out = []
    for b in range(len(labels)):
        keep = labels[b] >= 0
        lab, gt = labels[b][keep], gt_boxes[b][keep]  # (k,), (k, 4)
        if len(lab) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        c = (cfg.class_loss_coef * cls_cost[b][:, lab] + cfg.bbox_loss_coef * torch.cdist(boxes[b], gt, p=1)
             - cfg.giou_loss_coef * generalized_box_iou(cxcywh_to_xyxy(boxes[b]), cxcywh_to_xyxy(gt)))  # (N, k)
        out.append(hungarian(torch.nan_to_num(c, nan=1e6, posinf=1e6, neginf=-1e6).numpy()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Data: shapes scenes -> batches

def _images(x):
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1] (as data.normalize)."""
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def _vocab(data, cfg):
    """Name list, token ids, held-out set, and per-split targets, computed once per data object."""
    cache = vars(data).setdefault("_owlvit_cache", {})  # kept on the data object itself
    key = (cfg.held_out, cfg.max_len)
    if key in cache:
        return cache[key]
    if data.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} ids, the model's vocab_size is {cfg.vocab_size}")
    names = sorted({o["name"] for sc in list(data.scenes_train) + list(data.scenes_test) for o in sc})
    held = [s.strip() for s in cfg.held_out.split(",") if s.strip()]
    unknown = [h for h in held if h not in names]
    if unknown:
        raise ValueError(f"held_out names {unknown} are not in the data's vocabulary ({', '.join(names[:10])}, ...)")
    if cfg.closed_vocab and len(names) > cfg.num_names:
        raise ValueError(f"the data has {len(names)} names, closed_vocab's table only {cfg.num_names} (--num_names)")
    index = {n: i for i, n in enumerate(names)}
    ids = data.tokenizer.batch(names, cfg.max_len, eos=True)  # (V, L)
    S = data.x_train.shape[1]

    def targets(scenes):
        M = max(1, max(len(sc) for sc in scenes))
        boxes = np.zeros((len(scenes), M, 4), np.float32)  # cx, cy, w, h in [0, 1]
        labels = np.full((len(scenes), M), -1, np.int64)  # index into names
        for i, sc in enumerate(scenes):
            for j, o in enumerate(sc):
                x0, y0, x1, y1 = o["box"]
                boxes[i, j] = ((x0 + x1) / 2 / S, (y0 + y1) / 2 / S, (x1 - x0) / S, (y1 - y0) / S)
                labels[i, j] = index[o["name"]]
        return boxes, labels

    v = dict(names=names, ids=ids, held=[index[h] for h in held], train=targets(data.scenes_train),
             test=targets(data.scenes_test))
    v["seen"] = [i for i in range(len(names)) if i not in set(v["held"])]
    has_held = np.isin(v["train"][1], v["held"]).any(1)
    v["detect_images"] = np.flatnonzero(~has_held)  # stage 2 drops every image holding a held-out name
    cache[key] = v
    return v


def batches(data, cfg, split, batch_size, step=0, seed=0):
    """stage "pretrain": {"image", "text" (B, L) the name of one random object of each image ("pick": its
    index), "names" (B, M) the indices of all its objects' names (-1 pad)}.
    stage "detect": {"image", "boxes" (B, M, 4), "labels" (B, M) query index (-1 pad), "loss_mask" (B, Q) the
    image's names + num_negatives random absent ones, "queries" (numpy, not cut by train.py: shared by the
    batch) the seen names' token ids (Q, L), or their name indices with closed_vocab}."""
    v = _vocab(data, cfg)
    x_all = data.x_train if split == "train" else data.x_test
    boxes_all, labels_all = v["train" if split == "train" else "test"]
    seen = np.array(v["seen"])
    to_query = np.full(len(v["names"]), -1)
    to_query[seen] = np.arange(len(seen))  # name index -> query index (held-out names: none)
    pool = np.arange(len(x_all)) if cfg.stage == "pretrain" or split != "train" else v["detect_images"]
    queries = seen if cfg.closed_vocab else v["ids"][seen].numpy()
    epoch_len = max(1, len(pool) // batch_size) if split == "train" else math.ceil(len(pool) / batch_size)
    while True:
        if split == "train":
            rng = np.random.default_rng([seed, step])
            perm = np.random.default_rng([seed, step // epoch_len, 7]).permutation(pool)
            idx = perm[(step % epoch_len) * batch_size:][:batch_size]
        else:
            if step >= epoch_len:
                return
            rng = np.random.default_rng([seed, step])
            idx = pool[step * batch_size:(step + 1) * batch_size]
        dev = x_all.device
        image = _images(x_all[torch.as_tensor(idx, device=dev)])
        labels = labels_all[idx]  # (B, M) name indices
        if cfg.stage == "pretrain":
            k = (labels >= 0).sum(1)
            pick = labels[np.arange(len(idx)), (rng.random(len(idx)) * k).astype(np.int64)]  # (B,)
            yield {"image": image, "text": v["ids"][pick].to(dev), "names": torch.as_tensor(labels, device=dev),
                   "pick": torch.as_tensor(pick, device=dev)}
        else:
            lab = np.where(labels >= 0, to_query[labels.clip(0)], -1)  # (B, M) query index
            pos = np.zeros((len(idx), len(seen)), bool)  # (B, Q) the image's names
            rows, cols = np.nonzero(lab >= 0)
            pos[rows, lab[rows, cols]] = True
            r = np.where(pos, 2.0, rng.random(pos.shape))  # + num_negatives random absent names
            neg = np.argsort(r, axis=1)[:, :cfg.num_negatives]
            mask = pos.copy()
            np.put_along_axis(mask, neg, True, axis=1)
            yield {"image": image, "boxes": torch.as_tensor(boxes_all[idx], device=dev),
                   "labels": torch.as_tensor(lab, device=dev), "loss_mask": torch.as_tensor(mask, device=dev),
                   "queries": queries}
        step += 1


def loss(model, batch):
    if "text" in batch:  # stage 1: symmetric InfoNCE; several positives per row when names repeat
        logits = model(batch["image"], batch["text"])["logits_per_image"].float()  # (B, B)
        same = (batch["names"][:, :, None] == batch["pick"][None, None, :]).any(1).float()  # (B, B) text j in image i
        l_img = -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        l_txt = -(same.T / same.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        hit = same.gather(1, logits.argmax(1, keepdim=True)).mean()
        return (l_img + l_txt) / 2, {"acc": hit}
    cfg = _cfg_of(model)
    queries = torch.as_tensor(batch["queries"], device=batch["image"].device)
    out = model(batch["image"], queries)
    logits, boxes = out["logits"].float(), out["boxes"].float()  # (B, N, Q), (B, N, 4)
    labels, gt = batch["labels"], batch["boxes"]
    B, N, Q = logits.shape
    matches = match(logits, boxes, labels, gt, cfg)
    bi = torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, (r, _) in enumerate(matches)]).to(logits.device)
    ti = torch.as_tensor(np.concatenate([r for r, _ in matches]), dtype=torch.long, device=logits.device)
    gi = torch.as_tensor(np.concatenate([c for _, c in matches]), dtype=torch.long, device=logits.device)
    num = (labels >= 0).sum(1).clamp(min=1).float()  # (B,) boxes per image: per-example normalisation
    target = torch.zeros_like(logits)
    target[bi, ti, labels[bi, gi]] = 1.0
    cls = focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma) * batch["loss_mask"][:, None, :]
    loss_class = (cls.sum((1, 2)) / num).mean()
    pb, tb = boxes[bi, ti], gt[bi, gi]  # (K, 4) matched predictions and targets
    l1 = torch.zeros(B, device=logits.device).index_add(0, bi, (pb - tb).abs().sum(-1))
    giou = torch.diagonal(generalized_box_iou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb)))  # (K,)
    lg = torch.zeros(B, device=logits.device).index_add(0, bi, 1 - giou)
    loss_bbox, loss_giou = (l1 / num).mean(), (lg / num).mean()
    total = cfg.class_loss_coef * loss_class + cfg.bbox_loss_coef * loss_bbox + cfg.giou_loss_coef * loss_giou
    return total, {"loss_class": loss_class.detach(), "loss_bbox": loss_bbox.detach(),
                   "loss_giou": loss_giou.detach(), "matched_iou": (box_iou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb))[0]
                                                                    .diagonal().mean().detach() if len(pb) else 0.0)}


def _unwrap(model):
    m = getattr(model, "_orig_mod", model)
    return getattr(m, "module", m)


def _cfg_of(model):
    return _unwrap(model).cfg


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: COCO-style AP

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def np_iou(a, b):
    """a (n, 4), b (m, 4) xyxy numpy -> IoU (n, m)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def average_precision(dets, gts, iou_thresholds=IOU_THRESHOLDS):
    """COCO AP of one class. dets: per image (boxes (n, 4) xyxy, scores (n,)); gts: per image boxes (k, 4).
    Per image, detections in decreasing score greedily take the unmatched ground truth of highest IoU
    >= t; then all detections sorted by score give precision/recall; precision is made monotone and read
    at 101 recall points (0, 0.01, .., 1; 0 beyond the last recall). Returns AP per threshold (T,), or
    NaN if the class has no ground truth."""
    T = len(iou_thresholds)
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return np.full(T, np.nan)
    scores, tps = [], []
    for (boxes, s), g in zip(dets, gts):
        order = np.argsort(-s, kind="mergesort")
        boxes, s = boxes[order], s[order]
        tp = np.zeros((T, len(s)), bool)
        if len(g) and len(s):
            iou = np_iou(boxes, g)  # (n, k)
            taken = np.zeros((T, len(g)), bool)
            for d in np.flatnonzero(iou.max(1) >= iou_thresholds.min()):  # the rest are false positives
                cand = (iou[d][None] >= iou_thresholds[:, None]) & ~taken  # (T, k)
                best = np.where(cand, iou[d][None], -1).argmax(1)  # (T,)
                ok = cand[np.arange(T), best]
                tp[ok, d] = True
                taken[np.flatnonzero(ok), best[ok]] = True
        scores.append(s)
        tps.append(tp)
    order = np.argsort(-np.concatenate(scores), kind="mergesort")
    tp = np.concatenate(tps, axis=1)[:, order]  # (T, D)
    tpc, fpc = np.cumsum(tp, 1), np.cumsum(~tp, 1)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, 1e-12)
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # monotone decreasing
    ap = np.zeros(T)
    for t in range(T):
        i = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        ap[t] = np.where(i < tp.shape[1], precision[t][np.minimum(i, tp.shape[1] - 1)], 0.0).mean()
    return ap


def detection_ap(scores, boxes, gt_boxes, gt_labels, classes):
    """scores (I, N, V), boxes (I, N, 4) xyxy, per image gt boxes (M, 4) / labels (M,) (-1 pad) ->
    {class: AP per IoU threshold}; every token is a detection of every class (N <= COCO's 100 per image)."""
    out = {}
    for c in classes:
        dets = [(boxes[i], scores[i, :, c]) for i in range(len(scores))]
        gts = [gt_boxes[i][gt_labels[i] == c] for i in range(len(scores))]
        out[c] = average_precision(dets, gts)
    return out


@torch.no_grad()
def _detect_all(m, x, query_ids=None, query_embeds=None, batch_size=250):
    """sigmoid scores (I, N, Q) and boxes xyxy in [0, 1] (I, N, 4), numpy, for uint8 images x."""
    scores, boxes = [], []
    for i in range(0, len(x), batch_size):
        out = m(_images(x[i:i + batch_size]), query_ids, query_embeds=query_embeds)
        scores.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
        boxes.append(cxcywh_to_xyxy(out["boxes"].float()).cpu().numpy())
    return np.concatenate(scores), np.concatenate(boxes)


@torch.no_grad()
def image_query(m, image, box):
    """One-shot: the query embedding of the object in `box` (xyxy in [0, 1]) of an exemplar image
    (uint8 (H, W, C)), as HF image_guided_detection: among the tokens whose predicted box has IoU >= 0.8 x
    the best IoU with `box`, the one whose class embedding is least similar to the image's mean one."""
    out = m(_images(image[None]), query_embeds=torch.zeros(1, m.cfg.embed_dim, device=image.device))
    pred = cxcywh_to_xyxy(out["boxes"][0].float())  # (N, 4)
    target = torch.as_tensor(box, dtype=torch.float32, device=pred.device)[None]
    iou = box_iou(target, pred)[0][0]  # (N,)
    if (iou == 0).all():
        iou = generalized_box_iou(target, pred)[0]
    sel = torch.nonzero(iou >= iou.max() * 0.8 if iou.max() > 0 else iou >= iou.max())[:, 0]
    emb = out["class_embeds"][0].float()  # (N, E)
    best = sel[torch.argmin(emb[sel] @ emb.mean(0))]
    return emb[best], int(best)


@torch.no_grad()
def evaluate(model, data, cfg):
    m = _unwrap(model)
    v = _vocab(data, cfg)
    dev = data.x_test.device
    if cfg.stage == "pretrain":  # zero-shot naming: is the best of all names one of the image's objects?
        gt = v["test"][1]
        hits, hits_held, n_held = 0, 0, 0
        for i in range(0, len(data.x_test), 250):
            logits = m(_images(data.x_test[i:i + 250]), v["ids"].to(dev))["logits_per_image"]
            top = logits.argmax(1).cpu().numpy()
            ok = (gt[i:i + 250] == top[:, None]).any(1)
            held = np.isin(gt[i:i + 250], v["held"]).any(1)
            hits += ok.sum()
            hits_held += (ok & held).sum()
            n_held += held.sum()
        return {"test_acc": hits / len(data.x_test), "test_acc_heldout_images": hits_held / max(1, n_held)}
    boxes_gt, labels_gt = v["test"]
    gt_xyxy = [cxcywh_to_xyxy(torch.from_numpy(b)).numpy() for b in boxes_gt]
    V = len(v["names"])
    res = {}
    # text-conditioned: every name is a query (closed_vocab: only the training names exist)
    queries = torch.arange(V, device=dev) if cfg.closed_vocab else v["ids"].to(dev)
    scores, boxes = _detect_all(m, data.x_test, queries)
    ap = detection_ap(scores, boxes, gt_xyxy, labels_gt, range(V))
    if cfg.closed_vocab:  # a closed vocabulary cannot name a held-out class: AP 0 by definition
        ap.update({c: np.zeros(len(IOU_THRESHOLDS)) for c in v["held"]})
    res.update(_summary(ap, v, ""))
    # image-conditioned one-shot: per name, the first training image holding it; its box is the query
    train_boxes, train_labels = v["train"]
    embeds = torch.zeros(V, m.cfg.embed_dim, device=dev)
    found = [c for c in range(V) if (train_labels == c).any()]
    for c in found:
        i, j = np.argwhere(train_labels == c)[0]
        box = cxcywh_to_xyxy(torch.from_numpy(train_boxes[i, j])).tolist()
        embeds[c] = image_query(m, data.x_train[int(i)], box)[0]
    scores, boxes = _detect_all(m, data.x_test, query_embeds=embeds)
    res.update(_summary(detection_ap(scores, boxes, gt_xyxy, labels_gt, found), v, "img_"))
    return res


def _summary(ap, v, prefix):
    out = {}
    for part, classes in (("seen", v["seen"]), ("heldout", v["held"])):
        a = np.array([ap[c] for c in classes if c in ap and not np.isnan(ap[c]).all()])  # (C, T)
        if len(a):
            out[f"{prefix}ap50_{part}"] = float(a[:, 0].mean())
            out[f"{prefix}ap_{part}"] = float(a.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Inference on one image: --predict IMAGE "query" ... [threshold=0.3] [nms=0.5] [out=PATH] [exemplar=IMAGE box=x0,y0,x1,y1]

PALETTE = np.array([(255, 40, 40), (40, 220, 40), (60, 120, 255), (255, 220, 0), (255, 0, 255), (0, 230, 230),
                    (255, 140, 0), (255, 255, 255)], np.uint8)


def draw_boxes(image, boxes, colours, thickness=1):
    """A copy of image uint8 (H, W, 3) with box outlines (x0, y0, x1, y1 in pixels, x1/y1 exclusive)."""
    img = image.copy()
    H, W = img.shape[:2]
    for (x0, y0, x1, y1), c in zip(boxes, colours):
        x0, y0 = int(np.clip(round(x0), 0, W - 1)), int(np.clip(round(y0), 0, H - 1))
        x1, y1 = int(np.clip(round(x1) - 1, x0, W - 1)), int(np.clip(round(y1) - 1, y0, H - 1))
        for k in range(thickness):
            img[min(y0 + k, y1), x0:x1 + 1] = c
            img[max(y1 - k, y0), x0:x1 + 1] = c
            img[y0:y1 + 1, min(x0 + k, x1)] = c
            img[y0:y1 + 1, max(x1 - k, x0)] = c
    return img


def nms(boxes, scores, threshold):
    """Greedy non-maximum suppression: indices kept, by decreasing score."""
    keep, order = [], np.argsort(-scores, kind="mergesort")
    while len(order):
        keep.append(order[0])
        order = order[1:][np_iou(boxes[order[:1]], boxes[order[1:]])[0] <= threshold]
    return keep


def _load_image(data, arg):
    """'shapes:K' = test scene K of the data; else an image file (PPM / PNG) via data.read_image."""
    if arg.startswith("shapes:"):
        k = int(arg.split(":", 1)[1]) if arg.split(":", 1)[1].isdigit() else -1
        if not 0 <= k < len(data.x_test):
            raise ValueError(f"{arg}: use shapes:K with 0 <= K < {len(data.x_test)} (a test scene)")
        return data.x_test[k].cpu().numpy(), [dict(name=o["name"], box=list(o["box"])) for o in data.scenes_test[k]]
    if not hasattr(data, "read_image"):
        raise ValueError(f"this data object reads no image files; pass a test scene shapes:K instead of {arg}")
    return np.asarray(data.read_image(arg)), None


def _square(image, size, device):
    """Pad at the bottom/right to a square (grey), resize to size x size: model input (1, C, size, size)."""
    H, W = image.shape[:2]
    side = max(H, W)
    sq = np.full((side, side, 3), 128, np.uint8)
    sq[:H, :W] = image[..., :3]
    x = _images(torch.from_numpy(sq)[None].to(device))
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x, side


@torch.no_grad()
def predict(model, data, cfg, args):
    """args: IMAGE (a .ppm/.png path or shapes:K) then query strings, and options threshold=0.1 (score),
    nms=IOU (per-query NMS, default off), out=PATH (the drawn image; default <image>_boxes.png in the
    working directory), exemplar=IMAGE box=x0,y0,x1,y1 (an image-conditioned query, pixels of the exemplar).
    Returns {"detections": [{query, score, box (x0, y0, x1, y1) pixels}], "drawn": PATH, ...}."""
    if cfg.stage != "detect":
        raise ValueError("--predict detects objects: use a --stage detect checkpoint")
    opts = {k.lstrip("-"): val for k, _, val in (a.partition("=") for a in args[1:])
            if re.fullmatch(r"-{0,2}(threshold|nms|out|exemplar|box)", k)}
    texts = [a for a in args[1:] if not re.match(r"-{0,2}(threshold|nms|out|exemplar|box)=", a)]
    if not args or (not texts and "exemplar" not in opts):
        raise ValueError('--predict IMAGE "query" ["query" ...] [threshold=0.1] [nms=0.5] [out=PATH] '
                         '[exemplar=IMAGE box=x0,y0,x1,y1]')
    m = _unwrap(model)
    dev = next(m.parameters()).device
    image, truth = _load_image(data, args[0])
    x, side = _square(image, cfg.image_size, dev)
    names, embeds = list(texts), []
    if texts:
        if cfg.closed_vocab:
            v = _vocab(data, cfg)
            unknown = [t for t in texts if t not in v["names"] or v["names"].index(t) in v["held"]]
            if unknown:
                raise ValueError(f"closed_vocab knows only its training names; not {unknown}")
            embeds.append(m.name_embed[[v["names"].index(t) for t in texts]])
        else:
            ids = data.tokenizer.batch(texts, cfg.max_len, eos=True).to(dev)
            embeds.append(m.embed_text(ids))
    if "exemplar" in opts:
        ex, _ = _load_image(data, opts["exemplar"])
        try:
            box = [float(b) for b in opts.get("box", "").split(",")]
            assert len(box) == 4
        except (ValueError, AssertionError):
            raise ValueError("exemplar=IMAGE needs box=x0,y0,x1,y1 (pixels of the exemplar image)") from None
        ex_x, ex_side = _square(ex, cfg.image_size, dev)
        ex_img = ((ex_x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (S, S, C)
        emb, _ = image_query(m, ex_img, [b / ex_side for b in box])
        embeds.append(emb[None])
        names.append("exemplar")
    out = m(x, query_embeds=torch.cat(embeds).float())
    scores = torch.sigmoid(out["logits"][0].float()).cpu().numpy()  # (N, Q)
    boxes = (cxcywh_to_xyxy(out["boxes"][0].float()).cpu().numpy() * side).clip(0, None)  # (N, 4) pixels
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image.shape[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image.shape[0])
    threshold = float(opts.get("threshold", 0.1))
    dets = []
    for q, name in enumerate(names):
        keep = np.flatnonzero(scores[:, q] >= threshold)
        if "nms" in opts and len(keep):
            keep = keep[nms(boxes[keep], scores[keep, q], float(opts["nms"]))]
        dets += [dict(query=name, score=round(float(scores[k, q]), 4), box=[round(float(b), 1) for b in boxes[k]],
                      colour=PALETTE[q % len(PALETTE)].tolist()) for k in keep]
    dets.sort(key=lambda d: -d["score"])
    stem = args[0].replace(":", "") if args[0].startswith("shapes:") else Path(args[0]).stem
    path = opts.get("out", f"{stem}_boxes.png")
    if hasattr(data, "write_image"):
        data.write_image(path, draw_boxes(image[..., :3], [d["box"] for d in dets], [d["colour"] for d in dets]))
    else:
        path = None
    res = {"image": args[0], "size": [int(image.shape[1]), int(image.shape[0])], "queries": names,
           "threshold": threshold, "detections": dets, "drawn": path and str(path)}
    if truth is not None:
        res["truth"] = truth
    return res


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face OWL-ViT checkpoints (google/owlvit-base-patch32 format)

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_safetensors(path):
    """Read a .safetensors file: 8-byte little-endian header length, JSON header, raw little-endian bytes."""
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
        out[name] = torch.from_numpy(np.array(raw[start:end])).view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


# HF name -> ours, applied in order (older releases spell pre_layernorm "pre_layrnorm")
_HF_RENAMES = [
    (r"^owlvit\.", ""),
    (r"^vision_model\.embeddings\.class_embedding$", "vision.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision.patch_embed."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "vision.pos_embed"),
    (r"^vision_model\.pre_lay(er)?r?norm\.", "vision.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "vision.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "vision.blocks."),
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embed."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
    (r"^text_model\.encoder\.layers\.", "text.blocks."),
    (r"^text_model\.final_layer_norm\.", "text.ln_final."),
    (r"^layer_norm\.", "merge_norm."),
    (r"\.layer_norm1\.", ".norm1."),
    (r"\.layer_norm2\.", ".norm2."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."),
    (r"\.self_attn\.([qkv])_proj\.", r".attn.\1."),
]
_HF_TEXT = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                vocab_size=49408, max_position_embeddings=16, layer_norm_eps=1e-5)
_HF_VISION = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=768, patch_size=32, num_channels=3, layer_norm_eps=1e-5)


def hf_config(c, stage="detect"):
    """Our Config from a Hugging Face OwlViTConfig dict (missing fields take HF's defaults)."""
    t, v = {**_HF_TEXT, **(c.get("text_config") or {})}, {**_HF_VISION, **(c.get("vision_config") or {})}
    for sub in (t, v):
        if sub.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"hidden_act {sub['hidden_act']!r}: only CLIP's quick_gelu is supported")
    if c.get("projection_dim", 512) != t["hidden_size"]:
        raise ValueError("HF's class head maps to the text width: projection_dim must equal text hidden_size")
    return Config(stage=stage, image_size=v["image_size"], patch_size=v["patch_size"], channels=v["num_channels"],
                  width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
                  mlp_dim=v["intermediate_size"], text_width=t["hidden_size"], text_depth=t["num_hidden_layers"],
                  text_heads=t["num_attention_heads"], text_mlp_dim=t["intermediate_size"],
                  vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
                  embed_dim=c.get("projection_dim", 512), ln_eps=v["layer_norm_eps"], merge_ln_eps=v["layer_norm_eps"],
                  box_gelu="exact", logit_scale_init=c.get("logit_scale_init_value", 2.6592))


def from_hf_state_dict(sd, cfg):
    """HF OwlViTForObjectDetection / OwlViTModel weights -> a Model(cfg) (eval mode). q, k, v are fused."""
    ours = {}
    for k, val in sd.items():
        for pattern, repl in _HF_RENAMES:
            k = re.sub(pattern, repl, k)
        if not k.endswith("position_ids"):
            ours[k] = val
    ours["vision.cls_token"] = ours["vision.cls_token"].reshape(1, 1, -1)
    ours["vision.pos_embed"] = ours["vision.pos_embed"][None]
    ours["text.pos_embed"] = ours["text.pos_embed"][None]
    for tower in ("vision", "text"):
        depth = cfg.depth if tower == "vision" else cfg.text_depth
        for i in range(depth):
            for p in ("weight", "bias"):
                ours[f"{tower}.blocks.{i}.attn.qkv.{p}"] = torch.cat(
                    [ours.pop(f"{tower}.blocks.{i}.attn.{n}.{p}") for n in "qkv"])
    model = Model(cfg)
    own = model.state_dict()
    ours = {k: val for k, val in ours.items() if k in own}  # stage 1 has no heads; a detector no temperature
    missing = [k for k in own if k not in ours]
    if missing:
        raise ValueError(f"the Hugging Face weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(ours)
    return model.eval()


def from_hf(folder, stage="detect"):
    """A Model from a Hugging Face OWL-ViT folder (google/owlvit-base-patch32 format: config.json +
    model.safetensors or pytorch_model.bin). Inputs then follow HF: images normalised with CLIP's
    mean/std, text ids from CLIP's BPE tokenizer (EOS last before the 0-padding)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: pass a Hugging Face OWL-ViT folder")
    c = json.loads((folder / "config.json").read_text())
    if c.get("model_type", "owlvit") != "owlvit":
        raise ValueError(f"{folder}: model_type {c.get('model_type')!r}, expected 'owlvit'")
    if (folder / "model.safetensors").is_file():
        sd = load_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
    return from_hf_state_dict(sd, hf_config(c, stage))
