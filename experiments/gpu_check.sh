#!/usr/bin/env bash
# The CUDA path in one short script (about 3 minutes on an H100/H200):
#   1. bench.py: ViT-B/16 training step, compiled, bf16, flash attention -> images/s and MFU
#   2. train.py end to end on a CIFAR-shaped synthetic .npz kept on the GPU (compile + bf16 + fused AdamW)
# Usage: bash experiments/gpu_check.sh [OUT_DIR]     (CPU smoke test: SMOKE=1 bash experiments/gpu_check.sh)
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if torch.cuda.is_available():  # which SDPA kernel runs for ViT-B shapes in bf16
    from torch.nn.attention import sdpa_kernel, SDPBackend
    q = torch.randn(8, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    print("flash attention kernel: ok")
PY
if [ "${SMOKE:-0}" = 1 ]; then  # tiny sizes, to check the script itself on a CPU
  bench=(--width 32 --depth 1 --heads 2 --mlp_dim 64 --batch-size 8 --steps 2 --repeats 1)
  run=(--width 32 --depth 1 --heads 2 --mlp_dim 64 --steps 20 --batch-size 32)
else
  bench=(--preset b/16 --batch-size 256 --steps 20 --repeats 3)
  run=(--preset s/4 --steps 1000 --batch-size 512 --lr 1e-3 --warmup 100)
fi
python bench.py vit "${bench[@]}" | tee "$out/bench_b16.json"
python - "$out/cifar_like.npz" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)  # CIFAR-shaped: 50k/10k uint8 32x32x3, 10 classes (random: this checks speed and plumbing, not accuracy)
np.savez(sys.argv[1], x=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 50000),
         x_test=rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 10000))
PY
python train.py vit --data "$out/cifar_like.npz" "${run[@]}" --out "$out/run" --overwrite --no-progress | tee "$out/train.json"
tail -n 3 "$out/run/log.jsonl"
