"""Dual PatchNorm: "Dual PatchNorm" (Kumar, Dehghani, Houlsby, TMLR 2023), https://arxiv.org/abs/2302.01327

The key trick: two LayerNorms in the stem, one before and one after the patch embedding; the rest
is vit.py's standard pre-LayerNorm ViT, unchanged (its pooling and position options included).
In the paper's pseudocode:

    x  = rearrange(img, "b (ht hp) (wt wp) c -> b (ht wt) (hp wp c)")   x: (N, P*P*C)
    x  = ln1(dense(ln0(x)))          ln0 over the P*P*C values of each patch, dense = E, ln1 over D
    z0 = [x_cls; x] + E_pos          then z_l, y and the logits exactly as in vit.py

ln0 standardises every patch on its own (mean 0, variance 1 over its pixels and channels, then a
learned scale and bias per pixel and channel), so a patch's embedding ignores an affine change of
its intensities (a x + b, a > 0): its brightness and contrast. The paper's stem ablations are
`patch_norm`: "dual" (both), "pre" (ln0 only), "post" (ln1 only), "none" (plain linear embedding:
vit.py's model). "Often improves, never hurts" is the paper's claim.

Weights load from lucidrains' vit-pytorch `ViT`, which is this model exactly (`from_vit_pytorch`),
and from vit.py checkpoints (`adapt_state_dict`: the conv patch embedding becomes `dense`; with
vit.from_hf / vit.from_timm this reaches the public ViT weights, to fine-tune with DPN).

Train:  python train.py dual_patchnorm
"""

import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    width: int = 64              # D
    depth: int = 4               # L
    heads: int = 4
    mlp_dim: int = 256           # M
    pool: str = "cls"            # "cls" (paper) | "gap" | "map" (big_vision; no class token)
    posemb: str = "learn"        # "learn" | "sincos2d" (fixed)
    dropout: float = 0.0         # after positions, attention output and each MLP Dense
    ln_eps: float = 1e-6         # flax/timm; Hugging Face ViT uses 1e-12
    qkv_bias: bool = True
    representation_size: int | None = None  # the paper's pre-training "pre_logits" Dense + tanh
    head_bias_init: float = 0.0
    patch_norm: str = "dual"     # "dual" (paper) | "pre" (ln0 only) | "post" (ln1 only) | "none" (= vit.py)


# train.py's defaults for this file: vit.py's, so that the two differ only in the stem
TRAIN = dict(steps=2000, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.05)

# name -> Config overrides. Paper sizes at 224 px / 1000 classes (ViT paper Table 1, big_vision
# decode_variant), as vit.py; DPN adds 2*P*P*C + 2*D parameters. "mu" is big_vision's unit-test size;
# "ti/4" and "s/4" are CIFAR-sized.
PRESETS = {
    "mu/16": dict(width=32, depth=1, heads=2, mlp_dim=128, patch_size=16, image_size=224, num_classes=1000),
    "ti/16": dict(width=192, depth=12, heads=3, mlp_dim=768, patch_size=16, image_size=224, num_classes=1000),
    "s/16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16, image_size=224, num_classes=1000),
    "s/32": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=32, image_size=224, num_classes=1000),
    "b/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16, image_size=224, num_classes=1000),
    "b/32": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32, image_size=224, num_classes=1000),
    "l/16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=16, image_size=224, num_classes=1000),
    "h/14": dict(width=1280, depth=32, heads=16, mlp_dim=5120, patch_size=14, image_size=224, num_classes=1000),
    "ti/4": dict(width=192, depth=12, heads=3, mlp_dim=768, patch_size=4, image_size=32, num_classes=10),
    "s/4": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=4, image_size=32, num_classes=10),
}

INIT_FROM = ("vit",)  # train.py --init also takes vit.py checkpoints (adapt_state_dict converts them)


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
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
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
    """ViT classifier with Dual PatchNorm: images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        if cfg.pool not in ("cls", "gap", "map"):
            raise ValueError(f"unknown pool {cfg.pool!r}: use 'cls', 'gap' or 'map'")
        if cfg.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"unknown posemb {cfg.posemb!r}: use 'learn' or 'sincos2d'")
        if cfg.posemb == "sincos2d" and cfg.width % 4:
            raise ValueError(f"posemb 'sincos2d' needs width divisible by 4, got {cfg.width}")
        if cfg.patch_norm not in ("dual", "pre", "post", "none"):
            raise ValueError(f"unknown patch_norm {cfg.patch_norm!r}: use 'dual', 'pre', 'post' or 'none'")
        self.cfg = cfg
        D, P, C = cfg.width, cfg.patch_size, cfg.channels
        g = cfg.image_size // P  # grid side; N = g*g patches

        # Dual PatchNorm stem (see patch_embed): ln0 over each flattened patch, dense = E, ln1 over D
        self.ln0 = nn.LayerNorm(P * P * C, eps=cfg.ln_eps) if cfg.patch_norm in ("dual", "pre") else None
        self.dense = nn.Linear(P * P * C, D)
        lecun_normal_(self.dense.weight, fan_in=C * P * P)
        nn.init.zeros_(self.dense.bias)
        self.ln1 = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.patch_norm in ("dual", "post") else None
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
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)  # vit_jax "encoder_norm"
        self.map_head = MAPHead(cfg) if cfg.pool == "map" else None
        self.pre_logits = None
        if cfg.representation_size:
            self.pre_logits = nn.Linear(D, cfg.representation_size)
            lecun_normal_(self.pre_logits.weight, fan_in=D)
            nn.init.zeros_(self.pre_logits.bias)
        self.head = nn.Linear(cfg.representation_size or D, cfg.num_classes)
        nn.init.zeros_(self.head.weight)  # zero-init head: logits are exactly zero at init
        nn.init.constant_(self.head.bias, cfg.head_bias_init)

    def patch_embed(self, images):  # images: (B, C, H, W)
        """The stem: patchify in (row-in-patch, col-in-patch, channel) order, ln0, dense, ln1."""
        B, C, H, W = images.shape
        P = self.cfg.patch_size
        x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, ht, hp, wt, wp)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)  # (B, N, P*P*C) row-major
        if self.ln0 is not None:
            x = self.ln0(x)  # each patch: mean 0, variance 1 over its P*P*C values, then scale + bias
        x = self.dense(x)  # (B, N, D)
        if self.ln1 is not None:
            x = self.ln1(x)
        return x

    def forward_features(self, images):  # images: (B, C, H, W)
        x = self.patch_embed(images)  # (B, N, D), patches in row-major order
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
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))  # (B, R)
        return self.head(x)  # (B, num_classes)


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
    """Load a vit.py checkpoint too: its stride-P conv `patch_embed` (D, C, P, P) becomes `dense`
    (D, P*P*C) in the (row, col, channel) order of patch_embed; ln0/ln1 are not in it and keep their
    fresh init (identity), so only patch_norm="none" gives vit.py's outputs. Also resizes the learned
    `pos_embed` to cfg's patch grid (fine-tuning at another resolution). Returns a new dict; everything
    else (the head included) is left as it is."""
    state_dict = dict(state_dict)
    if "patch_embed.weight" in state_dict:
        w = state_dict.pop("patch_embed.weight")  # (D, C, P, P)
        state_dict["dense.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (D, P*P*C)
        if "patch_embed.bias" in state_dict:
            state_dict["dense.bias"] = state_dict.pop("patch_embed.bias")
    pe = state_dict.get("pos_embed")
    if pe is None or cfg.posemb != "learn":
        return state_dict
    prefix = int(cfg.pool == "cls")
    new_g = cfg.image_size // cfg.patch_size
    old_g = math.isqrt(pe.shape[1] - prefix)
    if old_g * old_g != pe.shape[1] - prefix:
        raise ValueError(f"pos_embed with {pe.shape[1]} entries is not {prefix} class + a square grid")
    return {**state_dict, "pos_embed": resize_pos_embed(pe, old_g, new_g, prefix)}


# ----------------------------------------------------------------------------- public weights

def _load(model, sd, source):
    """Strict load; a missing or differently-sized head stays zero-init (fine-tuning on new classes)."""
    if "head.weight" in sd and sd["head.weight"].shape != model.head.weight.shape:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd = adapt_state_dict(sd, model.cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{source} weights do not fit this ViT: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _config(sd_cfg, overrides):
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        raise ValueError(f"unknown Config fields {sorted(unknown)}")
    return Config(**{**sd_cfg, **overrides})


# lucidrains vit-pytorch `vit_pytorch.vit.ViT` names -> ours
_VIT_PYTORCH_RENAMES = [
    (r"^to_patch_embedding\.1\.", "ln0."),  # .0 is the Rearrange to (p1 p2 c) order
    (r"^to_patch_embedding\.2\.", "dense."),
    (r"^to_patch_embedding\.3\.", "ln1."),
    (r"^pos_embedding$", "pos_embed"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
    (r"^transformer\.layers\.(\d+)\.0\.to_qkv\.", r"blocks.\1.attn.qkv."),
    (r"^transformer\.layers\.(\d+)\.0\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.0\.", r"blocks.\1.norm2."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.1\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.4\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer\.norm\.", "norm."),
    (r"^mlp_head\.", "head."),
]


def from_vit_pytorch(state_dict, **overrides) -> Model:
    """Build a Model from a lucidrains vit-pytorch `vit_pytorch.vit.ViT` state dict (release 1.26's
    layout), whose stem is Dual PatchNorm (to_patch_embedding = Rearrange, LayerNorm, Linear,
    LayerNorm). pool="cls" -> "cls", pool="mean" -> "gap"; it must have dim_head = dim / heads.
    Its q/k/v have no bias and its LayerNorms torch's eps 1e-5: the Config gets qkv_bias=False,
    ln_eps=1e-5. The head count is not in a state dict: pass `heads=` (and `channels=` if not 3).
    Returns eval mode."""
    if "heads" not in overrides:
        raise ValueError("from_vit_pytorch needs heads=... (a state dict does not store the number of heads)")
    sd = {}
    for k, v in state_dict.items():
        for pattern, repl in _VIT_PYTORCH_RENAMES:
            k = re.sub(pattern, repl, k)
        sd[k] = v
    D = sd["dense.weight"].shape[0]
    cls = sd.pop("cls_token").reshape(-1, D)  # (1, D), or (0, D) for pool="mean"
    pool = "cls" if len(cls) else "gap"
    if pool == "cls":
        sd["cls_token"] = cls.reshape(1, 1, D)
    sd["pos_embed"] = sd["pos_embed"].reshape(1, -1, D)  # (1, T, D)
    if sd["blocks.0.attn.qkv.weight"].shape[0] != 3 * D:
        raise ValueError(f"heads * dim_head = {sd['blocks.0.attn.qkv.weight'].shape[0] // 3} != dim {D}: "
                         "only dim_head = dim / heads is supported")
    channels = overrides.get("channels", Config.channels)
    P = math.isqrt(sd["dense.weight"].shape[1] // channels)
    g = math.isqrt(sd["pos_embed"].shape[1] - (pool == "cls"))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = _config(dict(
        image_size=g * P, patch_size=P, channels=channels,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else Config.num_classes,
        width=D, depth=depth, mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], pool=pool, posemb="learn",
        ln_eps=1e-5, qkv_bias=False, patch_norm="dual",
    ), overrides)
    return _load(Model(cfg), sd, "vit-pytorch")
