"""DSI vs BM25 in miniature, for each docid kind (atomic, naive, semantic), on the embedded corpus.

    python experiments/dsi_docids.py --out /tmp/dsi_docids [--seeds 0,1] [--jobs 2] [-- extra Config flags]

Each arm is one `python train.py dsi --docid KIND --seed S` run; its final evaluation already holds DSI and
BM25 on the same test queries. Prints a markdown table: Hits@1 / Hits@10 overall, on lexical and
paraphrased queries, on documents with and without training queries (zero-shot), and on the paraphrased
queries of documents with training queries, mean over seeds (the final checkpoints are evaluated again
with the current dsi.evaluate, cached in <run>/eval.json).
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
GROUPS = ("", "_lexical", "_paraphrased", "_seen", "_zeroshot", "_paraphrased_seen")


def run(out, args):
    out = Path(out)
    if not (out / "results.json").exists():
        cmd = [sys.executable, str(ROOT / "train.py"), "dsi", "--no-progress", "--overwrite", "--out", str(out), *args]
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        t = time.time()
        with open(str(out) + ".log", "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if r.returncode:
            raise SystemExit(f"failed ({r.returncode}): see {out}.log")
        (out / "wall_s.txt").write_text(f"{time.time() - t:.1f}\n")
    return json.loads((out / "results.json").read_text()), float((out / "wall_s.txt").read_text())


def reevaluate(out):
    """evaluate() of dsi.py on a finished run's checkpoint (the same autocast dtype as in training), for
    groups added after the run; cached in <out>/eval.json."""
    cache = Path(out) / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch
    sys.path.insert(0, str(ROOT))
    import data
    import dsi
    ckpt = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True)
    cfg = dsi.Config(**ckpt["config"])
    model = dsi.Model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    amp = torch.autocast("cpu", torch.bfloat16) if ckpt["dtype"] == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), amp:
        res = dsi.evaluate(model, data.load(ckpt["data"], kind="corpus"), cfg)
    res = {k: v for k, v in res.items() if not isinstance(v, list)}
    cache.write_text(json.dumps(res, indent=1) + "\n")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="atomic,naive,semantic")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="/tmp/dsi_docids")
    args, extra = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds, seeds = args.kinds.split(","), [int(s) for s in args.seeds.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = {(k, s): pool.submit(run, out / f"{k}_s{s}", ["--docid", k, "--seed", str(s), *extra])
                for k in kinds for s in seeds}
        res = {key: f.result() for key, f in futs.items()}
    res = {key: (dict(r, **reevaluate(out / f"{key[0]}_s{key[1]}")), wall) for key, (r, wall) in res.items()}
    (out / "results.json").write_text(json.dumps({f"{k}_s{s}": r for (k, s), r in res.items()}, indent=1) + "\n")
    mean = lambda k, key: sum(res[(k, s)][0][key] for s in seeds) / len(seeds)
    print(f"\nseeds {args.seeds}; extra {' '.join(extra) or '-'}; n queries: " +
          ", ".join(f"{g[1:] or 'all'} {int(res[(kinds[0], seeds[0])][0]['n' + g])}" for g in GROUPS) + "\n")
    print("| system | all | lexical | paraphrased | docs with train queries | zero-shot docs | paraphrased, docs with train queries | index acc | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    r0 = res[(kinds[0], seeds[0])][0]
    print("| BM25 (k1 1.2, b 0.75) | " + " | ".join(f"{r0['bm25_hits1' + g]:.3f} / {r0['bm25_hits10' + g]:.3f}" for g in GROUPS)
          + " | - | - |")
    for k in kinds:
        wall = sum(res[(k, s)][1] for s in seeds) / len(seeds)
        print(f"| DSI {k} | " + " | ".join(f"{mean(k, 'hits1' + g):.3f} / {mean(k, 'hits10' + g):.3f}" for g in GROUPS)
              + f" | {mean(k, 'index_acc'):.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
