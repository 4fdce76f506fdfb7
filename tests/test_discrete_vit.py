"""discrete_vit.py: the quantiser (nearest code, ties, straight-through gradient, commitment loss), dead-code
restarts, the fusion token layout, the frozen tokenizer and Delta's learning rate, the sigmoid loss, preset
counts, setup()'s errors, and both stages through train.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import discrete_vit as dv  # noqa: E402
import vit  # noqa: E402
from discrete_vit import PRESETS, Config, Model  # noqa: E402
from helpers import images as _images  # noqa: E402

torch.set_num_threads(1)

TOK = dict(image_size=16, patch_size=4, channels=3, codebook_size=16, code_dim=8, filters=8, channel_mults="1,2,2",
           res_blocks=1)
CLS = dict(TOK, width=32, depth=1, heads=2, mlp_dim=64, num_classes=4, fusion_dim=8)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "discrete_vit", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def flags(d):
    return [s for k, v in d.items() for s in (f"--{k}", str(v))]


# ----------------------------------------------------------------------------- the quantiser

def test_nearest_code_and_ties_to_lowest_index():
    tok = dv.VQTokenizer(Config(**TOK), decoder=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tok.codebook.copy_(torch.randn(16, 8, generator=g))
        tok.codebook[9] = tok.codebook[3]  # a duplicate: equal distances, argmin must pick 3
    z = torch.randn(2, 8, 4, 4, generator=g)  # (B, d, g, g)
    z[0, :, 1, 2] = tok.codebook[3]  # exactly on the duplicated code
    codes, q = tok.quantize(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.stack([((v - tok.codebook) ** 2).sum(1).argmin() for v in zf]).view(2, 4, 4)
    assert torch.equal(codes, brute) and codes[0, 1, 2] == 3 and (codes != 9).all()
    assert torch.equal(q, tok.codebook[codes].permute(0, 3, 1, 2))


def _captured(tok, images):
    """Run the tokenizer, keeping the encoder output z and the decoder input (the straight-through q)."""
    seen = {}

    def keep(name, t):  # returns None: the hooks leave the tensors as they are
        if t.requires_grad:
            t.retain_grad()
        seen[name] = t

    h1 = tok.encoder.register_forward_hook(lambda m, i, o: keep("z", o))
    h2 = tok.decoder.register_forward_pre_hook(lambda m, i: keep("q", i[0]))
    out = tok(images)
    h1.remove(), h2.remove()
    return out, seen["z"], seen["q"]


def test_straight_through_gradient_and_commitment_loss():
    cfg = Config(**TOK, dead_code_threshold=0)
    tok = dv.VQTokenizer(cfg)
    out, z, q = _captured(tok, _images(4, 16))
    codes = out["codes"]
    e = tok.codebook[codes].permute(0, 3, 1, 2)  # (B, d, g, g) the chosen codes
    assert torch.allclose(q, e, atol=1e-6)  # forward: the decoder sees the codebook vectors
    want = ((z - e) ** 2).mean()
    assert torch.allclose(out["commitment_loss"], want) and torch.allclose(out["codebook_loss"], want)
    # backward of the reconstruction: the decoder input's gradient is copied to z unchanged
    F.mse_loss(out["recon"], out["target"]).backward()
    assert q.grad.abs().sum() > 0 and torch.equal(z.grad, q.grad)
    assert tok.codebook.grad is None  # the reconstruction does not reach the codebook (straight-through)
    # the commitment term moves only the encoder, the codebook term only the codebook
    tok.zero_grad()
    out, z, q = _captured(tok, _images(4, 16))
    (0.25 * out["commitment_loss"]).backward(retain_graph=True)
    assert tok.codebook.grad is None and tok.encoder[0].weight.grad.abs().sum() > 0
    assert torch.allclose(z.grad, 0.25 * 2 * (z - e).detach() / z.numel(), atol=1e-9)
    tok.zero_grad()
    out["codebook_loss"].backward()
    assert tok.encoder[0].weight.grad is None and tok.codebook.grad.abs().sum() > 0


def test_dead_code_restart_uses_the_codebook():
    cfg = Config(**TOK)
    tok = dv.VQTokenizer(cfg).train()
    assert (tok.usage == 0).all()  # every code dead at the start: the first step initialises them on data
    out, z, _ = _captured(tok, _images(8, 16))
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    assert all(((zf - c).abs().sum(1) < 1e-6).any() for c in tok.codebook.detach())  # each code is some z
    assert out["perplexity"] > 1 and abs(tok.usage.mean().item() - 1.0) < 0.05 + 1e-6
    with torch.no_grad():  # a code nobody picks falls below the threshold and is moved onto a batch vector
        tok.codebook[5] = 1e3
        tok.usage[5] = 0.0
    tok(_images(8, 16, seed=1))
    assert tok.codebook[5].abs().max() < 1e2 and tok.usage[5] > 0.9


# ----------------------------------------------------------------------------- the classifier's tokens

@pytest.mark.parametrize("fusion", ["concat", "discrete"])
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_shapes(fusion, pool):
    m = Model(Config(**CLS, fusion=fusion, pool=pool))
    x = _images(3, 16)
    assert m(x).shape == (3, 4)
    assert m.embed(x).shape == (3, 16, 32)  # (B, N, D): a 4x4 grid of codes = patches
    assert m.forward_features(x).shape == (3, 16 + (pool == "cls"), 32)
    assert m.code_delta.shape == (16, 8) and m.code_delta.lr_scale == 0.01
    assert (m.patch_embed is None) == (fusion == "discrete") and (m.code_proj is None) == (fusion == "concat")
    if fusion == "concat":
        assert m.patch_embed.weight.shape == (8, 3, 4, 4)  # stride-P conv to fusion_dim channels
    t = Model(Config(**TOK, stage="tokenizer"))(x)
    assert t["recon"].shape == (3, 3, 16, 16) and t["codes"].shape == (3, 4, 4)


def test_concat_token_layout():
    """token = [pixel conv (fusion_dim) | sg(C)[code] + Delta[code] (d) | zeros (D - fusion_dim - d)]."""
    m = Model(Config(**CLS))
    with torch.no_grad():
        m.code_delta.normal_()
    x = _images(2, 16)
    tok = m.embed(x)  # (2, 16, 32)
    codes = m.tokenizer.encode(x).flatten(1)  # (2, 16)
    pixel = F.conv2d(x, m.patch_embed.weight, m.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    assert torch.allclose(tok[..., :8], pixel, atol=1e-6)
    assert torch.allclose(tok[..., 8:16], (m.tokenizer.codebook + m.code_delta)[codes], atol=1e-6)
    assert (tok[..., 16:] == 0).all()
    # discrete only: the same code vectors through one linear map to D
    d = Model(Config(**CLS, fusion="discrete"))
    d.tokenizer.load_state_dict(m.tokenizer.state_dict())
    assert torch.allclose(d.embed(x), d.code_proj(d.tokenizer.codebook[codes]), atol=1e-6)


def test_discrete_only_ignores_perturbations_that_keep_the_codes():
    torch.manual_seed(0)  # a fixed model: with a random one a code could sit at a near-tie
    m = Model(Config(**CLS, fusion="discrete")).eval()
    x = _images(4, 16)
    y = x + 1e-4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.tokenizer.encode(x), m.tokenizer.encode(y))
    with torch.no_grad():
        m.head.weight.normal_()  # non-zero logits
    assert torch.equal(m(x), m(y))  # bit-identical: the pixels enter only through the code indices
    c = Model(Config(**CLS)).eval()
    with torch.no_grad():
        c.head.weight.normal_()
    assert not torch.equal(c(x), c(y))  # the concat model also sees the pixels


def test_no_gradient_reaches_the_frozen_tokenizer():
    m = Model(Config(**CLS))
    assert not any(p.requires_grad for p in m.tokenizer.parameters())
    with torch.no_grad():
        m.head.weight.normal_()
    dv.loss(m, {"image": _images(4, 16), "label": torch.tensor([0, 1, 2, 3])})[0].backward()
    assert all(p.grad is None for p in m.tokenizer.parameters())
    assert m.code_delta.grad.abs().sum() > 0 and m.patch_embed.weight.grad.abs().sum() > 0


def test_sigmoid_loss_with_official_head_bias():
    m = Model(Config(**CLS, loss="sigmoid", head_bias_init=-6.9))
    loss, _ = dv.loss(m, {"image": _images(2, 16), "label": torch.tensor([1, 3])})
    want = F.softplus(torch.tensor(6.9)) + 3 * F.softplus(torch.tensor(-6.9))  # 1 positive, 3 negatives per image
    assert torch.allclose(loss, want)
    soft, _ = dv.loss(Model(Config(**CLS)), {"image": _images(2, 16), "label": torch.tensor([1, 3])})
    assert torch.allclose(soft, torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("stage", ["tokenizer", "classifier"])
def test_loss_goes_down(stage):
    torch.manual_seed(0)
    m = Model(Config(**CLS, stage=stage))
    x, y = _images(16, 16), torch.arange(16) % 4
    x[:, :, : 8] += y[:, None, None, None] * 0.3  # a learnable signal
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss, metrics = dv.loss(m, {"image": x.clamp(-1, 1), "label": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_invalid_config():
    for bad in [dict(stage="vq"), dict(fusion="sum"), dict(loss="l2"), dict(channel_mults="1,2"),
                dict(channel_mults="1;2;2"), dict(fusion_dim=30), dict(image_size=18)]:
        with pytest.raises(ValueError):
            Model(Config(**{**CLS, **bad}))


def test_same_vit_as_vit_py():
    """The Transformer after the tokens is vit.py's: the same defaults, blocks and parameter names."""
    base = {k: v for k, v in vars(Config()).items() if k in vars(vit.Config())}
    assert base == vars(vit.Config()) and dv.TRAIN == vit.TRAIN
    ours, theirs = Model(Config()).state_dict(), vit.Model(vit.Config()).state_dict()
    vit_part = {k for k in ours if not k.startswith(("tokenizer.", "code_", "patch_embed."))}
    assert vit_part == {k for k in theirs if not k.startswith("patch_embed.")}
    assert all(ours[k].shape == theirs[k].shape for k in vit_part)


# ----------------------------------------------------------------------------- presets

def _resblock(cin, cout):  # GN(cin), conv3x3 cin->cout, GN(cout), conv3x3 cout->cout (bias-free), 1x1 shortcut
    return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cout * cout if cin != cout else 0)


def _vqgan_encoder(filters=128, mults=(1, 1, 2, 2, 4), blocks=2, d=256, C=3):
    n, c = 9 * C * filters, filters
    for m in mults:
        for _ in range(blocks):
            n, c = n + _resblock(c, filters * m), filters * m
    n += blocks * _resblock(c, c) + 2 * c + c * d + d  # end blocks, GroupNorm, 1x1 conv to the codes
    return n


@pytest.mark.parametrize("name,vit_count", [("s/16", 22_050_664), ("b/16", 86_567_656), ("l/16", 304_326_632)])
def test_preset_counts(name, vit_count):
    """Trainable: the card's ViT count with the patch embedding cut to 32 channels, plus Delta (1024 x 256).
    Frozen: the VQGAN f16 encoder (128 filters, [1,1,2,2,4], 2 res-blocks) and the 1024 x 256 codebook."""
    with torch.device("meta"):
        m = Model(Config(**PRESETS[name]))
    D = m.cfg.width
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == vit_count - (3 * 16 * 16 * D + D) + (3 * 16 * 16 * 32 + 32) + 1024 * 256
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert frozen == _vqgan_encoder() + 1024 * 256 == 24_037_248
    assert m.cfg.loss == "sigmoid" and m.head.bias[0].device.type == "meta" and m.cfg.head_bias_init == -6.9


def test_small_presets_and_ti():
    """Ti (D=192) cannot hold a 256-d code plus pixels: discrete only, as in the official code's constraint."""
    with torch.device("meta"):
        ti = Model(Config(**PRESETS["ti/16"]))
        small = Model(Config(**PRESETS["s/4"]))
    assert ti.cfg.fusion == "discrete"
    ti_vit = 5_717_416 - (3 * 16 * 16 * 192 + 192)  # no pixel embedding; a 256 -> 192 code projection and Delta
    assert sum(p.numel() for p in ti.parameters() if p.requires_grad) == ti_vit + 256 * 192 + 192 + 1024 * 256
    assert small.cfg.image_size == 32 and small.pos_embed.shape == (1, 65, 384)
    frozen = sum(p.numel() for p in small.parameters() if not p.requires_grad)
    assert frozen == _vqgan_encoder(64, (1, 2, 2)) + 1024 * 256


# ----------------------------------------------------------------------------- setup() and train.py

def _fake_loader(ckpts):
    def load(path, name):
        return ckpts[path]
    return load


def test_setup_errors_and_loading():
    tok = Model(Config(**TOK, stage="tokenizer"))
    good = {"model": tok.state_dict(), "config": vars(Config(**TOK, stage="tokenizer"))}
    cls = Model(Config(**CLS))
    big = vars(Config(**{**TOK, "codebook_size": 32}, stage="tokenizer"))
    loader = _fake_loader({"tok": good, "cls": {"model": cls.state_dict(), "config": vars(Config(**CLS))},
                           "big": {"model": {}, "config": big}})
    with pytest.raises(ValueError, match="needs a trained tokenizer"):
        dv.setup(cls, Config(**CLS), loader)
    with pytest.raises(ValueError, match="'classifier'-stage checkpoint"):
        dv.setup(cls, Config(**CLS, tokenizer="cls"), loader)
    with pytest.raises(ValueError, match="--codebook_size 32"):
        dv.setup(cls, Config(**CLS, tokenizer="big"), loader)
    dv.setup(cls, Config(**CLS, tokenizer="tok"), loader)
    assert torch.equal(cls.tokenizer.codebook, tok.tokenizer.codebook)
    assert torch.equal(cls.tokenizer.encoder[0].weight, tok.tokenizer.encoder[0].weight)
    dv.setup(tok, Config(**TOK, stage="tokenizer"), loader)  # stage 1 loads nothing


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """16 px, 4 classes: a bright top or bottom half, in red or green."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 320)
    x = rng.integers(0, 60, (320, 16, 16, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        half, channel = divmod(int(c), 2)
        x[i, half * 8:(half + 1) * 8, :, channel] += 180
    path = tmp_path_factory.mktemp("data") / "quad.npz"
    np.savez(path, x=x[:256], y=y[:256], x_test=x[256:], y_test=y[256:])
    return path


def test_two_stages_through_train_py(tmp_path, npz):
    """Stage 1 lowers the reconstruction error; stage 2 learns and leaves the tokenizer exactly as loaded,
    Delta at lr/100 (train.py's lr_scale); bad --tokenizer gets one error line."""
    common = ["--data", npz, "--batch-size", 32, "--warmup", 2, "--log-every", 5, "--no-progress", "--no-augment"]
    run("--stage", "tokenizer", *flags(TOK), "--steps", 40, "--lr", 3e-3, "--out", tmp_path / "tok", *common)
    log = [json.loads(l) for l in (tmp_path / "tok" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["recon_mse"] < 0.5 * log[0]["recon_mse"] and log[-1]["perplexity"] > 2
    res = json.loads((tmp_path / "tok" / "results.json").read_text())
    assert {"test_recon_mse", "test_psnr", "test_perplexity", "test_codes_used"} <= set(res)

    run("--stage", "classifier", "--tokenizer", tmp_path / "tok" / "ckpt.pt", *flags(CLS), "--steps", 40,
        "--lr", 3e-3, "--out", tmp_path / "cls", *common)
    tok = torch.load(tmp_path / "tok" / "ckpt.pt", weights_only=True)
    cls = torch.load(tmp_path / "cls" / "ckpt.pt", weights_only=True)
    frozen = [k for k in cls["model"] if k.startswith("tokenizer.")]
    assert frozen and all(torch.equal(cls["model"][k], tok["model"][k]) for k in frozen)
    assert cls["model"]["code_delta"].abs().max() > 0  # Delta trains ...
    groups = cls["optimizer"]["param_groups"]
    n_tok = sum(1 for k in cls["model"] if k.startswith("tokenizer.") and not k.endswith("usage"))
    assert sum(len(g["params"]) for g in groups) == len(cls["model"]) - n_tok - 1  # no frozen ones, no buffer
    assert sorted({g["lr_scale"] for g in groups}) == [0.01, 1.0]  # ... at lr / 100
    log = [json.loads(l) for l in (tmp_path / "cls" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and log[-1]["test_acc"] > 0.6

    p = run("--stage", "classifier", "--tokenizer", tmp_path / "cls", *flags(CLS), "--steps", 1,
            "--out", tmp_path / "bad", *common, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --tokenizer")
    p = run("--stage", "classifier", "--tokenizer", tmp_path / "tok", *flags({**CLS, "code_dim": 4}), "--steps", 1,
            "--out", tmp_path / "bad", *common, check=False)
    assert p.returncode == 2 and "--code_dim 8 (this run: 4)" in p.stderr
