"""Text data (data.py's text section, used by ul2.py) and the byte tokenizer."""
import hashlib
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import ul2  # noqa: E402
from data import ByteTokenizer, DataError  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text", ["plain ASCII text.", "naïve café, Straße, Ωμέγα", "中文字符 and 日本語",
                                  "emoji 🙂🚀 mixed ü", "", "tabs\tand\nnewlines\r\n", "\x00\x7f control"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]  # one id per UTF-8 byte
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, eos=True) + [65, 66]) == text  # decoding stops at EOS
    assert tok.decode([0] + ids + [0, 0]) == text  # PAD is skipped


def test_tokenizer_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 390 and tok.sentinel(0) == 389 and tok.sentinel(127) == 262
    assert tok.mode == {"R": 259, "X": 260, "S": 261}
    text = "[S] Once <extra_id_0> time <extra_id_1>, é"
    ids = tok.encode(text)
    assert ids[0] == 261 and 389 in ids and 388 in ids
    assert tok.decode(ids) == text
    literal = tok.encode(text, specials=False)  # the same characters as plain bytes
    assert all(3 <= i < 259 for i in literal) and tok.decode(literal) == text
    assert tok.decode(tok.encode("<extra_id_200>")) == "<extra_id_200>"  # a sentinel it does not have: literal text
    assert tok.decode([3 + 0xC3]) == "\ufffd"  # half a UTF-8 character: replaced, no exception
    with pytest.raises(DataError):
        tok.sentinel(128)
    b = tok.batch(["abc", "é" * 10], length=6)
    assert b.shape == (2, 6) and b[0].tolist() == [100, 101, 102, 1, 0, 0] and b[1, -1] == 1


# ---------------------------------------------------------------------------------------------- stdlib

def test_docstrings_are_read_without_importing(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('"""Module doc."""\nimport os\nos._exit(3)  # importing would kill the test\n\n'
                   'class A:\n    """Class doc.\n\n       indented body."""\n    def f(self):\n        """Method doc."""\n\n'
                   'async def g():\n    """Coroutine doc."""\n\ndef h():\n    pass\n', encoding="utf-8")
    assert data._docstrings(src) == ["Module doc.", "Class doc.\n\nindented body.", "Method doc.", "Coroutine doc."]
    (tmp_path / "bad.py").write_text("def broken(:\n", encoding="utf-8")
    assert data._docstrings(tmp_path / "bad.py") == []


def test_stdlib_documents_skip_tests_and_dedupe(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "a.py").write_text('"""Alpha."""\ndef f():\n    """Shared."""\n', encoding="utf-8")
    (tmp_path / "pkg" / "b.py").write_text('"""Beta."""\ndef f():\n    """Shared."""\n', encoding="utf-8")
    (tmp_path / "test" / "t.py").write_text('"""A test."""\n', encoding="utf-8")
    (tmp_path / "site-packages" / "x.py").write_text('"""Third party."""\n', encoding="utf-8")
    assert data._stdlib_documents(tmp_path) == ["Alpha.", "Shared.", "Beta."]


def test_stdlib_real():
    d = data.load("stdlib", kind="text")  # extracted once (~10 s), then cached in the cache folder
    assert d.name == "stdlib" and d.train.dtype == torch.int16 and d.tokenizer.vocab_size == 390
    assert d.n_train_docs > 1000 and d.n_val_docs > 50
    assert 0.02 < d.n_val_docs / (d.n_train_docs + d.n_val_docs) < 0.08
    assert len(d.train) > 200_000 and int(d.train.min()) >= 3 and int(d.train.max()) < 259  # bytes only
    text = d.tokenizer.decode(d.train[:20_000].tolist())
    assert "Return" in text and " the " in text
    val = d.tokenizer.decode(d.val.tolist())
    assert val[:200] not in d.tokenizer.decode(d.train.tolist())  # held-out documents are not in train
    assert d.to("cpu").device == torch.device("cpu") and d.to("meta").train is d.train


# ---------------------------------------------------------------------------------------------- split, PATH.txt

def test_split_is_by_document_hash():
    docs = [f"document number {i} with some text" for i in range(400)]
    d = data.text_data("x", docs)
    held = [doc for doc in docs if int(hashlib.md5(doc.encode()).hexdigest(), 16) % 20 == 0]
    assert d.n_val_docs == len(held) and d.n_train_docs == 400 - len(held) and 5 < len(held) < 40
    tok = d.tokenizer
    assert tok.decode(d.val.tolist()) == "\n\n".join(held)
    assert data.text_data("x", list(reversed(docs))).n_val_docs == len(held)  # independent of order and seed
    one = data.text_data("one", ["just one paragraph " * 20])  # too few documents: a 90/10 cut
    assert one.n_train_docs == one.n_val_docs == 1 and len(one.val) > 0
    with pytest.raises(DataError):
        data.text_data("tiny", ["a"])


def test_text_file(tmp_path):
    path = tmp_path / "my.txt"
    blocks = [f"Paragraph {i}: naïve text\nover two lines." for i in range(60)]
    path.write_text("\n\n".join(blocks[:30]) + "\n  \n\n" + "\r\n\r\n".join(blocks[30:]), encoding="utf-8")
    d = data.load(str(path), kind="text")
    assert d.name == "my" and d.n_train_docs + d.n_val_docs == 60
    assert "naïve" in d.tokenizer.decode(d.train.tolist())
    with pytest.raises(DataError, match="does not exist"):
        data.load(str(tmp_path / "missing.txt"), kind="text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        data.load(str(tmp_path / "latin1.txt"), kind="text")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        data.load(str(tmp_path / "empty.txt"), kind="text")
    with pytest.raises(DataError, match="stdlib"):
        data.load("wikipedia", kind="text")


# ---------------------------------------------------------------------------------------------- shakespeare

@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ZOO_CACHE", str(folder))
    return folder


SPEECHES = "".join(f"Citizen {i}:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, {i}.\n\n" for i in range(40))


def _serve(monkeypatch, tmp_path, text, sha=None):
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    monkeypatch.setitem(data.TEXT_DOWNLOADS["shakespeare"], "url", src.as_uri())
    monkeypatch.setitem(data.TEXT_DOWNLOADS["shakespeare"], "sha256", sha or hashlib.sha256(src.read_bytes()).hexdigest())


def _no_network(*args, **kwargs):
    raise AssertionError("must not download")


def test_shakespeare_download_and_cache(tmp_path, cache, monkeypatch):
    _serve(monkeypatch, tmp_path, SPEECHES)
    d = data.load("shakespeare", kind="text")
    assert d.n_train_docs + d.n_val_docs == 80 and d.n_val_docs > 0  # documents = blocks between blank lines
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)  # the second load reads the cache
    d2 = data.load("shakespeare", kind="text")
    assert torch.equal(d2.train, d.train)


def test_shakespeare_checksum_and_offline(tmp_path, cache, monkeypatch):
    _serve(monkeypatch, tmp_path, SPEECHES, sha="0" * 64)
    with pytest.raises(DataError, match="checksum"):
        data.load("shakespeare", kind="text")
    assert list(cache.iterdir()) == []  # no partial file

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="offline") as e:
        data.load("shakespeare", kind="text")
    assert "--data stdlib" in str(e.value) and list(cache.iterdir()) == []
    # a damaged cached file is fetched again
    monkeypatch.undo()
    monkeypatch.setenv("ZOO_CACHE", str(cache))
    _serve(monkeypatch, tmp_path, SPEECHES)
    (cache / "tinyshakespeare.txt").write_text("garbage")
    d = data.load("shakespeare", kind="text")
    assert d.n_train_docs + d.n_val_docs == 80


def test_shakespeare_known_checksum():
    src = data.TEXT_DOWNLOADS["shakespeare"]
    assert src["url"].startswith("https://raw.githubusercontent.com/karpathy/char-rnn/")
    assert src["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# ---------------------------------------------------------------------------------------------- ul2 batches on real text

def test_ul2_batches_on_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"Document {i}: the quick brown fox, ünïcode {i * 7}." * 3 for i in range(200)), encoding="utf-8")
    d = data.load(str(path), kind="text")
    cfg = ul2.Config(seq_len=64, eval_examples=8)
    it = ul2.batches(d, cfg, "train", 16, step=5, seed=1)
    b = next(it)
    again = next(ul2.batches(d, cfg, "train", 16, step=5, seed=1))  # batch s is a pure function of (seed, s)
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert not torch.equal(next(it)["inputs"], b["inputs"])
    assert b["inputs"].shape[0] == 16 and b["inputs"].shape[1] % 8 == 0 and b["inputs"].dtype == torch.long
    assert set(b["inputs"][:, 0].tolist()) <= set(d.tokenizer.mode.values())  # every example starts with a mode token
    assert len(set(b["inputs"][:, 0].tolist())) == 3  # R, X and S all drawn
    val = list(ul2.batches(d, cfg, "val", 5))
    assert sum(len(v["inputs"]) for v in val) == 8
    with pytest.raises(ValueError, match="vocab"):
        next(ul2.batches(d, ul2.Config(vocab_size=300), "train", 4))
    model = ul2.Model(ul2.Config(d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1, num_decoder_layers=1,
                                 seq_len=64, eval_examples=8)).eval()
    metrics = ul2.evaluate(model, d, model.cfg)
    assert set(metrics) >= {"val_loss", "val_loss_R1", "val_loss_S", "val_loss_X4", "infill_em", "cont_acc"}
    assert all(np.isfinite(v) for v in metrics.values())
    out = ul2.predict(model, d, model.cfg, ["[R] The quick <extra_id_0> fox", "max_new_tokens=5"])
    assert set(out) == {"prompt", "output", "filled"} and out["filled"].startswith("The quick ")
    out = ul2.predict(model, d, model.cfg, ["[S] Document", "beam=2", "max_new_tokens=4"])
    assert len(out["beams"]) == 2
    with pytest.raises(ValueError, match="unknown predict option"):
        ul2.predict(model, d, model.cfg, ["[S] x", "beams=2"])
