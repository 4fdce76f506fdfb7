"""Tests of pali.py: the token layout (image tokens first, then the prompt), the frozen-ViT switch,
prompt builders, coordinate tokens, metrics on hand-worked examples, preset sizes on the meta device,
parity of the text side with Hugging Face MT5, cached generation and beam search, initialisation from
vit.py / ul2.py checkpoints, the training hooks, predict, and CIFAR as captioning (offline)."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import pali  # noqa: E402
import ul2  # noqa: E402
import vit  # noqa: E402
from pali import Config, Model  # noqa: E402

from helpers import images as _images, perturb as _perturb, torchvision_stand_in  # noqa: E402
import transformers  # noqa: E402  (first, as CI installs it)

torchvision_stand_in()

torch.set_num_threads(1)
TINY = pali.PRESETS["tiny"]


@pytest.fixture(scope="module")
def scenes():
    """A small SceneData (the same class data.load returns) at 16 px."""
    x, sc = data.shapes_scenes(64, 16, seed=0)
    xt, st = data.shapes_scenes(16, 16, seed=1)
    return data.SceneData("shapes", torch.from_numpy(x), sc, torch.from_numpy(xt), st, data.ByteTokenizer())


def _model(**kw):
    torch.manual_seed(0)
    return Model(Config(**{**TINY, **kw}))


# ----------------------------------------------------------------------------- the model

def test_token_layout_image_first_then_prompt():
    m = _model().eval()
    x, prompt = _images(2, 16), torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    e, mask = m.embed(x, prompt)
    N = (16 // 4) ** 2
    assert e.shape == (2, N + 4, 32) and mask.shape == (2, N + 4)
    torch.testing.assert_close(e[:, :N], m.img_proj(m.vit(x)))  # the visual tokens, projected, come first
    torch.testing.assert_close(e[:, N:], m.shared(prompt))  # then the embedded prompt
    assert mask[:, :N].all() and mask[:, N:].tolist() == [[True, True, True, False], [True, True, False, False]]
    assert m.vit(x).shape == (2, N, 32)  # no class token, no pooling
    dec = torch.tensor([[0, 5], [0, 6]])
    out = m(x, prompt, dec)
    assert out.shape == (2, 2, TINY.get("vocab_size", Config.vocab_size))
    assert not torch.allclose(out, m(x.flip(0), prompt, dec))  # the answer depends on the image ...
    assert not torch.allclose(out, m(x, prompt.flip(0), dec))  # ... and on the prompt


def test_padding_in_the_prompt_is_masked():
    m = _model().eval()
    x, dec = _images(1, 16), torch.tensor([[0, 5, 6]])
    a = m(x, torch.tensor([[5, 6, 7]]), dec)
    b = m(x, torch.tensor([[5, 6, 7, 0, 0]]), dec)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_freeze_vit():
    m = _model(freeze_vit=True)
    assert not any(p.requires_grad for p in m.vit.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("vit."))
    before = {k: v.clone() for k, v in m.vit.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    out = m(_images(2, 16), torch.tensor([[5, 6], [7, 8]]), torch.tensor([[0, 5], [0, 6]]))
    out.square().mean().backward()
    assert all(p.grad is None for p in m.vit.parameters()) and m.img_proj.weight.grad is not None
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.vit.state_dict().items())
    assert any(p.requires_grad for p in _model(freeze_vit=False).vit.parameters())


def test_invalid_config():
    for bad in [dict(image_size=18), dict(width=33), dict(activation="relu"), dict(num_buckets=2), dict(posemb="rope"), dict(mixture="caption:1,ocr:1"),
                dict(mixture="caption:0"), dict(mixture="vqa:x"), dict(langs=""), dict(n_locations=1)]:
        with pytest.raises(ValueError):
            Model(Config(**{**TINY, **bad}))


def test_vision_side_equals_vit_py():
    """Our ViT = vit.py's forward_features without the class token (a gap ViT has none)."""
    torch.manual_seed(0)
    fields = {k: TINY[k] for k in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim")}
    ref = _perturb(vit.Model(vit.Config(**fields, pool="gap")))
    m = _model().eval()
    m.vit.load_state_dict(pali.vision_state_dict(ref.state_dict(), {"pool": "gap"}, m.cfg))
    x = _images(2, 16)
    torch.testing.assert_close(m.vit(x), ref.forward_features(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- sizes

def _count(**cfg):
    with torch.device("meta"):
        m = Model(Config(**cfg))
    vision = sum(p.numel() for p in m.vit.parameters())
    text = sum(p.numel() for n, p in m.named_parameters() if n.startswith(pali.T5_PREFIXES))
    return vision, text, sum(p.numel() for p in m.parameters())


def _hf_mt5_count(preset):
    c = pali.PRESETS[preset]
    cfg = transformers.MT5Config(vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
                                 num_layers=c["num_layers"], num_decoder_layers=c["num_decoder_layers"],
                                 num_heads=c["num_heads"], tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.MT5ForConditionalGeneration(cfg)
    return sum(p.numel() for p in hf.parameters()) + (0 if hf.lm_head.weight is not hf.shared.weight else hf.lm_head.weight.numel())


@pytest.mark.parametrize("preset,vision_b,text_b,total_b", [("3b", 1.8, 1.2, 3), ("15b", 1.8, 13, 15), ("17b", 3.9, 13, 17)])
def test_preset_sizes(preset, vision_b, text_b, total_b):
    """The paper's Table 1: ViT-G 1.8B, ViT-e 3.9B, mT5-Large 1.2B, mT5-XXL 13B; PaLI-3B / 15B / 17B.
    Our ViT is the encoder without any head (PaLI reads the patch outputs): ViT-G/14 1.842B, ViT-e/14
    3.805B, 2.4% under the paper's 3.9B (which presumably counts a pre-training head)."""
    vision, text, total = _count(**pali.PRESETS[preset])
    assert abs(vision / 1e9 - vision_b) / vision_b < 0.03
    assert round(text / 1e9, 1 if text_b < 10 else 0) == text_b
    assert round(total / 1e9) == total_b
    assert total == vision + text + pali.PRESETS[preset]["width"] * pali.PRESETS[preset]["d_model"] + pali.PRESETS[preset]["d_model"]


def test_text_side_counts_equal_hf_mt5():
    """Exact: our text side = MT5ForConditionalGeneration with the same sizes (untied head, 250,112 ids)."""
    for preset in ("3b", "17b"):
        assert _count(**pali.PRESETS[preset])[1] == _hf_mt5_count(preset)


# ----------------------------------------------------------------------------- parity with Hugging Face MT5

def test_parity_with_hf_mt5():
    cfg_hf = transformers.MT5Config(vocab_size=300, d_model=32, d_kv=12, d_ff=40, num_layers=3, num_decoder_layers=2,
                                    num_heads=3, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                    tie_word_embeddings=False, decoder_start_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.MT5ForConditionalGeneration(cfg_hf).eval()
    ours = Model(Config(**{**TINY, "vocab_size": 300, "d_model": 32, "d_kv": 12, "d_ff": 40, "num_layers": 3,
                           "num_decoder_layers": 2, "num_heads": 3})).eval()
    _perturb(ours)
    sd = ul2.load_hf_state_dict(hf.state_dict())
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("vit.", "img_proj.")) for k in missing)
    x = _images(2, 16)
    prompt = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    dec = torch.tensor([[0, 40, 41, 42], [0, 50, 51, 52]])
    e, mask = ours.embed(x, prompt)  # the visual tokens enter HF as input embeddings
    with torch.no_grad():
        ref = hf(inputs_embeds=e, attention_mask=mask.long(), decoder_input_ids=dec).logits
        out = ours(x, prompt, dec)
    assert (out - ref).abs().max() < 1e-4


def test_generation_cache_and_beam_search_match_hf():
    cfg_hf = transformers.MT5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
                                    eos_token_id=1, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(1)
    hf = transformers.MT5ForConditionalGeneration(cfg_hf).eval()
    ours = _perturb(Model(Config(**{**TINY, "vocab_size": 300})), scale=0.3, seed=2)
    ours.load_state_dict(ul2.load_hf_state_dict(hf.state_dict()), strict=False)
    x, prompt = _images(3, 16, seed=4), torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11], [12, 0, 0, 0]])
    greedy = ours.generate(x, prompt, max_new_tokens=8)
    assert torch.equal(greedy, ours.generate(x, prompt, max_new_tokens=8, use_cache=False))  # the cache changes nothing
    e, mask = ours.embed(x, prompt)
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=e, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                          num_beams=1, suppress_tokens=[0])
    ref = ref[:, 1:]  # drop the start token
    n = ref.shape[1]
    assert torch.equal(greedy[:, :n], ref) and (greedy[:, n:] == 0).all()
    seqs, scores = ours.beam_search(x, prompt, max_new_tokens=8, num_beams=3)
    assert seqs.shape == (3, 3, 8) and (scores[:, :-1] >= scores[:, 1:]).all()
    # the best beam is at least as likely as the greedy answer
    lp_greedy = ours.token_logprobs(x, prompt, greedy).sum(1)
    lp_beam = ours.token_logprobs(x, prompt, seqs[:, 0]).sum(1)
    assert (lp_beam >= lp_greedy - 1e-4).all()
    torch.testing.assert_close(lp_beam, scores[:, 0], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- prompts and coordinates

def test_prompt_builders(scenes):
    assert pali.caption_prompt("fr") == "Generate the caption in fr: <extra_id_0>"
    assert pali.vqa_prompt("wie viele Sterne gibt es?", "de") == "Answer in de: wie viele Sterne gibt es? <extra_id_0>"
    assert pali.detect_prompt() == "Detect all objects: <extra_id_0>"
    scene = scenes.scenes_train[0]
    rng = np.random.default_rng(0)
    for lang in data.LANGS:
        (p, t, q), = pali.examples(scenes, scene, "caption", lang, rng, 32)
        assert p == pali.caption_prompt(lang) and t == data.caption(scene, lang) and q == "caption"
        vqa = pali.examples(scenes, scene, "vqa", lang, np.random.default_rng(1), 32, every=True)
        ref = [x for x in data.vqa(scene, lang, np.random.default_rng(1)) if x[2] != "count"]
        assert [(p, t, q) for p, t, q in vqa] == [(pali.vqa_prompt(a, lang), b, c) for a, b, c in ref]
        (p, t, q), = pali.examples(scenes, scene, "count", lang, rng, 32)
        assert q == "count" and t.isdigit() and p.startswith(f"Answer in {lang}: ")
    (p, t, q), = pali.examples(scenes, scene, "detect", "en", rng, 32)
    assert p == pali.detect_prompt() and t.count("<loc") == 4 * len(scene) and t.count(" ; ") == len(scene) - 1
    # the sentinel is one token, the prompt never a target
    tok = pali.tokenizer(scenes, Config(**TINY))
    assert tok.encode(pali.caption_prompt("en"))[-1] == tok.sentinel(0)


def test_coordinate_round_trip():
    tok = data.ByteTokenizer(n_locations=32)
    rng = np.random.default_rng(0)
    for size, n in ((16, 32), (64, 32), (32, 33)):
        for _ in range(20):
            x0, y0 = rng.integers(0, size - 2, 2)
            box = (int(x0), int(y0), int(rng.integers(x0 + 1, size + 1)), int(rng.integers(y0 + 1, size + 1)))
            text = pali.box_to_text(box, size, n) + " red circle"
            ids = data.ByteTokenizer(n_locations=n).encode(text, eos=True)
            (back, name, score), = pali.parse_detections(ids, data.ByteTokenizer(n_locations=n), size, n)
            assert name == "red circle" and score == 1.0
            assert max(abs(a - b) for a, b in zip(back, box)) <= size / (n - 1) / 2 + 1e-9
            if n == size + 1:  # one bin per pixel edge: exact
                assert back == box
            assert pali.box_to_text(back, size, n) == pali.box_to_text(box, size, n)  # tokens -> boxes -> tokens: same
    assert pali.box_to_text((0, 4, 16, 8), 16, 32) == "<loc0008><loc0000><loc0016><loc0031>"  # y0 x0 y1 x1
    scene = [dict(box=(8, 0, 12, 4), name="blue star"), dict(box=(1, 2, 5, 6), name="red circle")]
    target = pali.detection_target([{**o, "image_size": 16} for o in scene], 16, 17)  # 17 bins: one per pixel edge
    got = pali.parse_detections(tok.encode(target), tok, 16, 17)
    assert [n for _, n, _ in got] == ["blue star", "red circle"]  # reading order: top first
    assert [b for b, _, _ in got] == [(8.0, 0.0, 12.0, 4.0), (1.0, 2.0, 5.0, 6.0)]


# ----------------------------------------------------------------------------- metrics

def test_bleu4_hand_worked():
    # hypothesis "the cat sat on the mat" (6 words) vs reference "the cat sat on a mat" (6 words):
    # 1-grams 5/6 (the x1 clipped: ref has one "the"), 2-grams 3/5 (the cat, cat sat, sat on),
    # 3-grams 2/4, 4-grams 1/3; brevity penalty 1 (same length):
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4) = 0.537285
    assert abs(pali.bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) - (1 / 12) ** 0.25) < 1e-9
    assert abs((1 / 12) ** 0.25 - 0.537285) < 1e-6
    # shorter candidate: "the cat sat on" vs "the cat sat on a mat": all precisions 1, BP = exp(1 - 6/4)
    assert abs(pali.bleu4(["the cat sat on"], [["the cat sat on a mat"]]) - math.exp(1 - 6 / 4)) < 1e-9
    assert pali.bleu4(["a b c d"], [["a b c d"]]) == 1.0
    assert pali.bleu4(["a b c"], [["a b c d"]]) == 0.0  # no 4-gram at all
    # corpus level: counts are summed before dividing; the closest of several references sets r
    # (precisions 9/9, 7/7, 5/5, 3/3; c = 9 words, r = 5 + 6 = 11: "a b c d z q" is closer to 4 than "x")
    two = pali.bleu4(["a b c d e", "a b c d"], [["a b c d e"], ["x", "a b c d z q"]])
    assert abs(two - math.exp(1 - 11 / 9)) < 1e-9
    # a tie in distance goes to the shorter reference (as NLTK / sacrebleu): r = 5 + 2 < c, no penalty
    assert pali.bleu4(["a b c d e", "a b c d"], [["a b c d e"], ["x y", "a b c d z q"]]) == 1.0


def test_vqa_exact_match_normalisation():
    assert pali.normalize_answer(" Rouge ") == pali.normalize_answer("rouge")
    assert pali.normalize_answer("media  luna.") == "media luna"
    assert pali.normalize_answer("3") != pali.normalize_answer("4")


def test_average_precision_hand_worked():
    gt = [[((0, 0, 10, 10), "a"), ((20, 20, 30, 30), "a")], [((0, 0, 10, 10), "b")]]
    perfect = [[((0, 0, 10, 10), "a", 0.9), ((20, 20, 30, 30), "a", 0.8)], [((0, 0, 10, 10), "b", 0.7)]]
    assert pali.average_precision(perfect, gt) == 1.0
    # class a, detections by score: 0.9 TP; 0.8 FP (IoU 25/175 < 0.5); 0.5 FP (image 2 has no "a");
    # 0.3 TP (IoU 81/100). Precision 1, 1/2, 1/3, 2/4 at recall 1/2, 1/2, 1/2, 1; the envelope is 1 up to
    # recall 1/2 and 1/2 after -> AP_a = 1/2 * 1 + 1/2 * 1/2 = 3/4. Class b: no detection -> 0. mAP = 3/8.
    dets = [[((0, 0, 10, 10), "a", 0.9), ((25, 25, 35, 35), "a", 0.8), ((21, 21, 30, 30), "a", 0.3)],
            [((0, 0, 10, 10), "a", 0.5)]]
    assert abs(pali.average_precision(dets, gt) - 3 / 8) < 1e-12
    # a duplicate of a matched box is a false positive
    dup = [[((0, 0, 10, 10), "a", 0.9), ((0, 0, 10, 10), "a", 0.8)], []]
    assert abs(pali.average_precision(dup, [gt[0], []]) - 0.5) < 1e-9
    assert abs(pali.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) - 50 / 150) < 1e-12


# ----------------------------------------------------------------------------- the training hooks

def test_batches_deterministic_and_targets_only(scenes):
    cfg = Config(**TINY)
    a = next(pali.batches(scenes, cfg, "train", 8, step=3, seed=1))
    b = next(pali.batches(scenes, cfg, "train", 8, step=3, seed=1))
    c = next(pali.batches(scenes, cfg, "train", 8, step=4, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in ("image", "prompt", "target")) and a["task"] == b["task"]
    assert not torch.equal(a["image"], c["image"])
    tok = pali.tokenizer(scenes, cfg)
    for i in range(8):
        target = tok.decode(a["target"][i])
        assert tok.decode(a["prompt"][i]).endswith("<extra_id_0>") and "<extra_id_0>" not in target
        assert target == a["answer"][i][:len(target)]
    assert torch.equal(a["decoder_input"][:, 1:], a["target"][:, :-1]) and (a["decoder_input"][:, 0] == 0).all()
    m = _model()
    l, met = pali.loss(m, a)
    assert met["tokens"] == int((a["target"] != 0).sum())  # prompt tokens and padding are never targets
    mix = Config(**{**TINY, "mixture": "caption:0,vqa:1"})
    assert set(next(pali.batches(scenes, mix, "train", 16))["task"]) == {"vqa"}
    both = [t for s in range(20) for t in next(pali.batches(scenes, Config(**{**TINY, "mixture": "vqa:3,count:1"}), "train", 16, step=s))["task"]]
    assert 0.6 < both.count("vqa") / len(both) < 0.9  # the weights are followed


def test_loss_goes_down(scenes):
    cfg = Config(**TINY)
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    batch = next(pali.batches(scenes, cfg, "train", 8))
    first = None
    for _ in range(30):
        l, _ = pali.loss(m, batch)
        first = first if first is not None else l.item()
        opt.zero_grad()
        l.backward()
        opt.step()
    assert l.item() < 0.5 * first


def test_evaluate_and_predict(scenes, tmp_path):
    cfg = Config(**{**TINY, "eval_images": 3, "max_target_len": 12})
    m = _model().eval()
    res = pali.evaluate(m, scenes, cfg)
    for k in ["test_loss", "caption_bleu4", "caption_bleu4_de", "caption_em_fr", "vqa_acc", "vqa_acc_es",
              "vqa_acc_colour", "count_acc", "count_acc_en", "det_ap50"]:
        assert k in res and 0 <= res[k] <= 1 or k == "test_loss"
    out = pali.predict(m, scenes, cfg, ["shapes:2", "Answer in fr: combien d'objets y a-t-il ?"])
    assert out["prompt"].endswith("<extra_id_0>") and isinstance(out["answer"], str) and out["objects"]
    out2 = pali.predict(m, scenes, cfg, ["shapes:2", "Answer in fr: combien d'objets y a-t-il ?", "beams=2"])
    assert isinstance(out2["answer"], str)
    path = tmp_path / "scene.png"  # an image file: the same pixels give the same answer
    data.write_image(path, scenes.x_test[2].numpy())
    out3 = pali.predict(m, scenes, cfg, [str(path), "Answer in fr: combien d'objets y a-t-il ?"])
    assert out3["answer"] == out["answer"]
    for bad in (["shapes:99", "x"], ["shapes:1"], ["shapes:1", "x", "y"], ["shapes:1", "x", "beams=0"]):
        with pytest.raises(ValueError):
            pali.predict(m, scenes, cfg, bad)


def test_setup_init_from_vit_and_ul2(tmp_path):
    cfg = Config(**TINY, init_vision="v.pt", init_text="t.pt")
    torch.manual_seed(1)
    v = vit.Model(vit.Config(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64))  # 32 px, cls token
    text = _model(vocab_size=390)  # a ul2-sized vocabulary (no location tokens)
    ckpts = {"v.pt": {"model": v.state_dict(), "config": dataclasses.asdict(v.cfg), "model_name": "vit"},
             "t.pt": {"model": {k: t for k, t in text.state_dict().items() if k.startswith(pali.T5_PREFIXES)},
                      "config": dataclasses.asdict(text.cfg), "model_name": "ul2"}}
    calls = []

    def load(path, name):
        calls.append((path, name))
        return ckpts[path]
    m = _model()
    pali.setup(m, cfg, load)
    assert calls == [("v.pt", "vit"), ("t.pt", "ul2")]
    torch.testing.assert_close(m.vit.blocks[1].mlp.fc2.weight, v.blocks[1].mlp.fc2.weight)
    assert m.vit.pos_embed.shape == (1, 16, 32)  # 8x8 grid without the class entry -> 4x4
    torch.testing.assert_close(m.encoder.blocks[0].attn.q.weight, text.encoder.blocks[0].attn.q.weight)
    tok, tok_ul2 = data.ByteTokenizer(n_locations=32), data.ByteTokenizer()
    for s in ("a", "<extra_id_0>", "<extra_id_5>", "[S]"):  # the same token gets the same row
        torch.testing.assert_close(m.shared.weight[tok.encode(s)], text.shared.weight[tok_ul2.encode(s)])
        torch.testing.assert_close(m.lm_head.weight[tok.encode(s)], text.lm_head.weight[tok_ul2.encode(s)])
    ckpts["v.pt"]["config"]["width"] = 48
    with pytest.raises(ValueError, match="width 48"):
        pali.setup(_model(), cfg, load)
    ckpts["v.pt"]["config"]["width"] = 32
    ckpts["t.pt"]["config"]["d_ff"] = 64
    with pytest.raises(ValueError, match="d_ff 64"):
        pali.setup(_model(), cfg, load)


def test_cifar_as_captioning_offline(tmp_path, monkeypatch):
    """A tiny fake CIFAR-10 already in the cache (no download): captions and a question in 4 languages."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(10), classes=np.array(classes))
    d = data.load("cifar10", kind="scenes")
    assert isinstance(d, data.SceneData) and d.langs == data.LANGS and d.tasks == ("caption", "vqa")
    s = d.scenes_test[6]
    assert [d.caption(s, l) for l in data.LANGS] == ["a photo of a frog", "une photo d'une grenouille",
                                                    "ein Foto von einem Frosch", "una foto de una rana"]
    assert d.caption(d.scenes_test[0], "en") == "a photo of an airplane"
    assert d.vqa(d.scenes_test[3], "de") == [("was ist auf dem Foto?", "Katze", "class")]
    cfg = Config(**{**TINY, "eval_images": 2})
    batch = next(pali.batches(d, cfg, "train", 6))
    assert set(batch["task"]) <= {"caption", "vqa"} and batch["image"].shape == (6, 3, 16, 16)  # resized to 16 px
    res = pali.evaluate(_model().eval(), d, cfg)
    assert "caption_bleu4_es" in res and "vqa_acc_class" in res and "det_ap50" not in res


def test_train_py_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "pali", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
           "--eval_images", "2", "--max_target_len", "8", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"vqa_acc"' in r.stdout.splitlines()[-1] and (out / "ckpt.pt").exists()
