import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ul2  # noqa: E402
from ul2 import DENOISERS, PRESETS, Config, Model  # noqa: E402

from helpers import torchvision_stand_in  # noqa: E402
import transformers  # noqa: E402  (first, as CI installs it)

torchvision_stand_in()
torch.set_num_threads(1)

TINY = dict(vocab_size=99, d_model=32, d_kv=12, d_ff=48, num_heads=3, num_layers=3, num_decoder_layers=2)


def _ids(B=2, S=40, V=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    ids[-1, S // 2:] = 0  # a padded row
    return ids


def _hf(tie=False, act="gated-gelu", seed=0):
    hc = transformers.T5Config(vocab_size=99, d_model=32, d_kv=12, d_ff=48, num_layers=3, num_decoder_layers=2,
                               num_heads=3, feed_forward_proj=act, dropout_rate=0.0, tie_word_embeddings=tie,
                               decoder_start_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(hc).eval()


# ---------------------------------------------------------------------------------------------- architecture

def test_shapes_and_layout():
    m = Model(Config(**TINY))
    logits = m(_ids(), _ids(S=7))
    assert logits.shape == (2, 7, 99)
    assert all(p.dim() >= 1 for p in m.parameters())
    assert not any(n.endswith(".bias") for n, _ in m.named_parameters())  # no biases anywhere
    assert m.encoder.relative_attention_bias.weight.shape == (32, 3)  # one table per stack
    assert m.decoder.blocks[0].cross_attn is not None and m.encoder.blocks[0].cross_attn is None
    assert m.encoder.blocks[0].attn.q.weight.shape == (36, 32)  # H * d_kv != d_model
    assert m.lm_head is not None and m.lm_head.weight is not m.shared.weight
    tied = Model(Config(**TINY, tie_embeddings=True))
    assert tied.lm_head is None
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in tied.parameters()) == 99 * 32


def test_relative_position_buckets_card_vectors():
    rel = torch.tensor([0, -1, -7, -8, -11, -12, -15, -16, -20, -32, -64, -100, -1000,
                        1, 7, 8, 11, 12, 15, 16, 20, 32, 64, 100, 1000])
    enc = [0, 1, 7, 8, 8, 9, 9, 10, 10, 12, 14, 15, 15, 17, 23, 24, 24, 25, 25, 26, 26, 28, 30, 31, 31]
    assert ul2.relative_position_bucket(rel, True).tolist() == enc
    rel = torch.tensor([0, -15, -16, -18, -19, -20, -32, -64, -100, -127, -500, 1, 50])
    dec = [0, 15, 16, 16, 17, 17, 21, 26, 30, 31, 31, 0, 0]
    assert ul2.relative_position_bucket(rel, False).tolist() == dec


def test_rmsnorm_and_attention_equations():
    norm = ul2.RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8) * 5 + 2
    assert torch.allclose(norm(x), norm.weight * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6))
    q, k, v = torch.randn(3, 2, 1, 5, 4).unbind(0)
    bias = torch.randn(1, 1, 5, 5)
    ref = torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v  # no 1/sqrt(d)
    assert torch.allclose(ul2.attention(q, k, v, bias), ref, atol=1e-6)
    bf = ul2.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)  # the written-out CPU path
    assert (bf.float() - ref).abs().max() < 0.05


def test_position_bias_shared_and_masks():
    torch.manual_seed(0)
    m = Model(Config(**TINY)).eval()
    ids, dec = _ids(), _ids(S=6)
    # padding is masked: the padded row's encoding of its real tokens equals that of the unpadded input
    e1, _ = m.encode(ids)
    e2, _ = m.encode(ids[-1:, :20])
    assert (e1[-1, :20] - e2[0]).abs().max() < 1e-5
    assert torch.allclose(m(ids, dec)[-1], m(ids[-1:, :20], dec[-1:])[0], atol=1e-5)
    # causal: the first decoder positions do not see later ones
    full = m(ids, dec)
    dec2 = dec.clone()
    dec2[:, 4:] = 5
    assert torch.allclose(full[:, :4], m(ids, dec2)[:, :4], atol=1e-6)
    assert not torch.allclose(full[:, 4:], m(ids, dec2)[:, 4:])


def test_preset_param_counts():
    # Hugging Face google/t5-v1_1-{small,base,large,xl,xxl} num_parameters(); UL2 20B (google/ul2): 32+32 layers,
    # d_model 4096, 16 heads x 256, d_ff 16384 gated-SiLU, untied head: "20B" in the paper
    expected = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184,
                "xxl": 11_135_332_352, "20b": 19_591_209_984}
    for name, n in expected.items():
        with torch.device("meta"):
            m = Model(Config(**PRESETS[name]))
        assert sum(p.numel() for p in m.parameters()) == n, name
    assert abs(expected["20b"] / 20e9 - 1) < 0.03
    assert PRESETS["20b"]["activation"] == "silu" and PRESETS["small"]["activation"] == "gelu_tanh"


def test_invalid_config():
    for kw in (dict(activation="relu"), dict(mixture="R1,Q9"), dict(mixture="R1=-1"), dict(dropout=1.5)):
        with pytest.raises(ValueError):
            Model(Config(**TINY, **kw))


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("tie,act", [(False, "gated-gelu"), (True, "gated-gelu"), (False, "gated-silu")])
def test_hf_parity(tie, act):
    hf = _hf(tie, act)
    scale = getattr(hf.config, "scale_decoder_outputs", hf.config.tie_word_embeddings)  # transformers 5 / 4
    assert scale == tie
    cfg = Config(**TINY, tie_embeddings=tie, scale_logits=tie, activation="gelu_tanh" if act == "gated-gelu" else "silu")
    m = Model(cfg).eval()
    sd = ul2.load_hf_state_dict(hf.state_dict())
    if tie:
        sd.pop("lm_head.weight", None)
    m.load_state_dict(sd)  # strict: every tensor has its HF counterpart
    ids, dec = _ids(S=150), _ids(S=20, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec).logits
        out = m(ids, dec)
    assert ref.abs().max() > 1
    assert (out - ref).abs().max() < 1e-4


def test_from_hf_folder(tmp_path):
    hf = _hf(False)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")  # google/ul2's layout: shards + index
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids, dec = _ids(), _ids(S=9, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec).logits
        for folder in ("one", "sharded"):
            m = ul2.from_hf(tmp_path / folder)
            assert (m(ids, dec) - ref).abs().max() < 1e-4
            assert not m.training
    with pytest.raises(FileNotFoundError):
        ul2.from_hf(tmp_path / "nothing")
    c = dict(hf.config.to_dict(), feed_forward_proj="relu")
    with pytest.raises(ValueError, match="gated"):
        ul2.config_from_hf(c)
    # google/ul2's config.json: no tie_word_embeddings key -> HF ties and rescales; gated-silu
    c = {"vocab_size": 32128, "d_model": 4096, "d_kv": 256, "d_ff": 16384, "num_layers": 32, "num_heads": 16,
         "feed_forward_proj": "gated-silu", "model_type": "t5"}
    cfg = ul2.config_from_hf(c)
    assert cfg.tie_embeddings and cfg.scale_logits and cfg.activation == "silu" and cfg.num_decoder_layers == 32


# ---------------------------------------------------------------------------------------------- decoding

def _peaky_model(seed=0):
    torch.manual_seed(seed)
    m = Model(Config(**TINY)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(4)  # a random model with confident, varied outputs
    return m


def test_cached_decoding_equals_uncached():
    m = _peaky_model()
    ids = _ids(B=3, S=25)
    enc, mask = m.encode(ids)
    dec = torch.cat([torch.zeros(3, 1, dtype=torch.long), _ids(B=3, S=12, seed=2)], 1)
    full = m.decode(dec, enc, mask)  # (B, T, V)
    cache, steps = m.new_cache(), []
    for t in range(dec.shape[1]):
        steps.append(m.decode(dec[:, t:t + 1], enc, mask, cache))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert cache[0]["self"]["k"].shape == (3, 3, 13, 12) and cache[0]["cross"]["k"].shape == (3, 3, 25, 12)
    a, b = m.generate(ids, 30), m.generate(ids, 30, use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, 30)
    assert len(set(a.flatten().tolist())) > 5  # not a constant output
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = m.generate(ids, 30, temperature=1.0, top_k=5, generator=g1)
    s2 = m.generate(ids, 30, temperature=1.0, top_k=5, generator=g2, use_cache=False)
    assert torch.equal(s1, s2) and not torch.equal(s1, a)


def test_sampling_top_k_and_eos():
    m = _peaky_model()
    ids = _ids(B=2, S=10)
    logits = m.decode(torch.zeros(2, 1, dtype=torch.long), *m.encode(ids))[:, 0]  # (B, V)
    top = logits.index_fill(-1, torch.tensor([0]), float("-inf")).topk(3).indices.tolist()  # (B, 3), never PAD
    for s in range(10):
        out = m.generate(ids, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(s))
        assert all(out[i, 0].item() in top[i] for i in range(2))

    def force_eos(prefix, logits):  # a logits processor: EOS at step 3
        if prefix.shape[1] == 3:
            logits = torch.full_like(logits, float("-inf"))
            logits[:, ul2.EOS] = 0
        return logits
    out = m.generate(ids, 8, logits_processor=force_eos)
    assert (out[:, 3] == ul2.EOS).all() and (out[:, 4:] == ul2.PAD).all() and (out[:, :3] != ul2.PAD).all()


def test_beam_search():
    m = _peaky_model()
    ids = _ids(B=2, S=15)
    greedy = m.generate(ids, 12)
    seqs, scores = m.beam_search(ids, 12, num_beams=1)
    assert torch.equal(seqs[:, 0], greedy)
    seqs, scores = m.beam_search(ids, 12, num_beams=4)
    assert seqs.shape == (2, 4, 12) and (scores[:, :-1] >= scores[:, 1:]).all()
    # each score is the sequence's log-probability under teacher forcing
    for b in range(2):
        for k in range(4):
            y = seqs[b, k]
            n = int((y != 0).sum())
            logits = m(ids[b:b + 1], ul2.shift_right(y[None, :n]))[0]
            lp = logits.index_fill(-1, torch.tensor([0]), float("-inf")).log_softmax(-1)  # PAD is never generated
            assert abs(lp.gather(1, y[:n, None]).sum().item() - scores[b, k].item()) < 1e-3
    assert (scores[:, 0] >= m(ids, ul2.shift_right(greedy)).index_fill(-1, torch.tensor([0]), float("-inf"))
            .log_softmax(-1).gather(2, greedy[..., None])
            .squeeze(-1).masked_fill(greedy == 0, 0).sum(-1) - 1e-4).all()  # beam >= greedy


def test_loss_goes_down():
    torch.manual_seed(0)
    m = Model(Config(**TINY))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = _ids(B=4, S=20)
    batch = {"inputs": ids, "targets": ids[:, :10].clone()}
    batch["targets"][-1, 5:] = 0
    first = None
    for _ in range(30):
        l, metrics = ul2.loss(m, batch)
        opt.zero_grad()
        l.backward()
        opt.step()
        first = first or l.item()
    assert l.item() < 0.5 * first and metrics["tokens"] == 35 + 70


# ---------------------------------------------------------------------------------------------- Mixture-of-Denoisers

class _Tok:  # the ByteTokenizer's id layout (data.py), without importing data.py
    vocab_size, n_sentinels, mode = 390, 128, {"R": 259, "X": 260, "S": 261}

    def sentinel(self, k):
        assert 0 <= k < self.n_sentinels
        return self.vocab_size - 1 - k


TOK = _Tok()


@pytest.mark.parametrize("length,density,mu", [(128, 0.15, 3), (128, 0.15, 8), (128, 0.5, 3), (512, 0.5, 8),
                                               (128, 0.15, 32), (128, 0.5, 32), (37, 0.15, 3)])
def test_random_spans_noise_mask_statistics(length, density, mu):
    rng = np.random.default_rng(0)
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = max(round(num_noise / mu), 1)
    span_lengths, first_lengths = [], []
    for _ in range(400):
        m = ul2.random_spans_noise_mask(length, density, mu, rng)
        assert m.shape == (length,) and not m[0]  # always starts clean
        assert m.sum() == num_noise  # exactly round(L r) noise tokens
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
        lens = edges[1::2] - edges[::2]
        assert len(lens) == num_spans  # exactly round(noise / mu) spans
        span_lengths += lens.tolist()
        first_lengths.append(lens[0])
    assert abs(np.mean(span_lengths) - num_noise / num_spans) < 1e-9  # mean = noise / spans exactly
    if num_spans > 1:  # uniform compositions: E[first span] = n/k as well, and lengths vary
        assert abs(np.mean(first_lengths) / (num_noise / num_spans) - 1) < 0.15
        assert np.std(span_lengths) > 0.3


def test_noise_mask_uniform_compositions():
    # 4 noise tokens in 2 spans: compositions (1,3), (2,2), (3,1) each with probability 1/3
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(3000):
        m = ul2.random_spans_noise_mask(8, 0.5, 2, rng)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
        key = tuple(edges[1::2] - edges[::2])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(1, 3), (2, 2), (3, 1)}
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values())
    assert not ul2.random_spans_noise_mask(10, 0.0, 3, rng).any()
    assert ul2.random_spans_noise_mask(1, 0.5, 3, rng).tolist() == [False]


def test_span_corrupt_card_example():
    tokens = np.arange(10, 20)
    noise = np.array([0, 1, 1, 0, 0, 1, 0, 0, 0, 1], bool)
    inputs, targets = ul2.span_corrupt(tokens, noise, TOK.sentinel)
    assert inputs.tolist() == [10, 389, 13, 14, 388, 16, 17, 18, 387]
    assert targets.tolist() == [389, 11, 12, 388, 15, 387, 19]  # no trailing sentinel (seqio)
    assert ul2.fill_in(inputs.tolist(), targets.tolist(), TOK) == tokens.tolist()


@pytest.mark.parametrize("name", list(DENOISERS))
def test_denoise_reconstructs_and_mode_tokens(name):
    rng = np.random.default_rng(0)
    kind, mu, rate = DENOISERS[name]
    for trial in range(50):
        L = 128 if trial % 2 else int(rng.integers(2, 128))
        tokens = rng.integers(3, 259, size=L)
        inputs, targets = ul2.denoise(tokens, name, rng, TOK)
        assert inputs[0] == TOK.mode[kind] and inputs[-1] == ul2.EOS and targets[-1] == ul2.EOS
        if kind == "S":  # prefix LM: context, then the continuation; no target token precedes any context token
            prefix, rest = inputs[1:-1], targets[:-1]
            assert len(prefix) >= 1 and len(rest) >= 1 and np.concatenate([prefix, rest]).tolist() == tokens.tolist()
        else:
            assert ul2.fill_in(inputs, targets, TOK) == tokens.tolist()
            n_spans = int((inputs >= TOK.vocab_size - TOK.n_sentinels).sum())
            assert len(inputs) == 1 + (L - (len(targets) - 1 - n_spans)) + n_spans + 1  # mode + clean + sentinels + EOS
            if L == 128:
                assert len(targets) - 1 - n_spans == round(L * rate)  # the configured corruption rate
                assert n_spans == max(1, round(round(L * rate) / ul2.mean_span_length(mu, L)))
    inputs, _ = ul2.denoise(np.arange(3, 40), name, rng, TOK, mode_tokens=False)
    assert inputs[0] not in TOK.mode.values()


def test_span_length_scaling_and_sentinel_budget():
    assert ul2.mean_span_length(64, 512) == 64 and ul2.mean_span_length(64, 128) == 32
    assert ul2.mean_span_length(3, 128) == 3 and ul2.mean_span_length(8, 16) == 4
    assert ul2.max_spans(Config(seq_len=128)) == 21  # X(3, .5): 64 noise tokens / 3
    assert ul2.max_spans(Config(seq_len=512)) == 85 <= TOK.n_sentinels  # enough sentinels for UL2's 512 inputs
    assert ul2.max_spans(Config(seq_len=1024, mixture="S")) == 0
    names, w = ul2.parse_mixture("R1=2, S")
    assert names == ["R1", "S"] and np.allclose(w, [2 / 3, 1 / 3])


def test_s_prefix_length_uniform():
    rng = np.random.default_rng(0)
    lens = [len(ul2.denoise(np.arange(3, 13), "S", rng, TOK)[0]) - 2 for _ in range(2000)]
    counts = np.bincount(lens, minlength=10)[1:]  # prefix lengths 1..9, uniform
    assert counts.min() > 150 and counts.max() < 300 and len(counts) == 9


# ---------------------------------------------------------------------------------------------- command line

def test_cli_train_resume_predict(tmp_path, capsys):
    import train
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i}." for i in range(300)))
    tiny = ["--d_model", "32", "--d_kv", "8", "--d_ff", "64", "--num_heads", "2", "--num_layers", "1",
            "--num_decoder_layers", "1", "--seq_len", "48", "--eval_examples", "8", "--batch-size", "8", "--log-every", "1"]
    out = tmp_path / "run"
    res = train.main(["ul2", "--data", str(txt), "--steps", "6", "--eval-every", "3", "--out", str(out),
                      "--no-progress", "--dtype", "fp32", *tiny])
    assert {"val_loss", "val_loss_S", "infill_em", "cont_acc"} <= set(res) and res["steps"] == 6
    logs = [l for l in (out / "log.jsonl").read_text().splitlines()]
    assert "tokens_per_s" in logs[0]
    # interrupted after 3 steps and resumed: the same final loss as the uninterrupted run
    out2 = tmp_path / "run2"
    base = ["ul2", "--data", str(txt), "--steps", "6", "--eval-every", "3", "--out", str(out2), "--no-progress",
            "--dtype", "fp32", *tiny]
    with pytest.raises(SystemExit):
        train.main(base + ["--stop-after", "3"])
    res2 = train.main(["ul2", "--out", str(out2), "--resume", "--no-progress"])
    losses = lambda o: [json.loads(l)["loss"] for l in (o / "log.jsonl").read_text().splitlines()]
    assert losses(out2) == losses(out) and len(losses(out)) == 6 and res2["val_loss"] == res["val_loss"]
    capsys.readouterr()
    pred = train.main(["ul2", "--out", str(out), "--predict", "[R] the quick <extra_id_0> fox", "max_new_tokens=6"])
    assert pred["prompt"] == "[R] the quick <extra_id_0> fox" and pred["filled"].startswith("the quick ")
