"""dsi.py: docid builders (semantic ids form a prefix-free trie with the configured k and c),
trie-constrained beam search (only valid docids, exact scores, best-first), atomic retrieval, BM25
against a hand-computed example, the DSI++ metric formulas on a hand-made matrix, forgetting events,
the multi-task and continual batches, the generative memory, SAM's two passes in train.py, and
train.py end to end (DSI on a JSONL corpus, a continual stage with --init and --qgen)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import dsi  # noqa: E402
from dsi import PRESETS, Config, Model  # noqa: E402

torch.set_num_threads(1)
TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, doc_len=32)


@pytest.fixture(scope="module")
def corpus():
    return data.load("corpus", kind="corpus")


def test_relative_position_buckets():  # the card's test vectors (T5, 32 buckets, max distance 128)
    enc = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -32: 12, -64: 14, -100: 15, -500: 15,
           1: 17, 7: 23, 8: 24, 16: 26, 32: 28, 64: 30, 100: 31}
    dec = {0: 0, -15: 15, -16: 16, -19: 17, -32: 21, -64: 26, -100: 30, -127: 31, -1000: 31, 5: 0}
    for table, bidirectional in ((enc, True), (dec, False)):
        rel = torch.tensor(list(table))
        assert dsi.relative_position_bucket(rel, bidirectional).tolist() == list(table.values())


@pytest.mark.parametrize("docid", ["atomic", "naive", "semantic"])
def test_forward_shapes(docid):
    cfg = Config(**TINY, docid=docid, num_docs=50)
    m = Model(cfg)
    logits = m(torch.randint(3, 200, (2, 11)), torch.zeros(2, 4, dtype=torch.long))
    assert logits.shape == (2, 4, cfg.vocab_size + (50 if docid == "atomic" else 0))


def test_preset_counts_on_meta():
    """T5 v1.1 sizes DSI starts from (the paper: Base 0.2B, Large 0.8B, XL 3B, XXL 11B); exact counts of
    HF's google/t5-v1_1-* (untied lm_head, 32128 tokens)."""
    expected = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184,
                "xxl": 11_135_332_352}
    for name, n in expected.items():
        with torch.device("meta"):
            m = Model(Config(**PRESETS[name], docid="naive"))
            atomic = Model(Config(**PRESETS[name], docid="atomic", num_docs=1000))
        assert sum(p.numel() for p in m.parameters()) == n, name
        assert sum(p.numel() for p in atomic.parameters()) == n + 1000 * PRESETS[name]["d_model"]  # + W_docs


def _clustered(n=137, dim=8, groups=6, seed=0):
    rng = np.random.RandomState(seed)
    centres = rng.randn(groups, dim) * 5
    return centres[rng.randint(groups, size=n)] + rng.randn(n, dim)


@pytest.mark.parametrize("k, c", [(10, 10), (3, 4), (4, 1)])
def test_semantic_docids_are_a_prefix_free_trie(k, c):
    X = _clustered()
    ids, tree = dsi.semantic_docids(X, k=k, c=c)
    assert len(set(ids)) == len(ids)
    for a in ids:  # prefix-free: no docid is the start of another
        assert not any(b != a and b.startswith(a) for b in ids)
    depth_digits = len(str(k - 1))
    leaf_digits = len(str(max(c - 1, 0)))
    leaves = {}
    for s in ids:
        path, leaf = s[:-leaf_digits], s[-leaf_digits:]
        assert len(path) % depth_digits == 0
        assert all(int(path[i:i + depth_digits]) < k for i in range(0, len(path), depth_digits))
        leaves.setdefault(path, []).append(int(leaf))
    for members in leaves.values():  # a leaf holds at most c documents, numbered 0..size-1
        assert len(members) <= c and sorted(members) == list(range(len(members)))
    # a new document goes down the nearest centroids and takes the next free leaf index
    new = dsi.place_semantic(X[0] + 0.01, tree)
    assert new not in ids and new[:-leaf_digits] in leaves


def test_semantic_docids_follow_topics(corpus):
    cfg = Config(docid="semantic")
    ids = dsi.docid_strings(corpus, cfg)
    assert len(set(ids)) == corpus.num_docs
    d0 = [i for i, d in enumerate(corpus.docs) if d["corpus"] == 0]
    # TF-IDF + LSA embeddings put each topic in its own top-level cluster (mostly)
    purity = np.mean([max(np.bincount([ord(ids[i][0]) - 48 for i in d0 if corpus.docs[i]["topic"] == t], minlength=10)) / 30
                      for t in data.CORPUS_TOPICS])
    assert purity > 0.9
    naive = dsi.docid_strings(corpus, Config(docid="naive"))
    assert sorted(int(s) for s in naive) == list(range(corpus.num_docs))


def _logprob(model, x, seq, trie):
    """log p(seq | x) by teacher forcing, each step renormalised over the trie's allowed tokens (what
    the constrained search scores)."""
    dec = torch.tensor([[0] + seq[:-1]])
    logits = model(x[None], dec)[0].float()
    total, node = 0.0, trie
    for i, t in enumerate(seq):
        allowed = [a for a in node if a is not None]
        total += logits[i, allowed].log_softmax(-1)[allowed.index(t)].item()
        node = node[t]
    return total


def test_constrained_beam_search_returns_only_valid_docids():
    torch.manual_seed(0)
    m = Model(Config(**TINY, docid="naive")).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(0.3)  # flatter distributions: more competition between docids
    strings = ["3", "31", "310", "7", "72", "9", "95", "951", "12", "120", "4"]
    seqs = [[ord(ch) + 3 for ch in s] + [1] for s in strings]
    trie = dsi.build_trie(seqs)
    x = torch.randint(3, 200, (5, 9))
    for beam in (3, len(seqs), 20):
        out = dsi.constrained_beam_search(m, x, trie, beam=beam)
        for b, hyps in enumerate(out):
            assert len(hyps) == min(beam, len(seqs))
            idx = [j for j, _ in hyps]
            assert len(set(idx)) == len(idx) and all(0 <= j < len(seqs) for j in idx)
            scores = [s for _, s in hyps]
            assert scores == sorted(scores, reverse=True)
            for j, s in hyps:  # the reported score is the model's log-probability of that docid
                assert abs(s - _logprob(m, x[b], seqs[j], trie)) < 1e-4
            if beam >= len(seqs):  # exhaustive: the ranking is the exact one
                exact = sorted(range(len(seqs)), key=lambda j: -_logprob(m, x[b], seqs[j], trie))
                assert idx == exact
    # an unconstrained greedy decode of this random model is not a docid: the trie matters
    free = m(x, torch.zeros(5, 1, dtype=torch.long))[:, 0].argmax(-1)
    assert any(t.item() not in {s[0] for s in seqs} for t in free)


def test_atomic_retrieval_is_one_step_sort(corpus):
    torch.manual_seed(0)
    cfg = Config(**TINY, docid="atomic", num_docs=600)
    m = Model(cfg).eval()
    p = dsi.prepare(corpus, cfg)
    docs = list(range(0, 300, 3))
    ranked = dsi.retrieve(m, p["q_in"][:4], docs, p, cfg, beam=10)
    for inp, r in zip(p["q_in"][:4], ranked):
        logits = m(torch.tensor([inp]), torch.zeros(1, 1, dtype=torch.long))[0, 0, cfg.vocab_size:]
        best = sorted(docs, key=lambda d: -logits[d].item())[:10]
        assert r == best


def test_bm25_hand_computed():
    docs = ["a b c", "a a d e", "b f"]
    bm = dsi.BM25(docs, k1=1.2, b=0.75)
    # N = 3, avgdl = 3; "a" is in 2 documents: IDF = ln(1 + 1.5/2.5) = ln 1.6
    idf_a = math.log(1.6)
    # doc 1: tf 2, |d| 4: 2 * 2.2 / (2 + 1.2 (0.25 + 0.75 * 4/3)) = 4.4 / 3.5
    assert bm.scores("a")[1] == pytest.approx(idf_a * 4.4 / 3.5)
    # doc 0: tf 1, |d| 3: 2.2 / (1 + 1.2) = 1
    assert bm.scores("a")[0] == pytest.approx(idf_a)
    # "f": in one document; doc 2: tf 1, |d| 2: 2.2 / (1 + 1.2 (0.25 + 0.5)) = 2.2 / 1.9
    idf_f = math.log(1 + 2.5 / 1.5)
    s = bm.scores("A f, zzz")  # lower-cased words; unknown words add nothing
    assert s[2] == pytest.approx(idf_f * 2.2 / 1.9)
    assert s[1] == pytest.approx(idf_a * 4.4 / 3.5) and s[0] == pytest.approx(idf_a)
    assert bm.rank("a f", 3) == [2, 1, 0]  # 1.135 > 0.591 > 0.470
    assert dsi.hits([4, 2, 9], 2, 1) == 0.0 and dsi.hits([4, 2, 9], 2, 2) == 1.0


def test_continual_metrics_hand_made():
    P = [[0.8, 0, 0],
         [0.5, 0.6, 0],
         [0.6, 0.3, 0.9]]
    m = dsi.continual_metrics(P)
    assert m["A"] == pytest.approx((0.6 + 0.3 + 0.9) / 3)
    # corpus 0: best of P[0,0], P[1,0] = 0.8, final 0.6 -> 0.2; corpus 1: best P[1,1] = 0.6, final 0.3 -> 0.3
    assert m["F"] == pytest.approx((0.2 + 0.3) / 2)
    assert m["LA"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
    assert dsi.continual_metrics([[0.7]]) == {"A": 0.7, "F": 0.0, "LA": 0.7}


def test_forgetting_events():
    history = [[0, 1, 1, 0],
               [1, 0, 1, 0],
               [0, 1, 1, 0],
               [1, 0, 1, 0]]
    events, frac = dsi.forgetting_events(history)
    assert events.tolist() == [1, 2, 0, 0]
    assert frac == pytest.approx(2 / 3)  # of the 3 documents ever learned, 2 were forgotten


def test_batches_mix_ratio_and_are_pure(corpus):
    cfg = Config(**TINY, ratio=3.0)
    p = dsi.prepare(corpus, cfg)
    it = dsi.batches(corpus, cfg, "train", 32, step=5, seed=1)
    b = next(it)
    again = next(dsi.batches(corpus, cfg, "train", 32, step=5, seed=1))
    assert all(torch.equal(b[k], again[k]) for k in ("input_ids", "labels"))
    query = torch.tensor(p["prefix_query"])
    is_query = (b["input_ids"][:, :len(query)] == query).all(1)
    assert is_query.sum() == 8  # 32 / (3 + 1) retrieval examples, the rest indexing
    # every target is the docid of a D0 document, and decoder inputs are the labels shifted right
    targets = {tuple(t) for t, c in zip(p["target"], p["corpus"]) if c == 0}
    for row in b["labels"]:
        assert tuple(row[row != -100].tolist()) in targets
    assert (b["decoder_input_ids"][:, 0] == 0).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1].clamp(min=0))


def test_continual_batches(corpus):
    cfg = Config(**TINY, stage=2, qgen="x.pt", mem_new=0.25, mem_old=0.25)
    p = dsi.prepare(corpus, cfg)
    b = next(dsi.batches(corpus, cfg, "train", 32, step=0, seed=0))
    assert b["pseudo"].tolist() == [False] * 16 + [True] * 16
    by_target = {tuple(t): c for t, c in zip(p["target"], p["corpus"])}
    corp = [by_target[tuple(r[r != -100].tolist())] for r in b["labels"]]
    assert set(corp[:24]) == {2}  # indexing of D2 and pseudo-queries for D2
    assert set(corp[24:]) <= {0, 1}  # replayed pseudo-queries for D0, D1
    naive = next(dsi.batches(corpus, Config(**TINY, stage=2), "train", 32))
    assert not naive["pseudo"].any()
    with pytest.raises(ValueError, match="stage 6"):
        next(dsi.batches(corpus, Config(**TINY, stage=6), "train", 32))
    qg = next(dsi.batches(corpus, Config(**TINY, task="qgen"), "train", 8))
    assert qg["labels"].shape[0] == 8


def test_loss_decreases_and_generative_memory(corpus):
    torch.manual_seed(0)
    cfg = Config(**TINY)
    m = Model(cfg)
    b = next(dsi.batches(corpus, cfg, "train", 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        l, metrics = dsi.loss(m, b)
        first = first if first is not None else l.item()
        opt.zero_grad()
        l.backward()
        opt.step()
    assert l.item() < 0.5 * first and metrics["tokens"] > 0
    # the memory: pseudo rows get "query: " + a sampled query ending in eos, the same for the same seed
    gen_cfg = Config(**TINY, qgen="unused.pt", mem_new=0.25, mem_old=0.25, stage=1)
    g = Model(gen_cfg)
    assert not any(p.requires_grad for p in g.qgen.parameters())
    b = next(dsi.batches(corpus, gen_cfg, "train", 8))
    out1, out2 = dsi.pseudo_queries(g, b), dsi.pseudo_queries(g, b)
    assert torch.equal(out1["input_ids"], out2["input_ids"])
    prefix = b["prefix"]
    for row, pseudo in zip(out1["input_ids"], b["pseudo"]):
        ids = row[row != 0].tolist()
        assert (ids[:len(prefix)] == prefix) == bool(pseudo) and ids[-1] == 1
    l, _ = dsi.loss(g, b)
    assert torch.isfinite(l)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A 12-document user corpus: D0 = 8 documents with queries, D1 = 4 without training queries."""
    lines = []
    for i in range(12):
        lines.append({"docid": f"d{i}", "text": f"document {i} about word{i} and more", "corpus": 0 if i < 8 else 1})
        lines.append({"query": f"word{i} please", "docid": f"d{i}", "split": "train" if i < 8 else "test"})
        lines.append({"query": f"which has word{i}", "docid": f"d{i}", "split": "test"})
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def _args(*extra):
    tiny = sum(([f"--{k}", str(v)] for k, v in TINY.items()), [])
    return ["dsi", "--steps", "4", "--batch-size", "8", "--eval-every", "4", "--no-progress", "--dtype", "fp32",
            *tiny, *extra]


def test_sam_two_passes(monkeypatch, jsonl, tmp_path):
    """train.py --sam RHO: two forward/backward passes per step, the second at w + rho g/|g|, and the
    weights restored before the optimizer step."""
    import train
    calls = []
    real = dsi.loss

    def counting(model, batch):
        raw = getattr(model, "module", model)
        calls.append(torch.cat([p.detach().flatten() for p in raw.parameters()]).clone())
        return real(model, batch)
    monkeypatch.setattr(dsi, "loss", counting)
    train.main(_args("--data", jsonl, "--steps", "2", "--out", str(tmp_path / "sam"), "--sam", "0.05"))
    assert len(calls) == 4  # two passes per step
    w0, w_adv = calls[0], calls[1]
    assert w_adv.sub(w0).norm().item() == pytest.approx(0.05, rel=1e-3)  # |eps| = rho
    assert not torch.equal(calls[2], w0)  # then one optimizer step from w (not from w + eps)


def test_train_cli_jsonl_and_continual(jsonl, tmp_path, capsys):
    """DSI on a user JSONL corpus, a query generator, then a continual stage with --init and --qgen."""
    import train
    out = tmp_path / "s0"
    res = train.main(_args("--data", jsonl, "--docid", "naive", "--out", str(out)))
    assert {"hits1", "hits10", "bm25_hits1", "bm25_hits10", "index_acc"} <= set(res)
    assert "BM25 hits@1" in capsys.readouterr().err
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(log[-1]["index_correct_D0"]) == 8  # per-document correctness of D0, for forgetting events
    train.main(_args("--data", jsonl, "--task", "qgen", "--docid", "naive", "--out", str(tmp_path / "qg")))
    res = train.main(_args("--data", jsonl, "--docid", "naive", "--stage", "1", "--init", str(out),
                           "--qgen", str(tmp_path / "qg"), "--out", str(tmp_path / "s1")))
    assert res["n_D1"] == 8 and "hits1_D0" in res and "hits1_D1" in res
    pred = train.main(["dsi", "--init", str(out), "--data", jsonl, "--dtype", "fp32", "--predict", "word3 please"])
    first = pred["results"][0]
    assert first["query"] == "word3 please" and first["bm25"][0] == "d3"
    assert len(first["dsi"]) == 8 and set(first["dsi"]) == {f"d{i}" for i in range(8)}  # D0's valid docids only
    with pytest.raises(Exception, match="not a query generator"):
        train.main(_args("--data", jsonl, "--docid", "naive", "--stage", "1", "--qgen", str(out),
                         "--out", str(tmp_path / "bad")))
