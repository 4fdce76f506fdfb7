#!/usr/bin/env bash
# Dual PatchNorm miniature: plain ViT stem vs DPN vs the paper's one-sided ablations ("pre" = ln0 only,
# "post" = ln1 only), all else equal, 3 seeds each, on `shapes` and on `shapes-hard` (a harder 32x32
# 10-class set made from the same generator, written to an .npz below). Prints a markdown table.
#   bash experiments/dpn_ablation.sh [OUT_DIR]          (defaults below; ~50 min on a busy 2-core CPU)
# Knobs (environment): STEPS, HARD_STEPS, BATCH, WARMUP, LR, SEEDS, JOBS (parallel runs), DATASETS, MODEL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dpn_ablation}
STEPS=${STEPS:-1500}         # on shapes
HARD_STEPS=${HARD_STEPS:-1000}  # on shapes-hard (a shorter schedule: the whole sweep then fits in ~1 h)
BATCH=${BATCH:-128}
WARMUP=${WARMUP:-100}
LR=${LR:-1e-3}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
DATASETS=${DATASETS:-"shapes shapes-hard"}
MODEL_ARGS=${MODEL_ARGS:-"--width 128 --depth 4 --heads 4 --mlp_dim 512 --patch_size 8 --image_size 32"}
mkdir -p "$OUT"

# shapes-hard: 4 distractors instead of 2, per-image contrast x0.4-1.4, brightness +-50, per-channel
# gains x0.85-1.15 and Gaussian pixel noise (std 12): the exposure / white-balance / sensor-noise
# nuisances of real photos, on top of the shapes scenes. 50k train / 10k test, 32x32, like CIFAR-10.
if [[ " $DATASETS " == *" shapes-hard "* && ! -f "$OUT/shapes-hard.npz" ]]; then
  OMP_NUM_THREADS=1 nice -n 19 python - "$OUT/shapes-hard.npz" <<'PY'
import sys
import numpy as np
import data

rng = np.random.default_rng(2302_01327)
def hard(split, n):
    x, y = data.shapes_classification(n, 32, seed=0, split=split, distractors=4)
    x = x.astype(np.float32)  # (n, 32, 32, 3)
    mean = x.mean((1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.4, 1.4, (n, 1, 1, 1))
    gain = rng.uniform(0.85, 1.15, (n, 1, 1, 3))
    bright = rng.uniform(-50, 50, (n, 1, 1, 1))
    x = (x - mean) * contrast * gain + mean + bright + rng.normal(0, 12, x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8), y
x, y = hard("train", 50_000)
xt, yt = hard("test", 10_000)
np.savez(sys.argv[1], x=x, y=y, x_test=xt, y_test=yt,
         classes=np.array(list(data.SHAPES)))
PY
fi

runs=()
for d in $DATASETS; do
  for s in $SEEDS; do
    for pn in none dual pre post; do
      runs+=("$d $pn $s")
    done
  done
done
one() {
  read -r d pn s <<<"$1"
  local out="$OUT/$d/$pn-s$s"
  [[ -f "$out/results.json" ]] && return 0  # finished earlier: keep it
  local data="$d" steps="$STEPS" aug="--no-augment"  # shapes: no crop/flip (data.py's default for it)
  [[ "$d" == shapes-hard ]] && data="$OUT/shapes-hard.npz" steps="$HARD_STEPS" aug="--augment"
  local t0=$SECONDS
  OMP_NUM_THREADS=1 nice -n 19 python train.py dual_patchnorm --data "$data" --patch_norm "$pn" --seed "$s" \
    --steps "$steps" --batch-size "$BATCH" --warmup "$WARMUP" --lr "$LR" --eval-every "$steps" --log-every 50 $aug $MODEL_ARGS --no-progress --out "$out" --overwrite \
    > "$out.stdout" 2> "$out.stderr" || { echo "FAILED: $1 (see $out.stderr)" >&2; return 1; }
  echo "$1: $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['test_acc'])" "$out/results.json") ($((SECONDS - t0)) s)"
}
export -f one; export OUT STEPS HARD_STEPS BATCH WARMUP LR MODEL_ARGS
for d in $DATASETS; do mkdir -p "$OUT/$d"; done
t0=$SECONDS
printf '%s\n' "${runs[@]}" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
echo "wall time: $(( (SECONDS - t0) / 60 )) min" >&2

python - "$OUT" $DATASETS <<'PY'
import json, statistics, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
label = {"none": "plain ViT (linear stem)", "pre": "pre only (ln0)", "post": "post only (ln1)", "dual": "Dual PatchNorm"}
print("| stem | " + " | ".join(f"{n}: test acc % (mean ± std, 3 seeds) | {n}: per seed" for n in names) + " |")
print("|---|" + "---|---|" * len(names))
for pn in ["none", "pre", "post", "dual"]:
    cells = []
    for n in names:
        accs = [100 * json.loads(p.read_text())["test_acc"] for p in sorted((out / n).glob(f"{pn}-s*/results.json"))]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells += [f"{statistics.mean(accs):.1f} ± {sd:.1f}" if accs else "-", " / ".join(f"{a:.1f}" for a in accs)]
    print(f"| {label[pn]} | " + " | ".join(cells) + " |")
print()
for n in names:  # paired by seed: same data order, same init of the shared weights
    base = {p.parent.name.split("-s")[1]: json.loads(p.read_text())["test_acc"] for p in (out / n).glob("none-s*/results.json")}
    for pn in ["pre", "post", "dual"]:
        d = [100 * (json.loads(p.read_text())["test_acc"] - base[p.parent.name.split("-s")[1]])
             for p in sorted((out / n).glob(f"{pn}-s*/results.json")) if p.parent.name.split("-s")[1] in base]
        if d:
            print(f"{n}: {pn} - plain, paired by seed: {statistics.mean(d):+.1f} points (per seed: "
                  + ", ".join(f"{x:+.1f}" for x in d) + ")")
PY
