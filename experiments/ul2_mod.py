"""UL2's claim in miniature (papers/text.md B5): span corruption only (SC) vs prefix LM only (PLM) vs the
Mixture-of-Denoisers (MoD), equal steps, batch and seeds, scored on held-out `stdlib` text for infilling and
left-to-right continuation; plus MoD with the wrong mode token (the mode-switch ablation) and SC asked for the
continuation T5's way (prefix + <extra_id_0>). Prints the README table.

    python experiments/ul2_mod.py [--out /tmp/ul2_mod] [--steps 1000] [--seeds 0] [--jobs 3]

Every run is `python train.py ul2 ...` (the printed commands), at most --jobs at a time, one thread each,
`nice -n 19`; finished runs (results.json) are not re-run. Then each checkpoint is scored with
ul2.paper_metrics on the same 64 held-out chunks of 128 bytes (fixed masks):
  infill_nll / infill_em   R(3, .15) corruption: NLL per target byte, exact match of greedily decoded spans
  cont_nll / cont_acc      first 64 bytes in: NLL per byte of the last 64, accuracy of 32 greedy bytes
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARMS = {"SC": ["--mixture", "R1", "--mode_tokens", "false"],
        "PLM": ["--mixture", "S", "--mode_tokens", "false"],
        "MoD": []}  # the default: R1, R2, X1..X4, S uniform, mode tokens on


def command(out, arm, seed, steps):
    return ["nice", "-n", "19", sys.executable, "train.py", "ul2", "--seed", str(seed), "--steps", str(steps),
            "--eval-every", str(steps), "--no-progress", "--overwrite", "--out", str(out), *ARMS[arm]]


def run(cmd, out):
    if (out / "results.json").exists():
        return
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return
    (out / "wall_s").write_text(f"{time.time() - t:.0f}\n")
    print(f"{time.time() - t:5.0f}s  {' '.join(cmd[3:])}", file=sys.stderr, flush=True)


def score(out):
    """The metrics of one checkpoint under each way of asking (rows of the table)."""
    import data as datasets
    import train
    import ul2
    torch.set_num_threads(1)
    _, cfg, model, _ = train.restore(out, "ul2", torch.device("cpu"))
    d = datasets.load("stdlib", kind="text")
    rows = {}
    if cfg.mode_tokens:
        rows["modes [R] / [S]"] = ul2.paper_metrics(model, d, cfg, "R", "S")
        rows["wrong modes [S] / [R]"] = ul2.paper_metrics(model, d, cfg, "S", "R")
        rows["no mode token"] = ul2.paper_metrics(model, d, cfg, None, None)
    else:
        rows["no mode token"] = ul2.paper_metrics(model, d, cfg, None, None)
        rows["continuation as prefix <extra_id_0>"] = ul2.paper_metrics(model, d, cfg, None, None, continue_sentinel=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/ul2_mod")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    runs = [(arm, seed, out / f"{arm}_s{seed}") for seed in args.seeds for arm in ARMS]
    with ThreadPoolExecutor(args.jobs) as ex:
        for arm, seed, o in runs:
            cmd = command(o, arm, seed, args.steps)
            print(" ".join(cmd[3:]), file=sys.stderr)
            ex.submit(run, cmd, o)
    table = {}
    for arm, seed, o in runs:
        if not (o / "results.json").exists():
            continue
        cache = o / "scores.json"
        rows = json.loads(cache.read_text()) if cache.exists() else score(o)
        cache.write_text(json.dumps(rows, indent=1))
        for how, m in rows.items():
            table.setdefault((arm, how), []).append(m)
    print(f"\n{args.steps} steps x batch 32, seeds {' / '.join(map(str, args.seeds))}; 64 held-out stdlib chunks of 128 bytes\n")
    print("| arm | asked with | infill NLL/byte | infill span EM | continuation NLL/byte | continuation 32-byte acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (arm, how), ms in table.items():  # one value per seed: "seed 0 / seed 1"
        cell = lambda k: " / ".join(f"{m[k]:.3f}" for m in ms)
        print(f"| {arm} | {how} | {cell('infill_nll')} | {cell('infill_em')} | {cell('cont_nll')} | {cell('cont_acc')} |")


if __name__ == "__main__":
    main()
