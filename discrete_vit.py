"""Discrete ViT (Dr. ViT): "Discrete Representations Strengthen Vision Transformer Robustness"
(Mao et al., ICLR 2022), https://arxiv.org/abs/2111.10493

The key trick: give the ViT discrete tokens from a frozen vector-quantised image tokenizer (a VQGAN
encoder) beside its usual pixel embedding. A code index does not change under small pixel
perturbations and carries little texture, which pushes the ViT towards global shape. Two stages:

  1. the tokenizer (`--stage tokenizer`): a conv encoder down-samples the image to the ViT's patch
     grid, z = Enc(x) (g, g, d); each z_i is replaced by its nearest codebook vector (ties -> lowest index)
         k_i = argmin_k ||z_i||^2 - 2 z_i.e_k + ||e_k||^2,     q_i = e_{k_i}
     with straight-through gradients (q = z + sg(q - z)), and a conv decoder reconstructs the image:
         L = ||Dec(q) - x||^2 + ||sg(z) - q||^2 + beta ||z - sg(q)||^2,      beta = 0.25 (commitment)
  2. the classifier (`--stage classifier --tokenizer CKPT`), tokenizer frozen. Each token is the
     concatenation (official scenic code, "fusion by concatenation, the algorithm that we finally use")
         token_i = [ x_p^i E  |  onehot(k_i) (sg(C) + Delta)  |  0 ]        (fusion_dim | d | D - fusion_dim - d)
     of a pixel embedding (stride-P conv to fusion_dim channels), the frozen codebook vector plus a
     learned correction Delta (zero init, trained at lr/100), and zeros up to the width D; then
     vit.py's class token, learned positions and pre-LN Transformer, unchanged. `--fusion discrete`
     is the paper's "discrete only" model: codebook vectors (+ Delta), a linear map d -> D, the ViT.

The official tokenizer is a VQGAN (f16, channel multipliers [1,1,2,2,4], 128 filters, 2 res-blocks,
GroupNorm, swish, codebook 1024 x 256) trained with perceptual and adversarial losses too; here it is
the same conv architecture trained as a VQ-VAE (reconstruction + codebook + commitment) with dead-code
restarts, so that it trains in minutes on a CPU. Official classifier: sigmoid cross-entropy, head bias
-6.9 (`--loss sigmoid --head_bias_init -6.9`; the presets set both).

Train:  python train.py discrete_vit --stage tokenizer
        python train.py discrete_vit --stage classifier --tokenizer out/discrete_vit-tokenizer-shapes/ckpt.pt
        python train.py discrete_vit --init CKPT --eval corruptions --baseline VIT_CKPT   # robustness (mCE)
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
    # Discrete ViT
    stage: str = "classifier"    # "tokenizer" (stage 1: the VQ autoencoder) | "classifier" (stage 2)
    tokenizer: str = ""          # stage 2: the stage-1 checkpoint (ckpt.pt or its folder); frozen
    fusion: str = "concat"       # "concat" (paper: pixel | discrete | zeros) | "discrete" ("discrete only")
    fusion_dim: int = 8          # pixel-embedding channels of a concat token (D/8; official S/16: 32 of 384)
    code_lr_scale: float = 0.01  # Delta trains at lr * code_lr_scale (official: lr / 100)
    loss: str = "softmax"        # "softmax" | "sigmoid" (official: sigmoid cross-entropy, head_bias_init -6.9)
    # the VQ tokenizer: conv encoder -> nearest codebook vector -> conv decoder
    codebook_size: int = 256     # K
    code_dim: int = 32           # d
    filters: int = 32            # base channels (VQGAN: 128)
    channel_mults: str = "1,2,2" # channels per level (VQGAN f16: "1,1,2,2,4"); 2x down-sampling between levels,
                                 # so 2^(levels-1) must equal patch_size: the code grid is the patch grid
    res_blocks: int = 1          # residual blocks per level (VQGAN: 2)
    commitment: float = 0.25     # beta
    dead_code_threshold: float = 0.03  # restart a code whose usage falls below this share of uniform (0: never)


# train.py's defaults for this file: vit.py's recipe for the classifier, the README miniature's for the tokenizer
TRAIN = dict(steps=2000, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.05)
TRAIN_BY_STAGE = {"tokenizer": dict(steps=800, batch_size=64, lr=1e-3)}

# name -> Config overrides. Paper sizes at 224 px / 1000 classes with the official VQGAN f16 tokenizer
# (codebook 1024 x 256), sigmoid loss and head bias -6.9, concat fusion with 32 pixel channels.
# Ti (D=192) is narrower than a 256-d code, so only "discrete only" fits it (the official concat code
# would ask for D - 256 - 1 < 0 pixel channels). "ti/4" and "s/4" are CIFAR-sized (32 px, f4 tokenizer).
_VQGAN_F16 = dict(codebook_size=1024, code_dim=256, filters=128, channel_mults="1,1,2,2,4", res_blocks=2)
_PAPER = dict(patch_size=16, image_size=224, num_classes=1000, fusion_dim=32, loss="sigmoid", head_bias_init=-6.9,
              **_VQGAN_F16)
_CIFAR = dict(patch_size=4, image_size=32, num_classes=10, fusion_dim=32, codebook_size=1024, code_dim=256,
              filters=64, channel_mults="1,2,2", res_blocks=2)
PRESETS = {
    "ti/16": dict(width=192, depth=12, heads=3, mlp_dim=768, fusion="discrete", **_PAPER),
    "s/16": dict(width=384, depth=12, heads=6, mlp_dim=1536, **_PAPER),
    "b/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, **_PAPER),
    "l/16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, **_PAPER),
    "ti/4": dict(width=192, depth=12, heads=3, mlp_dim=768, fusion="discrete", **_CIFAR),
    "s/4": dict(width=384, depth=12, heads=6, mlp_dim=1536, **_CIFAR),
}


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


# ----------------------------------------------------------------------------- the VQ tokenizer (stage 1)

def group_norm(channels):
    """VQGAN's GroupNorm: 32 groups (fewer when the channels do not split into 32), flax eps 1e-6."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3 (bias-free convs), plus a shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):  # x: (B, cin, h, w)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, h, w)
        h = self.conv2(F.silu(self.norm2(h)))
        # as scenic's (and MaskGIT's) VQGAN: where the width changes, the 1x1 "shortcut" is applied to h, not x
        return h + (x if self.shortcut is None else self.shortcut(h))


def vq_encoder(cfg):
    """Image in [0, 1] (B, C, H, W) -> z (B, d, H/P, W/P): conv, res-blocks per level with 2x average
    pooling between levels, res-blocks, GroupNorm, swish, 1x1 conv to the code dimension."""
    mults = [int(m) for m in cfg.channel_mults.split(",")]
    c = cfg.filters
    layers = [nn.Conv2d(cfg.channels, c, 3, padding=1, bias=False)]
    for i, m in enumerate(mults):
        for _ in range(cfg.res_blocks):
            layers.append(ResBlock(c, cfg.filters * m))
            c = cfg.filters * m
        if i < len(mults) - 1:
            layers.append(nn.AvgPool2d(2))
    layers += [ResBlock(c, c) for _ in range(cfg.res_blocks)]
    layers += [group_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def vq_decoder(cfg):
    """q (B, d, g, g) -> image in [0, 1] (B, C, H, W): the encoder mirrored, nearest 2x up-sampling + conv."""
    mults = [int(m) for m in cfg.channel_mults.split(",")]
    c = cfg.filters * mults[-1]
    layers = [nn.Conv2d(cfg.code_dim, c, 3, padding=1)]
    layers += [ResBlock(c, c) for _ in range(cfg.res_blocks)]
    for i in reversed(range(len(mults))):
        for _ in range(cfg.res_blocks):
            layers.append(ResBlock(c, cfg.filters * mults[i]))
            c = cfg.filters * mults[i]
        if i > 0:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
    layers += [group_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.channels, 3, padding=1)]
    return nn.Sequential(*layers)


class VQTokenizer(nn.Module):
    """Encoder + codebook (K, d) (+ decoder in stage 1). Images in [-1, 1]; the tokenizer sees (x + 1) / 2."""

    def __init__(self, cfg, decoder=True):
        super().__init__()
        self.cfg = cfg
        K, d = cfg.codebook_size, cfg.code_dim
        self.encoder = vq_encoder(cfg)
        self.codebook = nn.Parameter(torch.empty(K, d).uniform_(-math.sqrt(3 / K), math.sqrt(3 / K)))  # flax init
        # each code's share of the assignments, x K (1 = uniform), an EMA over steps; 0 at start, so the
        # first training step restarts every code on the batch's encoder outputs (a data-dependent init)
        self.register_buffer("usage", torch.zeros(K))
        self.decoder = vq_decoder(cfg) if decoder else None

    def quantize(self, z):  # z: (B, d, g, g)
        """Nearest codebook vector per position: codes (B, g, g) and q (B, d, g, g); distances in fp32."""
        B, d, g, _ = z.shape
        with torch.autocast(z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*N, d)
            e = self.codebook.float()  # (K, d)
            dist = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ e.t() + e.pow(2).sum(1)[None]  # (B*N, K)
            codes = dist.argmin(1)  # (B*N,), the first (lowest) index on ties
            q = F.embedding(codes, self.codebook).view(B, g, g, d).permute(0, 3, 1, 2)  # (B, d, g, g)
        return codes.view(B, g, g), q

    @torch.no_grad()
    def encode(self, images):  # images: (B, C, H, W) in [-1, 1]
        """Code indices (B, g, g) of the images (no gradients: the tokenizer is frozen in stage 2)."""
        return self.quantize(self.encoder((images + 1) / 2))[0]

    def forward(self, images):  # images: (B, C, H, W) in [-1, 1]
        z = self.encoder((images + 1) / 2)  # (B, d, g, g)
        if self.training and self.cfg.dead_code_threshold > 0:
            self.restart_dead_codes(z)
        codes, q = self.quantize(z)
        codebook_loss = F.mse_loss(q, z.detach().float())  # moves the codes towards the encoder outputs
        commitment_loss = F.mse_loss(z.float(), q.detach())  # keeps the encoder near its codes
        q = z + (q - z).detach()  # straight-through: forward q, backward dL/dq -> dL/dz
        counts = torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size).float()  # (K,)
        if self.training:
            self.update_usage(counts)
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())  # exp(entropy): K when uniform
        return dict(recon=self.decoder(q.to(z.dtype)), target=(images + 1) / 2, codes=codes, counts=counts,
                    codebook_loss=codebook_loss, commitment_loss=commitment_loss, perplexity=perplexity)

    @torch.no_grad()
    def update_usage(self, counts, decay=0.95):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every process sees the same usage, so restarts agree
        self.usage.mul_(decay).add_((1 - decay) * counts / counts.sum() * len(counts))

    @torch.no_grad()
    def restart_dead_codes(self, z):
        """Dead-code restart: a code used less than `dead_code_threshold` x the uniform share (EMA) is
        moved onto a random encoder output of this batch, and counted as in use again."""
        dead = self.usage < self.cfg.dead_code_threshold  # (K,)
        n = int(dead.sum())
        if n == 0:
            return
        zf = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*N, d)
        pick = torch.randint(len(zf), (n,), device=zf.device)
        self.codebook[dead] = zf[pick].to(self.codebook.dtype)
        self.usage[dead] = 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook.data, 0)  # one process's choice for all


class Model(nn.Module):
    """Discrete ViT. Stage "classifier": images (B, C, H, W) in [-1, 1] -> logits (B, num_classes), with the
    frozen tokenizer inside. Stage "tokenizer": images -> dict (reconstruction, codes, VQ losses)."""

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
        if cfg.stage not in ("tokenizer", "classifier"):
            raise ValueError(f"unknown stage {cfg.stage!r}: use 'tokenizer' or 'classifier'")
        if cfg.fusion not in ("concat", "discrete"):
            raise ValueError(f"unknown fusion {cfg.fusion!r}: use 'concat' (pixel | discrete) or 'discrete'")
        if cfg.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown loss {cfg.loss!r}: use 'softmax' or 'sigmoid'")
        try:
            mults = [int(m) for m in cfg.channel_mults.split(",")]
        except ValueError:
            raise ValueError(f"channel_mults {cfg.channel_mults!r} is not a comma-separated list of ints") from None
        if 2 ** (len(mults) - 1) != cfg.patch_size:
            raise ValueError(f"the tokenizer down-samples by 2^(levels-1) = {2 ** (len(mults) - 1)} "
                             f"(channel_mults {cfg.channel_mults!r}) but patch_size is {cfg.patch_size}: "
                             f"its code grid must be the patch grid (e.g. {len(bin(cfg.patch_size)) - 2} levels)")
        if cfg.stage == "classifier" and cfg.fusion == "concat" and cfg.fusion_dim + cfg.code_dim > cfg.width:
            raise ValueError(f"fusion_dim {cfg.fusion_dim} + code_dim {cfg.code_dim} exceed width {cfg.width}: "
                             f"a concat token holds both (or use --fusion discrete)")
        self.cfg = cfg
        D, P, C = cfg.width, cfg.patch_size, cfg.channels
        g = cfg.image_size // P  # grid side; N = g*g patches = codes

        self.tokenizer = VQTokenizer(cfg, decoder=cfg.stage == "tokenizer")
        if cfg.stage == "tokenizer":
            return  # stage 1 trains the tokenizer alone
        self.tokenizer.requires_grad_(False)  # frozen: no gradients, not given to the optimizer
        # the codebook correction Delta (K, d), zero init, at lr / 100 (scenic finetune_embed_code)
        self.code_delta = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.code_dim))
        self.code_delta.lr_scale = cfg.code_lr_scale
        if cfg.fusion == "concat":
            # pixel embedding: stride-P conv to fusion_dim channels (the rest of the token: code, zeros)
            self.patch_embed = nn.Conv2d(C, cfg.fusion_dim, kernel_size=P, stride=P)
            lecun_normal_(self.patch_embed.weight, fan_in=C * P * P)
            nn.init.zeros_(self.patch_embed.bias)
            self.code_proj = None
        else:
            # "discrete only": codes -> D by a linear map (scenic's 1x1 "linear_projection")
            self.patch_embed = None
            self.code_proj = nn.Linear(cfg.code_dim, D)
            lecun_normal_(self.code_proj.weight, fan_in=cfg.code_dim)
            nn.init.zeros_(self.code_proj.bias)
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

    def embed(self, images):  # images: (B, C, H, W)
        """The fused tokens (B, N, D): [pixel (fusion_dim) | sg(C)[code] + Delta[code] (d) | zeros]."""
        codes = self.tokenizer.encode(images).flatten(1)  # (B, N), frozen: no gradient reaches the tokenizer
        e = F.embedding(codes, self.tokenizer.codebook.detach() + self.code_delta)  # (B, N, d)
        if self.code_proj is not None:
            return self.code_proj(e)  # (B, N, D), "discrete only"
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, fusion_dim), patches in row-major order
        zeros = x.new_zeros(*x.shape[:2], self.cfg.width - x.shape[2] - e.shape[2])  # (B, N, D - fusion_dim - d)
        return torch.cat([x, e.to(x.dtype), zeros], dim=2)  # (B, N, D)

    def forward_features(self, images):  # images: (B, C, H, W)
        x = self.embed(images)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1+N, D)
        x = self.drop(x + self.pos_embed)  # z0
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, T, D)

    def forward(self, images):  # images: (B, C, H, W) in [-1, 1]
        if self.cfg.stage == "tokenizer":
            return self.tokenizer(images)  # dict: recon, target, codes, counts, VQ losses, perplexity
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


# ----------------------------------------------------------------------------- the two stages' tasks

TOKENIZER_FIELDS = ("image_size", "patch_size", "channels", "codebook_size", "code_dim", "filters", "channel_mults",
                    "res_blocks")


def setup(model, cfg, load_checkpoint):
    """Stage 2: load the stage-1 tokenizer named by --tokenizer into the (frozen) model.tokenizer."""
    if cfg.stage != "classifier":
        return
    if not cfg.tokenizer:
        raise ValueError("the classifier stage needs a trained tokenizer: first `python train.py discrete_vit "
                         "--stage tokenizer`, then pass --tokenizer out/discrete_vit-tokenizer-<data>/ckpt.pt")
    ckpt = load_checkpoint(cfg.tokenizer, "discrete_vit")
    saved = ckpt["config"]
    if saved.get("stage") != "tokenizer":
        raise ValueError(f"--tokenizer {cfg.tokenizer} is a {saved.get('stage')!r}-stage checkpoint, "
                         "not a tokenizer (train one with --stage tokenizer)")
    wrong = [f"--{k} {saved.get(k)} (this run: {getattr(cfg, k)})" for k in TOKENIZER_FIELDS
             if saved.get(k) != getattr(cfg, k)]
    if wrong:
        raise ValueError(f"--tokenizer {cfg.tokenizer} was trained with another configuration; "
                         f"pass {', '.join(wrong)}")
    sd = {k[len("tokenizer."):]: v for k, v in ckpt["model"].items()
          if k.startswith("tokenizer.") and not k.startswith("tokenizer.decoder.")}
    model.tokenizer.load_state_dict(sd)


def _images(x, cfg):
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1] at cfg.image_size (as train.py's default batches)."""
    x = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    if x.shape[-1] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    return x


def _classifier_loss(logits, labels, kind):
    if kind == "sigmoid":  # official: multi-label sigmoid cross-entropy on one-hot targets, summed over classes
        target = F.one_hot(labels, logits.shape[-1]).float()
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)  # (B,)
    return F.cross_entropy(logits, labels, reduction="none")  # (B,)


def _tokenizer_loss(out, cfg):
    recon = F.mse_loss(out["recon"].float(), out["target"])
    total = recon + out["codebook_loss"] + cfg.commitment * out["commitment_loss"]
    return total, recon


def loss(model, batch):
    cfg = getattr(model, "module", model).cfg  # under DDP the Config sits on the wrapped module
    out = model(batch["image"])
    if cfg.stage == "tokenizer":
        total, recon = _tokenizer_loss(out, cfg)
        return total, {"recon_mse": recon.detach(), "commitment": out["commitment_loss"].detach(),
                       "perplexity": out["perplexity"].detach()}
    logits = out.float()  # (B, K)
    return _classifier_loss(logits, batch["label"], cfg.loss).mean(), \
        {"acc": (logits.argmax(-1) == batch["label"]).float().mean()}


@torch.no_grad()
def evaluate(model, data, cfg, batch_size=500):
    """Classifier: test accuracy and loss. Tokenizer: reconstruction MSE (pixels in [0, 1]) and PSNR, the
    codebook's perplexity over all test codes (K if every code were used equally) and the codes used."""
    x_test, y_test = data.x_test, data.y_test
    if cfg.stage == "tokenizer":
        sq, n, counts, loss_sum = 0.0, 0, torch.zeros(cfg.codebook_size, device=x_test.device), 0.0
        for i in range(0, len(x_test), batch_size):
            out = model(_images(x_test[i:i + batch_size], cfg))
            m = len(out["recon"])
            sq += F.mse_loss(out["recon"].float(), out["target"]).item() * m
            loss_sum += _tokenizer_loss(out, cfg)[0].item() * m
            counts += out["counts"]
            n += m
        p = counts / counts.sum()
        mse = sq / n
        return {"test_recon_mse": mse, "test_psnr": 10 * math.log10(1 / max(mse, 1e-12)), "test_loss": loss_sum / n,
                "test_perplexity": math.exp(-(p * p.clamp_min(1e-10).log()).sum().item()),
                "test_codes_used": int((counts > 0).sum())}
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x_test), batch_size):
        logits = model(_images(x_test[i:i + batch_size], cfg)).float()
        labels = y_test[i:i + batch_size]
        loss_sum += _classifier_loss(logits, labels, cfg.loss).sum().item()
        correct += (logits.argmax(-1) == labels).sum().item()
    return {"test_acc": correct / len(x_test), "test_loss": loss_sum / len(x_test)}


def diagnostics(model):
    """The codebook: codes whose usage EMA is below the restart threshold (stage 1); |Delta| (stage 2)."""
    if model.cfg.stage == "tokenizer":
        return {"dead_codes": float((model.tokenizer.usage < model.cfg.dead_code_threshold).sum())}
    return {"delta_rms": float(model.code_delta.detach().pow(2).mean().sqrt())}
