#!/usr/bin/env bash
# OWL-ViT in miniature (README table): stage 1 once, then the stage-2 arms from the same stage-1 checkpoint
# (or none). Every run is a plain train.py call, one thread each, two at a time.
#   bash experiments/owlvit_miniature.sh [OUT]          (default OUT=/tmp/owlvit_miniature)
# Results: $OUT/<arm>/results.json (final) and log.jsonl (AP at steps 500 / 1000 / 1500).
set -euo pipefail
OUT=${1:-/tmp/owlvit_miniature}
mkdir -p "$OUT"
run() { name=$1; shift; OMP_NUM_THREADS=1 python train.py owlvit "$@" --no-progress --out "$OUT/$name" > "$OUT/$name.log" 2>&1; }

run pretrain --stage pretrain
run detect --stage detect --init "$OUT/pretrain/ckpt.pt" &
run detect_scratch --stage detect &
wait
run detect_no_box_bias --stage detect --init "$OUT/pretrain/ckpt.pt" --box_bias false &
run closed_vocab --stage detect --init "$OUT/pretrain/ckpt.pt" --closed_vocab true &
wait
run detect_text_lr --stage detect --init "$OUT/pretrain/ckpt.pt" --text_lr_scale 0.04 &
run detect_seed1 --stage detect --init "$OUT/pretrain/ckpt.pt" --seed 1 &
wait
run detect_scratch_seed1 --stage detect --seed 1
for r in detect detect_scratch detect_no_box_bias closed_vocab detect_text_lr detect_seed1 detect_scratch_seed1; do
  python -c "import json,sys; r=json.load(open('$OUT/$r/results.json')); print('$r', {k: round(v, 3) for k, v in r.items() if 'ap' in k})"
done
