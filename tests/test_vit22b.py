"""vit22b.py: the parallel block, QK-norm, no biases, the 22B count, timm parity, the sigmoid loss,
attention diagnostics, FSDP on 2 CPU processes, and train.py end to end."""
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vit22b  # noqa: E402
from helpers import images as _images, perturb as _perturb, torchvision_stand_in  # noqa: E402
from vit22b import PRESETS, Config, Model  # noqa: E402

torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_classes=5)


def _timm():
    import transformers  # noqa: F401  (before the stand-in: it probes torchvision itself)
    torchvision_stand_in()
    import timm.layers
    import timm.models.vision_transformer as tv
    return tv, timm.layers




@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("pool", ["map", "gap", "cls"])
def test_shapes(parallel, pool):
    m = Model(Config(**TINY, pool=pool, parallel_block=parallel))
    assert m(_images(3)).shape == (3, 5)
    assert m.forward_features(_images(3)).shape == (3, 16 + (pool == "cls"), 32)
    assert isinstance(m.blocks[0], vit22b.ParallelBlock if parallel else vit22b.Block)
    b = m.blocks[0]
    if parallel:
        assert b.in_proj.weight.shape == (64 + 3 * 32, 32) and b.out_proj.weight.shape == (32, 32 + 64)


def test_invalid_config():
    for bad in [dict(image_size=30), dict(width=30, heads=4), dict(pool="mean"), dict(norm="batchnorm"),
                dict(loss="hinge"), dict(posemb="rope")]:
        with pytest.raises(ValueError):
            Model(Config(**{**TINY, **bad}))


def _rms(t, w, eps=1e-6):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def test_parallel_block_by_hand():
    """y = x + Attn(Norm(x)) + MLP(Norm(x)), with the fused kernels cut into the paper's separate ones."""
    torch.manual_seed(0)
    b = _perturb(Model(Config(**TINY))).blocks[0]
    D, M, h, d, T = 32, 64, 2, 16, 16
    x = torch.randn(2, T, D)
    W1, Wq, Wk, Wv = b.in_proj.weight.split([M, D, D, D])  # rows [MLP hidden | q | k | v]
    Wo, W2 = b.out_proj.weight.split([D, M], dim=1)  # columns [attn | mlp]
    u = _rms(x, b.in_norm.weight)  # the ONE shared norm
    heads = lambda t: t.reshape(2, T, h, d).transpose(1, 2)  # noqa: E731
    q = _rms(heads(u @ Wq.T), b.q_norm.weight)  # QK-norm over d, no bias
    k = _rms(heads(u @ Wk.T), b.k_norm.weight)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ heads(u @ Wv.T)
    attn = a.transpose(1, 2).reshape(2, T, D) @ Wo.T
    mlp = F.gelu(u @ W1.T + b.mlp_bias) @ W2.T
    expect = x + attn + mlp + b.out_proj.bias  # one bias for both branches
    with torch.no_grad():
        assert (b(x) - expect).abs().max() < 1e-5


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm_nobias"])
def test_qk_norm_is_applied(parallel, norm):
    """Scaling the query projection by 100 changes nothing when queries are normalised, a lot when not."""
    for qk_norm in (True, False):
        torch.manual_seed(0)
        m = _perturb(Model(Config(**TINY, parallel_block=parallel, qk_norm=qk_norm, norm=norm)))
        x = _images()
        with torch.no_grad():
            before = m(x)
            for b in m.blocks:
                w = b.in_proj.weight if parallel else b.attn.qkv.weight
                q_rows = slice(64, 96) if parallel else slice(0, 32)
                w[q_rows] *= 100
            diff = (m(x) - before).abs().max()
        assert (diff < 1e-4) if qk_norm else (diff > 1e-2), (qk_norm, diff)


@pytest.mark.parametrize("parallel", [True, False])
def test_no_biases_where_the_paper_has_none(parallel):
    m = Model(Config(**TINY, parallel_block=parallel))
    names = {n for n, _ in m.named_parameters()}
    norms = [mod for mod in m.modules() if isinstance(mod, (torch.nn.RMSNorm, torch.nn.LayerNorm))]
    assert norms and all(getattr(n, "bias", None) is None for n in norms)  # no norm has a bias
    assert isinstance(m.blocks[0].q_norm if parallel else m.blocks[0].attn.q_norm, torch.nn.RMSNorm)
    if parallel:  # no q/k/v bias; the MLP keeps its first bias; one out bias
        assert m.blocks[0].in_proj.bias is None and "blocks.0.mlp_bias" in names and "blocks.0.out_proj.bias" in names
        m = Model(Config(**TINY, qkv_bias=True))
        assert m.blocks[0].mlp_bias is None and m.blocks[0].in_proj.bias.shape == (64 + 96,)
    else:
        assert m.blocks[0].attn.qkv.bias is None and {"blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias"} <= names
    m = Model(Config(**TINY, norm="layernorm_nobias", qk_norm=False))
    assert all(isinstance(n, torch.nn.LayerNorm) and n.bias is None for n in m.modules()
               if isinstance(n, (torch.nn.RMSNorm, torch.nn.LayerNorm)))
    assert not any("q_norm" in n for n, _ in m.named_parameters())


def test_init():
    torch.manual_seed(0)
    m = Model(Config())
    assert torch.equal(m(_images()), torch.zeros(2, 10))  # zero-init head
    assert torch.equal(Model(Config(loss="sigmoid"))(_images()), torch.full((2, 10), -10.0))  # big_vision
    assert torch.equal(Model(Config(loss="sigmoid", head_bias_init=-2.0))(_images()), torch.full((2, 10), -2.0))
    W = m.blocks[0].in_proj.weight  # xavier per kernel: the MLP part (fan 128 + 512) is narrower than q/k/v
    assert W[:512].abs().max() <= math.sqrt(6 / 640) and W[512:].abs().max() <= math.sqrt(6 / 256)
    assert W[512:].abs().max() > math.sqrt(6 / 640)
    assert m.blocks[0].mlp_bias.abs().max() < 1e-5 and m.blocks[0].out_proj.bias.abs().max() == 0


def test_preset_22b_count():
    """The paper quotes 21.743B = exactly the 48 blocks' weight matrices, 48 x 12 D^2 (in_proj 7D^2,
    out_proj 5D^2). Ours also counts the small vectors, the embeddings and the MAP head + classifier."""
    with torch.device("meta"):
        m = Model(Config(**PRESETS["22b"]))
    D, M, d, L = 6144, 24576, 128, 48
    count = lambda prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))  # noqa: E731
    matrices = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    assert matrices == L * 12 * D * D == 21_743_271_936  # the paper's 21.743B
    parts = {
        "block vectors (mlp_bias, out bias, norm, q/k norm)": (L * (M + D + D + 2 * d), 1_781_760),
        "patch_embed (14*14*3*D + D)": (count("patch_embed."), 3_618_816),
        "pos_embed (256 x D)": (count("pos_embed"), 1_572_864),
        "final norm": (count("norm."), 6_144),
        "MAP head (probe, q/kv/out 4D^2, norm, MLP 2DM)": (count("map_head."), 453_052_416),
        "classifier (D x 1000 + 1000)": (count("head."), 6_145_000),
    }
    for name, (ours, expect) in parts.items():
        assert ours == expect, name
    total = sum(p.numel() for p in m.parameters())
    assert total == matrices + sum(e for _, e in parts.values()) == 22_209_448_936  # +0.466B (2.1%)
    expect = {"ti/16": 6_146_728, "s/16": 23_792_488, "b/16": 93_588_712}
    for name, n in expect.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in Model(Config(**PRESETS[name])).parameters()) == n, name


def _timm_to_ours(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.proj.", "patch_embed.").replace("attn_pool.latent", "map_head.probe")
        out[k.replace("attn_pool.", "map_head.")] = v
    return out


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm_nobias"])
def test_timm_parity_parallel(norm):
    tv, layers = _timm()
    norm_layer = layers.RmsNorm if norm == "rmsnorm" else partial(layers.LayerNorm, bias=False)
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=5,
              qkv_bias=False, qk_norm=True, norm_layer=norm_layer, global_pool="map", class_token=False)
    ref = _perturb(tv.VisionTransformer(block_fn=partial(tv.ParallelScalingBlock, fuse_out_proj=True), **kw), 0.2)
    m = Model(Config(**TINY, norm=norm)).eval()
    m.load_state_dict(_timm_to_ours(ref.state_dict()))  # strict: the same names, rows [MLP | q | k | v]
    x = _images(4)
    with torch.no_grad():
        assert ref(x).abs().max() > 1 and (m(x) - ref(x)).abs().max() < 1e-4  # logits O(1), measured diff 0.0
    # timm's unfused form (two out-projections, two biases) is the fused one with the biases summed
    torch.manual_seed(1)
    ref = _perturb(tv.VisionTransformer(block_fn=tv.ParallelScalingBlock, **kw), 0.2)
    sd = _timm_to_ours(ref.state_dict())
    for i in range(2):
        a, b = (f"blocks.{i}.{n}_out_proj." for n in ("attn", "mlp"))
        sd[f"blocks.{i}.out_proj.weight"] = torch.cat([sd.pop(a + "weight"), sd.pop(b + "weight")], dim=1)
        sd[f"blocks.{i}.out_proj.bias"] = sd.pop(a + "bias") + sd.pop(b + "bias")
    m.load_state_dict(sd)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


def test_timm_parity_sequential():
    """parallel_block=False is timm's pre-LN `Block` with `Attention(qk_norm=True)`."""
    tv, layers = _timm()
    torch.manual_seed(0)
    ref = _perturb(tv.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                        num_classes=5, qkv_bias=False, qk_norm=True, norm_layer=layers.RmsNorm,
                                        global_pool="map", class_token=False), 0.2)
    m = Model(Config(**TINY, parallel_block=False)).eval()
    m.load_state_dict(_timm_to_ours(ref.state_dict()))
    x = _images(4)
    with torch.no_grad():
        assert ref(x).abs().max() > 1 and (m(x) - ref(x)).abs().max() < 1e-4


def test_sigmoid_loss():
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY, loss="sigmoid")))
    batch = {"image": _images(4), "label": torch.tensor([0, 3, 1, 4])}
    loss, metrics = vit22b.loss(m, batch)
    z = m(batch["image"])
    y = F.one_hot(batch["label"], 5).float()
    expect = -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).sum(-1).mean()  # big_vision sigmoid_xent
    assert torch.allclose(loss, expect, atol=1e-6)
    assert metrics["acc"] == (z.argmax(-1) == batch["label"]).float().mean()
    loss, _ = vit22b.loss(Model(Config(**TINY)), batch)  # softmax at a zero head: log K
    assert torch.allclose(loss, torch.tensor(math.log(5)))
    loss, _ = vit22b.loss(Model(Config(**TINY, loss="sigmoid")), batch)  # -10 bias: ~10 for the true class
    assert abs(loss.item() - (F.softplus(torch.tensor(10.0)) + 4 * F.softplus(torch.tensor(-10.0))).item()) < 1e-4


@pytest.mark.parametrize("parallel", [True, False])
def test_diagnostics(parallel):
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY, parallel_block=parallel)), scale=0.5).train()
    assert vit22b.diagnostics(m) == {}  # nothing recorded yet
    m.eval()(_images())
    assert vit22b.diagnostics(m) == {}  # inference records nothing
    m.train()(_images(6))
    diag = vit22b.diagnostics(m)
    assert set(diag) == {"max_logit/0", "max_logit/1", "entropy/0", "entropy/1", "max_logit", "min_entropy"}
    T = 16
    for i in range(2):
        assert 0 <= diag[f"entropy/{i}"] <= math.log(T) + 1e-5 and diag[f"max_logit/{i}"] >= 0
    assert diag["max_logit"] == max(diag["max_logit/0"], diag["max_logit/1"])
    # the logged values are the first layer's logits written out (first STATS_IMAGES images)
    x = m.patch_embed(_images(6)).flatten(2).transpose(1, 2) + m.pos_embed
    b = m.blocks[0]
    if parallel:
        _, q, k, _ = b.in_proj(b.in_norm(x)).split([64, 32, 32, 32], -1)
        q, k = (t.view(6, T, 2, 16).transpose(1, 2) for t in (q, k))
        q, k = b.q_norm(q), b.k_norm(k)
    else:
        q, k, _ = b.attn.qkv(b.norm1(x)).view(6, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k = b.attn.q_norm(q), b.attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2) / 4)[:vit22b.STATS_IMAGES]
    assert abs(diag["max_logit/0"] - logits.abs().max().item()) < 1e-4
    p = logits.softmax(-1)
    assert abs(diag["entropy/0"] - (-(p * p.log()).sum(-1).mean()).item()) < 1e-4


def test_bf16_autocast():
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY))).train()
    ref = m(_images())
    diag = vit22b.diagnostics(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_images())
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
    got = vit22b.diagnostics(m)  # the statistics themselves are computed in fp32 from bf16 q, k
    assert all(abs(got[k] - v) < 0.03 * abs(v) + 1e-3 for k, v in diag.items())


def test_loss_goes_down():
    torch.manual_seed(0)
    m = Model(Config(**TINY))
    batch = {"image": _images(8), "label": torch.arange(8) % 5}
    o = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = vit22b.loss(m, batch)
        o.zero_grad()
        loss.backward()
        o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- through train.py

SMALL = ["--width", "32", "--depth", "2", "--heads", "2", "--mlp_dim", "64", "--image_size", "16", "--patch_size", "4",
         "--batch-size", "16", "--no-progress"]


def _run(*args, torchrun=False):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if torchrun else []),
           str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_train_end_to_end(tmp_path):
    p = _run("vit22b", "--steps", 3, "--log-every", 1, "--out", tmp_path, "--loss", "sigmoid", *SMALL)
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert final["model"] == "vit22b" and final["steps"] == 3 and "test_acc" in final
    log = _log(tmp_path)
    assert len(log) == 3 and {"max_logit", "min_entropy", "max_logit/1", "entropy/1"} <= set(log[0])
    assert all(math.isfinite(r["loss"]) for r in log)


def test_fsdp_two_processes_equals_one(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 96)
    x = rng.integers(0, 255, (96, 16, 16, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x[:64], y=y[:64], x_test=x[64:], y_test=y[64:])
    common = ["vit22b", "--data", tmp_path / "d.npz", "--steps", 3, "--log-every", 1, "--dtype", "fp32", *SMALL]
    _run(*common, "--out", tmp_path / "one")
    _run(*common, "--fsdp", "--out", tmp_path / "two", torchrun=True)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]  # gathered, unsharded
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
