"""PaLI's two claims in miniature on the `shapes` scenes (32 px, 4 languages). Prints the two markdown
tables of README.md, section "PaLI in miniature".

    python experiments/pali_miniatures.py [--out /tmp/pali/mini] [--jobs 3] [--steps 600] [--steps2 300]

1. One model, many tasks and languages: the default mixture (caption, VQA, counting, detection, each
   in en/fr/de/es) against four single-task models, all at the same number of steps and batch size
   (so a single-task model sees its task 4x as often as the mixture does).
2. Scaling the vision side: on captioning + counting (`--mixture caption:1,count:1`, --steps2 steps),
   the default model against a larger ViT (depth 4 -> 8) and a larger text side (3 -> 4 encoder and
   decoder blocks, d_ff 256 -> 272), both adding ~445k parameters (+25%).

Every run is `python train.py pali ...` (the printed commands), at most --jobs at a time, each with one
thread. Finished runs (results.json) are not re-run; only the tables are recomputed.
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
LANGS = ("en", "fr", "de", "es")
ARMS = {  # name -> extra train.py arguments; claim 1 (--steps)
    "mixture": [],
    "caption": ["--mixture", "caption:1"],
    "vqa": ["--mixture", "vqa:1"],
    "count": ["--mixture", "count:1"],
    "detect": ["--mixture", "detect:1"],
}
CC = ["--mixture", "caption:1,count:1"]
ARMS2 = {  # claim 2 (--steps2)
    "cc-base": CC,
    "cc-vit+": CC + ["--depth", "8"],
    "cc-text+": CC + ["--num_layers", "4", "--num_decoder_layers", "4", "--d_ff", "272"],
}


def command(out, steps, batch, extra):
    return [sys.executable, "train.py", "pali", "--steps", str(steps), "--batch-size", str(batch),
            "--eval-every", str(steps), "--seed", "0", "--no-progress", "--overwrite", "--out", str(out), *extra]


def run(cmd, out):
    if (out / "results.json").exists():
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return
    (out / "wall_s").write_text(f"{time.time() - t:.0f}\n")
    print(f"{time.time() - t:5.0f}s  {' '.join(cmd[1:])}", file=sys.stderr, flush=True)


def result(out):
    f = out / "results.json"
    return json.loads(f.read_text()) if f.exists() else {}


def question_prior(n_train=5000, n_eval=100):
    """Accuracy of a blind answerer: the most frequent training answer to the same question text (in the same
    language), on the evaluation questions of pali.evaluate (the first n_eval test scenes, same seeds)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import data
    d = data.load("shapes", kind="scenes", image_size=32)
    counts, rng = {}, np.random.default_rng(0)
    for sc in d.scenes_train[:n_train]:
        for lang in LANGS:
            for q, a, t in d.vqa(sc, lang, rng):
                for key in ((lang, q), (lang, t)):
                    counts.setdefault(key, {}).setdefault(a, 0)
                    counts[key][a] += 1
    right = {}
    for i, sc in enumerate(d.scenes_test[:n_eval]):
        for j, lang in enumerate(LANGS):
            for q, a, t in d.vqa(sc, lang, np.random.default_rng([i, j])):
                c = counts.get((lang, q)) or counts[(lang, t)]
                ok = max(c, key=c.get) == a
                for key in (t, "vqa" if t != "count" else "count_all", f"{t}_{lang}", f"vqa_{lang}" if t != "count" else ""):
                    right.setdefault(key, []).append(ok)
    return {k: float(np.mean(v)) for k, v in right.items()}


def fmt(x, pct=True):
    return "—" if x is None else f"{100 * x:.1f}" if pct else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/pali/mini")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps2", type=int, default=300)
    ap.add_argument("--arms", default=",".join([*ARMS, *ARMS2]))
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    arms = args.arms.split(",")
    jobs = [(command(out / a, args.steps, args.batch, ARMS[a]) if a in ARMS else
             command(out / a, args.steps2, args.batch, ARMS2[a]), out / a) for a in arms]
    if not args.tables_only:
        for cmd, _ in jobs:
            print(" ".join(cmd[1:]), file=sys.stderr)
        with ThreadPoolExecutor(args.jobs) as ex:
            list(ex.map(lambda j: run(*j), jobs))
    r = {a: result(out / a) for a in [*ARMS, *ARMS2]}

    # table 1: mixture vs single task, per task and language
    rows = [("caption BLEU-4", "caption", "caption_bleu4_{}"), ("VQA accuracy", "vqa", "vqa_acc_{}"),
            ("counting accuracy", "count", "count_acc_{}")]
    print(f"\n| task | metric | {' | '.join(LANGS)} | mean |\n| --- | --- |" + " --- |" * (len(LANGS) + 1))
    for title, task, key in rows:
        for arm, label in (("mixture", "mixture"), (task, "single task")):
            vals = [r[arm].get(key.format(l)) for l in LANGS]
            mean = r[arm].get(key.replace("_{}", ""))
            print(f"| {title} | {label} | {' | '.join(fmt(v) for v in vals)} | {fmt(mean)} |")
    for qt in ("colour", "shape", "position"):
        print(f"| VQA `{qt}` | mixture / single | " + " | ".join("" for _ in LANGS) +
              f" | {fmt(r['mixture'].get(f'vqa_acc_{qt}'))} / {fmt(r['vqa'].get(f'vqa_acc_{qt}'))} |")
    prior = question_prior()
    print(f"| VQA accuracy | question-only prior | {' | '.join(fmt(prior[f'vqa_{l}']) for l in LANGS)} | {fmt(prior['vqa'])} |")
    print(f"| counting accuracy | question-only prior | {' | '.join(fmt(prior[f'count_{l}']) for l in LANGS)} | {fmt(prior['count_all'])} |")
    print("| VQA `colour` / `shape` / `position` | question-only prior | " + " | ".join("" for _ in LANGS) +
          f" | {fmt(prior['colour'])} / {fmt(prior['shape'])} / {fmt(prior['position'])} |")
    print("| detection AP@0.5 | mixture / single | " + " | ".join("" for _ in LANGS) +
          f" | {fmt(r['mixture'].get('det_ap50'))} / {fmt(r['detect'].get('det_ap50'))} |")

    # table 2: a larger ViT vs a larger text side at equal added parameters
    print("\n| model | parameters | counting acc. | count en / fr / de / es | caption BLEU-4 | BLEU-4 en / fr / de / es | test loss | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, label in (("cc-base", "default"), ("cc-vit+", "ViT depth 4 -> 8"), ("cc-text+", "T5 3+3 -> 4+4 blocks, d_ff 272")):
        x = r[arm]
        wall = (out / arm / "wall_s").read_text().strip() + " s" if (out / arm / "wall_s").exists() else "—"
        count = " / ".join(fmt(x.get(f"count_acc_{l}")) for l in LANGS)
        bleu = " / ".join(fmt(x.get(f"caption_bleu4_{l}")) for l in LANGS)
        print(f"| {label} | {x.get('params', 0):,} | {fmt(x.get('count_acc'))} | {count} | {fmt(x.get('caption_bleu4'))} | "
              f"{bleu} | {fmt(x.get('test_loss'), False)} | {wall} |")

if __name__ == "__main__":
    main()
