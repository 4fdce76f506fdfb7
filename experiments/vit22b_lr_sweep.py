"""ViT-22B's QK-norm claim in miniature: a learning-rate sweep with and without qk_norm on `shapes`,
then the parallel vs sequential block at equal steps. Prints the two markdown tables of
README.md, section "ViT-22B in miniature" (the throughput table there comes from bench.py; commands in that section).

    python experiments/vit22b_lr_sweep.py [--out /tmp/vit22b_sweep] [--jobs 2] [--steps 200]

Every run is `python train.py vit22b ...` (the printed commands), at most --jobs at a time, each with
one thread and `nice -n 19`. Finished runs (results.json, or a log that ended in a NaN) are not re-run,
so the script can be interrupted and restarted; only the tables are recomputed.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
SEEDS = [0, 1]
BLOCK_LR = 1e-3


def command(out, lr, seed, steps, batch, warmup, extra=()):
    return ["nice", "-n", "19", sys.executable, "train.py", "vit22b", "--lr", str(lr), "--seed", str(seed),
            "--steps", str(steps), "--batch-size", str(batch), "--warmup", str(warmup), "--eval-every", str(steps),
            "--no-progress", "--overwrite", "--out", str(out), *extra]


def run(cmd, out):
    if (out / "results.json").exists() or (out / "diverged").exists():
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        if "the loss became" in p.stderr:
            (out / "diverged").write_text(p.stderr.strip().splitlines()[-1] + "\n")
        else:
            print(p.stderr[-2000:], file=sys.stderr)
            return
    print(f"{time.time() - t:5.0f}s  {' '.join(cmd[3:])}", file=sys.stderr, flush=True)


def summary(out):
    """final train loss, test acc, end/peak max logit, end min entropy, peak loss after warm-up."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    finite = [r for r in log if math.isfinite(r["loss"])]
    return dict(
        loss=res.get("loss", float("nan")), acc=res.get("test_acc", float("nan")),
        test_loss=res.get("test_loss", float("nan")),
        logit_end=finite[-1]["max_logit"] if finite else float("nan"),
        logit_peak=max((r["max_logit"] for r in finite), default=float("nan")),
        ent_end=finite[-1]["min_entropy"] if finite else float("nan"),
        loss_peak=max((r["loss"] for r in finite), default=float("nan")),
        diverged=(out / "diverged").exists(), steps=log[-1]["step"] if log else 0,
    )


def fmt(values, spec):
    return " / ".join("div." if v is None else format(v, spec) for v in values)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/vit22b_sweep")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    base = Path(args.out)
    S, B, W = args.steps, args.batch_size, args.warmup

    # 1. the sweep: lr x qk_norm x seed; 2. parallel vs sequential block (qk_norm on)
    jobs = {}
    for lr in LRS[::-1]:
        for qk in ("true", "false"):
            for seed in SEEDS:
                out = base / f"lr{lr:g}_qk{qk}_s{seed}"
                jobs[("sweep", lr, qk, seed)] = (command(out, lr, seed, S, B, W, ["--qk_norm", qk]), out)
    # (at 16 px, 16 tokens: 4-5x cheaper per image, so 3x the steps and 2x the batch fit the same time)
    for block in ("true", "false"):
        for seed in SEEDS:
            out = base / f"block_{'parallel' if block == 'true' else 'sequential'}_s{seed}"
            jobs[("block", block, seed)] = (command(out, BLOCK_LR, seed, 3 * S, 2 * B, 3 * W,
                                                    ["--parallel_block", block, "--image_size", "16"]), out)
    t0 = time.time()
    for _, out in jobs.values():
        out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda co: run(*co), jobs.values()))
    print(f"wall time of this invocation: {(time.time() - t0) / 60:.1f} min", file=sys.stderr)

    print(f"\n`shapes`, default Config (D=128, depth 6, 4 heads, MAP head, RMSNorm), batch {B}, {S} steps, "
          f"warm-up {W} + cosine, AdamW wd 0.05, clip 1.0, bf16 autocast. Seeds {SEEDS[0]} / {SEEDS[1]}.\n")
    print("| lr | qk_norm | final train loss | test acc | max logit, end | max logit, peak | min entropy, end | peak loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lr in LRS:
        for qk in ("true", "false"):
            s = [summary(jobs[("sweep", lr, qk, seed)][1]) for seed in SEEDS]
            div = lambda k: [None if r["diverged"] else r[k] for r in s]  # noqa: E731
            print(f"| {lr:g} | {'on' if qk == 'true' else 'off'} | {fmt(div('loss'), '.3f')} | {fmt(div('acc'), '.3f')} | "
                  f"{fmt([r['logit_end'] for r in s], '.3g')} | {fmt([r['logit_peak'] for r in s], '.3g')} | "
                  f"{fmt([r['ent_end'] for r in s], '.2f')} | {fmt([r['loss_peak'] for r in s], '.3g')} |")
    print(f"\nParallel vs sequential block (qk_norm on), 16 px images (patch 4: 16 tokens), lr {BLOCK_LR:g}, "
          f"batch {2 * B}, {3 * S} steps, warm-up {3 * W}. Seeds {SEEDS[0]} / {SEEDS[1]}.\n")
    print("| block | final train loss | test acc | test loss |")
    print("| --- | --- | --- | --- |")
    for block in ("true", "false"):
        s = [summary(jobs[("block", block, seed)][1]) for seed in SEEDS]
        print(f"| {'parallel' if block == 'true' else 'sequential'} | {fmt([r['loss'] for r in s], '.3f')} | "
              f"{fmt([r['acc'] for r in s], '.3f')} | {fmt([r['test_loss'] for r in s], '.3f')} |")


if __name__ == "__main__":
    main()
