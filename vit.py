"""ViT: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., ICLR 2021), https://arxiv.org/abs/2010.11929

The key trick: no convolutions beyond a patchify. Cut the image into P x P patches, embed each one
linearly (E), prepend a learned [class] token, add learned position embeddings, and run a standard
pre-LayerNorm Transformer encoder; classify from the class token:

    z0   = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos        x_p: (N, P*P*C), E: (P*P*C, D), E_pos: (N+1, D)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                    l = 1..L
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L)[0]                                    logits = head(y)

Also here, from big_vision: global average pooling ("gap", no class token) or a multi-head
attention-pooling head ("map"), fixed 2-D sin-cos positions, and the paper's pre-logits tanh layer.
Weights load from Hugging Face (`from_hf`) and timm (`from_timm`) with identical outputs.

Train:  python train.py vit
"""

import hashlib
import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
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


# train.py's defaults for this file: Config() reaches ~95% on `shapes` in 2000 steps (README)
TRAIN = dict(steps=2000, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.05)

# name -> Config overrides. Paper sizes at 224 px / 1000 classes (ViT paper Table 1, big_vision
# decode_variant); "mu" is big_vision's unit-test size; "ti/4" and "s/4" are CIFAR-sized.
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
    """ViT classifier: images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""

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


# ----------------------------------------------------------------------------- public weights

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


# HF ViT names (legacy checkpoints, and transformers>=5 module names) -> ours; applied in order
_HF_RENAMES = [
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^(encoder\.layer|layers)\.(\d+)\.", r"blocks.\2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.(intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."),
    (r"\.(output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _download(url, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({getattr(e, 'reason', e)}); offline, put config.json "
                           f"and model.safetensors in a folder and pass the folder instead") from None
    os.replace(tmp, dest)  # atomic: a cached file is always complete


def from_hf(path_or_url: str, **overrides) -> Model:
    """Build a Model from a Hugging Face ViT (`ViTForImageClassification`/`ViTModel`) folder holding
    config.json and model.safetensors (or pytorch_model.bin), an http(s) URL of such a folder
    (e.g. https://huggingface.co/google/vit-base-patch16-224/resolve/main; cached under $ZOO_CACHE),
    or a hub id "owner/name". The HF pooler is dropped (ViTForImageClassification ignores it too);
    with no classifier weights, or `num_classes=` that differs, the head stays zero-init.
    `overrides` set Config fields (e.g. image_size=384 resizes the positions). Returns eval mode."""
    s = str(path_or_url)
    is_url = s.startswith(("http://", "https://"))
    hub_id = not is_url and not Path(s).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", s)
    url = f"https://huggingface.co/{s}/resolve/main" if hub_id else s
    if is_url or hub_id:
        cache = Path(os.environ.get("ZOO_CACHE", "~/.cache/vitzoo")).expanduser()
        folder = cache / "hf" / hashlib.sha256(url.encode()).hexdigest()[:16]
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).exists():
                try:
                    _download(url.rstrip("/") + "/" + name, folder / name)
                except RuntimeError as e:
                    raise RuntimeError(f"no folder {s!r}; as a hub id: {e}" if hub_id else str(e)) from None
    else:
        folder = Path(s)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: pass a Hugging Face ViT folder (or its URL)")
    c = json.loads((folder / "config.json").read_text())
    if c.get("model_type", "vit") != "vit" or c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{folder}: model_type {c.get('model_type')!r}, hidden_act {c.get('hidden_act')!r}; "
                         "only plain ViT with exact gelu is supported")

    if (folder / "model.safetensors").is_file():
        sd = load_safetensors(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():  # sharded
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        sd = {k: v for shard in sorted(shards) for k, v in load_safetensors(folder / shard).items()}
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")

    ours = {}
    for k, v in sd.items():
        for pattern, repl in _HF_RENAMES:
            k = re.sub(pattern, repl, k)
        if not k.startswith(("pooler.", "embeddings.mask_token")):
            ours[k] = v
    for i in range(c["num_hidden_layers"]):  # fuse q, k, v -> qkv rows [q; k; v]
        for p in ("weight", "bias"):
            parts = [ours.pop(f"blocks.{i}.attn.{n}.{p}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)

    head = ours.get("head.weight")
    num_classes = head.shape[0] if head is not None else len(c.get("id2label") or {0: 0, 1: 1})
    cfg = _config(dict(
        image_size=c["image_size"], patch_size=c["patch_size"], channels=c.get("num_channels", 3),
        num_classes=num_classes, width=c["hidden_size"], depth=c["num_hidden_layers"],
        heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"], pool="cls", posemb="learn",
        ln_eps=c.get("layer_norm_eps", 1e-12), qkv_bias=c.get("qkv_bias", True),
    ), overrides)
    return _load(Model(cfg), ours, f"Hugging Face ({folder})")


def from_timm(state_dict, **overrides) -> Model:
    """Build a Model from a timm `VisionTransformer` state dict: class token + global_pool="token"
    (pool "cls"), class_token=False + global_pool="map" ("map") or global_pool="avg" with
    fc_norm=False ("gap"). The head count is not in a state dict: pass `heads=`. Returns eval mode."""
    sd = dict(state_dict)
    if "heads" not in overrides:
        raise ValueError("from_timm needs heads=... (a state dict does not store the number of heads)")
    if "fc_norm.weight" in sd:
        raise ValueError("timm's fc_norm (LayerNorm after pooling) is not in this ViT: use fc_norm=False")
    ours = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.proj.", "patch_embed.").replace("attn_pool.latent", "map_head.probe")
        ours[k.replace("attn_pool.", "map_head.")] = v
    pool = "cls" if "cls_token" in ours else "map" if "map_head.probe" in ours else "gap"
    w = ours["patch_embed.weight"]  # (D, C, P, P)
    g = math.isqrt(ours["pos_embed"].shape[1] - (pool == "cls"))
    depth = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("blocks."))
    cfg = _config(dict(
        image_size=g * w.shape[-1], patch_size=w.shape[-1], channels=w.shape[1],
        num_classes=ours["head.weight"].shape[0] if "head.weight" in ours else Config.num_classes,
        width=w.shape[0], depth=depth, mlp_dim=ours["blocks.0.mlp.fc1.weight"].shape[0], pool=pool,
        posemb="learn", ln_eps=1e-6, qkv_bias="blocks.0.attn.qkv.bias" in ours,
    ), overrides)
    return _load(Model(cfg), ours, "timm")
