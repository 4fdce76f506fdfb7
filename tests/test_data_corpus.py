"""data.py's corpus kind (dsi.py): the embedded retrieval corpus (C7/D6 of the paper card) and the
user's PATH.jsonl, whose bad lines are reported with their line number."""
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return data.load("corpus", kind="corpus")


def test_embedded_sizes_and_flags(corpus):
    c = corpus
    assert c.num_docs == 600 and c.num_corpora == 6
    assert Counter(d["corpus"] for d in c.docs) == {0: 300, 1: 60, 2: 60, 3: 60, 4: 60, 5: 60}
    d0 = [d for d in c.docs if d["corpus"] == 0]
    assert Counter(d["topic"] for d in d0) == {t: 30 for t in data.CORPUS_TOPICS}
    assert sum(not d["train_queries"] for d in d0) == 60  # 20% zero-shot documents in D0
    assert not any(d["train_queries"] for d in c.docs if d["corpus"] > 0)  # new corpora: no queries
    assert len({d["docid"] for d in c.docs}) == 600
    per_doc = Counter((q["doc"], q["split"]) for q in c.queries)
    for i, d in enumerate(c.docs):
        assert per_doc[(i, "train")] == (4 if d["train_queries"] else 0)
        assert per_doc[(i, "test")] == 2
        assert 60 <= len(re.findall(r"\w+", d["text"])) <= 91 and d["text"] == d["text"].lower()
    para = sum(q["paraphrased"] for q in c.queries) / len(c.queries)
    assert 0.4 < para < 0.6


def test_embedded_key_words_synonyms_and_queries(corpus):
    c = corpus
    words = [set(re.findall(r"\w+", d["text"])) for d in c.docs]
    count = Counter(w for ws in words for w in ws)
    all_doc_words = set(count)
    for d, ws in zip(c.docs, words):
        first = set(re.findall(r"\w+", d["text"].split(".")[0]))
        assert 2 <= len(d["keys"]) <= 3
        for k in d["keys"]:
            assert k in first and count[k] == 1  # in the first sentence, and in no other document
    for q in c.queries:
        doc = c.docs[q["doc"]]
        qw = q["text"].split()
        assert q["text"] not in doc["text"]  # never a copy of the document text
        keys_in = [w for w in qw if w in doc["keys"]]
        if q["paraphrased"]:  # every key word replaced by a synonym that is in no document
            assert not keys_in
            assert sum(w not in all_doc_words for w in qw) == 2
        else:
            assert len(keys_in) == 2
    tests = {(q["doc"], q["text"]) for q in c.queries if q["split"] == "test"}
    trains = {(q["doc"], q["text"]) for q in c.queries if q["split"] == "train"}
    assert not tests & trains  # held-out queries differ from the training ones


def test_embedded_is_deterministic_and_seed_free(corpus):
    again = data.load("corpus", kind="corpus", seed=3)  # one fixed corpus whatever the training seed
    assert again.docs == corpus.docs and again.queries == corpus.queries
    assert corpus.to("cpu") is corpus and corpus.tokenizer.vocab_size == 390


def _write(tmp_path, lines, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(p)


def test_jsonl_corpus(tmp_path):
    lines = [{"docid": "a", "text": "The cat sat on the mat."},
             {"docid": 7, "text": "Stocks fell sharply today.", "corpus": 1},
             "",
             {"query": "where did the cat sit", "docid": "a", "split": "train"},
             {"query": "feline resting place", "docid": "a", "split": "test"},
             {"query": "market drop", "docid": 7}]
    c = data.load(_write(tmp_path, lines), kind="corpus")
    assert [d["docid"] for d in c.docs] == ["a", "7"] and [d["corpus"] for d in c.docs] == [0, 1]
    assert c.num_corpora == 2 and c.name == "c"
    q = c.queries
    assert [x["split"] for x in q] == ["train", "test", "test"]  # corpus 1: always test
    assert [x["paraphrased"] for x in q] == [False, True, True]  # "cat" is shared; nothing else is
    assert c.docs[0]["train_queries"] and not c.docs[1]["train_queries"]


@pytest.mark.parametrize("bad, line, msg", [
    ('{"docid": "a", "text": "x"', 2, "not valid JSON"),
    ('[1, 2]', 2, "expected one JSON object"),
    ({"docid": "a", "text": "x", "query": "y"}, 2, "expected one JSON object"),
    ({"text": "no id"}, 2, "expected one JSON object"),
    ({"docid": "d0", "text": "again"}, 2, "already used on line 1"),
    ({"docid": "b", "text": ""}, 2, "non-empty string"),
    ({"docid": "b", "text": "x", "corpus": -1}, 2, "corpus must be"),
    ({"docid": 1.5, "text": "x"}, 2, "docid must be"),
    ({"query": "q", "docid": "zzz"}, 2, "no document line has"),
    ({"query": "q", "docid": "d0", "split": "dev"}, 2, "split must be"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, line, msg):
    path = _write(tmp_path, [{"docid": "d0", "text": "some text"}, bad, {"query": "q", "docid": "d0", "split": "test"}])
    with pytest.raises(data.DataError, match=rf"line {line}.*{msg}|{msg}.*line {line}"):
        data.load(path, kind="corpus")


def test_jsonl_whole_file_errors(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load(str(tmp_path / "missing.jsonl"), kind="corpus")
    with pytest.raises(data.DataError, match="no documents"):
        data.load(_write(tmp_path, [{"query": "q", "docid": "a"}]), kind="corpus")
    with pytest.raises(data.DataError, match="no test queries"):
        data.load(_write(tmp_path, [{"docid": "a", "text": "t"}, {"query": "q", "docid": "a", "split": "train"}]), kind="corpus")
    with pytest.raises(data.DataError, match="without gaps"):
        data.load(_write(tmp_path, [{"docid": "a", "text": "t", "corpus": 2}]), kind="corpus")
    with pytest.raises(data.DataError, match="unknown corpus"):
        data.load("nope", kind="corpus")
