"""data.py's corruptions (ImageNet-C style, torch): severity 0 is the identity, the error grows with the
severity, the same seed gives the same images, shapes and dtypes are kept, and the pieces match their
originals (JPEG tables, PIL's pixelate and JPEG, HSV brightness, per-channel contrast)."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

torch.set_num_threads(1)
NAMES = list(data.CORRUPTIONS)
NOISY = ["gaussian_noise", "shot_noise", "impulse_noise"]


@pytest.fixture(scope="module")
def shapes():
    return {s: torch.from_numpy(data.shapes_classification(32, s, seed=0, split="test")[0]) for s in (32, 40)}


def test_the_nine_corruptions():
    assert NAMES == ["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "defocus_blur", "contrast",
                     "brightness", "pixelate", "jpeg"]


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity_and_shape_dtype_kept(name, shapes):
    x = shapes[32]
    y = data.corrupt(x, name, 0, seed=0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    for size, x in shapes.items():
        y = data.corrupt(x[:5], name, 3, seed=0)
        assert y.shape == (5, size, size, 3) and y.dtype == torch.uint8 and y.device == x.device
    grey = data.corrupt(x[:2, :, :, :1], name, 2, seed=0)  # one channel works too
    assert grey.shape == (2, 40, 40, 1) and grey.dtype == torch.uint8


@pytest.mark.parametrize("size", [32, 40])
@pytest.mark.parametrize("name", NAMES)
def test_error_grows_with_severity(name, size, shapes):
    x = shapes[size]
    err = [(data.corrupt(x, name, s, seed=0).float() - x.float()).abs().mean().item() for s in range(6)]
    assert err[0] == 0 and all(a < b for a, b in zip(err, err[1:])), err


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(name, shapes):
    x = shapes[32][:8]
    a, b, c = (data.corrupt(x, name, 4, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert (not torch.equal(a, c)) == (name in NOISY)  # only the noises draw random numbers


def test_bad_input_is_a_data_error(shapes):
    x = shapes[32][:2]
    for args in [(x, "fog", 1), (x, "jpeg", 6), (x, "jpeg", -1), (x, "jpeg", 1.5), (x.float(), "jpeg", 1),
                 (x[0], "jpeg", 1)]:
        with pytest.raises(data.DataError):
            data.corrupt(*args, seed=0)


def test_constants_and_formulas(shapes):
    x = shapes[32][:8]
    # JPEG: quality 50 is the standard table itself; IJG scaling 5000/q below 50, 200 - 2q above
    assert data.jpeg_table(data._JPEG_LUMA, 50).flatten().tolist() == data._JPEG_LUMA
    assert data.jpeg_table(data._JPEG_LUMA, 25)[0, 0] == 32 and data.jpeg_table(data._JPEG_CHROMA, 90)[0, 0] == 3
    assert data.jpeg_table(data._JPEG_LUMA, 100).eq(1).all()
    # contrast: (x - m) c + m with m the per-channel mean, c = 0.4 at severity 1
    xf = x.permute(0, 3, 1, 2).float() / 255
    m = xf.mean((2, 3), keepdim=True)
    want = ((xf - m) * 0.4 + m).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(data.corrupt(x, "contrast", 1, 0), want)
    # brightness: HSV value + 0.3, hue and saturation kept
    import colorsys
    px = (x[0, :4, :4].reshape(-1, 3).double() / 255).tolist()
    got = data.corrupt(x[:1], "brightness", 3, 0)[0, :4, :4].reshape(-1, 3).double()
    for p, q in zip(px, got):
        h, s, v = colorsys.rgb_to_hsv(*p)
        assert torch.allclose(q, torch.tensor(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))).double() * 255, atol=0.51)
    # gaussian noise: the added noise has ImageNet-C's std (0.08 at severity 1) where nothing clips
    grey = torch.full((4, 32, 32, 3), 128, dtype=torch.uint8)
    assert abs((data.corrupt(grey, "gaussian_noise", 1, 0).float() - 128).std().item() / 255 - 0.08) < 0.002
    # impulse noise: 3% of the values set to 0 or 255
    hit = data.corrupt(grey, "impulse_noise", 1, 0) != 128
    assert abs(hit.float().mean().item() - 0.03) < 0.005


def test_pixelate_and_jpeg_match_pil(shapes):
    Image = pytest.importorskip("PIL.Image")
    x = shapes[40][:8]
    for s, c in enumerate([.6, .5, .4, .3, .25], 1):  # ImageNet-C: PIL BOX down to int(side c), BOX back up
        pil = np.stack([np.array(Image.fromarray(im).resize((int(40 * c),) * 2, Image.BOX).resize((40, 40), Image.BOX))
                        for im in x.numpy()])
        assert (data.corrupt(x, "pixelate", s, 0).int() - torch.from_numpy(pil).int()).abs().max() <= 1
    for s, q in enumerate([25, 18, 15, 10, 7], 1):  # ImageNet-C: PIL JPEG at these qualities (4:2:0)
        pil = []
        for im in x.numpy():
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, "JPEG", quality=q)
            pil.append(np.array(Image.open(buf)))
        pil = torch.from_numpy(np.stack(pil)).float()
        ours = data.corrupt(x, "jpeg", s, 0).float()
        err_pil, err_ours = (pil - x.float()).abs().mean(), (ours - x.float()).abs().mean()
        assert abs(err_ours - err_pil) < 0.1 * err_pil and (ours - pil).abs().mean() < 0.4 * err_pil


def test_works_in_chunks_and_on_the_gpu(shapes, monkeypatch):
    x = shapes[32]
    whole = data.corrupt(x, "shot_noise", 2, seed=3)
    monkeypatch.setattr(data, "_CORRUPT_CHUNK", 5)
    assert torch.equal(data.corrupt(x, "shot_noise", 2, seed=3), whole)  # one random stream across chunks
    if torch.cuda.is_available():
        for name in NAMES:
            y = data.corrupt(x.cuda(), name, 3, seed=0)
            assert y.is_cuda and y.dtype == torch.uint8 and y.shape == x.shape
