"""Tests of data.py: shapes (images, scenes, boxes, captions, VQA), CIFAR download/cache on a fake
archive (no network), user .npz files, normalize and augment."""

import hashlib
import io
import os
import pickle
import sys
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError  # noqa: E402


# ----------------------------------------------------------------------------------------------
# shapes: classification view

@pytest.fixture(scope="module")
def shapes():
    return data.load("shapes")


def test_load_shapes(shapes):
    d = shapes
    assert isinstance(d, data.ImageData) and d.name == "shapes"
    assert d.x_train.shape == (50_000, 32, 32, 3) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (10_000, 32, 32, 3) and d.x_test.dtype == torch.uint8
    assert d.y_train.shape == (50_000,) and d.y_train.dtype == torch.int64 and d.y_test.dtype == torch.int64
    assert d.num_classes == 10 and d.classes == list(data.SHAPES)
    assert 0 <= d.y_train.min() and d.y_train.max() < 10 and 0 <= d.y_test.min() and d.y_test.max() < 10
    for y, n in ((d.y_train, 50_000), (d.y_test, 10_000)):  # balanced
        counts = torch.bincount(y, minlength=10)
        assert (counts - n // 10).abs().max() <= n // 100
    assert not torch.equal(d.x_train[:100], d.x_test[:100])  # train and test are different streams
    assert d.x_train[:1000].float().std() > 30  # not blank
    moved = d.to("cpu")
    assert isinstance(moved, data.ImageData) and torch.equal(moved.y_test, d.y_test) and moved.num_classes == 10


def test_shapes_deterministic():
    x0, y0 = data.shapes_classification(64, 32, seed=0)
    x1, y1 = data.shapes_classification(64, 32, seed=0)
    x2, y2 = data.shapes_classification(64, 32, seed=1)
    assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    assert not np.array_equal(x0, x2)
    xa, _ = data.shapes_scenes(8, 48, seed=3)
    xb, sb = data.shapes_scenes(8, 48, seed=3)
    xc, _ = data.shapes_scenes(8, 48, seed=4)
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)


@pytest.mark.parametrize("size", [16, 48, 64])
def test_shapes_image_size(size):
    x, y = data.shapes_classification(20, size, seed=0)
    assert x.shape == (20, size, size, 3) and x.dtype == np.uint8 and y.shape == (20,) and y.dtype == np.int64


def test_shapes_speed():
    data.shapes_classification(500, 32, seed=0)  # warm up
    t = time.perf_counter()
    data.shapes_classification(10_000, 32, seed=0)
    rate = 10_000 / (time.perf_counter() - t)
    print(f"shapes: {rate:.0f} images/s at 32x32")
    assert rate > 1000  # a loose sanity bound (measured ~25k/s on one core): catches per-pixel python loops


def test_linear_probe_does_poorly():
    """A ridge classifier on raw pixels must stay far from solving the task."""
    x, y = data.shapes_classification(5000, 32, seed=5)
    xt, yt = data.shapes_classification(1000, 32, seed=5, split="test")
    f = lambda a: np.concatenate([a.reshape(len(a), -1).astype(np.float32) / 255, np.ones((len(a), 1), np.float32)], 1)
    X, Xt = f(x), f(xt)
    W = np.linalg.solve(X.T @ X + 100 * np.eye(X.shape[1], dtype=np.float32), X.T @ np.eye(10, dtype=np.float32)[y])
    acc = ((Xt @ W).argmax(1) == yt).mean()
    print(f"ridge probe accuracy {acc:.3f}")
    assert acc < 0.5


def test_shapes_fit_the_unit_circle():
    """The renderer's windows assume every shape lies inside radius 1 (in units of its size)."""
    g = np.linspace(-1.5, 1.5, 601, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    for name, sdf in data.SDF.items():
        inside = sdf(u, v) < 0
        assert inside.mean() > 0.05, name
        assert np.hypot(u, v)[inside].max() < 1.02, name


# ----------------------------------------------------------------------------------------------
# shapes: scenes, boxes, captions, questions

def test_scenes():
    x, scenes = data.shapes_scenes(50, 64, seed=0, min_objects=1, max_objects=4)
    assert x.shape == (50, 64, 64, 3) and x.dtype == np.uint8 and len(scenes) == 50
    assert {len(s) for s in scenes} <= {1, 2, 3, 4} and len({len(s) for s in scenes}) > 1
    for scene in scenes:
        for o in scene:
            assert o["shape"] in data.SHAPES and o["colour"] in data.COLOURS
            assert o["name"] == f"{o['colour']} {o['shape']}"
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x0 <= o["cx"] <= x1 and y0 <= o["cy"] <= y1
            assert x1 - x0 <= o["size"] + 2 and y1 - y0 <= o["size"] + 2
    boxes, names = data.detection_targets(scenes)
    assert len(boxes) == len(names) == 50
    assert all(b.shape == (len(s), 4) and b.dtype == np.float32 for b, s in zip(boxes, scenes))
    assert names[0] == [o["name"] for o in scenes[0]]
    _, one = data.shapes_scenes(20, 32, seed=1, min_objects=2, max_objects=2)
    assert all(len(s) == 2 for s in one)
    with pytest.raises(DataError):
        data.shapes_scenes(2, 32, min_objects=3, max_objects=2)


def test_boxes_match_drawn_pixels():
    """One object per image on a flat grey background: pixels outside the box are at most half
    covered, and each side of the box touches a pixel covered by more than half."""
    rng = np.random.default_rng(0)
    n, size, grey = 60, 40, 128.0
    shape = np.arange(n) % len(data.SHAPES)
    r = rng.uniform(3, 12, n)
    objs = data._objects(rng, np.arange(n), np.zeros(n, np.int64), shape,
                         rng.uniform(0, size, n), rng.uniform(0, size, n), r)  # may be cut by the border
    x, boxes = data._render(objs, n, size, rng, plain=grey, noise=0)
    for i in range(n):
        contrast = np.abs(objs["rgb"][i] - grey).max()
        cover = np.abs(x[i].astype(np.float32) - grey).max(-1) / contrast  # (H, W) ~ pixel coverage
        x0, y0, x1, y1 = boxes[i]
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        outside = np.ones((size, size), bool)
        outside[y0:y1, x0:x1] = False
        tol = 1.01 / contrast
        assert cover[outside].max(initial=0) <= 0.5 + tol, i
        for edge in (cover[y0, x0:x1], cover[y1 - 1, x0:x1], cover[y0:y1, x0], cover[y0:y1, x1 - 1]):
            assert edge.max() >= 0.5 - tol, i


def _obj(shape, colour, cx=10.0, cy=10.0, size=64):
    return dict(shape=shape, colour=colour, name=f"{colour} {shape}", cx=cx, cy=cy, size=10.0, image_size=size)


def test_captions_grammar():
    scene = [_obj("circle", "red"), _obj("square", "blue"), _obj("circle", "red")]
    assert data.caption(scene, "en") == "two red circles and a blue square"
    assert data.caption(scene, "fr") == "deux cercles rouges et un carré bleu"
    assert data.caption(scene, "de") == "zwei rote Kreise und ein blaues Quadrat"
    assert data.caption(scene, "es") == "dos círculos rojos y un cuadrado azul"
    scene = [_obj("star", "orange"), _obj("star", "white"), _obj("star", "white"), _obj("cross", "green")]
    assert data.caption(scene, "en") == "an orange star, two white stars and a green cross"
    assert data.caption(scene, "fr") == "une étoile orange, deux étoiles blanches et une croix verte"
    assert data.caption(scene, "de") == "ein orangefarbener Stern, zwei weiße Sterne und ein grünes Kreuz"
    assert data.caption(scene, "es") == "una estrella naranja, dos estrellas blancas y una cruz verde"
    assert data.caption([_obj("diamond", "yellow")], "de") == "eine gelbe Raute"
    with pytest.raises(DataError):
        data.caption(scene, "xx")


def test_captions_and_vqa_all_languages():
    _, scenes = data.shapes_scenes(40, 64, seed=2, min_objects=1, max_objects=5)
    for i, scene in enumerate(scenes):
        answers = None
        for lang in data.LANGS:
            cap = data.caption(scene, lang)
            assert cap and "  " not in cap
            qa = data.vqa(scene, lang, np.random.default_rng(i), answer_lang="en")
            assert qa and all(q and a and t in ("colour", "shape", "count", "position") for q, a, t in qa)
            # the same random choices in every language: the same (English) answers
            assert answers is None or [a for _, a, _ in qa] == answers
            answers = [a for _, a, _ in qa]
            native = data.vqa(scene, lang, np.random.default_rng(i))
            assert [t for *_, t in native] == [t for *_, t in qa]


def test_vqa_answers_match_the_scene():
    _, scenes = data.shapes_scenes(200, 64, seed=3, min_objects=1, max_objects=5)
    seen = set()
    for i, scene in enumerate(scenes):
        for q, a, t in data.vqa(scene, "en", i):
            seen.add(t)
            if q == "how many objects are there?":
                assert a == str(len(scene))
            elif t == "count" and q.endswith(" objects are there?"):
                colour = q.split()[2]
                assert a == str(sum(o["colour"] == colour for o in scene))
            elif t == "count":
                plural = q.split()[2]
                assert a == str(sum(data.NOUNS["en"][o["shape"]][1] == plural for o in scene))
            elif t == "colour":
                shape = q.removeprefix("what colour is the ").removesuffix("?")
                (o,) = [o for o in scene if o["shape"] == shape]
                assert a == o["colour"]
            elif t == "shape":
                colour = q.split()[4]
                (o,) = [o for o in scene if o["colour"] == colour]
                assert a == o["shape"]
            else:
                name = q.removeprefix("is the ").split(" on the ")[0].split(" at the ")[0]
                (o,) = [o for o in scene if o["name"] == name]
                half = o["image_size"] / 2
                expected = {"left": o["cx"] < half, "right": o["cx"] > half, "top": o["cy"] < half,
                            "bottom": o["cy"] > half}[a]
                assert expected
    assert seen == {"colour", "shape", "count", "position"}


# ----------------------------------------------------------------------------------------------
# CIFAR on a fake archive in the official layout (no network)

def _pickle_bytes(obj):
    """Protocol 2 and the numpy module name of the official (Python 2) files."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _fake_cifar(path, which="cifar10", n=6, members=None):
    """Write a tar.gz in the official layout: python-pickled dicts with bytes keys."""
    rng = np.random.default_rng(0)
    if which == "cifar10":
        folder, meta = "cifar-10-batches-py", "batches.meta"
        train, test = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        key, names_key, names = b"labels", b"label_names", [f"c{i}".encode() for i in range(10)]
    else:
        folder, train, test, meta = "cifar-100-python", ["train"], ["test"], "meta"
        key, names_key, names = b"fine_labels", b"fine_label_names", [f"f{i}".encode() for i in range(100)]
    files, arrays = {}, {}
    for name in train + test:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, len(names), n)]
        files[f"{folder}/{name}"] = _pickle_bytes({b"batch_label": name.encode(), key: y, b"data": x,
                                                   b"filenames": [b"f.png"] * n})
        arrays[name] = (x, y)
    files[f"{folder}/{meta}"] = _pickle_bytes({names_key: names, b"num_cases_per_batch": n})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info, payload in members or []:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return arrays, [n.decode() for n in names]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ZOO_CACHE", str(folder))
    return folder


def _serve(monkeypatch, name, archive, md5=None):
    md5 = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.SOURCES[name], "url", archive.as_uri())
    monkeypatch.setitem(data.SOURCES[name], "md5", md5)


def _no_network(*args, **kwargs):
    raise AssertionError("must not download")


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_fake_archive(tmp_path, cache, monkeypatch, which):
    archive = tmp_path / f"{which}.tar.gz"
    arrays, names = _fake_cifar(archive, which)
    _serve(monkeypatch, which, archive)
    d = data.load(which, image_size=64)  # cifar comes at 32x32 whatever the size asked
    n_train = 5 * 6 if which == "cifar10" else 6
    assert d.x_train.shape == (n_train, 32, 32, 3) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (6, 32, 32, 3) and d.y_train.dtype == torch.int64 and d.y_train.shape == (n_train,)
    assert d.classes == names and d.num_classes == len(names)
    first = "data_batch_1" if which == "cifar10" else "train"
    x, y = arrays[first]
    assert np.array_equal(d.x_train[0].numpy(), x[0].reshape(3, 32, 32).transpose(1, 2, 0))  # (C,H,W) -> (H,W,C)
    assert d.y_train[:6].tolist() == y
    assert d.y_test.tolist() == arrays["test_batch" if which == "cifar10" else "test"][1]
    assert sorted(p.name for p in cache.iterdir()) == [f"{which}.npz"]  # no archive, extraction or temp left
    # the second load reads the cached .npz and does not download
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)
    d2 = data.load(which)
    assert torch.equal(d2.x_train, d.x_train) and d2.classes == d.classes
    (cache / f"{which}.npz").write_bytes(b"garbage")  # a damaged cache: clear error, then deleted
    with pytest.raises(DataError, match="run again"):
        data.load(which)
    assert list(cache.iterdir()) == []


def test_cifar_checksum_mismatch(tmp_path, cache, monkeypatch):
    archive = tmp_path / "c.tar.gz"
    _fake_cifar(archive)
    _serve(monkeypatch, "cifar10", archive, md5="0" * 32)
    with pytest.raises(DataError, match="checksum") as e:
        data.load("cifar10")
    assert "--data shapes" in str(e.value) and "\n" not in str(e.value)
    assert list(cache.iterdir()) == []  # no partial file


def test_cifar_offline(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(data.SOURCES["cifar10"], "url", (tmp_path / "nonexistent.tar.gz").as_uri())
    with pytest.raises(DataError, match="--data shapes"):
        data.load("cifar10")
    assert list(cache.iterdir()) == []

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="offline") as e:
        data.load("cifar100")
    assert "--data shapes" in str(e.value) and "\n" not in str(e.value)
    assert list(cache.iterdir()) == []


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    payload = b"evil" if kind == tarfile.REGTYPE else None
    info.size = len(payload) if payload else 0
    return info, payload


@pytest.mark.parametrize("bad", [
    _member("../evil"),
    _member("cifar-10-batches-py/../../evil"),
    _member("/tmp/vitzoo_test_evil_absolute"),
    _member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"),
    _member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"),
    _member("cifar-10-batches-py/dev", tarfile.CHRTYPE),
])
def test_cifar_malicious_archive(tmp_path, cache, monkeypatch, bad):
    archive = tmp_path / "c.tar.gz"
    _fake_cifar(archive, members=[bad])
    _serve(monkeypatch, "cifar10", archive)
    with pytest.raises(DataError, match="unsafe"):
        data.load("cifar10")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/vitzoo_test_evil_absolute").exists()
    assert list(cache.iterdir()) == []  # neither the refused archive nor a partial extraction is kept


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch vitzoo_pwned",))


def test_cifar_pickle_runs_no_code(tmp_path, cache, monkeypatch):
    """Even with a matching checksum, a batch that pickles anything but data is refused."""
    archive = tmp_path / "c.tar.gz"
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    _fake_cifar(archive, members=[])
    with tarfile.open(archive) as tar:  # rewrite with a poisoned test_batch
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files["cifar-10-batches-py/test_batch"] = payload
    with tarfile.open(archive, "w:gz") as tar:
        for name, data_ in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data_)
            tar.addfile(info, io.BytesIO(data_))
    _serve(monkeypatch, "cifar10", archive)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="cannot parse"):
        data.load("cifar10")
    assert not (tmp_path / "vitzoo_pwned").exists() and list(cache.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# user .npz files

def test_npz_good(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    x, y = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 50)
    xt, yt = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 5
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    d = data.load(str(path))
    assert d.name == "mine" and d.x_train.shape == (50, 8, 8, 3) and d.x_test.shape == (10, 8, 8, 3)
    assert d.y_train.dtype == torch.int64 and d.num_classes == 5 and d.classes == ["0", "1", "2", "3", "4"]
    assert np.array_equal(d.x_test.numpy(), xt)
    # no test split: a seeded 90/10 split; grayscale (N,H,W) gets a channel; class names kept
    np.savez(path, x=x[..., 0], y=y, classes=np.array(["a", "b", "c", "d"]))
    d1, d2, d3 = data.load(str(path), seed=0), data.load(str(path), seed=0), data.load(str(path), seed=1)
    assert d1.x_train.shape == (45, 8, 8, 1) and d1.x_test.shape == (5, 8, 8, 1) and d1.classes == list("abcd")
    assert torch.equal(d1.x_test, d2.x_test) and not torch.equal(d1.x_test, d3.x_test)
    sums = sorted(torch.cat([d1.x_train, d1.x_test]).flatten(1).sum(1).tolist())  # the split loses no image
    assert sums == sorted(x[..., 0].reshape(50, -1).sum(1).tolist())


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, int)), "keys"),
    (dict(x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, int)), "dtype"),
    (dict(x=np.zeros((4, 3, 8, 8), np.uint8), y=np.zeros(4, int)), "channels first"),
    (dict(x=np.zeros((4, 8, 8, 5), np.uint8), y=np.zeros(4, int)), "shape"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(3, int)), "y has shape"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.float32)), "y has shape"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=-np.ones(4, int)), "non-negative"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, int), x_test=np.zeros((2, 8, 8, 3), np.uint8)), "keys"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, int), x_test=np.zeros((2, 9, 9, 3), np.uint8),
          y_test=np.zeros(2, int)), "differ"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 3], object)), "cannot read"),
    (dict(x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, int)), "no images"),
])
def test_npz_bad(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as e:
        data.load(str(path))
    assert "\n" not in str(e.value)


def test_npz_missing_or_not_npz(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        data.load(str(tmp_path / "junk.npz"))


def test_load_errors():
    with pytest.raises(DataError, match="shapes, cifar10, cifar100"):
        data.load("imagenet")
    with pytest.raises(DataError, match="text"):
        data.load("stdlib")
    with pytest.raises(DataError, match="unknown text data 'shapes'"):
        data.load("shapes", kind="text")
    with pytest.raises(DataError, match="unknown data kind"):
        data.load("shapes", kind="video")
    with pytest.raises(DataError):
        data.load("shapes", image_size=4)


# ----------------------------------------------------------------------------------------------
# normalize and augment

def test_normalize():
    x = torch.randint(0, 256, (2, 4, 8, 3), dtype=torch.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    y = data.normalize(x)
    assert y.shape == (2, 3, 4, 8) and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1 and y[0, :, 0, 0].eq(-1).all() and y[0, :, 0, 1].eq(1).all()
    assert torch.allclose(y, (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)


def test_augment():
    x = torch.randint(1, 256, (16, 8, 8, 3), dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(data.augment(x, g(), pad=0, flip=False), x)
    a, b = data.augment(x, g()), data.augment(x, g())
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)  # deterministic
    assert not torch.equal(a, x)
    # flips only: every image is itself or its mirror, and both happen
    f = data.augment(x, g(), pad=0, flip=True)
    same = [torch.equal(f[i], x[i]) for i in range(16)]
    mirrored = [torch.equal(f[i], x[i].flip(1)) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    # crops only: every image is a window of its zero-padded self
    c = data.augment(x, g(), pad=2, flip=False)
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (2, 2, 2, 2)).permute(0, 2, 3, 1)
    for i in range(16):
        assert any(torch.equal(c[i], padded[i, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert (c == 0).any()  # some crops show padding
