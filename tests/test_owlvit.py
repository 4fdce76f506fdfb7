import itertools
import math
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import owlvit  # noqa: E402
from owlvit import PRESETS, Config, Model  # noqa: E402

torch.set_num_threads(1)

from helpers import images as _images, perturb as _perturb, torchvision_stand_in  # noqa: E402
import transformers  # noqa: E402,F401  (first, as CI installs it)

torchvision_stand_in()

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, text_width=32, text_depth=2,
            text_heads=2, text_mlp_dim=64, embed_dim=32)


@pytest.fixture(scope="module")
def scenes():
    """A small stand-in for data.load('shapes', kind='scenes'): same fields, 64 train / 32 test scenes."""
    x, sc = data.shapes_scenes(96, 32, seed=0)
    return SimpleNamespace(x_train=torch.from_numpy(x[:64]), scenes_train=sc[:64], x_test=torch.from_numpy(x[64:]),
                           scenes_test=sc[64:], tokenizer=data.ByteTokenizer(), read_image=data.read_image,
                           write_image=data.write_image)


def _ids(texts, L=16):
    return data.ByteTokenizer().batch(texts, L, eos=True)


# ------------------------------------------------------------------------------------------------ model


def test_shapes_and_init():
    torch.manual_seed(0)
    m = Model(Config(**TINY)).eval()
    q = _ids(["red circle", "blue square", "x"])
    q[2] = 0  # an all-pad query
    out = m(_images(2, 32), q)
    assert out["logits"].shape == (2, 16, 3) and out["boxes"].shape == (2, 16, 4)
    assert out["class_embeds"].shape == (2, 16, 32)
    # prior init: logit_shift bias = log(0.01 / 0.99); cosine in [-1, 1] and scale ELU(.) + 1 near 1
    assert abs(m.class_head.logit_shift.bias.item() - math.log(0.01 / 0.99)) < 1e-6
    with torch.no_grad():  # with zero shift/scale kernels: logit = cos - 4.6, so p <= sigmoid(-3.6)
        m.class_head.logit_shift.weight.zero_(), m.class_head.logit_scale.weight.zero_()
        p = torch.sigmoid(m(_images(2, 32), _ids(["red circle"]))["logits"])
    assert p.max() < 0.03 and p.min() > 0.003
    assert (out["logits"][..., 2] == -1e6).all()  # an all-pad query is masked
    # zero-init last box layer: the box is the fixed bias -> a patch-sized box at the token's grid corner
    g = 4
    assert torch.allclose(out["boxes"][0, 0], torch.tensor([1 / g, 1 / g, 1 / g, 1 / g]), atol=1e-3)
    assert torch.allclose(out["boxes"][0, 5], torch.tensor([2 / g, 2 / g, 1 / g, 1 / g]), atol=1e-3)  # row 1, col 1
    m2 = Model(Config(**TINY, box_bias=False)).eval()
    assert torch.allclose(m2(_images(1, 32), _ids(["a"]))["boxes"], torch.full((1, 16, 4), 0.5))
    # stage 1 has the CLIP temperature and the pooled projection, no detection heads
    p = Model(Config(**TINY, stage="pretrain"))
    assert p(_images(3, 32), _ids(["a", "b"]))["logits_per_image"].shape == (3, 2)
    assert hasattr(p, "logit_scale") and not hasattr(p, "class_head") and not hasattr(m, "logit_scale")
    assert abs(p.logit_scale.item() - math.log(1 / 0.07)) < 1e-3


def test_box_bias():
    b = owlvit.box_bias(2)  # tokens (row, col): (0,0) (0,1) (1,0) (1,1); corners c/g, r/g for 1-based c, r
    logit = lambda z: math.log(z + 1e-4) - math.log(1 - z + 1e-4)
    expect = [[logit(0.5), logit(0.5)], [logit(1.0), logit(0.5)], [logit(0.5), logit(1.0)], [logit(1.0), logit(1.0)]]
    assert torch.allclose(b[:, :2], torch.tensor(expect), atol=1e-4)
    assert torch.allclose(b[:, 2:], torch.full((4, 2), logit(0.5)), atol=1e-4)


def test_equations():
    """The detection forward == the card's equations written with plain tensor ops."""
    torch.manual_seed(0)
    m = _perturb(Model(Config(**TINY)))
    x, ids = _images(2, 32), _ids(["red circle", "a", "green star"])
    out = m(x, ids)
    tokens = m.vision(x)  # (B, 1+N, D), ln_post applied to all tokens
    t = torch.nn.functional.layer_norm(tokens[:, 1:] * tokens[:, :1], (32,), m.merge_norm.weight, m.merge_norm.bias, 1e-5)
    e = t @ m.class_head.dense0.weight.T + m.class_head.dense0.bias
    q = m.text_projection(m.text(ids))
    s = torch.einsum("bnd,qd->bnq", e / (e.norm(dim=-1, keepdim=True) + 1e-6), q / (q.norm(dim=-1, keepdim=True) + 1e-6))
    shift = t @ m.class_head.logit_shift.weight.T + m.class_head.logit_shift.bias
    scale = torch.nn.functional.elu(t @ m.class_head.logit_scale.weight.T + m.class_head.logit_scale.bias) + 1
    assert torch.allclose(out["logits"], (s + shift) * scale, atol=1e-5)
    h = m.box_head
    gelu = torch.nn.functional.gelu
    raw = h.dense2(gelu(h.dense1(gelu(h.dense0(t)))))
    assert torch.allclose(out["boxes"], torch.sigmoid(raw + owlvit.box_bias(4)), atol=1e-6)
    # text pooling at the last non-pad token (the EOS), causal: later pads change nothing
    longer = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)[:, :16]
    assert torch.allclose(m.text(longer), m.text(ids), atol=1e-5)
    # quick-GELU in the towers
    z = torch.randn(10)
    assert torch.allclose(owlvit.quick_gelu(z), z * torch.sigmoid(1.702 * z))


def test_invalid_config():
    for bad in [dict(stage="train"), dict(image_size=30), dict(width=30, heads=4), dict(box_gelu="relu"),
                dict(stage="pretrain", closed_vocab=True)]:
        with pytest.raises(ValueError):
            Model(Config(**{**TINY, **bad}))


# ------------------------------------------------------------------------------------------------ matching, AP


def test_hungarian_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, m = (int(k) for k in rng.integers(1, 6, 2))
        cost = rng.normal(size=(n, m)) if trial % 3 else rng.integers(0, 4, (n, m)).astype(float)  # ties too
        rows, cols = owlvit.hungarian(cost)
        assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert abs(cost[rows, cols].sum() - best) < 1e-9, (cost, rows, cols)


def test_average_precision_hand_worked():
    """Image A: gt g1; d1 (0.9) IoU 0.82, d2 (0.7) IoU 0.3. Image B: gts g2, g3; d3 (0.8) IoU 0.62 with g2,
    d4 (0.6) far away. By score: d1 TP, d3 TP, d2 FP, d4 FP; recall 1/3, 2/3; precision 1, 1 -> at IoU 0.5
    the 101-point AP = 67/101 (recall points 0..0.66 have precision 1). At 0.65..0.8 only d1 is a TP:
    34/101; from 0.85 nothing: 0. AP@[.5:.95] = (3 * 67 + 4 * 34) / 1010."""
    dets = [(np.array([[0, 0, 10, 8.2], [0, 0, 10, 3]]), np.array([0.9, 0.7])),
            (np.array([[20, 20, 30, 26.2], [60, 60, 70, 70]]), np.array([0.8, 0.6]))]
    gts = [np.array([[0, 0, 10, 10.0]]), np.array([[20, 20, 30, 30.0], [40, 40, 50, 50]])]
    ap = owlvit.average_precision(dets, gts)
    assert abs(ap[0] - 67 / 101) < 1e-12
    assert np.allclose(ap, [67 / 101] * 3 + [34 / 101] * 4 + [0] * 3)
    assert abs(ap.mean() - 337 / 1010) < 1e-12
    assert np.isnan(owlvit.average_precision(dets, [np.zeros((0, 4))] * 2)).all()
    # a duplicate of d1 is a false positive (g1 is taken), after the two TPs it does not change AP@0.5
    dup = [(np.concatenate([dets[0][0], [[0, 0, 10, 8.0]]]), np.array([0.9, 0.7, 0.5])), dets[1]]
    assert abs(owlvit.average_precision(dup, gts)[0] - 67 / 101) < 1e-12


# ------------------------------------------------------------------------------------------------ data, loss


def test_batches(scenes):
    cfg = Config(**TINY, num_negatives=10)
    v = owlvit._vocab(scenes, cfg)
    held = set(cfg.held_out.split(","))
    b = next(owlvit.batches(scenes, cfg, "train", 8, step=3, seed=1))
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].min() >= -1 and b["image"].max() <= 1
    seen_names = [v["names"][i] for i in v["seen"]]
    assert not held & set(seen_names) and b["queries"].shape == (len(seen_names), 16)
    for lab, mask in zip(b["labels"], b["loss_mask"]):
        pos = set(lab[lab >= 0].tolist())
        assert pos <= set(torch.nonzero(mask)[:, 0].tolist())
        assert int(mask.sum()) == len(pos) + min(10, len(seen_names) - len(pos))
    # stage 2 drops the images holding a held-out name; the batch of a step is a function of (seed, step)
    for img in v["detect_images"]:
        assert not held & {o["name"] for o in scenes.scenes_train[img]}
    again = next(owlvit.batches(scenes, cfg, "train", 8, step=3, seed=1))
    assert torch.equal(again["image"], b["image"]) and torch.equal(again["loss_mask"], b["loss_mask"])
    # boxes: cx, cy, w, h of the scene boxes / image size
    i = int(v["detect_images"][0])
    test = list(owlvit.batches(scenes, cfg, "test", 10))
    assert sum(len(t["image"]) for t in test) == 32
    x0, y0, x1, y1 = scenes.scenes_train[i][0]["box"]
    assert np.allclose(v["train"][0][i, 0], [(x0 + x1) / 64, (y0 + y1) / 64, (x1 - x0) / 32, (y1 - y0) / 32])
    # stage 1: one name per image; held-out names are allowed there
    p = next(owlvit.batches(scenes, Config(**TINY, stage="pretrain"), "train", 8))
    assert p["text"].shape == (8, 16) and (p["names"] == p["pick"][:, None]).any(1).all()


@pytest.mark.parametrize("stage", ["pretrain", "detect"])
def test_loss_decreases(scenes, stage):
    torch.manual_seed(0)
    cfg = Config(**TINY, stage=stage)
    m = Model(cfg)
    b = next(owlvit.batches(scenes, cfg, "train", 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        l, metrics = owlvit.loss(m, b)
        opt.zero_grad()
        l.backward()
        opt.step()
        losses.append(l.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if stage == "detect":
        assert {"loss_class", "loss_bbox", "loss_giou", "matched_iou"} <= set(metrics)


def test_matching_loss_by_hand(scenes):
    """One image, one box: the matched token is the Hungarian argmin of the summed costs, and the loss is
    the focal loss over tokens x (masked) queries + L1 + (1 - GIoU) of that token, per box."""
    torch.manual_seed(0)
    cfg = Config(**TINY)
    m = _perturb(Model(cfg), scale=0.2)
    q = _ids(["red circle", "blue square", "green star"])
    batch = {"image": _images(1, 32), "queries": q.numpy(), "labels": torch.tensor([[1, -1]]),
             "boxes": torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0, 0, 0, 0]]]), "loss_mask": torch.tensor([[True, True, False]])}
    total, met = owlvit.loss(m, batch)
    out = m(batch["image"], q)
    logits, boxes = out["logits"][0], out["boxes"][0]  # (N, Q), (N, 4)
    p = torch.sigmoid(logits[:, 1])
    cost = (-torch.log(p) * 0.3 * (1 - p) ** 2 + torch.log(1 - p) * 0.7 * p ** 2
            + (boxes - batch["boxes"][0, 0]).abs().sum(-1)
            - owlvit.generalized_box_iou(owlvit.cxcywh_to_xyxy(boxes), owlvit.cxcywh_to_xyxy(batch["boxes"][0, :1]))[:, 0])
    k = int(cost.argmin())
    target = torch.zeros_like(logits)
    target[k, 1] = 1
    fl = owlvit.focal_loss(logits, target, 0.3, 2.0)[:, :2].sum()
    l1 = (boxes[k] - batch["boxes"][0, 0]).abs().sum()
    giou = owlvit.generalized_box_iou(owlvit.cxcywh_to_xyxy(boxes[k:k + 1]), owlvit.cxcywh_to_xyxy(batch["boxes"][0, :1]))[0, 0]
    assert torch.allclose(total, fl + l1 + 1 - giou, atol=1e-5)
    assert torch.allclose(met["loss_class"], fl, atol=1e-5)


def test_evaluate_and_image_query(scenes):
    torch.manual_seed(0)
    cfg = Config(**TINY)
    m = Model(cfg).eval()
    res = owlvit.evaluate(m, scenes, cfg)
    assert {"ap50_seen", "ap_seen", "img_ap50_seen", "img_ap_seen"} <= set(res)
    assert all(0 <= v <= 1 for v in res.values())
    # image-conditioned: the chosen token's predicted box overlaps the exemplar box best (zero-init box head:
    # token (row r, col c) predicts a 1/g box centred at the corner ((c + 1) / g, (r + 1) / g))
    emb, k = owlvit.image_query(m, scenes.x_train[0], [2.5 / 4, 1.5 / 4, 3.5 / 4, 2.5 / 4])
    assert k == 1 * 4 + 2 and emb.shape == (32,)
    closed = Config(**TINY, closed_vocab=True)
    res = owlvit.evaluate(Model(closed).eval(), scenes, closed)
    assert res.get("ap_heldout", 0.0) == 0.0  # a closed vocabulary cannot name held-out classes


# ------------------------------------------------------------------------------------------------ parity


def _hf_tiny():
    from transformers import OwlViTConfig, OwlViTForObjectDetection
    cfg = OwlViTConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=400, max_position_embeddings=16),
                       vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, image_size=64, patch_size=8),
                       projection_dim=32)
    torch.manual_seed(0)
    hf = OwlViTForObjectDetection(cfg)
    hf.config._attn_implementation = "eager"
    hf = _perturb(hf, scale=0.05)
    with torch.no_grad():  # HF's default Linear init makes shift/scale ~N(0, 1) per unit: logits of +-50
        hf.class_head.logit_shift.weight.mul_(0.1)  # keep them in a trained model's range (+-10)
        hf.class_head.logit_scale.weight.mul_(0.1)
    return hf


def _hf_ids(n=3, L=16, seed=0):
    """Ids where the EOS is the highest id in its row (HF pools at argmax), then 0-padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, L, dtype=torch.long)
    for i, length in enumerate([5, 16, 9][:n]):
        ids[i, :length - 1] = torch.randint(3, 390, (length - 1,), generator=g)
        ids[i, length - 1] = 399
    return ids


def test_hf_parity(tmp_path):
    hf = _hf_tiny()
    ours = owlvit.from_hf_state_dict(hf.state_dict(), owlvit.hf_config(hf.config.to_dict()))
    x = _images(2, 64, seed=1)
    ids = _hf_ids()
    with torch.no_grad():
        ref = hf(input_ids=ids.repeat(2, 1), pixel_values=x)  # (B * Q, L): the queries of each image
        out = ours(x, ids)
    assert (out["logits"] - ref.logits).abs().max() < 1e-4
    assert (out["boxes"] - ref.pred_boxes).abs().max() < 1e-4
    e = out["class_embeds"] / (out["class_embeds"].norm(dim=-1, keepdim=True) + 1e-6)  # HF returns them normalised
    assert (e - ref.class_embeds).abs().max() < 1e-4
    # image-guided (one-shot) detection: HF picks the query token in the whole query image (box 0,0,1,1)
    q = _images(2, 64, seed=2)
    with torch.no_grad():
        embeds = [owlvit.image_query(ours, ((q[i].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8), [0, 0, 1, 1])
                  for i in range(2)]
    # our image_query takes uint8 images: compare on images that are exactly representable
    qq = ((q.permute(0, 2, 3, 1) + 1) * 127.5).round() / 127.5 - 1
    with torch.no_grad():
        ref = hf.image_guided_detection(pixel_values=x, query_pixel_values=qq.permute(0, 3, 1, 2))
        for i in range(2):
            logits = ours(x[i:i + 1], query_embeds=embeds[i][0][None])["logits"]
            assert (logits[0, :, 0] - ref.logits[i, :, 0]).abs().max() < 1e-4
    # stage 1: OwlViTModel's contrastive logits
    pre = owlvit.from_hf_state_dict(hf.state_dict(), owlvit.hf_config(hf.config.to_dict(), stage="pretrain"))
    with torch.no_grad():
        ref = hf.owlvit(input_ids=ids, pixel_values=x)
        assert (pre(x, ids)["logits_per_image"] - ref.logits_per_image).abs().max() < 1e-4
    # the folder loader (save_pretrained: config.json + model.safetensors)
    hf.save_pretrained(tmp_path)
    folder = owlvit.from_hf(tmp_path)
    with torch.no_grad():
        assert torch.allclose(folder(x, ids)["logits"], out["logits"], atol=1e-6)


# HF OwlViTForObjectDetection parameter counts (built on meta) minus stage 1's visual_projection + logit_scale
HF_COUNTS = {"b/32": 152_838_662, "b/16": 152_396_294, "l/14": 433_102_086}
# OpenAI CLIP at 224 px with 77 text positions (the CLIP paper's models): the stage-1 towers of the presets
# differ only by the position tables (image grid at 768 / 840 px, 16 text positions)
CLIP_224 = {"b/32": (151_277_313, 7), "b/16": (149_620_737, 14), "l/14": (427_616_513, 16)}


@pytest.mark.parametrize("preset", ["b/32", "b/16", "l/14"])
def test_preset_counts(preset):
    from transformers import OwlViTConfig, OwlViTForObjectDetection
    c = PRESETS[preset]
    with torch.device("meta"):
        ours = sum(p.numel() for p in Model(Config(**c)).parameters())
        stage1 = sum(p.numel() for p in Model(Config(**c, stage="pretrain")).parameters())
        hc = OwlViTConfig(
            text_config=dict(hidden_size=c["text_width"], num_hidden_layers=c["text_depth"],
                             num_attention_heads=c["text_heads"], intermediate_size=c["text_mlp_dim"]),
            vision_config=dict(hidden_size=c["width"], num_hidden_layers=c["depth"], num_attention_heads=c["heads"],
                               intermediate_size=c["mlp_dim"], image_size=c["image_size"], patch_size=c["patch_size"]),
            projection_dim=c["embed_dim"])
        hf = OwlViTForObjectDetection(hc)
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "visual_projection" not in n and n != "owlvit.logit_scale")
    assert ours == n_hf == HF_COUNTS[preset]
    assert stage1 == sum(p.numel() for p in hf.owlvit.parameters())
    clip, g224 = CLIP_224[preset]
    g = c["image_size"] // c["patch_size"]
    assert stage1 == clip + (g * g - g224 * g224) * c["width"] - (77 - 16) * c["text_width"]


# ------------------------------------------------------------------------------------------------ image files, predict


def _png(x, ctype, filters, depth=8, palette=None):
    """A reference PNG encoder with the given filter type per row (0..4)."""
    h, w = x.shape[:2]
    bpp = x.shape[2] if x.ndim == 3 else 1
    rows = x.reshape(h, -1).astype(np.int64)
    raw = b""
    prev = np.zeros(w * bpp, np.int64)
    for y in range(h):
        cur, f = rows[y], filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if f == 0:
            enc = cur
        elif f == 1:
            enc = cur - left
        elif f == 2:
            enc = cur - prev
        elif f == 3:
            enc = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            enc = cur - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw += bytes([f]) + (enc & 255).astype(np.uint8).tobytes()
        prev = cur
    chunk = lambda k, b: struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette.tobytes())
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_read_write_image(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for name in ("a.png", "a.ppm"):
        data.write_image(tmp_path / name, x)
        assert np.array_equal(data.read_image(tmp_path / name), x)
    assert (tmp_path / "a.ppm").read_bytes()[:11] == b"P6\n5 7\n255\n"
    (tmp_path / "c.ppm").write_bytes(b"P6 # a comment\n5 7\n255\n" + x.tobytes())
    assert np.array_equal(data.read_image(tmp_path / "c.ppm"), x)
    rgba = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    pal = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    idx = rng.integers(0, 5, (6, 4), dtype=np.uint8)
    for filters in ([0], [1], [2], [3], [4], [4, 3, 2, 1, 0]):
        (tmp_path / "f.png").write_bytes(_png(x, 2, filters))
        assert np.array_equal(data.read_image(tmp_path / "f.png"), x), filters
        (tmp_path / "f.png").write_bytes(_png(rgba, 6, filters))
        assert np.array_equal(data.read_image(tmp_path / "f.png"), rgba[..., :3])
        (tmp_path / "f.png").write_bytes(_png(gray, 0, filters))
        assert np.array_equal(data.read_image(tmp_path / "f.png"), np.repeat(gray[..., None], 3, 2))
    (tmp_path / "p.png").write_bytes(_png(idx, 3, [1, 4], palette=pal))
    assert np.array_equal(data.read_image(tmp_path / "p.png"), pal[idx])
    for bad, msg in [(_png(x.astype(np.uint8), 2, [0], depth=16), "bit depth 16"), (b"GIF89a....", "not a binary PPM"),
                     (b"P6\n5 7\n65535\n", "maxval"), (b"P6\n5 7\n255\n" + x.tobytes()[:20], "truncated"),
                     (_png(x, 2, [0])[:-20], "CRC")]:
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(data.DataError, match=msg):
            data.read_image(tmp_path / "bad")
    with pytest.raises(data.DataError):
        data.write_image(tmp_path / "a.jpg", x)
    with pytest.raises(data.DataError):
        data.read_image(tmp_path / "missing.png")


def test_read_png_written_by_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # an independent encoder (adaptive filters), where installed
    x = np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    x[10:20] = 200  # flat regions make Pillow choose several filters
    Image.fromarray(x).save(tmp_path / "p.png")
    assert np.array_equal(data.read_image(tmp_path / "p.png"), x)


def test_predict(scenes, tmp_path):
    torch.manual_seed(0)
    cfg = Config(**TINY)
    m = Model(cfg).eval()
    data.write_image(tmp_path / "scene.png", scenes.x_test[3].numpy())
    res = owlvit.predict(m, scenes, cfg, [str(tmp_path / "scene.png"), "red circle", "blue square", "threshold=0.0",
                                          "nms=0.5", f"out={tmp_path / 'drawn.ppm'}"])
    assert res["size"] == [32, 32] and res["queries"] == ["red circle", "blue square"]
    assert res["detections"] and {d["query"] for d in res["detections"]} <= {"red circle", "blue square"}
    drawn = data.read_image(tmp_path / "drawn.ppm")
    assert drawn.shape == (32, 32, 3) and not np.array_equal(drawn, scenes.x_test[3].numpy())
    assert all(0 <= b <= 32 for d in res["detections"] for b in d["box"])
    res = owlvit.predict(m, scenes, cfg, ["shapes:3", "exemplar=shapes:4", "box=0,0,16,16", "threshold=0.0",
                                          f"out={tmp_path / 'b.png'}"])
    assert res["queries"] == ["exemplar"] and res["truth"][0]["name"] == scenes.scenes_test[3][0]["name"]
    with pytest.raises(ValueError):
        owlvit.predict(m, scenes, cfg, ["shapes:999", "red circle"])
    with pytest.raises(ValueError):
        owlvit.predict(m, scenes, cfg, ["shapes:1", "exemplar=shapes:2"])  # no box
