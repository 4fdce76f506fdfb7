"""The one training loop, shared by every model file.

    python train.py MODEL [--data NAME_OR_PATH] [--preset P] [--steps N] [--batch-size B] [--lr LR]
                          [--FIELD VALUE ...] [--out DIR] [--resume] [--init CKPT] [--compile/--no-compile]
                          [--dtype fp32|bf16|fp16] [--accum K] [--fsdp]
    torchrun --nproc_per_node=N train.py MODEL ...        # DDP (gloo on CPU, NCCL on GPU); add --fsdp for FSDP2

It knows nothing of any paper. A model file (vit.py, ...) provides
    Config            a dataclass; every field is a command-line flag (--width 256)
    PRESETS           name -> dict of Config overrides (--preset b/16)
    Model(cfg)        the nn.Module
and optionally
    TRAIN             dict of default steps / batch_size / lr / warmup / weight_decay / clip / eval_every
    TRAIN_BY_STAGE    stage -> dict of TRAIN overrides, for a Config with a `stage` field
    DATA              "images" (default), "text" or "corpus": the kind of data.load() it needs
    batches(data, cfg, split, batch_size, step=0, seed=0) -> iterator of dict batches
                      (train: endless, the batch of step s a pure function of (seed, s); test: one pass)
    loss(model, batch) -> (loss, metrics dict)
    evaluate(model, data, cfg) -> dict of floats (the paper's metric)
    diagnostics(model) -> dict of floats, logged with the loss
    adapt_state_dict(state_dict, cfg) -> state_dict, for --init at another configuration (e.g. resolution)
    INIT_FROM         other model names whose checkpoints --init accepts (e.g. ("vit",) for a ViT variant)
    setup(model, cfg, load_checkpoint)  a fresh run's extra checkpoints (a frozen tokenizer, a vision tower, ...)
    predict(model, data, cfg, args) -> dict, for --predict (generate text, detect in an image, answer a question)
Plain image classification (below) is the default for batches / loss / evaluate.
A parameter with an attribute `lr_scale` trains at lr * lr_scale; frozen ones (requires_grad=False) are skipped.
A Config with a `stage` field writes to out/<model>-<stage>-<data>.

Inference on a finished run (--init CKPT, or the checkpoint in --out):
    python train.py MODEL --init CKPT --predict ARG [ARG ...]       # the model's predict(): one JSON line
    python train.py MODEL --init CKPT --eval corruptions [--baseline CKPT]
                      # image classifiers: clean accuracy, accuracy per corruption and severity, mCE vs the baseline

Writes out/<model>-<data>/ckpt.pt (atomic), log.jsonl, results.json; the last stdout line is one JSON object.
On CUDA by default: torch.compile, bf16 autocast, TF32, fused AdamW, data resident on the GPU.
"""
import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

import data as datasets

MODELS = ["vit", "vit22b", "dual_patchnorm", "discrete_vit", "ul2", "dsi", "owlvit", "pali"]
DEFAULTS = dict(steps=1000, batch_size=128, lr=1e-3, warmup=100, weight_decay=0.05, clip=1.0, eval_every=0,
                log_every=10, ckpt_every=0, accum=1, seed=0, sam=0.0)


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# The default task: image classification (random crop + flip on the device, cross-entropy, accuracy)

def _images(x, cfg):
    x = datasets.normalize(x)  # uint8 (B,H,W,C) -> float (B,C,H,W) in [-1, 1]
    if x.shape[-1] != cfg.image_size:  # e.g. 32 px CIFAR fed to a 224 px preset
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    return x


def batches(data, cfg, split, batch_size, step=0, seed=0):
    if split != "train":
        for i in range(0, len(data.x_test), batch_size):
            yield {"image": _images(data.x_test[i:i + batch_size], cfg), "label": data.y_test[i:i + batch_size]}
        return
    n = len(data.x_train)
    per_epoch = n // batch_size
    epoch, perm = -1, None
    while True:
        if step // per_epoch != epoch:  # a fresh permutation every epoch, a pure function of (seed, epoch)
            epoch = step // per_epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        i = step % per_epoch
        idx = perm[i * batch_size:(i + 1) * batch_size].to(data.x_train.device)
        x = data.x_train[idx]
        if data.augment:
            x = datasets.augment(x, torch.Generator().manual_seed(seed * 1_000_003 + step + 1))
        yield {"image": _images(x, cfg), "label": data.y_train[idx]}
        step += 1


def loss(model, batch):
    logits = model(batch["image"])  # (B, K)
    loss = F.cross_entropy(logits.float(), batch["label"])
    return loss, {"acc": (logits.argmax(-1) == batch["label"]).float().mean()}


@torch.no_grad()
def evaluate(model, data, cfg, batch_size=500):
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches(data, cfg, "test", batch_size):
        logits = model(batch["image"]).float()
        loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["label"]).sum().item()
        total += len(batch["label"])
    return {"test_acc": correct / total, "test_loss": loss_sum / total}


# ----------------------------------------------------------------------------------------------------------------
# Command line: the model file's Config fields become flags

def load_module(name):
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise UsageError(f"model '{name}' is not written yet (no {name}.py)")
        raise


def _parse_value(text, typ, field):
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # Optional[X]
        if text.lower() == "none":
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        return typ(text)
    except (TypeError, ValueError):
        raise UsageError(f"--{field} expects {getattr(typ, '__name__', typ)}, got '{text}'")


def parse_overrides(mod, tokens):
    """['--width', '256', '--pool=gap'] -> {'width': 256, 'pool': 'gap'}, typed by the Config's annotations."""
    hints = typing.get_type_hints(mod.Config)
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise UsageError(f"unexpected argument '{tok}'")
        key, _, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key not in hints:
            raise UsageError(f"unknown option --{key} for {mod.__name__}; train options: see --help; "
                             f"{mod.__name__}.Config fields: {', '.join(hints)}")
        if not _:
            i += 1
            if i >= len(tokens):
                raise UsageError(f"--{key} needs a value")
            val = tokens[i]
        out[key] = _parse_value(val, hints[key], key)
        i += 1
    return out


def make_config(mod, preset=None, overrides=None):
    fields = {}
    if preset is not None:
        if preset not in mod.PRESETS:
            raise UsageError(f"unknown preset '{preset}' for {mod.__name__}; choose one of: {', '.join(mod.PRESETS)}")
        fields.update(mod.PRESETS[preset])
    fields.update(overrides or {})
    return mod.Config(**fields)


def build_model(mod, cfg):
    try:
        return mod.Model(cfg)
    except ValueError as e:  # the model file's own validation: one clear line
        raise UsageError(str(e))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                usage="train.py MODEL [options] [--FIELD VALUE ...]")
    p.add_argument("model")
    p.add_argument("--data", default=None, help="shapes | cifar10 | cifar100 | PATH.npz (default: the model's embedded data)")
    p.add_argument("--preset", default=None)
    for k in ("steps", "batch_size", "accum", "warmup", "eval_every", "log_every", "ckpt_every", "seed"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    for k in ("lr", "weight_decay", "clip"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=None)
    p.add_argument("--out", default=None, help="output folder (default out/<model>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from these weights (fine-tuning)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip for image classification (default: the data's own choice)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 under torchrun")
    p.add_argument("--sam", type=float, default=None, metavar="RHO",
                   help="sharpness-aware minimisation with radius RHO (two forward/backward passes per step)")
    p.add_argument("--predict", nargs="+", default=None, metavar="ARG",
                   help="run the model's predict() on these arguments with the weights of --init (or --out)")
    p.add_argument("--eval", choices=["corruptions"], default=None,
                   help="evaluate the weights of --init (or --out) on the corrupted test set")
    p.add_argument("--baseline", default=None, metavar="CKPT", help="--eval corruptions: the model mCE is relative to")
    p.add_argument("--eval-samples", type=int, default=None, help="--eval: use the first N test images")
    p.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this many steps of this invocation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the loop

def default_dtype(device):
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16():
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device, dtype):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def lr_at(step, lr, warmup, steps):
    """Linear warm-up to lr, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model, lr, weight_decay, device):
    """AdamW; weight decay on matrices (dim >= 2: linear/conv kernels, embeddings), not on biases and norm gains.
    Trainable parameters only; one group per (decay, lr_scale) pair, `lr_scale` read from the parameter."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (p.dim() >= 2, float(getattr(p, "lr_scale", 1.0)))
            groups.setdefault(key, []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
              for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def save_atomic(obj, path):
    """torch.save to a temp file, fsync, then rename over `path`: a crash midway leaves the old file intact."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, model_name, also=()):
    """A train.py checkpoint dict (model_name None: from any model), or one clear UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by train.py")
    if model_name is not None and ckpt.get("model_name") != model_name and ckpt.get("model_name") not in also:
        raise UsageError(f"checkpoint {path} is from model '{ckpt.get('model_name')}', not '{model_name}'")
    return ckpt


def split_batch(batch, parts, index):
    """Rows [index/parts, (index+1)/parts) of every tensor in a dict batch."""
    def cut(v):
        if not torch.is_tensor(v):
            return v
        n = len(v) // parts
        return v[index * n:(index + 1) * n]
    return {k: cut(v) for k, v in batch.items()}


class Stop:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits."""
    signum = None

    @classmethod
    def install(cls):
        def handler(signum, frame):
            if cls.signum is not None:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            cls.signum = signum
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------------------------------------------
# Inference on a finished run: --predict and --eval corruptions

def restore(path, model_name, device, overrides=None, also=()):
    """(module, cfg, model in eval mode, checkpoint) from a checkpoint; model_name None accepts any model."""
    ckpt = load_checkpoint(path, model_name, also)
    mod = load_module(ckpt["model_name"])
    cfg = make_config(mod, None, {**ckpt["config"], **(overrides or {})})
    model = build_model(mod, cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"the weights in {path} do not fit this configuration ({str(e).splitlines()[1].strip()[:150]})")
    return mod, cfg, model.to(device).eval(), ckpt


def corruption_benchmark(models, data, seed, log):
    """Accuracy of every model on the clean test set and on each corruption x severity 1..5, all models on
    the same corrupted images; mCE (ImageNet-C): per corruption the summed error over severities, divided by
    the baseline's (the last model), averaged over corruptions, x 100. Relative mCE subtracts clean errors."""
    acc = {}
    for name, (m, cfg, fn) in models.items():
        clean = fn(m, data, cfg)
        if "test_acc" not in clean:
            raise UsageError(f"--eval corruptions needs an image classifier; {name} is not one "
                             f"(its evaluate() reports no test_acc{', stage ' + cfg.stage if hasattr(cfg, 'stage') else ''})")
        acc[name] = {"clean": [clean["test_acc"]]}
    for c in datasets.CORRUPTIONS:
        for s in range(1, 6):
            corrupted = dataclasses.replace(data, x_test=datasets.corrupt(data.x_test, c, s, seed))
            for name, (m, cfg, fn) in models.items():
                acc[name].setdefault(c, []).append(fn(m, corrupted, cfg)["test_acc"])
        log(f"{c:>16}: " + " | ".join(f"{name} " + " ".join(f"{a:.3f}" for a in acc[name][c]) for name in acc))
    errors = {name: {c: [1 - x for x in v] for c, v in a.items()} for name, a in acc.items()}
    berr = errors[list(models)[-1]]
    bclean = berr["clean"][0]
    res = {}
    for name, a in acc.items():
        err = {c: e for c, e in errors[name].items() if c != "clean"}
        clean_err = errors[name]["clean"][0]
        r = {"clean_acc": a["clean"][0], "corrupted_acc": sum(map(sum, map(a.get, err))) / (5 * len(err)),
             "acc": {c: v for c, v in a.items() if c != "clean"}}
        if len(models) > 1:
            ce = {c: sum(e) / max(1e-9, sum(berr[c])) for c, e in err.items()}
            # relative CE is defined only where the baseline degrades at all (else it divides by ~0)
            rce = {c: sum(x - clean_err for x in e) / sum(x - bclean for x in berr[c])
                   for c, e in err.items() if sum(x - bclean for x in berr[c]) > 0}
            r.update(mCE=100 * sum(ce.values()) / len(ce), CE={c: 100 * v for c, v in ce.items()},
                     relative_mCE=100 * sum(rce.values()) / len(rce) if rce else float("nan"),
                     relative_mCE_over=sorted(rce))
        res[name] = r
    return res


def infer(args, mod, overrides, device):
    source = args.init or args.out
    if source is None:
        raise UsageError(f"--{'predict' if args.predict else 'eval'} needs weights: --init CKPT (or --out DIR of a finished run)")
    mod, cfg, model, ckpt = restore(source, args.model, device, overrides, getattr(mod, "INIT_FROM", ()))
    kind = getattr(mod, "DATA", "images")
    data_name = args.data or ckpt["data"]
    data = datasets.load(data_name, kind=kind, image_size=getattr(cfg, "image_size", 32), seed=ckpt["train"]["seed"])
    if args.eval_samples and kind == "images":
        data = dataclasses.replace(data, x_test=data.x_test[:args.eval_samples], y_test=data.y_test[:args.eval_samples])
    data = data.to(device)
    amp = autocast(device, args.dtype or ckpt.get("dtype") or default_dtype(device))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.predict:
        if not hasattr(mod, "predict"):
            raise UsageError(f"{args.model} has no predict(); --predict is for models that generate or detect")
        with torch.no_grad(), amp:
            try:
                result = mod.predict(model, data, cfg, args.predict)
            except ValueError as e:
                raise UsageError(str(e))
        print(json.dumps(result, ensure_ascii=False), flush=True)
        return result
    # --eval corruptions
    if kind != "images":
        raise UsageError(f"--eval corruptions is for image classifiers; {args.model} reads {kind}")
    models = {args.model: (model, cfg, getattr(mod, "evaluate", evaluate))}
    if args.baseline:
        bmod, bcfg, bmodel, _ = restore(args.baseline, None, device)
        if getattr(bmod, "DATA", "images") != "images":
            raise UsageError(f"--baseline {args.baseline} is not an image classifier")
        models["baseline"] = (bmodel, bcfg, getattr(bmod, "evaluate", evaluate))
    log(f"{args.model}: {len(data.x_test)} test images of {data_name}, {len(datasets.CORRUPTIONS)} corruptions x 5 severities"
        f"{' vs the baseline ' + args.baseline if args.baseline else ''}")
    with torch.no_grad(), amp:
        res = corruption_benchmark(models, data, args.seed or 0, log)
    results = {"model": args.model, "checkpoint": str(source), "data": data_name, "test_images": len(data.x_test),
               **res[args.model]}
    if args.baseline:
        results["baseline"] = {"checkpoint": args.baseline, **res["baseline"]}
    log(f"clean acc {results['clean_acc']:.4f} | mean corrupted acc {results['corrupted_acc']:.4f}" +
        (f" | mCE {results['mCE']:.1f} | relative mCE {results['relative_mCE']:.1f} (baseline = 100)" if args.baseline else ""))
    folder = Path(args.out) if args.out and args.init else Path(source) if Path(source).is_dir() else Path(source).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corruptions.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args, rest = parser().parse_known_args(argv)
    mod = load_module(args.model)
    overrides = parse_overrides(mod, rest)

    # distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda asked but no CUDA GPU is visible; use --device cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.fsdp and not distributed:
        raise UsageError("--fsdp needs several processes: torchrun --nproc_per_node=N train.py ... --fsdp")
    main_proc = rank == 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_proc else (lambda *a: None)

    # the run's hyper-parameters: command line > the resumed checkpoint > the model's TRAIN > DEFAULTS
    if args.predict or args.eval:
        return infer(args, mod, overrides, device)
    data_name = args.data or {"text": "stdlib", "corpus": "corpus"}.get(getattr(mod, "DATA", "images"), "shapes")
    cfg = make_config(mod, args.preset, overrides)
    stage = f"-{cfg.stage}" if hasattr(cfg, "stage") else ""
    out = Path(args.out or f"out/{args.model}{stage}-{Path(data_name).stem if '.' in Path(data_name).name else data_name}")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(out, args.model)
    elif (out / "ckpt.pt").exists() and not args.overwrite:
        raise UsageError(f"{out}/ckpt.pt exists: pass --resume to continue it, --overwrite to start afresh, or --out DIR")
    hp = {**DEFAULTS, **getattr(mod, "TRAIN", {}), **getattr(mod, "TRAIN_BY_STAGE", {}).get(getattr(cfg, "stage", None), {})}
    if ckpt:
        hp.update(ckpt["train"])
        data_name = args.data or ckpt["data"]
    for k in DEFAULTS:
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    steps, bs, accum = hp["steps"], hp["batch_size"], hp["accum"]
    if bs % (world * accum):
        raise UsageError(f"--batch-size {bs} is not divisible by processes x accumulation = {world * accum}")
    dtype = args.dtype or (ckpt and ckpt["dtype"]) or default_dtype(device)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"

    # data: the whole dataset goes to the device once (uint8 images are small), batches are cut there
    kind = getattr(mod, "DATA", "images")
    with torch.device("meta"):
        build_model(mod, cfg)  # validate the configuration before any data is made or downloaded
    data = datasets.load(data_name, kind=kind, image_size=getattr(cfg, "image_size", 32), seed=hp["seed"])
    if kind == "images" and "num_classes" not in overrides:
        overrides["num_classes"] = data.num_classes  # the head follows the data unless --num_classes is given
        cfg = make_config(mod, args.preset, overrides)
    if ckpt:
        saved = make_config(mod, None, ckpt["config"])
        changed = [k for k in overrides if getattr(saved, k) != getattr(cfg, k)]
        if changed or args.preset:
            raise UsageError(f"--resume continues the saved configuration; cannot change {', '.join(changed) or '--preset'}")
        cfg = saved
    if kind == "images":
        if data.x_train.shape[-1] != cfg.channels:
            raise UsageError(f"data '{data_name}' has {data.x_train.shape[-1]} channels, the model expects {cfg.channels}")
        if data.num_classes > cfg.num_classes:
            raise UsageError(f"data '{data_name}' has {data.num_classes} classes, the model's head only {cfg.num_classes}")
    if args.augment is not None:
        data = dataclasses.replace(data, augment=args.augment)
    data = data.to(device)

    torch.manual_seed(hp["seed"])
    model = build_model(mod, cfg).to(device)
    if hasattr(mod, "setup") and not ckpt:  # e.g. a frozen tokenizer or tower from another checkpoint
        try:
            mod.setup(model, cfg, lambda path, name=args.model: load_checkpoint(path, name))
        except ValueError as e:
            raise UsageError(str(e))
    if args.init and not ckpt:
        init = load_checkpoint(args.init, args.model, also=getattr(mod, "INIT_FROM", ()))
        sd = init["model"]
        if hasattr(mod, "adapt_state_dict"):
            sd = mod.adapt_state_dict(sd, cfg)
        own = model.state_dict()
        fresh = [k for k in own if k not in sd or sd[k].shape != own[k].shape]
        model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in fresh}, strict=False)
        log(f"initialised from {args.init}" + (f"; freshly initialised: {', '.join(fresh)}" if fresh else ""))
    if ckpt:
        model.load_state_dict(ckpt["model"])
    n_params = sum(p.numel() for p in model.parameters())

    raw = model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for m in list(model.modules()):
            if isinstance(m, torch.nn.ModuleList):  # shard every block, then the rest
                for block in m:
                    fully_shard(block)
        fully_shard(model)
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(raw, hp["lr"], hp["weight_decay"], device)
    if ckpt:
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(raw, opt, model_state_dict={}, optim_state_dict=ckpt["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
    step = ckpt["step"] if ckpt else 0
    fwd = torch.compile(model) if use_compile else model

    batches_fn = getattr(mod, "batches", batches)
    loss_fn = getattr(mod, "loss", loss)
    evaluate_fn = getattr(mod, "evaluate", evaluate)
    diagnostics_fn = getattr(mod, "diagnostics", None)
    amp = autocast(device, dtype)

    def state():
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            msd, osd = get_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            msd, osd = raw.state_dict(), opt.state_dict()
        return {"model": msd, "optimizer": osd, "step": step, "model_name": args.model, "data": data_name,
                "config": dataclasses.asdict(cfg), "train": hp, "dtype": dtype, "rng": torch.get_rng_state()}

    def checkpoint():
        s = state()  # every rank takes part in gathering FSDP shards
        if main_proc:
            save_atomic(s, out / "ckpt.pt")
        if distributed:
            torch.distributed.barrier()

    def run_eval():
        raw.eval()
        with amp:
            metrics = evaluate_fn(fwd, data, cfg)
        raw.train()
        return {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v) for k, v in metrics.items()}

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        logs = [l for l in (out / "log.jsonl").read_text().splitlines() if json.loads(l)["step"] <= step] \
            if ckpt and (out / "log.jsonl").exists() else []
        (out / "log.jsonl").write_text("".join(l + "\n" for l in logs))
    size = (f"{len(data.x_train):,} train images" if hasattr(data, "x_train") else
            f"{data.n_train_docs:,} train documents, {len(data.train):,} tokens" if hasattr(data, "n_train_docs") else
            f"{data.num_docs:,} documents, {len(data.queries):,} queries" if hasattr(data, "num_docs") else "")
    log(f"{args.model}: {n_params:,} parameters | data {data_name} ({size}) | "
        f"{device.type} {dtype}{' compiled' if use_compile else ''} | {world} process(es){' fsdp' if args.fsdp else ''} | "
        f"batch {bs} x {steps} steps, lr {hp['lr']} | out {out}")

    Stop.install()
    it = batches_fn(data, cfg, "train", bs, step=step, seed=hp["seed"])
    eval_every = hp["eval_every"] or max(1, steps // 5)
    bar = None
    if main_proc and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=step, dynamic_ncols=True, file=sys.stderr)
    new_window = lambda: {"loss": torch.zeros((), device=device), "n": 0, "samples": 0, "tokens": 0, "metrics": {}}
    window, t0, stop_at, last = new_window(), time.time(), (step + args.stop_after if args.stop_after else None), {}

    def forward_backward(mine, window):
        """Gradients of one global batch, in `accum` micro-batches; the loss and metrics go to `window`."""
        for micro in range(accum):
            part = split_batch(mine, accum, micro)
            no_sync = micro < accum - 1 and hasattr(model, "no_sync")  # DDP: all-reduce gradients once, at the end
            with model.no_sync() if no_sync else contextlib.nullcontext():
                with amp:
                    l, metrics = loss_fn(fwd, part)
                (l / accum).backward()
            if window is None:
                continue
            window["loss"] += l.detach().float() / accum
            window["tokens"] += int(metrics.pop("tokens", 0)) * world  # text models report tokens per micro-batch
            for k, v in metrics.items():
                window["metrics"][k] = window["metrics"].get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach() / accum
    raw.train()
    while step < steps:
        lr = lr_at(step, hp["lr"], hp["warmup"], steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        try:
            batch = next(it)
        except ValueError as e:  # the model file's check of data against config (e.g. a vocabulary too small)
            raise UsageError(str(e))
        mine = split_batch(batch, world, rank)  # this process's rows of the global batch
        forward_backward(mine, window)
        if hp["sam"]:  # SAM: the gradient at the worst nearby point w + rho g/|g| updates w
            params = [p for p in raw.parameters() if p.grad is not None]
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                eps = [p.grad * (hp["sam"] / (norm + 1e-12)) for p in params]
                torch._foreach_add_(params, eps)
            opt.zero_grad(set_to_none=True)
            forward_backward(mine, None)
            with torch.no_grad():
                torch._foreach_sub_(params, eps)
        if hp["clip"]:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), hp["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window["n"] += 1
        window["samples"] += bs
        if bar:
            bar.update(1)

        if step % hp["log_every"] == 0 or step == steps or Stop.signum or step == stop_at:
            vals = torch.stack([window["loss"]] + [v.to(device) for v in window["metrics"].values()]) / window["n"]
            if distributed:
                torch.distributed.all_reduce(vals)
                vals /= world
            vals = vals.tolist()
            if not math.isfinite(vals[0]):
                log(f"error: the loss became {vals[0]} at step {step} (try a lower --lr or --clip); "
                    f"the last good checkpoint is kept in {out}/ckpt.pt")
                if distributed:
                    torch.distributed.destroy_process_group()
                sys.exit(1)
            dt = time.time() - t0
            rec = {"step": step, "loss": vals[0], "lr": lr, **dict(zip(window["metrics"], vals[1:]))}
            rec["samples_per_s"] = window["samples"] / dt
            if window["tokens"]:
                rec["tokens_per_s"] = window["tokens"] / dt
            if diagnostics_fn:
                rec.update({k: float(v) for k, v in diagnostics_fn(raw).items()})
            if step % eval_every == 0 or step == steps:
                rec.update(run_eval())
            last = rec
            if main_proc:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", **{
                        k: f"{rec[k]:.4g}" for k in ("samples_per_s", "tokens_per_s", "test_acc") if k in rec})
            window, t0 = new_window(), time.time()

        if (hp["ckpt_every"] and step % hp["ckpt_every"] == 0) or step == steps:
            checkpoint()
        stop = Stop.signum is not None or step == stop_at
        if distributed and step % hp["log_every"] == 0:  # a signal may reach the processes at different steps
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.all_reduce(flag)
            stop = flag.item() > 0
        if stop and step < steps:
            checkpoint()
            if bar:
                bar.close()
            log(f"stopped at step {step}; checkpoint saved in {out}/ckpt.pt (continue with --resume)")
            if distributed:
                torch.distributed.destroy_process_group()
            sys.exit(0 if Stop.signum is None else 128 + Stop.signum)
    if bar:
        bar.close()

    results = {"model": args.model, "data": data_name, "steps": step, "params": n_params}
    results.update({k: v for k, v in last.items() if k not in ("step", "lr") and not isinstance(v, list)})
    if "test_acc" not in last and "test_loss" not in last:
        results.update(run_eval())
    if main_proc:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results), flush=True)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
