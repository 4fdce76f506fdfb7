"""bench.py: runs any model, reports throughput and FLOPs; --vs timm times timm's ViT beside ours."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402

TINY = ["--width", "32", "--depth", "2", "--heads", "2", "--mlp_dim", "64", "--image_size", "16", "--patch_size", "4"]


def test_bench_reports_throughput_and_flops():
    a = bench.main(["vit", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "1", "--dtype", "fp32", *TINY])
    b = bench.main(["vit", "--batch-size", "16", "--steps", "2", "--warmup", "1", "--repeats", "1", "--dtype", "fp32", *TINY])
    assert a["samples_per_s"] > 0 and a["step_ms"] > 0 and a["peak_mem_mb"] > 0
    assert a["params"] == sum(p.numel() for p in __import__("vit").Model(__import__("vit").Config(
        width=32, depth=2, heads=2, mlp_dim=64, image_size=16, patch_size=4)).parameters())
    assert 1.9 < b["flops_per_step"] / a["flops_per_step"] < 2.1  # FLOPs of a step are linear in the batch


def test_bench_vs_timm_command_line():
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "vit", "--vs", "timm", "--batch-size", "8", "--steps", "2",
                        "--warmup", "1", "--repeats", "2", *TINY], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["timm_samples_per_s"] > 0 and res["ratio_vs_timm"] > 0


def test_bench_bad_model_is_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "resnet"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: unknown model")
