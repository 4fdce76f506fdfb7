"""DSI++ in miniature: continual indexing of K new corpora that arrive without queries.

    python experiments/dsi_continual.py --continual 3 --out /tmp/dsi_cl

Every stage is a plain train.py run (so each one can be re-run, resumed or inspected alone):
  stage 0   python train.py dsi --stage 0                          D0: indexing + retrieval (its queries)
  qgen      python train.py dsi --task qgen                        the doc -> query generator, on D0
  stage t   python train.py dsi --stage t --init <stage t-1>       index D_t only, a fixed step budget, per arm:
              naive      nothing else
              sam        --sam RHO (sharpness-aware minimisation)
              mem        --qgen <qgen run>: pseudo-queries for D_t (mem_new) and replayed ones for D_<t (mem_old)
              sam+mem    both
  retrain   python train.py dsi --stage K --retrain true           from scratch on D0..D_K (the upper bound)
After each stage the evaluation on the test queries of D0..D_t gives one row of P[t, o] (Hits@1, Hits@10);
the script prints the matrices, A_K, F_K, LA_K (dsi.continual_metrics), the number of model updates, and
forgetting events of D0's documents (dsi.forgetting_events over the per-document indexing correctness that
evaluate() logs) during stage 0 (Adam vs SAM with --stage0-sam) and over the continual stages.
Results: <out>/results.json and a markdown table on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dsi  # noqa: E402

ARMS = ("naive", "sam", "mem", "sam+mem", "retrain")


def run(out, args, log):
    """One train.py run (skipped if its results.json exists); returns (results, log.jsonl records, seconds)."""
    out = Path(out)
    if not (out / "results.json").exists():
        cmd = [sys.executable, str(ROOT / "train.py"), "dsi", "--no-progress", "--overwrite", "--out", str(out), *args]
        log(" ".join(cmd[1:]))
        t = time.time()
        with open(str(out) + ".log", "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if r.returncode:
            raise SystemExit(f"failed ({r.returncode}): see {out}.log")
        (out / "wall_s.txt").write_text(f"{time.time() - t:.1f}\n")
    res = json.loads((out / "results.json").read_text())
    logs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    wall = float((out / "wall_s.txt").read_text()) if (out / "wall_s.txt").exists() else float("nan")
    return res, logs, wall


def row(res, t, metric):
    return [res[f"{metric}_D{o}"] for o in range(t + 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--continual", type=int, default=3, metavar="K", help="new corpora D1..DK")
    p.add_argument("--data", default="corpus")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps0", type=int, default=2000, help="stage 0 (and the retrain run) steps")
    p.add_argument("--steps", type=int, default=200, help="steps per new corpus")
    p.add_argument("--qgen-steps", type=int, default=1000)
    p.add_argument("--sam", type=float, default=0.05, help="rho of the sam arms")
    p.add_argument("--stage0-sam", action="store_true", help="also train stage 0 with SAM (forgetting events)")
    p.add_argument("--eval-every0", type=int, default=200, help="evaluations of stage 0 (forgetting events)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluations in a continual stage")
    p.add_argument("--jobs", type=int, default=2, help="arms run in parallel")
    p.add_argument("--stage0", default=None, help="reuse this finished stage-0 run (same seed and flags) for seed 0")
    p.add_argument("--out", default="/tmp/dsi_continual")
    args, extra = p.parse_known_args()  # extra: Config fields for every run, e.g. --docid naive
    K = args.continual
    arms = args.arms.split(",")
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a}: choose from {', '.join(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    report = {"K": K, "args": vars(args), "extra": extra, "seeds": {}}

    for seed in [int(s) for s in args.seeds.split(",")]:
        base = ["--data", args.data, "--seed", str(seed), *extra]
        d = out / f"seed{seed}"
        d.mkdir(exist_ok=True)
        if args.stage0 and seed == int(args.seeds.split(",")[0]) and not (d / "stage0").exists():
            (d / "stage0").symlink_to(Path(args.stage0).resolve())
        s0 = dict(zip(("res", "logs", "wall"), run(d / "stage0", base + ["--stage", "0", "--steps", str(args.steps0),
                                                                          "--eval-every", str(args.eval_every0)], log)))
        rep = {"stage0": {"wall_s": s0["wall"], **{k: v for k, v in s0["res"].items() if not isinstance(v, list)}}}
        ev, frac = dsi.forgetting_events([r["index_correct_D0"] for r in s0["logs"] if "index_correct_D0" in r])
        rep["stage0"]["forgetting"] = {"docs_forgotten_frac": frac, "events_mean": float(ev.mean())}
        jobs = {}
        with ThreadPoolExecutor(args.jobs) as pool:
            if args.stage0_sam:
                jobs["stage0_sam"] = pool.submit(run, d / "stage0_sam", base + [
                    "--stage", "0", "--steps", str(args.steps0), "--eval-every", str(args.eval_every0), "--sam", str(args.sam)], log)
            if any("mem" in a for a in arms):
                qgen = pool.submit(run, d / "qgen", base + ["--task", "qgen", "--steps", str(args.qgen_steps)], log)
            if "retrain" in arms:
                jobs["retrain"] = pool.submit(run, d / f"retrain{K}", base + [
                    "--stage", str(K), "--retrain", "true", "--steps", str(args.steps0)], log)

            def arm(name):
                prev, res_rows, walls = d / "stage0", [], []
                hist = [[r["index_correct_D0"] for r in s0["logs"] if "index_correct_D0" in r][-1]]  # end of stage 0
                if "mem" in name:
                    qgen.result()
                for t in range(1, K + 1):
                    a = base + ["--stage", str(t), "--init", str(prev), "--steps", str(args.steps),
                                "--warmup", "0", "--eval-every", str(args.eval_every)]
                    if "sam" in name:
                        a += ["--sam", str(args.sam)]
                    if "mem" in name:
                        a += ["--qgen", str(d / "qgen")]
                    prev = d / f"{name}_stage{t}"
                    res, logs, wall = run(prev, a, log)
                    res_rows.append(res)
                    walls.append(wall)
                    hist += [r["index_correct_D0"] for r in logs if "index_correct_D0" in r]
                return res_rows, hist, walls

            for name in arms:
                if name != "retrain":
                    jobs[name] = pool.submit(arm, name)
            done = {k: v.result() for k, v in jobs.items()}

        if "stage0_sam" in done:
            res, logs, wall = done["stage0_sam"]
            ev, frac = dsi.forgetting_events([r["index_correct_D0"] for r in logs if "index_correct_D0" in r])
            rep["stage0_sam"] = {"wall_s": wall, "hits1": res["hits1"], "hits10": res["hits10"],
                                 "index_acc": res["index_acc"],
                                 "forgetting": {"docs_forgotten_frac": frac, "events_mean": float(ev.mean())}}
        for name in arms:
            if name == "retrain":
                res, _, wall = done["retrain"]
                rep["retrain"] = {"wall_s": wall, "hits1": row(res, K, "hits1"), "hits10": row(res, K, "hits10"),
                                  "A_hits1": sum(row(res, K, "hits1")) / (K + 1),
                                  "A_hits10": sum(row(res, K, "hits10")) / (K + 1),
                                  "updates": args.steps0 * (K + 1),  # retraining from scratch at each arrival
                                  "updates_note": "measured: the stage-K retrain only; updates count a retrain at every arrival"}
                continue
            rows, hist, walls = done[name]
            r = {"wall_s": s0["wall"] + sum(walls), "updates": args.steps0 + K * args.steps}
            for metric in ("hits1", "hits10", "index_acc"):
                P = [[0.0] * (K + 1) for _ in range(K + 1)]
                P[0][0] = s0["res"][f"{metric}_D0"]
                for t, res in enumerate(rows, 1):
                    for o, v in enumerate(row(res, t, metric)):
                        P[t][o] = v
                r[f"P_{metric}"] = P
                r[metric] = dsi.continual_metrics(P)
            ev, frac = dsi.forgetting_events(hist) if hist else (None, 0.0)
            r["D0_forgotten_frac"] = frac
            rep[name] = r
        report["seeds"][seed] = rep
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")

    # the table: mean over seeds
    seeds = list(report["seeds"].values())
    mean = lambda xs: sum(xs) / len(xs)
    print(f"\nDSI++ miniature: D0 + {K} new corpora, seeds {args.seeds}, extra {' '.join(extra) or '-'}\n")
    print("| arm | A_K Hits@1 | F_K Hits@1 | LA_K Hits@1 | A_K Hits@10 | F_K Hits@10 | LA_K Hits@10 | D0 index acc at the end | model updates | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in arms:
        if name == "retrain":
            print(f"| retrain (upper bound) | {mean([s['retrain']['A_hits1'] for s in seeds]):.3f} | - | - | "
                  f"{mean([s['retrain']['A_hits10'] for s in seeds]):.3f} | - | - | - | {seeds[0]['retrain']['updates']} | "
                  f"{mean([s['retrain']['wall_s'] for s in seeds]):.0f} |")
            continue
        g = lambda m, k: mean([s[name][m][k] for s in seeds])
        print(f"| {name} | {g('hits1', 'A'):.3f} | {g('hits1', 'F'):.3f} | {g('hits1', 'LA'):.3f} | {g('hits10', 'A'):.3f} | "
              f"{g('hits10', 'F'):.3f} | {g('hits10', 'LA'):.3f} | {mean([s[name]['P_index_acc'][K][0] for s in seeds]):.3f} | "
              f"{seeds[0][name]['updates']} | {mean([s[name]['wall_s'] for s in seeds]):.0f} |")
    s0 = seeds[0]
    print(f"\nstage 0 (seed {args.seeds.split(',')[0]}): Hits@1 {s0['stage0']['hits1']:.3f}, Hits@10 {s0['stage0']['hits10']:.3f}; "
          f"D0 documents forgotten at least once while memorising: {s0['stage0']['forgetting']['docs_forgotten_frac']:.3f}"
          + (f" (SAM: {s0['stage0_sam']['forgetting']['docs_forgotten_frac']:.3f})" if "stage0_sam" in s0 else ""))
    for name in arms:
        if name != "retrain":
            print(f"\n{name}: P[t, o] Hits@10 (rows: after stage t; columns: corpus o)")
            for t, r in enumerate(s0[name]["P_hits10"]):
                print("  " + " ".join(f"{v:.2f}" if o <= t else "  - " for o, v in enumerate(r)))


if __name__ == "__main__":
    main()
