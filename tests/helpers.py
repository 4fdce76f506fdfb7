"""Helpers shared by the model tests: random images, parameter perturbation for parity checks, and empty
stand-ins for torchvision, so timm (and transformers' image utils) import beside the CPU torch build, with
which the PyPI torchvision wheel does not load (parity tests only)."""
import enum
import sys
import types

import torch


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (B, C, H, W) in [-1, 1]


def perturb(model, scale=0.05, seed=0):
    """Make every parameter (zero heads, unit LayerNorms, zero biases) nontrivial for parity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def torchvision_stand_in():
    """timm and transformers' image utils import torchvision; the PyPI torchvision wheel does not load
    with the CPU torch build. Parity needs none of it, so install empty stand-in modules."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop the half-imported package

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def any_name(attr):  # `from torchvision.x import Anything` gets a dummy class
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})

    for name in ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets"]:
        mod = types.ModuleType(name)
        mod.__getattr__ = any_name
        mod.__path__ = []
        mod.InterpolationMode = InterpolationMode
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
