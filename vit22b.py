"""ViT-22B: "Scaling Vision Transformers to 22 Billion Parameters"
(Dehghani et al., ICML 2023), https://arxiv.org/abs/2302.05442

The key trick: three changes to the ViT block that let a 22B-parameter ViT train stably and fast.

1. Parallel block (as PaLM): one shared norm feeds attention and MLP side by side,

       y = x + Attn(Norm(x)) + MLP(Norm(x))

   so the q/k/v projections and the MLP's first Dense fuse into one matmul (D -> M + 3D, rows
   [MLP hidden | q | k | v] as timm's `ParallelScalingBlock.in_proj`), and the attention
   out-projection and the MLP's second Dense into another ([attn (D) | GELU(mlp) (M)] -> D, one bias).
2. QK normalisation: without it, ~8B-parameter ViTs diverged: attention logits grew without bound
   and attention became one-hot (near-zero entropy). A norm on queries and keys, per head over the
   head dimension d (learnable scale of size d, no bias), before the dot product:

       A = softmax( Norm_q(X W_q) Norm_k(X W_k)^T / sqrt(d) )

3. No biases on the q/k/v projections and on the norms; the MLP keeps its biases. The paper applies
   its LayerNorms "without bias and centering", citing Zhang & Sennrich 2019: that is RMSNorm,
   x / rms(x) * gain, the default here (`norm="rmsnorm"`, as timm's ViT-22B-style presets);
   `norm="layernorm_nobias"` is the centred LayerNorm without bias (flax's `normalize_qk`).

The head is big_vision's MAP (attention pooling), as the paper's setup; pre-training used sigmoid
cross-entropy (`loss="sigmoid"`, head bias initialised to -10). Every trick is a Config switch
(`parallel_block`, `qk_norm`, `qkv_bias`, `norm`), so the ablations are command-line flags.
`diagnostics` reports each layer's largest attention logit max|q k^T / sqrt(d)| and mean attention
entropy: the quantities whose runaway the paper describes.

Size: PRESETS["22b"] (D=6144, depth 48, M=4D) has 48 x 12 D^2 = 21,743,271,936 block weight matrices
(in_proj 7D^2 + out_proj 5D^2 per block): exactly the paper's quoted 21.743B. Our count is
22,209,448,936: the remaining 466M are the MAP head (453M: its MLP alone is 2DM), the classifier
(6.1M), the patch embedding (3.6M), the block vectors (1.8M) and the positions (1.6M); the test
`test_preset_22b_count` spells the breakdown out.

Train:  python train.py vit22b
        torchrun --standalone --nproc_per_node=2 train.py vit22b --fsdp     # sharded (FSDP2)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    width: int = 128             # D
    depth: int = 6               # L
    heads: int = 4
    mlp_dim: int = 512           # M
    pool: str = "map"            # "map" (paper; no class token) | "gap" | "cls"
    posemb: str = "learn"        # "learn" | "sincos2d" (fixed)
    dropout: float = 0.0         # after positions, attention output and each MLP Dense
    ln_eps: float = 1e-6         # flax/timm
    parallel_block: bool = True  # y = x + Attn(Norm(x)) + MLP(Norm(x)); False: pre-LN sequential (vit.py)
    qk_norm: bool = True         # Norm over d on each head's queries and keys
    qkv_bias: bool = False
    norm: str = "rmsnorm"        # "rmsnorm" (paper: no bias, no centering) | "layernorm_nobias"
    loss: str = "softmax"        # "softmax" | "sigmoid" (paper's pre-training: per-class sigmoid xent)
    head_bias_init: float | None = None  # None: -10 for the sigmoid loss (big_vision), else 0


# name -> Config overrides at 224 px / 1000 classes. "22b" is the paper's Table 1; ti/s/b are the
# ViT sizes with the three tricks (timm's `vit_base_patch16_xp_224` is such a B/16).
PRESETS = {
    "ti/16": dict(width=192, depth=12, heads=3, mlp_dim=768, patch_size=16, image_size=224, num_classes=1000),
    "s/16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16, image_size=224, num_classes=1000),
    "b/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16, image_size=224, num_classes=1000),
    "22b": dict(width=6144, depth=48, heads=48, mlp_dim=24576, patch_size=14, image_size=224, num_classes=1000),
}

# diagnostics look at this many images of each training batch (a small fraction of the step's cost)
STATS_IMAGES = 4


def lecun_normal_(w, fan_in):
    """flax's default kernel init: truncated normal (2 std) with variance 1/fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo the truncation's variance loss
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def xavier_rows_(w, sizes):
    """xavier_uniform of each row block of a fused (sum(sizes), fan_in) kernel, as if separate Denses."""
    for part in w.split(sizes, dim=0):
        bound = math.sqrt(6 / (part.shape[0] + part.shape[1]))
        nn.init.uniform_(part, -bound, bound)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """big_vision's fixed 2-D positions: [sin(x w), cos(x w), sin(y w), cos(y w)] per grid point."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    omega = 1.0 / temperature ** (torch.arange(width // 4) / (width // 4 - 1))  # (D/4,)
    x = x.flatten()[:, None] * omega[None, :]  # (N, D/4)
    y = y.flatten()[:, None] * omega[None, :]  # (N, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None].float()  # (1, N, D)


def make_norm(cfg, dim):
    """The paper's norm: no bias; RMSNorm (no centering) or a centred LayerNorm. Gain init 1."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.ln_eps)
    return nn.LayerNorm(dim, eps=cfg.ln_eps, bias=False)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v, per head; q, k, v: (B, h, T, d).
    SDPA (flash kernels on GPU) everywhere but bf16 on the CPU, where SDPA's backward is ~3x slower
    than the same three ops written out (bench.py measures it)."""
    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@torch.no_grad()
def attention_stats(q, k):
    """[max |q k^T / sqrt(d)|, mean entropy (nats) of softmax over keys] of a few images; q, k: (B, h, T, d)."""
    q, k = q[:STATS_IMAGES].float(), k[:STATS_IMAGES].float()
    with torch.autocast(q.device.type, enabled=False):  # in fp32 even under bf16 autocast
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (b, h, T, T)
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1).mean()
    return torch.stack([logits.abs().max(), entropy])  # (2,)


class Attention(nn.Module):
    """Multi-head self-attention of the sequential block: fused q,k,v projection (rows [q; k; v]),
    optional QK-norm per head, SDPA, output projection (timm `Attention(qk_norm=True)`)."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.width
        self.heads = cfg.heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.q_norm = make_norm(cfg, dim // cfg.heads) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, dim // cfg.heads) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.stats = None  # attention_stats of the last training forward
        xavier_rows_(self.qkv.weight, [dim] * 3)  # xavier of each (D, D) q/k/v kernel, zero biases
        nn.init.xavier_uniform_(self.proj.weight)
        if cfg.qkv_bias:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # x: (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, d) each
        q, k = self.q_norm(q), self.k_norm(k)  # over d
        if self.training:
            self.stats = attention_stats(q, k)
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
    """Pre-LN encoder block: z' = MSA(Norm(z)) + z; z = MLP(Norm(z')) + z' (the ablation of the parallel block)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.width)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg, cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # x: (B, T, D)
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ParallelBlock(nn.Module):
    """y = x + Attn(Norm(x)) + MLP(Norm(x)) with one fused in- and one fused out-projection.
    Names as timm's `ParallelScalingBlock(fuse_out_proj=True)`, so its weights load 1:1."""

    def __init__(self, cfg):
        super().__init__()
        D, M, h = cfg.width, cfg.mlp_dim, cfg.heads
        self.heads = h
        self.split = [M, D, D, D]
        self.in_norm = make_norm(cfg, D)
        self.in_proj = nn.Linear(D, M + 3 * D, bias=cfg.qkv_bias)  # rows [MLP hidden | q | k | v]
        # the MLP's first bias: inside in_proj.bias when qkv_bias, else its own (q/k/v get none)
        self.mlp_bias = None if cfg.qkv_bias else nn.Parameter(torch.empty(M))
        self.q_norm = make_norm(cfg, D // h) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, D // h) if cfg.qk_norm else nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = nn.Linear(D + M, D)  # columns [attn (D) | mlp (M)], one bias
        self.stats = None  # attention_stats of the last training forward
        # init as the separate Denses of vit.py: xavier per kernel, MLP bias N(0, 1e-6), others zero
        xavier_rows_(self.in_proj.weight, self.split)
        xavier_rows_(self.out_proj.weight.T, [D, M])
        if cfg.qkv_bias:
            nn.init.zeros_(self.in_proj.bias)
            nn.init.normal_(self.in_proj.bias[:M], std=1e-6)
        else:
            nn.init.normal_(self.mlp_bias, std=1e-6)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):  # x: (B, T, D)
        B, T, D = x.shape
        h = self.heads
        a, q, k, v = self.in_proj(self.in_norm(x)).split(self.split, dim=-1)  # (B, T, M), (B, T, D) x 3
        if self.mlp_bias is not None:
            a = a + self.mlp_bias
        q = self.q_norm(q.view(B, T, h, D // h)).transpose(1, 2)  # (B, h, T, d), normalised over d
        k = self.k_norm(k.view(B, T, h, D // h)).transpose(1, 2)  # (B, h, T, d)
        v = v.view(B, T, h, D // h).transpose(1, 2)  # (B, h, T, d)
        if self.training:
            self.stats = attention_stats(q, k)
        o = attention(q, k, v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        y = self.out_proj(torch.cat([o, self.drop(self.act(a))], dim=-1))  # (B, T, D)
        return x + self.drop(y)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead): one learned probe attends over the tokens."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.heads = cfg.heads
        self.probe = nn.Parameter(torch.empty(1, 1, D))
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)  # rows [k; v]
        self.proj = nn.Linear(D, D)
        self.norm = make_norm(cfg, D)
        self.mlp = MLP(D, cfg.mlp_dim)
        # flax xavier_uniform on a (1, 1, D) array: fan_in 1, fan_out D
        bound = math.sqrt(6 / (1 + D))
        nn.init.uniform_(self.probe, -bound, bound)
        bound = math.sqrt(6 / (D + D))  # xavier of each (D, D) q/k/v/out kernel
        for lin in (self.q, self.kv, self.proj):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)

    def forward(self, x):  # x: (B, T, D)
        B, T, D = x.shape
        h = self.heads
        q = self.q(self.probe.expand(B, -1, -1)).view(B, 1, h, D // h).transpose(1, 2)  # (B, h, 1, d)
        k, v = self.kv(x).view(B, T, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, d) each
        y = attention(q, k, v)  # (B, h, 1, d)
        y = self.proj(y.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, D)


class Model(nn.Module):
    """ViT-22B-style classifier: images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        if cfg.pool not in ("cls", "gap", "map"):
            raise ValueError(f"unknown pool {cfg.pool!r}: use 'map', 'gap' or 'cls'")
        if cfg.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"unknown posemb {cfg.posemb!r}: use 'learn' or 'sincos2d'")
        if cfg.posemb == "sincos2d" and cfg.width % 4:
            raise ValueError(f"posemb 'sincos2d' needs width divisible by 4, got {cfg.width}")
        if cfg.norm not in ("rmsnorm", "layernorm_nobias"):
            raise ValueError(f"unknown norm {cfg.norm!r}: use 'rmsnorm' or 'layernorm_nobias'")
        if cfg.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown loss {cfg.loss!r}: use 'softmax' or 'sigmoid'")
        self.cfg = cfg
        D, P, C = cfg.width, cfg.patch_size, cfg.channels
        g = cfg.image_size // P  # grid side; N = g*g patches

        # patchify + linear embedding E in one stride-P conv (= Dense on flattened patches)
        self.patch_embed = nn.Conv2d(C, D, kernel_size=P, stride=P)
        lecun_normal_(self.patch_embed.weight, fan_in=C * P * P)
        nn.init.zeros_(self.patch_embed.bias)
        # class token only for pool="cls" (gap/map have none, as big_vision)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        T = g * g + (cfg.pool == "cls")  # tokens: N (+1 class)
        if cfg.posemb == "learn":
            # vit_jax: N(0, 0.02) for N+1 positions
            # (big_vision: N(0, 1/sqrt(D)) for N positions, added before its class token)
            self.pos_embed = nn.Parameter(torch.empty(1, T, D).normal_(std=0.02))
        else:
            pe = posemb_sincos_2d(g, g, D)  # (1, N, D)
            pe = torch.cat([torch.zeros(1, T - g * g, D), pe], dim=1)  # class token (if any) gets none
            self.register_buffer("pos_embed", pe, persistent=False)  # fixed: not in the state dict
        self.drop = nn.Dropout(cfg.dropout)
        block = ParallelBlock if cfg.parallel_block else Block
        self.blocks = nn.ModuleList([block(cfg) for _ in range(cfg.depth)])
        self.norm = make_norm(cfg, D)  # vit_jax "encoder_norm"
        self.map_head = MAPHead(cfg) if cfg.pool == "map" else None
        self.head = nn.Linear(D, cfg.num_classes)
        nn.init.zeros_(self.head.weight)  # zero-init head: logits are exactly the bias at init
        bias = cfg.head_bias_init if cfg.head_bias_init is not None else -10.0 if cfg.loss == "sigmoid" else 0.0
        nn.init.constant_(self.head.bias, bias)  # -10: sigmoid(-10) ~ 5e-5, a small prior per class

    def forward_features(self, images):  # images: (B, C, H, W)
        x = self.patch_embed(images)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1+N, D)
        x = self.drop(x + self.pos_embed)  # z0
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, T, D)

    def forward(self, images):  # images: (B, C, H, W) in [-1, 1]
        x = self.forward_features(images)  # (B, T, D)
        if self.cfg.pool == "cls":
            x = x[:, 0]  # (B, D)
        elif self.cfg.pool == "gap":
            x = x.mean(dim=1)  # (B, D)
        else:
            x = self.map_head(x)  # (B, D)
        return self.head(x)  # (B, num_classes)


# ----------------------------------------------------------------------------- train.py hooks

TRAIN = dict(steps=1000, batch_size=128, lr=1e-3, warmup=100, weight_decay=0.05)


def loss(model, batch):
    """Softmax cross-entropy, or the paper's sigmoid cross-entropy on one-hot targets (big_vision
    `sigmoid_xent`: summed over classes, averaged over images). Returns (loss, {"acc"})."""
    logits = model(batch["image"]).float()  # (B, K)
    labels = batch["label"]  # (B,)
    if getattr(model, "module", model).cfg.loss == "sigmoid":  # (DDP wraps the model in .module)
        onehot = F.one_hot(labels, logits.shape[-1]).float()  # (B, K)
        loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / len(logits)
    else:
        loss = F.cross_entropy(logits, labels)
    return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}


def diagnostics(model):
    """Per layer, from the last training forward (first STATS_IMAGES images): the largest attention
    logit max|q k^T / sqrt(d)| and the mean attention entropy in nats (log T = uniform, 0 = one-hot)."""
    out = {}
    for i, block in enumerate(model.blocks):
        stats = getattr(block, "attn", block).stats
        if stats is not None:
            out[f"max_logit/{i}"], out[f"entropy/{i}"] = stats.tolist()
    if out:
        out["max_logit"] = max(v for k, v in out.items() if k.startswith("max_logit/"))
        out["min_entropy"] = min(v for k, v in out.items() if k.startswith("entropy/"))
    return out


# ----------------------------------------------------------------------------- resolution changes

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


def adapt_state_dict(state_dict, cfg):
    """Resize a checkpoint's learned `pos_embed` to cfg's patch grid (fine-tuning at another
    resolution). Returns a new dict; everything else (the head included) is left as it is."""
    pe = state_dict.get("pos_embed")
    if pe is None or cfg.posemb != "learn":
        return dict(state_dict)
    prefix = int(cfg.pool == "cls")
    new_g = cfg.image_size // cfg.patch_size
    old_g = math.isqrt(pe.shape[1] - prefix)
    if old_g * old_g != pe.shape[1] - prefix:
        raise ValueError(f"pos_embed with {pe.shape[1]} entries is not {prefix} class + a square grid")
    return {**state_dict, "pos_embed": resize_pos_embed(pe, old_g, new_g, prefix)}
