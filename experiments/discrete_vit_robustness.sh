#!/usr/bin/env bash
# Discrete ViT miniature (Mao et al. 2022): ViT vs "discrete only" vs the concat fusion, equal steps, on `shapes`
# (32 px, 10 classes); clean accuracy, accuracy under 9 ImageNet-C-style corruptions x 5 severities, and mCE
# relative to the ViT of the same seed. One stage-1 tokenizer (seed 0) is shared by every discrete run.
#   bash experiments/discrete_vit_robustness.sh [OUT_DIR]        (~1 h on a 2-core CPU, 2 runs at a time)
# Knobs (environment): TOK_STEPS, STEPS, BATCH, SEEDS, EVAL_SAMPLES (test images per corruption), JOBS, DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/discrete_vit_robustness}
TOK_STEPS=${TOK_STEPS:-800}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-128}
SEEDS=${SEEDS:-"0 1"}
EVAL_SAMPLES=${EVAL_SAMPLES:-2000}
JOBS=${JOBS:-2}
DATA=${DATA:-shapes}
mkdir -p "$OUT"
export OUT TOK_STEPS STEPS BATCH DATA EVAL_SAMPLES

one() {  # one training run: "tokenizer", "vit SEED", "discrete SEED" or "concat SEED"
  read -r arm s <<<"$1"
  local out="$OUT/$arm${s:+-s$s}" t0
  [[ -f "$out/results.json" ]] && return 0  # finished earlier: keep it
  t0=$(date +%s)
  case $arm in
    tokenizer) python train.py discrete_vit --stage tokenizer --data "$DATA" --steps "$TOK_STEPS" --batch-size "$BATCH" \
                 --lr 1e-3 --no-progress --overwrite --out "$out" ;;
    vit) python train.py vit --data "$DATA" --steps "$STEPS" --batch-size "$BATCH" --seed "$s" --no-progress \
           --overwrite --out "$out" ;;
    discrete|concat) python train.py discrete_vit --stage classifier --fusion "$arm" --tokenizer "$OUT/tokenizer" \
           --data "$DATA" --steps "$STEPS" --batch-size "$BATCH" --seed "$s" --no-progress --overwrite --out "$out" ;;
  esac > "$out.log" 2>&1
  echo "$(( $(date +%s) - t0 ))" > "$out/wall_s"
  echo "$arm${s:+-s$s}: $(tail -1 "$out.log")"
}

evaluate() {  # the corruption benchmark of one classifier, against the ViT of the same seed
  read -r arm s <<<"$1"
  local run="$OUT/$arm-s$s" model=discrete_vit base=(--baseline "$OUT/vit-s$s") t0
  [[ -f "$run/corruptions.json" ]] && return 0
  [[ $arm == vit ]] && model=vit base=()
  t0=$(date +%s)
  python train.py $model --init "$run" --eval corruptions "${base[@]}" --eval-samples "$EVAL_SAMPLES" \
    > "$run.eval.log" 2>&1
  echo "$(( $(date +%s) - t0 ))" > "$run/eval_wall_s"
  echo "$arm-s$s: $(tail -2 "$run.eval.log" | head -1)"
}
export -f one evaluate

{ echo tokenizer; for s in $SEEDS; do echo "vit $s"; done; } | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c 'one "{}"'
for s in $SEEDS; do echo "discrete $s"; echo "concat $s"; done | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c 'one "{}"'
for s in $SEEDS; do for a in vit discrete concat; do echo "$a $s"; done; done |
  OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c 'evaluate "{}"'

python - "$OUT" $SEEDS <<'PY'
import json, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2:]
tok = json.loads((out / "tokenizer" / "results.json").read_text())
print(f"tokenizer: test recon MSE {tok['test_recon_mse']:.4f} (PSNR {tok['test_psnr']:.1f} dB), "
      f"perplexity {tok['test_perplexity']:.1f}, {int(tok['test_codes_used'])} codes used, "
      f"{(out / 'tokenizer' / 'wall_s').read_text().strip()} s\n")
names = {"vit": "ViT (vit.py)", "discrete": "discrete only", "concat": "concat fusion (Dr. ViT)"}
print("| model | clean acc % | mean corrupted acc % | corrupted / clean | mCE (ViT = 100) | train s | eval s |")
print("|---|---|---|---|---|---|---|")
per = {}
for arm, name in names.items():
    r = [json.loads((out / f"{arm}-s{s}" / "corruptions.json").read_text()) for s in seeds]
    for x in r:
        x["retained"] = x["corrupted_acc"] / x["clean_acc"]
    per[arm] = r
    f = lambda k, scale=100, p=1: " / ".join(f"{scale * x[k]:.{p}f}" for x in r) + (
        f" (mean {sum(scale * x[k] for x in r) / len(r):.{p}f})" if len(r) > 1 else "")
    wall = lambda fn: " / ".join((out / f"{arm}-s{s}" / fn).read_text().strip() for s in seeds)
    mce = f("mCE", 1) if "mCE" in r[0] else "100"  # relative mCE is left out: see the README
    print(f"| {name} | {f('clean_acc')} | {f('corrupted_acc')} | {f('retained', 1, 2)} | {mce} | {wall('wall_s')} "
          f"| {wall('eval_wall_s')} |")
corr = list(per["vit"][0]["acc"])
print("\nAccuracy % per corruption, mean over seeds and severities 1-5:\n")
print("| model | " + " | ".join(corr) + " |")
print("|---|" + "---|" * len(corr))
for arm, name in names.items():
    accs = [sum(sum(x["acc"][c]) / 5 for x in per[arm]) / len(per[arm]) for c in corr]
    print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
PY
