"""dual_patchnorm.py: the stem (patch order, ln0, ln1), its invariance, the ablations, preset counts,
loading vit.py weights, parity with lucidrains vit-pytorch, and train.py end to end."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dual_patchnorm as dpn  # noqa: E402
import vit  # noqa: E402
from helpers import images as _images, perturb as _perturb  # noqa: E402
from dual_patchnorm import PRESETS, Config, Model  # noqa: E402

torch.set_num_threads(1)

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_classes=5)
NORMS = ["dual", "pre", "post", "none"]




@pytest.mark.parametrize("patch_norm", NORMS)
@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_shapes(patch_norm, pool):
    m = Model(Config(**TINY, pool=pool, patch_norm=patch_norm))
    assert m(_images(3)).shape == (3, 5)
    assert m.patch_embed(_images(3)).shape == (3, 16, 32)  # (B, N, D)
    assert m.forward_features(_images(3)).shape == (3, 16 + (pool == "cls"), 32)
    assert (m.ln0 is not None) == (patch_norm in ("dual", "pre"))
    assert (m.ln1 is not None) == (patch_norm in ("dual", "post"))
    assert m.dense.weight.shape == (32, 8 * 8 * 3)
    if m.ln0 is not None:
        assert m.ln0.weight.shape == m.ln0.bias.shape == (8 * 8 * 3,) and m.ln0.eps == 1e-6
    if m.ln1 is not None:
        assert m.ln1.weight.shape == m.ln1.bias.shape == (32,)


def test_same_recipe_as_vit():
    """Defaults, training recipe and presets are vit.py's: the two files differ only in the stem."""
    assert {k: v for k, v in vars(Config()).items() if k != "patch_norm"} == vars(vit.Config())
    assert dpn.TRAIN == getattr(vit, "TRAIN", None) and PRESETS == vit.PRESETS
    assert Config().patch_norm == "dual" and dpn.INIT_FROM == ("vit",)


def test_invalid_config():
    for bad in [dict(patch_norm="both"), dict(image_size=30, patch_size=4), dict(width=30, heads=4)]:
        with pytest.raises(ValueError):
            Model(Config(**bad))


def test_patch_order_is_row_col_channel():
    """'b c (ht hp) (wt wp) -> b (ht wt) (hp wp c)': with dense = identity the stem returns raw patches."""
    P, C = 4, 3
    m = Model(Config(image_size=8, patch_size=P, width=P * P * C, heads=2, depth=1, mlp_dim=8, patch_norm="none"))
    with torch.no_grad():
        m.dense.weight.copy_(torch.eye(P * P * C))
    x = _images(2, size=8)
    got = m.patch_embed(x)  # (2, 4, 48)
    for b in range(2):
        for ht in range(2):
            for wt in range(2):
                for hp in range(P):
                    for wp in range(P):
                        for c in range(C):
                            assert got[b, ht * 2 + wt, (hp * P + wp) * C + c] == x[b, c, ht * P + hp, wt * P + wp]


def test_ln0_normalises_each_patch():
    m = Model(Config(**TINY))
    x = _images(4)
    patches = x.reshape(4, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(4, 16, 192)  # (B, N, P*P*C)
    y = m.ln0(patches)  # unit scale, zero bias at init
    assert y.mean(-1).abs().max() < 1e-5
    assert (y.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    e = m.patch_embed(x)  # ln1 at init: every token mean 0, variance 1 over D
    assert e.mean(-1).abs().max() < 1e-5 and (e.var(-1, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("patch_norm", NORMS)
def test_affine_change_within_a_patch(patch_norm):
    """a*x + b, with its own a > 0 and b for every patch: the embedding ignores it iff ln0 is there."""
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY, patch_norm=patch_norm)), scale=0.3)
    x = _images(2)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 4, 1, 4, 1, generator=g) * 1.5 + 0.5  # (B, 1, ht, 1, wt, 1): per patch
    b = torch.rand(2, 1, 4, 1, 4, 1, generator=g) - 0.5
    x2 = (x.reshape(2, 3, 4, 8, 4, 8) * a + b).reshape(2, 3, 32, 32)
    with torch.no_grad():
        diff = (m.patch_embed(x2) - m.patch_embed(x)).abs().max()
        logits_diff = (m(x2) - m(x)).abs().max()
    if patch_norm in ("dual", "pre"):
        assert diff < 1e-4 and logits_diff < 1e-4
    else:
        assert diff > 1e-2 and logits_diff > 1e-3


def test_none_is_vit_and_loads_vit_weights():
    """adapt_state_dict: vit.py's conv (D, C, P, P) -> dense (D, P*P*C); patch_norm="none" == vit.py."""
    torch.manual_seed(0)
    ref = _perturb(vit.Model(vit.Config(**TINY)))
    x = _images(3)
    cfg = Config(**TINY, patch_norm="none")
    m = Model(cfg).eval()
    m.load_state_dict(dpn.adapt_state_dict(ref.state_dict(), cfg))  # strict: every key fits
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-5
    # DPN proper: everything but ln0/ln1 loads; they start as identity
    cfg = Config(**TINY)
    m = Model(cfg)
    missing, unexpected = m.load_state_dict(dpn.adapt_state_dict(ref.state_dict(), cfg), strict=False)
    assert sorted(missing) == ["ln0.bias", "ln0.weight", "ln1.bias", "ln1.weight"] and not unexpected
    assert torch.equal(m.ln0.weight, torch.ones(192)) and torch.equal(m.ln1.bias, torch.zeros(32))
    # at another resolution the positions are resized as vit.py does
    cfg = Config(**{**TINY, "image_size": 64})
    sd = dpn.adapt_state_dict(ref.state_dict(), cfg)
    assert sd["pos_embed"].shape == (1, 65, 32) and "patch_embed.weight" not in sd
    vit_cfg = vit.Config(**{**TINY, "image_size": 64})
    assert torch.equal(sd["pos_embed"], vit.adapt_state_dict(ref.state_dict(), vit_cfg)["pos_embed"])


def test_preset_param_counts():
    """Each preset = vit.py's count + 2*P*P*C (ln0) + 2*D (ln1); 'none' = vit.py exactly."""
    for name, p in PRESETS.items():
        with torch.device("meta"):
            n_vit = sum(t.numel() for t in vit.Model(vit.Config(**p)).parameters())
            n = {k: sum(t.numel() for t in Model(Config(**p, patch_norm=k)).parameters()) for k in NORMS}
        ppc, D = p["patch_size"] ** 2 * 3, p["width"]
        assert n == dict(dual=n_vit + 2 * ppc + 2 * D, pre=n_vit + 2 * ppc, post=n_vit + 2 * D, none=n_vit), name
    with torch.device("meta"):
        assert sum(t.numel() for t in Model(Config(**PRESETS["b/16"])).parameters()) == 86_567_656 + 2 * 768 + 2 * 768


def _lucidrains_vit():
    """lucidrains' vit_pytorch/vit.py, loaded on its own: the package __init__ imports torchvision."""
    pytest.importorskip("einops")
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        pytest.skip("vit-pytorch is not installed (requirements-test.txt)")
    path = Path(spec.submodule_search_locations[0]) / "vit.py"
    mod_spec = importlib.util.spec_from_file_location("_lucidrains_vit", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_parity(pool):
    ViT = _lucidrains_vit().ViT
    torch.manual_seed(0)
    ref = _perturb(ViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64,
                       dim_head=16, pool=pool), scale=0.2)
    m = dpn.from_vit_pytorch(ref.state_dict(), heads=2)
    assert m.cfg.pool == {"cls": "cls", "mean": "gap"}[pool] and m.cfg.patch_norm == "dual"
    assert m.cfg.qkv_bias is False and m.cfg.ln_eps == 1e-5 and m.cfg.patch_size == 8 and not m.training
    x = _images(4)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4
        assert (m.patch_embed(x) - ref.to_patch_embedding(x)).abs().max() < 1e-5  # the DPN stem itself
    with pytest.raises(ValueError, match="heads"):
        dpn.from_vit_pytorch(ref.state_dict())


def test_loss_goes_down():
    torch.manual_seed(0)
    m = Model(Config(**TINY))
    x, y = _images(8), torch.arange(8) % 5
    o = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x), y)
        o.zero_grad()
        loss.backward()
        o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast():
    m = _perturb(Model(Config(**TINY)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_images())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - m(_images())).abs().max() < 0.1


def test_train_cli_and_init_from_vit(tmp_path):
    """train.py end to end on shapes; --init from a vit.py checkpoint loads all but ln0/ln1."""
    tiny = ["--width", "32", "--depth", "1", "--heads", "2", "--mlp_dim", "64", "--image_size", "16",
            "--patch_size", "4", "--batch-size", "16", "--steps", "3", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def run(*args):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    run("vit", "--out", tmp_path / "vit", *tiny)
    p = run("dual_patchnorm", "--out", tmp_path / "dpn", "--init", tmp_path / "vit", *tiny)
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert final["model"] == "dual_patchnorm" and final["steps"] == 3 and 0 <= final["test_acc"] <= 1
    line = next(l for l in p.stderr.splitlines() if l.startswith("initialised from"))
    assert line.endswith("freshly initialised: ln0.weight, ln0.bias, ln1.weight, ln1.bias"), line
    ckpt = torch.load(tmp_path / "dpn" / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "dual_patchnorm" and ckpt["config"]["patch_norm"] == "dual"
    assert ckpt["model"]["dense.weight"].shape == (32, 48)
