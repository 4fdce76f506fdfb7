"""Throughput, memory and MFU of one training step of any model file.

    python bench.py MODEL [--preset P] [--batch-size B] [--dtype fp32|bf16|fp16] [--compile] [--FIELD VALUE ...]
    python bench.py vit --vs timm       # ours vs timm's VisionTransformer, same config, alternating, same process

Warm-up steps, then --repeats timed runs of --steps training steps (forward, backward, clip, AdamW);
prints the median samples/s (and tokens/s for text), peak memory, the FLOPs of a step (counted by
torch.utils.flop_counter) and, on CUDA, the model FLOPs utilisation against the device's dense bf16 peak.
The last line is one JSON object.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

import data as datasets
import train

# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "A10G": 125, "A10": 125, "L40S": 362,
               "L40": 181, "L4": 121, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65}


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def fake_images(cfg, n, seed=0):
    """Random uint8 images of the model's size: the benchmark measures the step, not the data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, cfg.image_size, cfg.image_size, cfg.channels), dtype=torch.uint8, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return datasets.ImageData("random", x, y, x[:0], y[:0], [str(i) for i in range(cfg.num_classes)])


def make_step(model, loss_fn, batch, dtype, device, clip=1.0):
    """One training step exactly as train.py takes it (autocast forward, backward, clip, AdamW)."""
    opt = train.make_optimizer(model, 1e-4, 0.05, device)
    amp = train.autocast(device, dtype)

    def step():
        with amp:
            loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def flops_of(step_fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step_fn()
    return counter.get_total_flops()


def time_steps(step_fn, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timm_vit(cfg):
    """timm's VisionTransformer at our vit Config (timm's default: fp32 eager). timm imports torchvision,
    whose PyPI build does not load beside the CPU torch: give it a stand-in module (benchmark only)."""
    import importlib.abc
    import importlib.machinery
    import types
    import transformers  # noqa: F401  (import it before the stand-in: it probes torchvision itself)
    try:
        import torchvision  # noqa: F401
    except Exception:  # every torchvision.* module becomes an empty one whose attributes are dummy classes
        class Dummy(type):
            def __getattr__(cls, attr):
                return f"{cls.__name__}.{attr}"

        class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] == "torchvision" else None

            def create_module(self, spec):
                module = types.ModuleType(spec.name)
                module.__file__ = "<stand-in>"
                module.__getattr__ = lambda attr: Dummy(attr, (), {}) if not attr.startswith("__") else None  # noqa: E731
                return module

            def exec_module(self, module):
                module.__path__ = []
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.meta_path.insert(0, StandIn())
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
                             num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
                             mlp_ratio=cfg.mlp_dim / cfg.width, global_pool="token" if cfg.pool == "cls" else "avg",
                             class_token=cfg.pool == "cls", qkv_bias=cfg.qkv_bias)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("model")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: train.py's default")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--vs", choices=["timm"], default=None, help="also time timm's VisionTransformer (vit only)")
    args, rest = p.parse_known_args(argv)
    mod = train.load_module(args.model)
    cfg = train.make_config(mod, args.preset, train.parse_overrides(mod, rest))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = args.dtype or train.default_dtype(device)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    bs = args.batch_size or getattr(mod, "TRAIN", {}).get("batch_size", train.DEFAULTS["batch_size"])
    if getattr(mod, "DATA", "images") != "images":
        raise train.UsageError(f"bench.py has no synthetic data for '{mod.DATA}' models yet")
    data = fake_images(cfg, bs).to(device)
    batch = next(getattr(mod, "batches", train.batches)(data, cfg, "train", bs))
    loss_fn = getattr(mod, "loss", train.loss)

    torch.manual_seed(0)
    model = train.build_model(mod, cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_of(make_step(model, loss_fn, batch, "fp32", device))  # counted once, eager
    runs = {"ours": make_step(torch.compile(model) if use_compile else model, loss_fn, batch, dtype, device)}
    if args.vs == "timm":
        if args.model != "vit":
            raise train.UsageError("--vs timm compares vit only")
        torch.manual_seed(0)
        runs["timm"] = make_step(timm_vit(cfg).to(device), train.loss, batch, "fp32", device)
    for step in runs.values():
        for _ in range(args.warmup):
            step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {k: [] for k in runs}
    for r in range(args.repeats):  # alternate, and swap who goes first: a busy machine slows both alike
        for k, step in (list(runs.items()) if r % 2 == 0 else reversed(runs.items())):
            times[k].append(time_steps(step, args.steps, device))

    res = {"model": args.model, "preset": args.preset, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else f"cpu x{torch.get_num_threads()}", "dtype": dtype, "compile": use_compile,
           "batch_size": bs, "params": n_params, "gflops_per_step": round(flops / 1e9, 3), "flops_per_step": int(flops)}
    for k, ts in times.items():
        t = statistics.median(ts) / args.steps
        res[f"{k}_samples_per_s" if k != "ours" else "samples_per_s"] = round(bs / t, 1)
        if k == "ours":
            res["step_ms"] = round(t * 1000, 2)
            res["tflops"] = round(flops / t / 1e12, 3)
            peak = peak_tflops(device)
            if peak:
                res["mfu"] = round(flops / t / 1e12 / peak, 4)
    if "timm_samples_per_s" in res:
        res["ratio_vs_timm"] = round(res["samples_per_s"] / res["timm_samples_per_s"], 3)
    res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for k, v in res.items():
        print(f"{k:>20}: {v}", file=sys.stderr)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    try:
        main()
    except (train.UsageError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
