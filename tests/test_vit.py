import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit  # noqa: E402
from vit import PRESETS, Config, Model  # noqa: E402

torch.set_num_threads(1)


from helpers import images as _images, perturb as _perturb, torchvision_stand_in  # noqa: E402
import transformers  # noqa: E402,F401  (first, as CI installs it)

torchvision_stand_in()

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_classes=5)




@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_shapes(pool, posemb):
    m = Model(Config(**TINY, pool=pool, posemb=posemb))
    assert m(_images(3)).shape == (3, 5)
    assert (m.cls_token is not None) == (pool == "cls")
    T = 16 + (pool == "cls")
    assert m.forward_features(_images(3)).shape == (3, T, 32)
    assert m.pos_embed.shape == (1, T, 32)
    assert ("pos_embed" in m.state_dict()) == (posemb == "learn")  # sincos is a fixed buffer
    m = Model(Config(**TINY, pool=pool, posemb=posemb, representation_size=24))
    assert m.pre_logits.weight.shape == (24, 32) and m(_images()).shape == (2, 5)


def test_init():
    torch.manual_seed(0)
    m = Model(Config(width=192, heads=3, mlp_dim=768))
    assert torch.equal(m(_images()), torch.zeros(2, 10))  # zero-init head
    assert torch.equal(m.cls_token, torch.zeros(1, 1, 192))
    assert abs(m.pos_embed.std().item() - 0.02) < 0.001 and m.pos_embed.shape == (1, 65, 192)
    assert m.blocks[0].mlp.fc1.bias.abs().max() < 1e-5  # N(0, 1e-6)
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0
    bound = math.sqrt(6 / (2 * 192))  # xavier of each (D, D) q/k/v kernel
    assert m.blocks[0].attn.qkv.weight.abs().max() <= bound
    assert m.blocks[0].attn.qkv.weight.std() > 0.9 * bound / math.sqrt(3)
    std = m.patch_embed.weight.std().item()  # lecun normal: 1/sqrt(fan_in)
    assert abs(std * math.sqrt(3 * 4 * 4) - 1) < 0.1
    m = Model(Config(head_bias_init=-2.0))
    assert torch.equal(m(_images()), torch.full((2, 10), -2.0))


def test_sincos2d_matches_big_vision_formula():
    pe = vit.posemb_sincos_2d(3, 4, 8)  # (1, 12, 8)
    omega = 1.0 / 10000 ** (torch.arange(2) / 1.0)
    i = 6  # grid point row 1, col 2
    x, y = 2.0, 1.0
    expect = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
    assert torch.allclose(pe[0, i], expect)


def test_invalid_config():
    for bad in [dict(image_size=30, patch_size=4), dict(width=30, heads=4), dict(pool="mean"),
                dict(posemb="rope"), dict(width=6, heads=2, posemb="sincos2d")]:
        with pytest.raises(ValueError):
            Model(Config(**bad))


def test_equations():
    """forward == the paper's equations written out with plain tensor ops."""
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY)))
    x = _images()
    P, D, h = 8, 32, 2
    patches = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * P * P)
    E = m.patch_embed.weight.reshape(D, -1).T  # (P*P*C, D) for (C, P, P)-ordered patches
    z = torch.cat([m.cls_token.expand(2, 1, D), patches @ E + m.patch_embed.bias], 1) + m.pos_embed
    ln = lambda t, mod: F.layer_norm(t, (D,), mod.weight, mod.bias, eps=1e-6)  # noqa: E731
    for b in m.blocks:
        q, k, v = (ln(z, b.norm1) @ b.attn.qkv.weight.T + b.attn.qkv.bias).split(D, -1)
        heads = lambda t: t.reshape(2, 17, h, D // h).transpose(1, 2)  # noqa: E731
        a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // h), -1) @ heads(v)
        z = z + b.attn.proj(a.transpose(1, 2).reshape(2, 17, D))  # z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        z = z + b.mlp.fc2(F.gelu(b.mlp.fc1(ln(z, b.norm2))))  # z_l = MLP(LN(z'_l)) + z'_l
    y = ln(z, m.norm)[:, 0]
    assert (m(x) - m.head(y)).abs().max() < 1e-5


def test_preset_param_counts():
    expect = {"ti/16": 5_717_416, "s/16": 22_050_664, "b/16": 86_567_656, "b/32": 88_224_232,
              "l/16": 304_326_632, "h/14": 632_045_800}
    for name, n in expect.items():
        with torch.device("meta"):
            m = Model(Config(**PRESETS[name]))
        assert sum(p.numel() for p in m.parameters()) == n, name
    for name in PRESETS:
        with torch.device("meta"):
            Model(Config(**PRESETS[name]))


def _hf_tiny():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    c = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8, num_labels=5, attn_implementation="eager")
    return _perturb(ViTForImageClassification(c))


def test_hf_parity(tmp_path):
    hf = _hf_tiny()
    x = _images(4)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    hf.save_pretrained(tmp_path / "st")  # config.json + model.safetensors (legacy checkpoint names)
    m = vit.from_hf(str(tmp_path / "st"))
    assert m.cfg.ln_eps == 1e-12 and m.cfg.num_classes == 5 and not m.training
    with torch.no_grad():
        assert (m(x) - ref).abs().max() < 1e-4
    # pytorch_model.bin with the transformers>=5 module names
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "st" / "config.json").read_bytes())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    m = vit.from_hf(str(tmp_path / "bin"))
    with torch.no_grad():
        assert (m(x) - ref).abs().max() < 1e-4
    # new classes: the head is left zero-init
    m = vit.from_hf(str(tmp_path / "st"), num_classes=3)
    assert torch.equal(m(x), torch.zeros(4, 3))


def test_safetensors_dtypes(tmp_path):
    from safetensors.torch import save_file
    ts = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 1, 3).bfloat16()}
    save_file(ts, tmp_path / "t.safetensors")
    got = vit.load_safetensors(tmp_path / "t.safetensors")
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)


def test_hf_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vit.from_hf(str(tmp_path))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="could not download"):
        vit.from_hf("http://127.0.0.1:9/vit")  # nothing listens on port 9: offline-like


@pytest.mark.parametrize("kw,pool", [(dict(), "cls"), (dict(class_token=False, global_pool="map"), "map"),
                                     (dict(class_token=False, global_pool="avg", fc_norm=False), "gap")])
def test_timm_parity(kw, pool):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    ref = _perturb(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                     mlp_ratio=2, num_classes=5, **kw))
    m = vit.from_timm(ref.state_dict(), heads=2)
    assert m.cfg.pool == pool
    x = _images(4)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


def test_resize_pos_embed():
    torch.manual_seed(0)
    small = Model(Config(**TINY))  # 32 px, 4x4 grid
    sd = small.state_dict()
    cfg = Config(**{**TINY, "image_size": 64})  # 8x8 grid
    big = Model(cfg)
    big.load_state_dict(vit.adapt_state_dict(sd, cfg))
    pe = big.pos_embed.detach()
    assert pe.shape == (1, 65, 32) and torch.equal(pe[:, 0], sd["pos_embed"][:, 0])
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(pe[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 64, 32))
    assert big(_images(size=64)).shape == (2, 5)
    assert vit.adapt_state_dict(sd, Config(**TINY))["pos_embed"] is sd["pos_embed"]  # same size: identity
    assert vit.resize_pos_embed(sd["pos_embed"], 4, 4, 1) is sd["pos_embed"]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_loss_goes_down(opt):
    torch.manual_seed(0)
    m = Model(Config(**TINY, pool="gap" if opt == "sgd" else "cls"))
    x, y = _images(8), torch.arange(8) % 5
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if opt == "sgd" else \
        torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x), y)
        o.zero_grad()
        loss.backward()
        o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast():
    m = _perturb(Model(Config(**TINY, pool="map")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_images())
    assert out.shape == (2, 5) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - m(_images())).abs().max() < 0.1
