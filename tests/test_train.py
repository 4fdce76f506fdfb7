"""train.py end to end: the command line, resume, atomic checkpoints, bad input, DDP/FSDP on 2 CPU processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--mlp_dim", "64", "--image_size", "16", "--patch_size", "4",
        "--batch-size", "16", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(*args, check=True, timeout=300):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A small 4-class image set at 16 px (bright top or bottom half, in red or green), learnable in a few steps
    and unchanged by the horizontal flips of the default augmentation."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 320)
    x = rng.integers(0, 60, (320, 16, 16, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        half, channel = divmod(int(c), 2)
        x[i, half * 8:(half + 1) * 8, :, channel] += 180
    path = tmp_path_factory.mktemp("data") / "quad.npz"
    np.savez(path, x=x[:256], y=y[:256], x_test=x[256:], y_test=y[256:])
    return path


def test_cli_end_to_end_on_shapes(tmp_path):
    out = tmp_path / "run"
    p = run("vit", "--steps", 20, "--lr", 3e-3, "--warmup", 5, "--log-every", 5, "--out", out, *TINY)
    final = json.loads(p.stdout.strip().splitlines()[-1])  # the last stdout line is the final metrics
    assert final["model"] == "vit" and final["data"] == "shapes" and final["steps"] == 20
    assert 0.0 <= final["test_acc"] <= 1.0 and np.isfinite(final["loss"])
    assert json.loads((out / "results.json").read_text())["test_acc"] == final["test_acc"]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert all("samples_per_s" in r and "lr" in r and "acc" in r for r in log)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain tensors and containers only
    assert ckpt["step"] == 20 and ckpt["model_name"] == "vit" and ckpt["config"]["width"] == 32
    assert ckpt["config"]["num_classes"] == 10  # the head follows the data


def test_loss_goes_down_and_learns(tmp_path, npz):
    run("vit", "--data", npz, "--steps", 150, "--lr", 3e-3, "--warmup", 10, "--log-every", 10, "--out", tmp_path, *TINY)
    l = losses(tmp_path)
    assert l[-1] < 0.5 * l[0]
    assert json.loads((tmp_path / "results.json").read_text())["test_acc"] > 0.8


def test_resume_is_exact(tmp_path, npz):
    common = ["vit", "--data", npz, "--steps", 12, "--lr", 3e-3, "--warmup", 3, "--log-every", 1, "--dropout", 0.1, *TINY]
    run(*common, "--out", tmp_path / "full")
    run(*common, "--out", tmp_path / "cut", "--stop-after", 5)
    assert len(losses(tmp_path / "cut")) == 5
    run("vit", "--resume", "--out", tmp_path / "cut", "--no-progress")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit for bit on CPU


def test_sigterm_saves_and_resumes(tmp_path, npz):
    out = tmp_path / "run"
    args = ["vit", "--data", npz, "--steps", 100000, "--log-every", 1, "--out", out, *TINY]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    for _ in range(600):
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "continue with --resume" in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == len(losses(out))


def test_accumulation_matches_one_big_batch(tmp_path, npz):
    common = ["vit", "--data", npz, "--steps", 4, "--log-every", 1, "--dtype", "fp32", *TINY]
    run(*common, "--out", tmp_path / "a")
    run(*common, "--out", tmp_path / "b", "--accum", 4)
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-5)


def test_init_at_another_resolution(tmp_path, npz):
    run("vit", "--data", npz, "--steps", 3, "--out", tmp_path / "a", *TINY)
    tiny32 = TINY[:TINY.index("--image_size")] + ["--image_size", "32"] + TINY[TINY.index("--image_size") + 2:]
    p = run("vit", "--data", npz, "--steps", 3, "--out", tmp_path / "b", "--init", tmp_path / "a", *tiny32)
    assert "initialised from" in p.stderr and "pos_embed" not in p.stderr.split("initialised from")[1].split("\n")[0]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    assert a["pos_embed"].shape[1] == 1 + 16 and torch.load(tmp_path / "b" / "ckpt.pt")["model"]["pos_embed"].shape[1] == 1 + 64


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, npz):
    out = tmp_path / "run"
    run("vit", "--data", npz, "--steps", 4, "--out", out, *TINY)
    good = torch.load(out / "ckpt.pt", weights_only=True)
    p = run("vit", "--data", npz, "--steps", 50, "--lr", 1e30, "--warmup", 1, "--clip", 0, "--log-every", 1,
            "--ckpt-every", 1, "--out", out, "--overwrite", *TINY, check=False)
    assert p.returncode == 1 and "the loss became" in p.stderr and "Traceback" not in p.stderr
    kept = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert kept["step"] < 50 or kept["step"] == good["step"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown model 'nope'"),
    (["vit", "--preset", "x/99"], "unknown preset 'x/99'"),
    (["vit", "--widht", "3"], "unknown option --widht"),
    (["vit", "--width", "wide"], "--width expects int"),
    (["vit", "--data", "/no/such/file.npz"], "/no/such/file.npz"),
    (["vit", "--data", "imagenet"], "imagenet"),
    (["vit", "--image_size", "30", "--patch_size", "4"], "30"),
    (["vit", "--batch-size", "10", "--accum", "4"], "not divisible"),
])
def test_bad_input_gets_one_clear_line(args, message):
    p = run(*args, "--steps", 1, "--out", "/tmp/never-written", check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_checkpoint_from_another_model_and_existing_run(tmp_path, npz):
    torch.save({"model": {}, "model_name": "ul2", "step": 0}, tmp_path / "other.pt")
    p = run("vit", "--data", npz, "--init", tmp_path / "other.pt", "--out", tmp_path / "x", *TINY, check=False)
    assert p.returncode == 2 and "from model 'ul2'" in p.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    p = run("vit", "--data", npz, "--init", tmp_path / "bad.pt", "--out", tmp_path / "x", *TINY, check=False)
    assert p.returncode == 2 and "cannot be read" in p.stderr
    run("vit", "--data", npz, "--steps", 1, "--out", tmp_path / "y", *TINY)
    p = run("vit", "--data", npz, "--steps", 1, "--out", tmp_path / "y", *TINY, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr  # an existing checkpoint is never silently overwritten


def test_ddp_two_processes_equals_one(tmp_path, npz):
    common = ["vit", "--data", npz, "--steps", 5, "--log-every", 1, "--dtype", "fp32", *TINY]
    run(*common, "--out", tmp_path / "one")
    torchrun(*common, "--out", tmp_path / "two")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fsdp_two_processes_equals_one(tmp_path, npz):
    common = ["vit", "--data", npz, "--steps", 4, "--log-every", 1, "--dtype", "fp32", *TINY]
    run(*common, "--out", tmp_path / "one")
    torchrun(*common, "--fsdp", "--out", tmp_path / "two")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)  # a full, unsharded state dict
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])


def test_schedule_and_overrides():
    assert train.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert train.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert train.lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    import vit
    o = train.parse_overrides(vit, ["--width", "64", "--pool=gap", "--qkv-bias", "false", "--representation_size", "none"])
    assert o == {"width": 64, "pool": "gap", "qkv_bias": False, "representation_size": None}
    model = vit.Model(train.make_config(vit, "ti/4"))
    opt = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.blocks[0].attn.qkv.bias) not in decayed
    assert id(model.norm.weight) not in decayed


def test_optimizer_groups_follow_lr_scale_and_skip_frozen():
    import vit
    model = vit.Model(train.make_config(vit, None, dict(width=32, depth=1, heads=2, mlp_dim=64)))
    model.cls_token.lr_scale = 0.01  # e.g. a delta trained at lr / 100
    model.patch_embed.weight.requires_grad_(False)  # e.g. a frozen tower
    opt = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    owner = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert id(model.patch_embed.weight) not in owner
    assert owner[id(model.cls_token)]["lr_scale"] == 0.01 and owner[id(model.cls_token)]["weight_decay"] == 0.1
    assert owner[id(model.head.weight)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_sam_trains_differently_and_resumes_exactly(tmp_path, npz):
    common = ["vit", "--data", npz, "--steps", 8, "--lr", 3e-3, "--warmup", 2, "--log-every", 1, *TINY]
    run(*common, "--out", tmp_path / "adam")
    run(*common, "--sam", 0.5, "--out", tmp_path / "full")
    run(*common, "--sam", 0.5, "--out", tmp_path / "cut", "--stop-after", 4)
    run("vit", "--resume", "--out", tmp_path / "cut", "--no-progress")
    sam = losses(tmp_path / "full")
    assert sam == losses(tmp_path / "cut")  # --sam is saved with the run
    assert sam[0] == losses(tmp_path / "adam")[0] and sam[1:] != losses(tmp_path / "adam")[1:]


def test_predict_and_eval_need_weights_and_a_hook(tmp_path, npz):
    run("vit", "--data", npz, "--steps", 2, "--out", tmp_path, *TINY)
    p = run("vit", "--predict", "x", "--init", tmp_path, check=False)
    assert p.returncode == 2 and "has no predict()" in p.stderr
    p = run("vit", "--eval", "corruptions", check=False)
    assert p.returncode == 2 and "--init CKPT" in p.stderr


def test_corruption_benchmark_mce_by_hand(monkeypatch):
    """Two corruptions; each 'image' carries a code (10 * severity + corruption index) that the fake models map to
    an accuracy, so mCE and relative mCE can be worked out by hand."""
    import data as datasets
    monkeypatch.setattr(datasets, "CORRUPTIONS", {"a": None, "b": None})
    monkeypatch.setattr(datasets, "corrupt", lambda x, c, s, seed: torch.full_like(x, 10 * s + "ab".index(c)))
    clean = datasets.ImageData("t", torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                               torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["x"])
    def model(clean_acc, a_acc, b_acc):  # corruption a: the same accuracy at every severity; b likewise
        table = {0: clean_acc, **{10 * s: a_acc for s in range(1, 6)}, **{10 * s + 1: b_acc for s in range(1, 6)}}
        return lambda m, data, cfg: {"test_acc": table[int(data.x_test.flatten()[0])]}
    models = {"m": (None, None, model(0.9, 0.8, 0.5)), "baseline": (None, None, model(0.8, 0.6, 0.8))}
    res = train.corruption_benchmark(models, clean, 0, lambda *a: None)
    m = res["m"]
    assert m["clean_acc"] == 0.9 and m["corrupted_acc"] == pytest.approx(0.65)
    # CE_a = 5 x 0.2 / (5 x 0.4) = 0.5, CE_b = 5 x 0.5 / (5 x 0.2) = 2.5 -> mCE 150
    assert m["mCE"] == pytest.approx(150.0) and res["baseline"]["mCE"] == pytest.approx(100.0)
    # relative: only a (the baseline does not degrade on b): (0.2 - 0.1) / (0.4 - 0.2) = 0.5
    assert m["relative_mCE"] == pytest.approx(50.0) and m["relative_mCE_over"] == ["a"]
    bad = {"tokenizer": (None, None, lambda m, data, cfg: {"test_mse": 0.1})}
    with pytest.raises(train.UsageError, match="needs an image classifier"):
        train.corruption_benchmark(bad, clean, 0, lambda *a: None)
