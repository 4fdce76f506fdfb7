"""Every data source of the project: procedural, downloaded, and the user's own files.

Image sources, `load(name, kind="images", image_size=32, seed=0) -> ImageData`:

  shapes     embedded default, no download: procedural scenes drawn with numpy (seeded, fast).
             10 classes = the shape of the main object; colour, size, position, rotation, the
             textured background and 0-2 small distractor objects are nuisances.
             50,000 train / 10,000 test images at any image_size.
             The same generator also gives multi-object scenes (`shapes_scenes`) with boxes
             (`detection_targets`), captions (`caption`) and question-answer pairs (`vqa`)
             in English, French, German and Spanish.
  cifar10    https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, 10 classes, 50k/10k, 32x32.
  cifar100   https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, 100 (fine) classes.
             Downloaded once into the cache folder ($ZOO_CACHE, default ~/.cache/vitzoo), MD5
             checked before anything is parsed, extracted safely, parsed with numpy and cached as
             one .npz (later loads are instant). CIFAR is always returned at 32x32 whatever
             image_size asks for: train.py resizes on the device.
  PATH.npz   the user's own arrays: x uint8 (N,H,W,C) or (N,H,W), y int (N,); optional x_test,
             y_test (else a seeded 90/10 split) and classes (strings).

Scenes, `load("shapes", kind="scenes", image_size) -> SceneData` (owlvit.py, pali.py): 10,000 train /
1,000 test multi-object scenes with per-object boxes and names, captions and questions in en/fr/de/es,
and the tokenizer.

Text, `kind="text"` (ul2.py), and retrieval corpora, `kind="corpus"` (dsi.py): see their sections below.

The byte tokenizer (`ByteTokenizer`): UTF-8 bytes + pad/eos/unk, UL2's mode tokens, optional coordinate
tokens and T5-style sentinels at the top of the vocabulary; no vocabulary file.

Helpers for the models: `normalize` (uint8 images -> float in [-1, 1], channels first) and
`augment` (random crop with zero padding + horizontal flip, on the images' device).
"""

import functools
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view


class DataError(Exception):
    """A data problem the user can fix; the message is one line saying what to do."""


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor  # (N, H, W, C) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, H, W, C) uint8
    y_test: torch.Tensor  # (M,) int64
    classes: list[str]
    augment: bool = True  # random crop + flip while training (off for shapes: its scenes are random already)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device) -> "ImageData":
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))


IMAGE_SOURCES = ("shapes", "cifar10", "cifar100", "PATH.npz")
TEXT_SOURCES = ("stdlib", "shakespeare", "PATH.txt", "PATH.jsonl")


def load(name: str, kind: str = "images", image_size: int = 32, seed: int = 0):
    """Load a data source by name (see the module docstring). kind: images | scenes | text | corpus."""
    if kind == "scenes":
        return _load_scenes(name, image_size, seed)
    if kind == "text":
        return _load_text(name, seed)
    if kind == "corpus":
        return _load_corpus(name, seed)
    if kind != "images":
        raise DataError(f"unknown data kind '{kind}': choose one of images, scenes, text, corpus")
    if name == "shapes":
        if image_size < 8:
            raise DataError(f"shapes needs image_size >= 8, got {image_size}")
        x, y = shapes_classification(50_000, image_size, seed, split="train")
        xt, yt = shapes_classification(10_000, image_size, seed, split="test")
        t = torch.from_numpy
        return ImageData("shapes", t(x), t(y), t(xt), t(yt), list(SHAPES), augment=False)
    if name in SOURCES:
        return _load_cifar(name)
    if name.endswith(".npz"):
        return _load_npz(name, seed)
    if name in TEXT_SOURCES[:2] or name.endswith((".txt", ".jsonl")):
        raise DataError(f"'{name}' is a text source and this model reads images "
                        f"(image sources: {', '.join(IMAGE_SOURCES)})")
    raise DataError(f"unknown data '{name}': choose one of {', '.join(IMAGE_SOURCES)}")


# ----------------------------------------------------------------------------------------------
# Model-side helpers: normalize and augment

def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,C) -> float32 (B,C,H,W) in [-1, 1], as big_vision / HF ViT: (x/255 - 0.5) / 0.5."""
    x = x.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W) uint8
    return (x.float() / 255 - 0.5) / 0.5


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop from the zero-padded image + random horizontal flip, all images at once.

    x: uint8 (B,H,W,C) on any device. The random numbers come from the CPU `generator` (a few
    bytes, then moved), so the result depends only on the generator state, not on the device.
    """
    B, H, W, C = x.shape
    shift = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator).to(x.device)  # (B, 2) top-left of the crop
    mirror = (torch.rand(B, generator=generator) < 0.5).to(x.device)  # (B,)
    if pad == 0 and not flip:
        return x
    xp = x.new_zeros(B, H + 2 * pad, W + 2 * pad, C)  # (B, H+2p, W+2p, C)
    xp[:, pad:pad + H, pad:pad + W] = x
    rows = shift[:, :1] + torch.arange(H, device=x.device)  # (B, H)
    cols = shift[:, 1:] + torch.arange(W, device=x.device)  # (B, W)
    if flip:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


# ----------------------------------------------------------------------------------------------
# shapes: the vocabulary

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "ellipse", "crescent", "heart")
COLOURS = {  # name -> RGB; each object gets +-20 jitter per channel
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 210, 40),
    "orange": (245, 140, 20), "purple": (140, 60, 190), "white": (240, 240, 240), "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
MAIN_SIZE = (0.5, 0.8)  # classification: diameter of the main object, as a fraction of the image side
DISTRACTOR_SIZE = (0.12, 0.22)  # and of the small distractors
SCENE_SIZE = (0.2, 0.4)  # scenes: diameter of each object
ROTATION = 20  # objects are tilted by a random angle in [-ROTATION, ROTATION] degrees (180: any angle,
#                 but then a square is also a diamond and learning is much slower)
_RGB = np.array(list(COLOURS.values()), np.float32)  # (8, 3)

# ----------------------------------------------------------------------------------------------
# shapes: signed distance functions
# Each takes local coordinates (u, v) in units of the object's radius (the shape fits inside the
# unit circle, v points down) and returns the signed distance to the outline in the same units:
# negative inside. Formulas after Inigo Quilez, "2D distance functions". The pixel coverage is
# clip(0.5 - distance_in_pixels, 0, 1): a one-pixel anti-aliased edge.

def _length(x, y):
    return np.sqrt(x * x + y * y)


def _box(u, v, bx, by):
    qx, qy = np.abs(u) - bx, np.abs(v) - by
    return _length(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _triangle(u, v):  # equilateral, vertices on the unit circle
    k, r = 3 ** 0.5, 3 ** 0.5 / 2  # r = half the side
    x, y = np.abs(u) - r, v + r / k
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0)
    return -_length(x, y) * np.sign(y)


def _star(u, v, rf=0.45):  # five points on the unit circle, inner radius set by rf
    kx, ky = 0.809016994375, -0.587785252292
    x, y = np.abs(u), v
    d = 2 * np.maximum(kx * x + ky * y, 0)
    x, y = x - d * kx, y - d * ky
    d = 2 * np.maximum(-kx * x + ky * y, 0)
    x, y = x + d * kx, y - d * ky
    x, y = np.abs(x), y - 1
    bx, by = -rf * ky, rf * kx - 1
    h = np.clip((x * bx + y * by) / (bx * bx + by * by), 0, 1)
    return _length(x - bx * h, y - by * h) * np.sign(y * bx - x * by)


def _rhombus(u, v, bx=0.6, by=1.0):  # half-diagonals bx, by
    x, y = np.abs(u), np.abs(v)
    h = np.clip(((bx - 2 * x) * bx - (by - 2 * y) * by) / (bx * bx + by * by), -1, 1)
    return _length(x - 0.5 * bx * (1 - h), y - 0.5 * by * (1 + h)) * np.sign(x * by + y * bx - bx * by)


def _ellipse(u, v, a=1.0, b=0.5):  # semi-axes a, b; a first-order approximation of the distance
    k0 = _length(u / a, v / b)
    k1 = np.maximum(_length(u / (a * a), v / (b * b)), 1e-6)
    return k0 * (k0 - 1) / k1


def _heart(u, v, s=0.635, c=0.62):  # Quilez's heart (point at the origin, lobes up) scaled by s around (0, c)
    x, y = np.abs(u) * s, c - v * s
    upper = _length(x - 0.25, y - 0.75) - 2 ** 0.5 / 4
    t = np.maximum(x + y, 0) / 2
    lower = np.sqrt(np.minimum(x * x + (y - 1) ** 2, (x - t) ** 2 + (y - t) ** 2)) * np.sign(x - y)
    return np.where(x + y > 1, upper, lower) / s


SDF = {
    "circle": lambda u, v: _length(u, v) - 1,
    "square": lambda u, v: _box(u, v, 0.7071, 0.7071),
    "triangle": _triangle,
    "star": _star,
    "cross": lambda u, v: np.minimum(_box(u, v, 0.96, 0.27), _box(u, v, 0.27, 0.96)),
    "ring": lambda u, v: np.abs(_length(u, v) - 0.72) - 0.28,
    "diamond": _rhombus,
    "ellipse": _ellipse,
    "crescent": lambda u, v: np.maximum(_length(u, v) - 1, 0.8 - _length(u - 0.45, v)),
    "heart": _heart,
}

# ----------------------------------------------------------------------------------------------
# shapes: the renderer
# Objects are given as flat arrays over all objects of a batch of images (img, slot, shape,
# colour, rgb, cx, cy, r, angle). Slot j is the j-th object of its image: slots are drawn in order,
# so later objects occlude earlier ones. Within a slot every image has at most one object, so all
# objects of one (slot, shape) pair are drawn at once, each in a small window around it.

@functools.cache
def _basis(size):
    """28 smooth images (28, H*W): constant, x and y ramps (a colour gradient) and a 5x5 grid of
    bilinear bumps (a low-frequency texture). A background is one linear combination per channel."""
    f32 = np.float32
    ramp = (np.arange(size, dtype=f32) + 0.5) / size - 0.5  # (H,) in (-0.5, 0.5)
    bump = np.maximum(0, 1 - np.abs(np.linspace(0, 4, size, dtype=f32)[:, None] - np.arange(5)))  # (H, 5)
    gx, gy = np.meshgrid(ramp, ramp)  # (H, W)
    texture = (bump[:, None, :, None] * bump[None, :, None, :]).reshape(size * size, 25)  # (H*W, 25)
    return np.concatenate([np.ones((1, size * size), f32), gx.reshape(1, -1), gy.reshape(1, -1), texture.T]).astype(f32)


def _background(rng, n, size):
    """Random backgrounds (n, 3, H, W) float32 in ~[40, 215]: a gradient between two desaturated
    colours in a random direction, plus a smooth grey texture."""
    f32 = np.float32
    ends = rng.uniform(70, 180, (n, 2, 1)) + rng.uniform(-25, 25, (n, 2, 3))  # (n, 2, 3) two colours
    angle = rng.uniform(0, 2 * np.pi, (n, 1))
    coef = np.empty((n, 3, 28), f32)  # per image and channel: weights of the 28 basis images
    coef[:, :, 0] = ends.mean(1)
    coef[:, :, 1] = (ends[:, 1] - ends[:, 0]) * np.cos(angle)
    coef[:, :, 2] = (ends[:, 1] - ends[:, 0]) * np.sin(angle)
    coef[:, :, 3:] = (rng.uniform(-1, 1, (n, 25)) * rng.uniform(5, 25, (n, 1)))[:, None, :]
    return (coef.reshape(n * 3, 28) @ _basis(size)).reshape(n, 3, size, size)


def _render(objs, n, size, rng, plain=None, noise=8.0):
    """Draw objects on n backgrounds. Returns images uint8 (n,H,W,3) and boxes int (K,4).

    A box is (x0, y0, x1, y1) in pixels, x1/y1 exclusive: the pixels the object covers by more
    than half (before occlusion by later objects). `plain` = a flat background grey level and
    `noise` = the pixel noise amplitude (tests draw on a plain, noise-free background)."""
    f32 = np.float32
    img = _background(rng, n, size) if plain is None else np.full((n, 3, size, size), plain, f32)  # (n, 3, H, W)
    boxes = np.zeros((len(objs["img"]), 4), np.int64)
    for slot in np.unique(objs["slot"]):
        for k, shape in enumerate(SHAPES):
            sel = np.flatnonzero((objs["slot"] == slot) & (objs["shape"] == k))
            if len(sel) == 0:
                continue
            idx, cx, cy, r, a = (objs[key][sel] for key in ("img", "cx", "cy", "r", "angle"))
            w = int(min(size, np.ceil(2 * r.max() + 3)))  # window side; holds the object and its soft edge
            ox = np.clip(np.floor(cx - w / 2), 0, size - w).astype(np.int64)  # (m,) window corner
            oy = np.clip(np.floor(cy - w / 2), 0, size - w).astype(np.int64)
            px = np.arange(w, dtype=f32) + 0.5
            dx = (ox[:, None] + px - cx[:, None])[:, None, :]  # (m, 1, w) pixel centre - object centre
            dy = (oy[:, None] + px - cy[:, None])[:, :, None]  # (m, w, 1)
            cos, sin = (np.cos(a) / r)[:, None, None], (np.sin(a) / r)[:, None, None]
            u = cos * dx + sin * dy  # (m, w, w) rotated, in units of r
            v = cos * dy - sin * dx
            alpha = np.clip(0.5 - SDF[shape](u, v) * r[:, None, None], 0, 1)  # (m, w, w) pixel coverage
            # composite into the windows (later objects over earlier ones)
            windows = sliding_window_view(img, (w, w), axis=(2, 3), writeable=True)  # (n, 3, H-w+1, W-w+1, w, w)
            win = windows[idx, :, oy, ox]  # (m, 3, w, w) a copy; one object per image, so no overlaps
            win += alpha[:, None] * (objs["rgb"][sel][:, :, None, None] - win)
            windows[idx, :, oy, ox] = win
            # tight box of the pixels covered by more than half
            inside = alpha > 0.5
            on_x, on_y = inside.any(1), inside.any(2)  # (m, w)
            boxes[sel, 0] = ox + on_x.argmax(1)
            boxes[sel, 1] = oy + on_y.argmax(1)
            boxes[sel, 2] = ox + w - on_x[:, ::-1].argmax(1)
            boxes[sel, 3] = oy + w - on_y[:, ::-1].argmax(1)
            empty = ~on_x.any(1)  # nothing covered by half a pixel (tiny sliver): use the circle's box
            if empty.any():
                e = sel[empty]
                boxes[e] = np.stack([cx[empty] - r[empty], cy[empty] - r[empty], cx[empty] + r[empty],
                                     cy[empty] + r[empty]], 1).round().clip(0, size)
    if noise:
        img += rng.uniform(-noise, noise, (n, 1, size, size)).astype(f32)  # grey pixel noise
    np.clip(img + 0.5, 0, 255, out=img)  # + 0.5, then astype truncates: rounding
    return img.astype(np.uint8).transpose(0, 2, 3, 1).copy(), boxes  # (n, H, W, 3)


def _objects(rng, img, slot, shape, cx, cy, r):
    """Random colour (with jitter) and rotation for the given objects; returns the object arrays."""
    f32 = np.float32
    colour = rng.integers(0, len(COLOURS), len(img))
    rgb = np.clip(_RGB[colour] + rng.uniform(-20, 20, (len(img), 3)).astype(f32), 0, 255)
    angle = np.radians(rng.uniform(-ROTATION, ROTATION, len(img))).astype(f32)
    return dict(img=img, slot=slot, shape=shape, colour=colour, rgb=rgb, cx=cx.astype(f32),
                cy=cy.astype(f32), r=r.astype(f32), angle=angle)


def _chunks(n, size):
    """Split n images into chunks of ~2M pixels (bounded memory at any image size)."""
    step = max(1, (1 << 21) // (size * size))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


# ----------------------------------------------------------------------------------------------
# shapes: the views

def shapes_classification(n: int, image_size: int = 32, seed: int = 0, split: str = "train",
                          distractors: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 (n,H,W,3) and labels int64 (n,): the shape of the one large object.

    The main object (MAIN_SIZE of the image side, fully inside, any colour, tilted by up to
    ROTATION degrees) is drawn over 0..`distractors` small objects (DISTRACTOR_SIZE, anywhere).
    Labels are balanced within each chunk. `split` picks an independent random stream."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    xs, ys = [], []
    for start, stop in _chunks(n, image_size):
        m, s = stop - start, image_size
        label = rng.permutation(np.arange(m) % len(SHAPES))
        # distractors: slots 0..distractors-1, each present with the image's count
        count = rng.integers(0, distractors + 1, m)
        img_d, slot_d = np.nonzero(np.arange(distractors) < count[:, None])  # (kd,) image and slot of each
        kd = len(img_d)
        small = dict(img=img_d, slot=slot_d, shape=rng.integers(0, len(SHAPES), kd),
                     cx=rng.uniform(0, s, kd), cy=rng.uniform(0, s, kd), r=rng.uniform(*DISTRACTOR_SIZE, kd) * s / 2)
        # the main object: last slot, drawn over the distractors
        r = rng.uniform(*MAIN_SIZE, m) * s / 2  # radius in pixels
        main = dict(img=np.arange(m), slot=np.full(m, distractors), shape=label,
                    cx=rng.uniform(r, s - r), cy=rng.uniform(r, s - r), r=r)
        parts = [_objects(rng, **small), _objects(rng, **main)]
        objs = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        x, _ = _render(objs, m, s, rng)
        xs.append(x)
        ys.append(label)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def shapes_scenes(n: int, image_size: int = 64, seed: int = 0, min_objects: int = 1,
                  max_objects: int = 4) -> tuple[np.ndarray, list[list[dict]]]:
    """n scenes of min..max objects (SCENE_SIZE of the side, fully inside, overlaps kept small).

    Returns images uint8 (n,H,W,3) and per image a list of objects in drawing order, each a dict:
    shape, colour, name ("red circle"), size (diameter in pixels), cx, cy (centre in pixels),
    angle (degrees), box (x0, y0, x1, y1) in pixels (x1, y1 exclusive, inside the image),
    image_size."""
    if not 1 <= min_objects <= max_objects:
        raise DataError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    rng = np.random.default_rng([seed, 2])
    images, scenes = [], []
    for start, stop in _chunks(n, image_size):
        m, s = stop - start, image_size
        count = rng.integers(min_objects, max_objects + 1, m)
        r = rng.uniform(*SCENE_SIZE, (m, max_objects)) * s / 2  # radius in pixels
        pos = np.zeros((m, max_objects, 2))
        for j in range(max_objects):  # place each object at the best of 8 tries: farthest from the others
            tries = rng.uniform(r[:, j, None, None], s - r[:, j, None, None], (m, 8, 2))
            gap = np.linalg.norm(tries[:, :, None] - pos[:, None, :j], axis=-1) - r[:, None, :j] - r[:, j, None, None]
            best = gap.min(2).argmax(1) if j else np.zeros(m, np.int64)
            pos[:, j] = tries[np.arange(m), best]
        img, slot = np.nonzero(np.arange(max_objects) < count[:, None])  # present objects, in order
        objs = _objects(rng, img, slot, rng.integers(0, len(SHAPES), len(img)),
                        pos[img, slot, 0], pos[img, slot, 1], r[img, slot])
        x, boxes = _render(objs, m, s, rng)
        images.append(x)
        chunk = [[] for _ in range(m)]
        for k in range(len(img)):
            shape, colour = SHAPES[objs["shape"][k]], COLOUR_NAMES[objs["colour"][k]]
            chunk[img[k]].append(dict(
                shape=shape, colour=colour, name=f"{colour} {shape}", size=round(2 * float(objs["r"][k]), 2),
                cx=round(float(objs["cx"][k]), 2), cy=round(float(objs["cy"][k]), 2),
                angle=round(float(np.degrees(objs["angle"][k])), 1), box=tuple(int(b) for b in boxes[k]),
                image_size=s))
        scenes += chunk
    return np.concatenate(images), scenes


def detection_targets(scenes: list[list[dict]]) -> tuple[list[np.ndarray], list[list[str]]]:
    """Per image: boxes float32 (k, 4) as (x0, y0, x1, y1) in pixels, and the k names ("red circle")."""
    boxes = [np.array([o["box"] for o in sc], np.float32).reshape(-1, 4) for sc in scenes]
    return boxes, [[o["name"] for o in sc] for sc in scenes]


# ----------------------------------------------------------------------------------------------
# shapes: captions and questions in four languages
# Nouns are (singular, plural, gender); French/Spanish colours are (m. sg, f. sg, m. pl, f. pl);
# German colours are (answer word, adjective stem) and take the ending of the article.

LANGS = ("en", "fr", "de", "es")
NOUNS = {
    "en": {s: (s, s + ("es" if s == "cross" else "s"), "") for s in SHAPES},
    "fr": dict(circle=("cercle", "cercles", "m"), square=("carré", "carrés", "m"),
               triangle=("triangle", "triangles", "m"), star=("étoile", "étoiles", "f"), cross=("croix", "croix", "f"), ring=("anneau", "anneaux", "m"),
               diamond=("losange", "losanges", "m"), ellipse=("ellipse", "ellipses", "f"),
               crescent=("croissant", "croissants", "m"), heart=("cœur", "cœurs", "m")),
    "de": dict(circle=("Kreis", "Kreise", "m"), square=("Quadrat", "Quadrate", "n"),
               triangle=("Dreieck", "Dreiecke", "n"), star=("Stern", "Sterne", "m"), cross=("Kreuz", "Kreuze", "n"), ring=("Ring", "Ringe", "m"),
               diamond=("Raute", "Rauten", "f"), ellipse=("Ellipse", "Ellipsen", "f"),
               crescent=("Halbmond", "Halbmonde", "m"), heart=("Herz", "Herzen", "n")),
    "es": dict(circle=("círculo", "círculos", "m"), square=("cuadrado", "cuadrados", "m"),
               triangle=("triángulo", "triángulos", "m"), star=("estrella", "estrellas", "f"), cross=("cruz", "cruces", "f"), ring=("anillo", "anillos", "m"),
               diamond=("rombo", "rombos", "m"), ellipse=("elipse", "elipses", "f"),
               crescent=("media luna", "medias lunas", "f"), heart=("corazón", "corazones", "m")),
}
ADJECTIVES = {
    "en": {c: c for c in COLOURS},
    "fr": dict(red=("rouge", "rouge", "rouges", "rouges"), green=("vert", "verte", "verts", "vertes"),
               blue=("bleu", "bleue", "bleus", "bleues"), yellow=("jaune", "jaune", "jaunes", "jaunes"),
               orange=("orange",) * 4, purple=("violet", "violette", "violets", "violettes"),
               white=("blanc", "blanche", "blancs", "blanches"), black=("noir", "noire", "noirs", "noires")),
    "de": dict(red=("rot", "rot"), green=("grün", "grün"), blue=("blau", "blau"), yellow=("gelb", "gelb"),
               orange=("orange", "orangefarben"), purple=("violett", "violett"), white=("weiß", "weiß"),
               black=("schwarz", "schwarz")),
    "es": dict(red=("rojo", "roja", "rojos", "rojas"), green=("verde", "verde", "verdes", "verdes"),
               blue=("azul", "azul", "azules", "azules"), yellow=("amarillo", "amarilla", "amarillos", "amarillas"),
               orange=("naranja",) * 4, purple=("morado", "morada", "morados", "moradas"),
               white=("blanco", "blanca", "blancos", "blancas"), black=("negro", "negra", "negros", "negras")),
}
NUMBERS = {  # 2..10 (one is the article)
    "en": "two three four five six seven eight nine ten".split(),
    "fr": "deux trois quatre cinq six sept huit neuf dix".split(),
    "de": "zwei drei vier fünf sechs sieben acht neun zehn".split(),
    "es": "dos tres cuatro cinco seis siete ocho nueve diez".split(),
}
AND = dict(en="and", fr="et", de="und", es="y")
PLACES = dict(en=("left", "right", "top", "bottom"), fr=("gauche", "droite", "haut", "bas"),
              de=("links", "rechts", "oben", "unten"), es=("izquierda", "derecha", "arriba", "abajo"))
QUESTIONS = {  # {the} = definite noun phrase, {obj} = definite "colour shape" phrase
    "en": dict(colour="what colour is {the}?", shape="what shape is the {adj} object?",
               total="how many objects are there?", by_shape="how many {pl} are there?",
               by_colour="how many {adj} objects are there?",
               x="is {obj} on the left or on the right?", y="is {obj} at the top or at the bottom?"),
    "fr": dict(colour="de quelle couleur est {the} ?", shape="quelle est la forme de l'objet {adj} ?",
               total="combien d'objets y a-t-il ?", by_shape="combien {de_pl} y a-t-il ?",
               by_colour="combien d'objets {adj_pl} y a-t-il ?",
               x="{obj} est-{pron} à gauche ou à droite ?", y="{obj} est-{pron} en haut ou en bas ?"),
    "de": dict(colour="welche Farbe hat {the}?", shape="welche Form hat das {adj}e Objekt?",
               total="wie viele Objekte gibt es?", by_shape="wie viele {pl} gibt es?",
               by_colour="wie viele {adj}e Objekte gibt es?",
               x="ist {obj} links oder rechts?", y="ist {obj} oben oder unten?"),
    "es": dict(colour="¿de qué color es {the}?", shape="¿qué forma tiene el objeto {adj}?",
               total="¿cuántos objetos hay?", by_shape="¿{how_many} {pl} hay?",
               by_colour="¿cuántos objetos {adj_pl} hay?",
               x="¿{obj} está a la izquierda o a la derecha?", y="¿{obj} está arriba o abajo?"),
}
_VOWEL = tuple("aeiouhéèêœ")
_FEM = {"f": 1, "m": 0, "n": 0, "": 0}


def _colour_word(colour, lang):
    """The colour as an answer: the base (masculine singular) form."""
    a = ADJECTIVES[lang][colour]
    return a if isinstance(a, str) else a[0]


def _adj_sg(colour, lang):
    """The colour as an adjective before/after a masculine (German: neuter stem) singular noun."""
    a = ADJECTIVES[lang][colour]
    return a if lang == "en" else a[1] if lang == "de" else a[0]


def _phrase(count, colour, shape, lang):
    """'two red circles' / 'deux cercles rouges' / 'zwei rote Kreise' / 'dos círculos rojos'."""
    sg, pl, g = NOUNS[lang][shape]
    adj, many = ADJECTIVES[lang][colour], count > 1
    num = NUMBERS[lang][count - 2] if 2 <= count <= 10 else str(count)
    if lang == "en":
        return f"{num if many else ('an' if adj[0] in _VOWEL else 'a')} {adj} {pl if many else sg}"
    if lang == "de":
        if many:
            return f"{num} {adj[1]}e {pl}"
        return {"m": f"ein {adj[1]}er {sg}", "n": f"ein {adj[1]}es {sg}", "f": f"eine {adj[1]}e {sg}"}[g]
    one = {"fr": ("un", "une"), "es": ("un", "una")}[lang][_FEM[g]]
    return f"{num if many else one} {pl if many else sg} {adj[2 * many + _FEM[g]]}"


def _join(items, lang):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {AND[lang]} " + items[-1]


def caption(scene: list[dict], lang: str = "en") -> str:
    """Describe a scene: 'two red circles and a blue square' (objects grouped by name, in order of appearance)."""
    if lang not in LANGS:
        raise DataError(f"unknown language '{lang}': choose one of {', '.join(LANGS)}")
    counts = {}
    for o in scene:
        counts[o["colour"], o["shape"]] = counts.get((o["colour"], o["shape"]), 0) + 1
    return _join([_phrase(c, col, sh, lang) for (col, sh), c in counts.items()], lang)


def _definite(shape, lang, colour=None):
    """'the (red) circle' / 'le cercle (rouge)' / 'der (rote) Kreis' / 'el círculo (rojo)'."""
    sg, _, g = NOUNS[lang][shape]
    adj = ADJECTIVES[lang][colour] if colour else None
    if lang == "en":
        return f"the {adj + ' ' if adj else ''}{sg}"
    if lang == "de":
        return f"{dict(m='der', f='die', n='das')[g]} {adj[1] + 'e ' if adj else ''}{sg}"
    art = {"fr": ("le", "la"), "es": ("el", "la")}[lang][_FEM[g]]
    art = "l'" if lang == "fr" and sg[0] in _VOWEL else art + " "
    return f"{art}{sg}{' ' + adj[_FEM[g]] if adj else ''}"


def vqa(scene: list[dict], lang: str = "en", rng=None, answer_lang: str | None = None) -> list[tuple[str, str, str]]:
    """Question-answer pairs about a scene: [(question, answer, qtype)], at most one per qtype.

    qtype "colour" (of a shape that occurs once), "shape" (of a colour that occurs once), "count"
    (all objects, one shape, or one colour; the answer is a digit string, can be "0"), "position"
    (left/right or top/bottom of a uniquely named object at least 1/8 of the side off centre).
    Questions are in `lang`, answers in `answer_lang` (default: the same). rng: numpy Generator or seed."""
    for x in (lang, answer_lang or lang):
        if x not in LANGS:
            raise DataError(f"unknown language '{x}': choose one of {', '.join(LANGS)}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    alang, q, out = answer_lang or lang, QUESTIONS[lang], []
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    names = [o["name"] for o in scene]
    # colour of a shape that is there exactly once
    once = [o for o in scene if shapes.count(o["shape"]) == 1]
    if once:
        o = once[rng.integers(len(once))]
        out.append((q["colour"].format(the=_definite(o["shape"], lang)), _colour_word(o["colour"], alang), "colour"))
    # shape of a colour that is there exactly once
    once = [o for o in scene if colours.count(o["colour"]) == 1]
    if once:
        o = once[rng.integers(len(once))]
        out.append((q["shape"].format(adj=_adj_sg(o["colour"], lang)), NOUNS[alang][o["shape"]][0], "shape"))
    # counts: everything, a shape or a colour (possibly absent)
    which = rng.integers(3)
    if which == 0:
        out.append((q["total"], str(len(scene)), "count"))
    elif which == 1:
        shape = SHAPES[rng.integers(len(SHAPES))]
        _, pl, g = NOUNS[lang][shape]
        de_pl = ("d'" if pl[0] in _VOWEL else "de ") + pl
        text = q["by_shape"].format(pl=pl, de_pl=de_pl, how_many="cuántas" if g == "f" else "cuántos")
        out.append((text, str(shapes.count(shape)), "count"))
    else:
        colour = COLOUR_NAMES[rng.integers(len(COLOURS))]
        adj = ADJECTIVES[lang][colour]
        text = q["by_colour"].format(adj=_adj_sg(colour, lang), adj_pl=adj[2] if lang in ("fr", "es") else adj)
        out.append((text, str(colours.count(colour)), "count"))
    # position of a uniquely named object, when it is clearly off centre
    asks = []
    for o in scene:
        if names.count(o["name"]) != 1:
            continue
        half = o["image_size"] / 2
        for axis, c in (("x", o["cx"]), ("y", o["cy"])):
            if abs(c - half) > o["image_size"] / 8:
                asks.append((o, axis, (c > half) + (2 if axis == "y" else 0)))
    if asks:
        o, axis, place = asks[rng.integers(len(asks))]
        pron = "elle" if NOUNS[lang][o["shape"]][2] == "f" else "il"
        obj = _definite(o["shape"], lang, o["colour"])
        out.append((q[axis].format(obj=obj, pron=pron), PLACES[alang][place], "position"))
    return out


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: download, verify, extract, parse, cache

SOURCES = {  # tests monkeypatch url and md5
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", labels=b"labels", names=b"label_names"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], meta="meta", labels=b"fine_labels", names=b"fine_label_names"),
}


def cache_dir() -> Path:
    path = Path(os.environ.get("ZOO_CACHE") or "~/.cache/vitzoo").expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {path} ({e}); set ZOO_CACHE to a writable folder") from None
    return path


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download(url, dest, md5, name, sha256=None, offline="use --data shapes (embedded, needs no download)"):
    """Fetch url to dest through a temporary file; only a file with the right MD5 (or SHA-256) is renamed into place."""
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    from tqdm import tqdm
    want = md5 if sha256 is None else sha256
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            h, total = hashlib.md5() if sha256 is None else hashlib.sha256(), int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {name}", disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != want:
            raise DataError(f"{name}: checksum mismatch for {url} (got {h.name.upper()} {h.hexdigest()}, expected "
                            f"{want}); try again later or {offline}")
        os.replace(tmp, dest)
    except (OSError, urllib.error.URLError, EOFError) as e:  # URLError, timeouts, refused connections...
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {name} from {url} ({reason}); are you offline? {offline}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _safe_extract(archive, dest):
    """Extract a tar archive into dest, refusing absolute paths, '..', links, devices and escapes."""
    root = dest.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            bad = (os.path.isabs(m.name) or m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts
                   or not (m.isfile() or m.isdir()) or not (root / m.name).resolve().is_relative_to(root))
            if bad:
                raise DataError(f"refusing unsafe archive member '{m.name}' in {archive.name} (deleted); "
                                "retry later or use --data shapes")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library checks too
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickled dicts of lists, bytes and numpy arrays: allow nothing else."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 writes bytes in protocol-2 pickles (the tests' archives)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path):
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="bytes").load()


def _parse_cifar(folder, src):
    def batches(files):
        ds = [_unpickle(folder / f) for f in files]
        x = np.concatenate([np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32) for d in ds])  # (N, C, H, W)
        y = np.concatenate([np.asarray(d[src["labels"]], np.int64) for d in ds])
        return x.transpose(0, 2, 3, 1).copy(), y  # (N, H, W, C)
    x_train, y_train = batches(src["train"])
    x_test, y_test = batches(src["test"])
    classes = [c.decode() for c in _unpickle(folder / src["meta"])[src["names"]]]
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(classes))


def _load_cifar(name):
    src, cache = SOURCES[name], cache_dir()
    npz = cache / f"{name}.npz"
    if not npz.exists():
        archive = cache / src["url"].rsplit("/", 1)[-1]
        if archive.exists() and _md5(archive) != src["md5"]:
            archive.unlink()  # a corrupt or stale archive: fetch it again
        if not archive.exists():
            _download(src["url"], archive, src["md5"], name)
        work = cache / f"{name}.extract{os.getpid()}"
        try:
            shutil.rmtree(work, ignore_errors=True)
            _safe_extract(archive, work)
            try:
                arrays = _parse_cifar(work / src["folder"], src)
            except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
                raise DataError(f"cannot parse the {name} archive ({e}); it was deleted, "
                                "retry or use --data shapes") from None
            tmp = npz.with_name(f"{npz.name}.part{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, npz)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            archive.unlink(missing_ok=True)  # parsed: the .npz is the cache from now on; refused: not kept
    try:
        with np.load(npz) as z:
            t = torch.from_numpy
            return ImageData(name, t(z["x_train"]), t(z["y_train"]), t(z["x_test"]), t(z["y_test"]),
                             z["classes"].tolist())
    except Exception as e:  # truncated or foreign file
        npz.unlink(missing_ok=True)
        raise DataError(f"the cached {npz} was unreadable ({type(e).__name__}) and is deleted; run again") from None


# ----------------------------------------------------------------------------------------------
# PATH.npz: the user's own arrays

NPZ_HELP = "expected x uint8 (N,H,W,C) with C 1 or 3 (or (N,H,W)), y int (N,), optional x_test/y_test, classes"


def _check_xy(x, y, what):
    if x.dtype != np.uint8:
        raise DataError(f"{what}: x{'' if what.endswith('train') else '_test'} has dtype {x.dtype}; {NPZ_HELP}")
    if len(x) == 0:
        raise DataError(f"{what}: no images; {NPZ_HELP}")
    if x.ndim == 3:
        x = x[..., None]  # grayscale (N, H, W) -> (N, H, W, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (channels first? transpose to (N,H,W,C))" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise DataError(f"{what}: x has shape {tuple(x.shape)}{hint}; {NPZ_HELP}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or (len(y) and y.min() < 0):
        raise DataError(f"{what}: y has shape {tuple(y.shape)} dtype {y.dtype} for {len(x)} images "
                        f"(labels must be non-negative integers); {NPZ_HELP}")
    return x, y.astype(np.int64)


def _load_npz(path, seed):
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, object arrays, truncated file...
        raise DataError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); {NPZ_HELP}") from None
    keys = set(arrays)
    if not {"x", "y"} <= keys or ("x_test" in keys) != ("y_test" in keys):
        raise DataError(f"{path}: found keys {sorted(keys)}; {NPZ_HELP}")
    x, y = _check_xy(arrays["x"], arrays["y"], f"{path} train")
    if "x_test" in keys:
        xt, yt = _check_xy(arrays["x_test"], arrays["y_test"], f"{path} test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test images {xt.shape[1:]} differ from x images {x.shape[1:]}")
    else:  # a seeded 90/10 split
        if len(x) < 2:
            raise DataError(f"{path}: need at least 2 images to split off a test set; {NPZ_HELP}")
        perm = np.random.default_rng(seed).permutation(len(x))
        n_test = max(1, len(x) // 10)
        xt, yt, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    n_classes = int(max(y.max(), yt.max())) + 1
    classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in keys else [str(i) for i in range(n_classes)]
    if len(classes) < n_classes:
        raise DataError(f"{path}: {len(classes)} class names for labels up to {n_classes - 1}")
    t = torch.from_numpy
    return ImageData(Path(path).stem, t(np.ascontiguousarray(x)), t(y), t(np.ascontiguousarray(xt)), t(yt), classes)


# ----------------------------------------------------------------------------------------------
# ---- the byte tokenizer (every text model): UTF-8 bytes + specials, mode tokens, locations, sentinels

class ByteTokenizer:
    """Text <-> ids without a vocabulary file.

    ids: 0 pad, 1 eos, 2 unk, 3..258 the 256 UTF-8 bytes (byte b -> b + 3), 259 [R], 260 [X], 261 [S]
    (UL2's mode tokens), then n_locations coordinate tokens <loc0000>.. (Pix2Seq / PaliGemma style), then
    n_sentinels sentinels at the top of the vocabulary: <extra_id_k> = vocab_size - 1 - k (T5's order).
    The specials can be written literally in the text ("[S] Once upon", "a <extra_id_0> c")."""
    pad, eos, unk, offset = 0, 1, 2, 3
    mode = {"R": 259, "X": 260, "S": 261}

    def __init__(self, n_sentinels: int = 128, n_locations: int = 0):
        self.n_sentinels, self.n_locations = n_sentinels, n_locations
        self.vocab_size = 262 + n_locations + n_sentinels
        self._special = re.compile(r"\[([RXS])\]|<extra_id_(\d+)>|<loc(\d{4})>")

    def sentinel(self, k: int) -> int:
        if not 0 <= k < self.n_sentinels:
            raise DataError(f"sentinel {k} does not exist: the tokenizer has {self.n_sentinels} (n_sentinels)")
        return self.vocab_size - 1 - k

    def location(self, i: int) -> int:
        if not 0 <= i < self.n_locations:
            raise DataError(f"location token {i} does not exist: the tokenizer has {self.n_locations} (n_locations)")
        return 262 + i

    def encode(self, text: str, eos: bool = False, specials: bool = True) -> list[int]:
        ids, pos = [], 0
        for m in (self._special.finditer(text) if specials else ()):
            ids += [b + 3 for b in text[pos:m.start()].encode("utf-8")]
            mode, sentinel, loc = m.groups()
            if mode:
                ids.append(self.mode[mode])
            elif sentinel is not None and int(sentinel) < self.n_sentinels:
                ids.append(self.sentinel(int(sentinel)))
            elif loc is not None and int(loc) < self.n_locations:
                ids.append(self.location(int(loc)))
            else:  # a special this tokenizer does not have: keep the literal text
                ids += [b + 3 for b in m.group().encode("utf-8")]
            pos = m.end()
        ids += [b + 3 for b in text[pos:].encode("utf-8")]
        return ids + [self.eos] if eos else ids

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i == self.eos:
                break
            if 3 <= i < 259:
                buf.append(i - 3)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if i in (self.pad, self.unk):
                out.append("" if i == self.pad else "\ufffd")
            elif i < 262:
                out.append(f"[{'RXS'[i - 259]}]")
            elif i < 262 + self.n_locations:
                out.append(f"<loc{i - 262:04d}>")
            elif i < self.vocab_size:
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
            else:
                out.append("\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch(self, texts, length: int, eos: bool = True) -> torch.Tensor:
        """Encode, truncate to `length` (keeping the eos as the last id), pad with 0: LongTensor (B, length)."""
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:length - 1 if eos else length] + ([self.eos] if eos else [])
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------------
# ---- scenes: shapes with boxes, names, captions and questions (owlvit.py, pali.py)

@dataclass
class SceneData:
    name: str
    x_train: torch.Tensor  # (N, H, W, 3) uint8
    scenes_train: list  # per image: a list of objects, dicts with shape, colour, name, box (x0, y0, x1, y1) px, ...
    x_test: torch.Tensor  # (M, H, W, 3) uint8
    scenes_test: list
    tokenizer: ByteTokenizer
    langs: tuple = LANGS
    augment: bool = False

    @staticmethod
    def caption(scene: list[dict], lang: str = "en") -> str:
        return caption(scene, lang)

    @staticmethod
    def vqa(scene: list[dict], lang: str = "en", rng=None, answer_lang: str | None = None) -> list[tuple[str, str, str]]:
        return vqa(scene, lang, rng, answer_lang)

    @staticmethod
    def read_image(path) -> np.ndarray:  # uint8 (H, W, 3); PPM (P6) or PNG (the image-files section)
        return read_image(path)

    @staticmethod
    def write_image(path, x) -> None:  # PNG (.png) or PPM (.ppm)
        return write_image(path, x)

    def to(self, device) -> "SceneData":
        return replace(self, x_train=self.x_train.to(device), x_test=self.x_test.to(device))


SCENES_TRAIN, SCENES_TEST = 10_000, 1_000


def _load_scenes(name, image_size, seed):
    if name == "shapes":
        if image_size < 16:
            raise DataError(f"shapes scenes need image_size >= 16, got {image_size}")
        x, scenes = shapes_scenes(SCENES_TRAIN, image_size, seed=seed)
        xt, scenes_t = shapes_scenes(SCENES_TEST, image_size, seed=seed + 10_007)  # another stream: no overlap
        return SceneData("shapes", torch.from_numpy(x), scenes, torch.from_numpy(xt), scenes_t, ByteTokenizer())
    if name in SOURCES or name.endswith(".npz"):
        return _load_captioned_images(name, image_size, seed)
    raise DataError(f"unknown scene data '{name}': choose shapes (or cifar10/cifar100 as captioned images)")


# ----------------------------------------------------------------------------------------------
# ---- scenes: CIFAR as captioning (pali helper)

# CIFAR-10's classes in four languages: (the indefinite article the caption needs, the noun). German takes
# the dative after "von"; "automobile" is captioned as the everyday word (car, voiture, Auto, coche).
CIFAR10_NOUNS = {
    "airplane": dict(en=("an", "airplane"), fr=("un", "avion"), de=("einem", "Flugzeug"), es=("un", "avión")),
    "automobile": dict(en=("a", "car"), fr=("une", "voiture"), de=("einem", "Auto"), es=("un", "coche")),
    "bird": dict(en=("a", "bird"), fr=("un", "oiseau"), de=("einem", "Vogel"), es=("un", "pájaro")),
    "cat": dict(en=("a", "cat"), fr=("un", "chat"), de=("einer", "Katze"), es=("un", "gato")),
    "deer": dict(en=("a", "deer"), fr=("un", "cerf"), de=("einem", "Hirsch"), es=("un", "ciervo")),
    "dog": dict(en=("a", "dog"), fr=("un", "chien"), de=("einem", "Hund"), es=("un", "perro")),
    "frog": dict(en=("a", "frog"), fr=("une", "grenouille"), de=("einem", "Frosch"), es=("una", "rana")),
    "horse": dict(en=("a", "horse"), fr=("un", "cheval"), de=("einem", "Pferd"), es=("un", "caballo")),
    "ship": dict(en=("a", "ship"), fr=("un", "bateau"), de=("einem", "Schiff"), es=("un", "barco")),
    "truck": dict(en=("a", "truck"), fr=("un", "camion"), de=("einem", "Lastwagen"), es=("un", "camión")),
}
PHOTO = dict(en="a photo of {}", fr="une photo d'{}", de="ein Foto von {}", es="una foto de {}")
PHOTO_QUESTION = dict(en="what is in the photo?", fr="qu'y a-t-il sur la photo ?", de="was ist auf dem Foto?",
                      es="¿qué hay en la foto?")


@dataclass
class CaptionedImageData(SceneData):
    """Labelled photos as captioning data (pali.py): each image is a one-object scene [{name, label, box,
    image_size}], captioned "a photo of a {class}" and asked "what is in the photo?" (qtype "class") in
    every language of `langs` (CIFAR-10: en fr de es; CIFAR-100 and .npz files: English class names only)."""
    tasks = ("caption", "vqa")  # no counting or detection: one object filling the photo

    @staticmethod
    def _noun(name, lang):
        if name in CIFAR10_NOUNS:
            return CIFAR10_NOUNS[name][lang]
        if lang != "en":
            raise DataError(f"no {lang} name for class '{name}': only CIFAR-10's classes are translated")
        noun = name.replace("_", " ")
        return ("an" if noun[0] in "aeiou" else "a"), noun

    @staticmethod
    def caption(scene: list[dict], lang: str = "en") -> str:
        art, noun = CaptionedImageData._noun(scene[0]["name"], lang)
        return PHOTO[lang].format(f"{art} {noun}")

    @staticmethod
    def vqa(scene: list[dict], lang: str = "en", rng=None, answer_lang: str | None = None) -> list[tuple[str, str, str]]:
        return [(PHOTO_QUESTION[lang], CaptionedImageData._noun(scene[0]["name"], answer_lang or lang)[1], "class")]


def _load_captioned_images(name, image_size, seed):
    """cifar10 / cifar100 / PATH.npz as SceneData: images at their own size (the model resizes)."""
    d = _load_cifar(name) if name in SOURCES else _load_npz(name, seed)
    if d.x_train.shape[-1] != 3:
        raise DataError(f"'{name}' has {d.x_train.shape[-1]} channel(s); captioned images must be RGB")
    size = d.x_train.shape[1]

    def scenes(y):
        return [[dict(name=d.classes[int(c)], label=int(c), box=(0, 0, size, size), image_size=size)] for c in y.tolist()]
    langs = LANGS if all(c in CIFAR10_NOUNS for c in d.classes) else ("en",)
    return CaptionedImageData(name, d.x_train, scenes(d.y_train), d.x_test, scenes(d.y_test), ByteTokenizer(), langs)


# ----------------------------------------------------------------------------------------------
# ---- text: stdlib, shakespeare, PATH.txt (ul2 helper)
#
# `load(name, kind="text", seed=0) -> TextData` (ul2.py):
#   stdlib       embedded, no download: the docstrings of the running Python's standard library, read with `ast`
#                from the .py sources (never imported); module, class and function docstrings in source order,
#                cleaned like inspect.getdoc, deduplicated; one docstring = one document. Test folders (test,
#                tests, idle_test) and site-packages are skipped. CPython 3.11: ~8,300 documents, 1.8 MB.
#                Extracted once (~10 s) and cached as JSON in the cache folder (per Python version and path).
#   shakespeare  tiny Shakespeare (karpathy/char-rnn input.txt, 1,115,394 bytes), downloaded once into the cache
#                folder, SHA-256 checked (before use and at every load); documents = blocks between blank lines.
#   PATH.txt     your own UTF-8 text file; documents = blocks between blank lines.
# Train/validation split: a document is held out iff the MD5 of its text is 0 modulo 20 (~5%): a document is on
# the same side whatever the seed or machine, and deduplicated text never crosses the split. (A text that gives
# an empty side, e.g. one paragraph, is cut at 90% of its length instead.) `seed` is not used.

TEXT_DOWNLOADS = {  # tests monkeypatch url and sha256
    "shakespeare": dict(url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                        file="tinyshakespeare.txt"),
}


@dataclass
class TextData:
    """A text source as token ids. train, val: flat int16 tensors (N,) of ByteTokenizer ids (UTF-8 bytes + 3,
    specials not parsed), the documents one after another with a blank line ("\n\n") between them, no EOS:
    models cut their own chunks. The ids stay on the CPU (examples are built there, with numpy); `device` is where
    batches should go (`.to(device)` sets it)."""
    name: str
    train: torch.Tensor  # (N,) int16
    val: torch.Tensor  # (M,) int16
    tokenizer: ByteTokenizer
    n_train_docs: int
    n_val_docs: int
    device: torch.device = torch.device("cpu")

    def to(self, device) -> "TextData":
        return replace(self, device=torch.device(device))


def _docstrings(path):
    """The docstrings of one Python source file, in source order (module first), without importing it."""
    import ast
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes etc. in old sources
        try:
            tree = ast.parse(Path(path).read_bytes())
        except (SyntaxError, ValueError, OSError):
            return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d and d.strip()]


def _stdlib_documents(root):
    """Deduplicated docstrings of every .py file under root (the stdlib folder), files in sorted order."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs, seen = [], set()
    for path in sorted(Path(root).rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        for d in _docstrings(path):
            if d not in seen:
                seen.add(d)
                docs.append(d)
    return docs


def _stdlib():
    import json
    import sys
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.md5(str(root.resolve()).encode()).hexdigest()[:8]
    cached = cache_dir() / f"stdlib-docstrings-py{sys.version_info[0]}.{sys.version_info[1]}-{key}.json"
    try:
        return json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not there yet (or a broken file): extract again
        pass
    docs = _stdlib_documents(root)
    if not docs:
        raise DataError(f"no docstrings found under the standard library folder {root}; use --data PATH.txt")
    tmp = cached.with_name(f"{cached.name}.part{os.getpid()}")
    try:
        tmp.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs the extraction next time
    finally:
        tmp.unlink(missing_ok=True)
    return docs


def _blocks(text):
    """Documents of a plain text: blocks separated by blank lines, stripped, non-empty."""
    return [b.strip() for b in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")) if b.strip()]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _shakespeare():
    src = TEXT_DOWNLOADS["shakespeare"]
    path = cache_dir() / src["file"]
    if path.exists() and _sha256(path) != src["sha256"]:
        path.unlink()  # corrupt or stale: fetch again
    if not path.exists():
        _download(src["url"], path, None, "shakespeare", sha256=src["sha256"],
                  offline="use --data stdlib (embedded, needs no download)")
    return _blocks(path.read_text(encoding="utf-8"))


def _text_file(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from None
    docs = _blocks(text)
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


def text_data(name, docs, tokenizer=None):
    """Documents (list of str) -> TextData with the MD5 train/validation split described above."""
    tokenizer = tokenizer or ByteTokenizer()
    held = [int(hashlib.md5(d.encode("utf-8")).hexdigest(), 16) % 20 == 0 for d in docs]
    train = [d for d, h in zip(docs, held) if not h]
    val = [d for d, h in zip(docs, held) if h]
    if not train or not val:  # too few documents: cut the text itself at 90%
        text = "\n\n".join(docs)
        cut = int(len(text) * 0.9)
        train, val = [text[:cut]], [text[cut:]]
        if not train[0].strip() or not val[0].strip():
            raise DataError(f"{name}: {len(text)} characters is too little text for a train/validation split")

    def ids(parts):
        return torch.tensor(tokenizer.encode("\n\n".join(parts), specials=False), dtype=torch.int16)
    return TextData(name, ids(train), ids(val), tokenizer, len(train), len(val))


def _load_text(name, seed):
    if name == "stdlib":
        return text_data("stdlib", _stdlib())
    if name == "shakespeare":
        return text_data("shakespeare", _shakespeare())
    if name.endswith(".txt"):
        return text_data(Path(name).stem, _text_file(name))
    raise DataError(f"unknown text data '{name}': choose stdlib (embedded), shakespeare (download) or PATH.txt")


# ----------------------------------------------------------------------------------------------
# ---- corpus: embedded retrieval corpus, PATH.jsonl (dsi helper)
#
# `load(name, kind="corpus", seed=0) -> CorpusData` (dsi.py):
#   corpus       embedded, no download: a seeded synthetic retrieval corpus (card C7/D6 of papers/text.md).
#                10 topics; D0 = 300 documents (30 per topic) with queries, then K = 5 new corpora
#                D1..D5 of 60 documents each (6 per topic) that arrive without training queries (DSI++).
#                A document is 60-90 lower-case words: its first sentence holds 2-3 made-up "key" words
#                that no other document has, the rest are words of its topic and function words.
#                A query is 2 of the document's key words + 1-2 of its topic words, shuffled (never a
#                copy of the document text). Paraphrase channel: half the queries replace every key word
#                by a fixed synonym that occurs in no document (they share only topic words, common to
#                ~30 documents, with their document). Per D0 document 4 train + 2 test queries, except
#                20% of D0 that has no train queries (zero-shot: indexed only); D1..D5 have 2 test
#                queries per document.
#   PATH.jsonl   your own corpus, one JSON object per line (blank lines skipped):
#                  {"docid": "d17", "text": "the document ..."}                  a document
#                  {"docid": "d17", "text": "...", "corpus": 2}                  ... arriving in D2 (DSI++; default 0)
#                  {"query": "who wrote ...", "docid": "d17"}                    a query with its document
#                  {"query": "...", "docid": "d17", "split": "test"}           ... forced to train or test
#                docids are unique strings (or ints); a query may come before its document. Queries without
#                "split" are held out as test with probability 0.2 (seeded); queries of documents in a
#                corpus > 0 are always test (new corpora arrive without queries). A query is flagged lexical
#                if it shares a word (3+ letters, not a stopword) with its document, else paraphrased.
#                A bad line raises DataError naming its line number.

@dataclass
class CorpusData:
    name: str
    docs: list  # dicts: docid (str), text (str), corpus (int: 0 = D0, t = the t-th new corpus), train_queries (bool)
    queries: list  # dicts: text, doc (index into docs), split ("train" | "test"), paraphrased (bool)
    tokenizer: ByteTokenizer

    @property
    def num_docs(self) -> int:
        return len(self.docs)

    @property
    def num_corpora(self) -> int:  # D0 + the new corpora
        return 1 + max(d["corpus"] for d in self.docs)

    def to(self, device) -> "CorpusData":  # everything is text: nothing to move
        return self


CORPUS_TOPICS = {
    "astronomy": "star planet orbit comet galaxy telescope moon nebula eclipse gravity asteroid solar lunar "
                 "cosmic meteor orbitals crater quasar supernova horizon",
    "cooking": "oven recipe flour butter sauce garlic onion pepper simmer roast dough salt sugar kitchen "
               "spice broth bake skillet herbs vinegar",
    "music": "melody rhythm guitar piano chord tempo violin drum singer chorus harmony concert song note "
             "orchestra bass lyric scale opera jazz",
    "sailing": "boat sail wind harbor anchor mast deck rope tide keel hull captain crew voyage port "
               "compass knot rudder storm island",
    "medicine": "doctor patient fever vaccine clinic nurse dose symptom surgery blood heart virus tablet "
                "therapy diagnosis hospital pulse infection bone injury",
    "football": "goal striker referee match pitch league coach penalty keeper tackle midfield corner "
                "season stadium team kick score defender trophy fans",
    "geology": "rock mineral quartz granite volcano lava fossil sediment crystal erosion basalt magma "
               "canyon tectonic fault limestone glacier strata pebble cliff",
    "computing": "code compiler memory processor kernel network server database bug program software "
                 "cache thread algorithm binary byte query script laptop keyboard",
    "gardening": "seed soil compost flower tulip rose weed shovel prune garden hedge bulb mulch orchard "
                 "vine leaf root sprout watering greenhouse",
    "finance": "bank loan interest stock bond market credit budget profit investor dividend tax "
               "mortgage currency debt savings asset trader price fund",
}
_FUNCTION_WORDS = "the a of and in with on for is was by to from near about its".split()
_STOPWORDS = set(_FUNCTION_WORDS) | set("an at as are be it this that or not but his her their which who what "
                                        "when where how have has had were will would can could".split())
CORPUS_SIZES = (300, 60, 60, 60, 60, 60)  # D0, D1..D5


def _nonce_words(rng, n, taken):
    """n distinct made-up words (3 consonant-vowel syllables, e.g. 'vorelin'), none of them in `taken`."""
    cons, vows = list("bdfgklmnprstvz"), list("aeiou")
    out = []
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(3)) + rng.choice(["", "n", "r", "s"])
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def corpus_embedded(seed: int = 0, sizes=CORPUS_SIZES, train_queries: int = 4, test_queries: int = 2,
                    zero_shot: float = 0.2, paraphrase: float = 0.5) -> CorpusData:
    """The embedded corpus (see the section comment above); a pure function of its arguments."""
    rng = np.random.RandomState(seed)
    topics = list(CORPUS_TOPICS)
    topic_words = {t: CORPUS_TOPICS[t].split() for t in topics}
    taken = set(_FUNCTION_WORDS) | {w for ws in topic_words.values() for w in ws}
    n = sum(sizes)
    n_keys = rng.randint(2, 4, size=n)  # 2 or 3 key words per document
    keys = _nonce_words(rng, int(n_keys.sum()), taken)
    synonym = dict(zip(keys, _nonce_words(rng, len(keys), taken)))  # drawn after: never in a document
    docs, queries, k = [], [], 0
    order = rng.permutation(n)  # docid numbers are not in corpus order
    for corpus, size in enumerate(sizes):
        no_train = set(rng.choice(size, int(round(zero_shot * size)), replace=False)) if corpus == 0 else set(range(size))
        for j in range(size):
            topic = topics[j % len(topics)]
            tw = topic_words[topic]
            key = keys[k:k + n_keys[len(docs)]]
            k += len(key)
            first = ["the", key[0]] + [rng.choice(tw), "of", key[1]] + (["and", key[2]] if len(key) > 2 else []) + [rng.choice(tw)]
            words = list(first)
            for _ in range(rng.randint(60, 91) - len(first)):
                words.append(rng.choice(tw) if rng.rand() < 0.6 else rng.choice(_FUNCTION_WORDS))
            text = " ".join(first) + ". " + " ".join(words[len(first):]) + "."
            in_doc = sorted(set(words) & set(tw))
            d = len(docs)
            docs.append({"docid": f"doc{order[d]:04d}", "text": text, "corpus": corpus, "topic": topic,
                         "keys": list(key), "train_queries": j not in no_train})
            seen = set()
            for split, m in (("train", 0 if j in no_train else train_queries), ("test", test_queries)):
                for _ in range(m):
                    for _attempt in range(100):  # distinct queries, never a substring of the document
                        ks = list(rng.choice(key, 2, replace=False))
                        para = rng.rand() < paraphrase
                        ws = [synonym[w] for w in ks] if para else ks
                        ws += list(rng.choice(in_doc, rng.randint(1, 3), replace=False))
                        rng.shuffle(ws)
                        q = " ".join(ws)
                        if q not in seen and q not in text:
                            break
                    seen.add(q)
                    queries.append({"text": q, "doc": d, "split": split, "paraphrased": bool(para)})
    return CorpusData("corpus", docs, queries, ByteTokenizer())


def _words(text):
    return re.findall(r"\w+", text.lower())


def _load_corpus_jsonl(path, seed):
    import json
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    fmt = ('one JSON object per line: {"docid": ID, "text": "..."} (optional "corpus": 0, 1, ...) or '
           '{"query": "...", "docid": ID} (optional "split": "train" | "test")')
    docs, raw_queries, index = [], [], {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {ln}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); expected {fmt}") from None
            if not isinstance(obj, dict) or "docid" not in obj or ("text" in obj) == ("query" in obj):
                raise DataError(f"{where}: expected {fmt}")
            docid = obj["docid"]
            if isinstance(docid, bool) or not isinstance(docid, (str, int)) or str(docid) == "":
                raise DataError(f"{where}: docid must be a non-empty string or an integer, got {docid!r}")
            docid = str(docid)
            body = obj.get("text", obj.get("query"))
            if not isinstance(body, str) or not body.strip():
                raise DataError(f"{where}: {'text' if 'text' in obj else 'query'} must be a non-empty string")
            if "text" in obj:
                corpus = obj.get("corpus", 0)
                if isinstance(corpus, bool) or not isinstance(corpus, int) or corpus < 0:
                    raise DataError(f"{where}: corpus must be an integer >= 0, got {corpus!r}")
                if docid in index:
                    raise DataError(f"{where}: docid {docid!r} already used on line {docs[index[docid]]['line']}")
                index[docid] = len(docs)
                docs.append({"docid": docid, "text": body, "corpus": corpus, "line": ln})
            else:
                split = obj.get("split")
                if split not in (None, "train", "test"):
                    raise DataError(f"{where}: split must be \"train\" or \"test\", got {split!r}")
                raw_queries.append((ln, docid, body, split))
    if not docs:
        raise DataError(f"{path}: no documents; expected {fmt}")
    present = sorted({d["corpus"] for d in docs})
    if present != list(range(len(present))):
        raise DataError(f"{path}: corpus numbers must be 0, 1, 2, ... without gaps; found {present}")
    rng = np.random.RandomState(seed)
    queries = []
    for ln, docid, text, split in raw_queries:
        if docid not in index:
            raise DataError(f"{path}, line {ln}: query for docid {docid!r}, which no document line has")
        d = index[docid]
        held_out = rng.rand() < 0.2
        if docs[d]["corpus"] > 0:
            split = "test"
        elif split is None:
            split = "test" if held_out else "train"
        shared = (set(_words(text)) & set(_words(docs[d]["text"]))) - _STOPWORDS
        queries.append({"text": text, "doc": d, "split": split,
                        "paraphrased": not any(len(w) >= 3 for w in shared)})
    has_train = {q["doc"] for q in queries if q["split"] == "train"}
    for i, d in enumerate(docs):
        d["train_queries"] = i in has_train
    if not any(q["split"] == "test" for q in queries):
        raise DataError(f"{path}: no test queries to evaluate on; add queries (\"split\": \"test\")")
    return CorpusData(path.stem, docs, queries, ByteTokenizer())


def _load_corpus(name, seed):
    if name == "corpus":
        return corpus_embedded(0)  # one fixed corpus: --seed varies the training only
    if name.endswith(".jsonl"):
        return _load_corpus_jsonl(name, 0)  # a fixed train/test split too
    raise DataError(f"unknown corpus '{name}': use the embedded 'corpus' or a PATH.jsonl file "
                    f"(documents {{\"docid\", \"text\"}} and queries {{\"query\", \"docid\"}}, one per line)")


# ----------------------------------------------------------------------------------------------
# ---- image files: read_image / write_image (owlvit helper)
# PPM (binary P6, maxval 255) and PNG (8-bit gray, gray+alpha, RGB, RGBA, palette; non-interlaced), with
# numpy and zlib only. read_image returns uint8 (H, W, 3): gray is repeated, alpha dropped.

import struct  # noqa: E402  (this section's)
import zlib  # noqa: E402

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _read_ppm(raw, path):
    fields, pos = [], 2
    while len(fields) < 3:  # width, height, maxval; whitespace and # comments between them
        while pos < len(raw) and raw[pos:pos + 1].isspace():
            pos += 1
        if raw[pos:pos + 1] == b"#":
            pos = raw.find(b"\n", pos) + 1 or len(raw)
            continue
        start = pos
        while pos < len(raw) and raw[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise DataError(f"{path}: broken PPM header")
        fields.append(int(raw[start:pos]))
    w, h, maxval = fields
    if maxval != 255:
        raise DataError(f"{path}: PPM with maxval {maxval}; only 8-bit (255) is supported")
    pixels = raw[pos + 1:pos + 1 + w * h * 3]  # one whitespace byte ends the header
    if len(pixels) != w * h * 3:
        raise DataError(f"{path}: PPM is truncated ({len(pixels)} of {w * h * 3} pixel bytes)")
    return np.frombuffer(pixels, np.uint8).reshape(h, w, 3).copy()


def _unfilter_png(data, h, w, bpp):
    """Undo the per-row PNG filters (0 none, 1 sub, 2 up, 3 average, 4 Paeth) -> uint8 (h, w * bpp)."""
    stride = w * bpp
    rows = np.frombuffer(data, np.uint8)
    if len(rows) < h * (stride + 1):
        raise DataError("PNG image data is truncated")
    rows = rows[:h * (stride + 1)].reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        elif f == 2:
            cur = (line + prev) & 255
        elif f in (3, 4):  # average / Paeth depend on the reconstructed left pixel: pixel by pixel
            cur = line.copy()
            for x in range(0, stride, bpp):
                a = cur[x - bpp:x] if x else np.zeros(bpp, np.int32)
                b = prev[x:x + bpp]
                if f == 3:
                    cur[x:x + bpp] = (cur[x:x + bpp] + (a + b) // 2) & 255
                else:
                    c = prev[x - bpp:x] if x else np.zeros(bpp, np.int32)
                    p = a + b - c
                    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
                    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
                    cur[x:x + bpp] = (cur[x:x + bpp] + pred) & 255
        else:
            raise DataError(f"PNG row {y} has an unknown filter type {f}")
        out[y] = cur
        prev = cur
    return out


def _read_png(raw, path):
    pos, chunks, idat = 8, {}, []
    while pos + 8 <= len(raw):
        n, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + n]
        if len(body) != n or zlib.crc32(kind + body) != struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n] or b"\0\0\0\0")[0]:
            raise DataError(f"{path}: PNG chunk {kind!r} is truncated or fails its CRC")
        if kind == b"IDAT":
            idat.append(body)
        else:
            chunks.setdefault(kind, body)
        pos += 12 + n
        if kind == b"IEND":
            break
    if b"IHDR" not in chunks or not idat:
        raise DataError(f"{path}: PNG without IHDR or image data")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    if depth != 8 or ctype not in _PNG_CHANNELS or interlace:
        raise DataError(f"{path}: PNG with bit depth {depth}, colour type {ctype}, interlace {interlace}; "
                        "supported: 8-bit gray / gray+alpha / RGB / RGBA / palette, non-interlaced")
    try:
        data = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise DataError(f"{path}: PNG image data does not decompress ({e})") from None
    ch = _PNG_CHANNELS[ctype]
    px = _unfilter_png(data, h, w, ch).reshape(h, w, ch)
    if ctype == 3:
        if b"PLTE" not in chunks:
            raise DataError(f"{path}: palette PNG without a PLTE chunk")
        palette = np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)
        if px.max(initial=0) >= len(palette):
            raise DataError(f"{path}: palette index beyond the {len(palette)} PLTE entries")
        return palette[px[..., 0]]
    if ch <= 2:  # gray (+ alpha)
        return np.repeat(px[..., :1], 3, axis=2)
    return px[..., :3].copy()


def read_image(path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3). PPM P6 (maxval 255) or PNG (8-bit; gray, gray+alpha, RGB, RGBA,
    palette; non-interlaced; alpha is dropped). Anything else raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"P6":
        return _read_ppm(raw, path)
    if raw[:8] == _PNG_MAGIC:
        return _read_png(raw, path)
    raise DataError(f"{path}: not a binary PPM (P6) or PNG file; convert it first (e.g. to PNG)")


def _png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_image(path, x) -> None:
    """uint8 (H, W, 3) (or (H, W) gray; a torch tensor or numpy array) -> PNG (.png) or PPM (.ppm/.pnm),
    by the file's extension; written atomically."""
    x = x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise DataError(f"write_image needs uint8 (H, W, 3) or (H, W), got {x.dtype} {x.shape}")
    path = Path(path)
    h, w = x.shape[:2]
    suffix = path.suffix.lower()
    if suffix == ".png":
        rows = np.concatenate([np.zeros((h, 1), np.uint8), x.reshape(h, w * 3)], axis=1)  # filter 0 per row
        raw = (_PNG_MAGIC + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
               + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _png_chunk(b"IEND", b""))
    elif suffix in (".ppm", ".pnm"):
        raw = f"P6\n{w} {h}\n255\n".encode() + np.ascontiguousarray(x).tobytes()
    else:
        raise DataError(f"{path}: write_image writes .png or .ppm files, not '{suffix}'")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# ---- corruptions: ImageNet-C style, on the device (discrete helper)
# Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
# Perturbations" (ICLR 2019, https://arxiv.org/abs/1903.12261), in torch, on the images' device:
#   corrupt(x uint8 (B,H,W,C), name, severity 0..5, seed) -> uint8 (B,H,W,C), severity 0 = identity.
# CORRUPTIONS maps a name to f(x, severity, generator) on float (B,C,H,W) in [0, 1] (unclipped out).
# Constants per severity 1..5 (pixel values in [0, 1]):
#   gaussian_noise  std                 .08 .12 .18 .26 .38      ImageNet-C (per pixel: resolution-free)
#   shot_noise      Poisson photons     60 25 12 5 3             ImageNet-C
#   impulse_noise   salt-and-pepper     .03 .06 .09 .17 .27      ImageNet-C (share of values, skimage 's&p')
#   gaussian_blur   sigma (px at 32 px) .4 .6 .7 .8 1            CIFAR-10-C, x H/32 (ImageNet-C: 1 2 3 4 6 at 224)
#   defocus_blur    disk radius, alias  (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1)  CIFAR-10-C, both x H/32
#   contrast        c: (x-m) c + m      .4 .3 .2 .1 .05          ImageNet-C, m = per-channel image mean
#   brightness      HSV value + c       .1 .2 .3 .4 .5           ImageNet-C
#   pixelate        down-scale factor   .6 .5 .4 .3 .25          ImageNet-C (PIL BOX down and up)
#   jpeg            quality             25 18 15 10 7            ImageNet-C (8x8 DCT of YCbCr, IJG tables, 4:2:0)
# Differences from the numpy/PIL/OpenCV originals: results are rounded (not truncated) to uint8; blur borders
# replicate (gaussian) or reflect (defocus), as skimage/OpenCV do; pixelate is PIL's BOX resampling (within 1
# of PIL in 8 bits); JPEG up-samples chroma by repetition (libjpeg: a triangle filter) and has no entropy
# coding (lossless anyway): its error is within ~0.5/255 (mean) of PIL's at these qualities.
# Random numbers come from a generator on the images' device seeded with `seed`: the same seed gives the
# same images on one device (CPU and CUDA draw different numbers).

import math  # noqa: E402  (this section's)

import torch.nn.functional as F  # noqa: E402

_CORRUPT_CHUNK = 1024  # images per pass (memory); fixed, so the random stream does not depend on it


def _gaussian_noise(x, s, g):
    return x + [.08, .12, .18, .26, .38][s - 1] * torch.randn(x.shape, generator=g, device=x.device)


def _shot_noise(x, s, g):
    c = [60, 25, 12, 5, 3][s - 1]
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


def _impulse_noise(x, s, g):
    c = [.03, .06, .09, .17, .27][s - 1]
    flipped = torch.rand(x.shape, generator=g, device=x.device) < c  # this share of the values ...
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5  # ... half of them to 1, half to 0
    return torch.where(flipped, salt.to(x.dtype), x)


def _filter(x, kernel, mode):
    """Each channel convolved with one 2-D kernel (kh, kw) of odd sides, borders padded by `mode`."""
    B, C, H, W = x.shape
    kh, kw = kernel.shape
    x = F.pad(x.reshape(B * C, 1, H, W), (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    return F.conv2d(x, kernel[None, None].to(x)).reshape(B, C, H, W)


def _gaussian_kernel(sigma, device):
    radius = int(4 * sigma + 0.5)  # skimage / scipy truncate=4
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return k / k.sum()  # (2r+1,)


def _gaussian_blur(x, s, g):
    k = _gaussian_kernel([.4, .6, .7, .8, 1.0][s - 1] * x.shape[-1] / 32, x.device)
    x = _filter(x, k[None, :], "replicate")  # separable: rows, then columns
    return _filter(x, k[:, None], "replicate")


def _defocus_blur(x, s, g):
    radius, alias = [(.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1)][s - 1]
    radius, alias = radius * x.shape[-1] / 32, alias * x.shape[-1] / 32
    half = math.ceil(radius) + 1  # a zero border, so the alias blur keeps the kernel's sum
    t = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()  # (2h+1, 2h+1) the aliased disk
    a = torch.exp(-torch.arange(-1.0, 2.0, device=x.device) ** 2 / (2 * alias ** 2))
    a = a / a.sum()  # OpenCV GaussianBlur(ksize=3, sigma=alias) of the disk kernel
    disk = F.conv2d(disk[None, None], (a[:, None] * a[None, :])[None, None], padding=1)[0, 0]
    return _filter(x, disk, "reflect")


def _contrast(x, s, g):
    m = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return (x - m) * [.4, .3, .2, .1, .05][s - 1] + m


def _brightness(x, s, g):
    """HSV value V = max(r, g, b) raised by c (clipped at 1) with hue and saturation kept: rgb scales by V'/V."""
    v = x.amax(dim=1, keepdim=True)  # (B, 1, H, W)
    v2 = (v + [.1, .2, .3, .4, .5][s - 1]).clamp(max=1)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2)  # black (s = 0) becomes grey v2


def _box_matrix(n_in, n_out, device):
    """PIL's BOX resampling along one axis as an (n_out, n_in) matrix: output pixel i averages the input pixels
    whose centres fall in its box [i, i+1) * n_in/n_out (down-sampling); up-sampling takes the nearest pixel."""
    scale = n_in / n_out
    fs = max(scale, 1.0)  # PIL filterscale; the box's support is 0.5 * fs either side of the centre
    center = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale  # (n_out, 1)
    j = torch.arange(n_in, dtype=torch.float64)[None, :]  # (1, n_in)
    t = (j + 0.5 - center) / fs
    lo, hi = torch.floor(center - 0.5 * fs + 0.5), torch.floor(center + 0.5 * fs + 0.5)  # PIL's xmin, xmax
    w = ((t > -0.5) & (t <= 0.5) & (j >= lo) & (j < hi)).double()
    return (w / w.sum(1, keepdim=True)).float().to(device)


def _pixelate(x, s, g):
    """PIL BOX down to int(side * c), then BOX (= nearest) back up, with 8-bit rounding in between (as PIL)."""
    H, W = x.shape[-2:]
    c = [.6, .5, .4, .3, .25][s - 1]
    h, w = max(1, int(H * c)), max(1, int(W * c))
    small = _box_matrix(H, h, x.device) @ x @ _box_matrix(W, w, x.device).T  # (B, C, h, w)
    small = (small * 255).round() / 255
    return _box_matrix(h, H, x.device) @ small @ _box_matrix(w, W, x.device).T  # (B, C, H, W)


_JPEG_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
              14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]  # JPEG Annex K.1
_JPEG_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32  # Annex K.2


def jpeg_table(base, quality):
    """IJG (libjpeg) quality scaling: 5000/q below 50, 200 - 2q above; entries floor((t s + 50) / 100) in [1, 255]."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    t = torch.tensor(base, dtype=torch.float64).reshape(8, 8)
    return ((t * scale + 50) // 100).clamp(1, 255).float()  # (8, 8)


def _dct_matrix(device):
    """Orthonormal 8-point DCT-II: D[k, n] = a_k cos(pi (2n+1) k / 16); the 2-D JPEG FDCT is D X D^T."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.float().to(device)  # (8, 8)


def _jpeg_plane(p, table, d):
    """One plane (B, h, w), h and w multiples of 8, level-shifted: block DCT, quantise, dequantise, inverse."""
    B, h, w = p.shape
    blocks = p.reshape(B, h // 8, 8, w // 8, 8).transpose(2, 3)  # (B, h/8, w/8, 8, 8)
    coef = d @ blocks @ d.T  # (B, h/8, w/8, 8, 8)
    coef = torch.round(coef / table) * table
    return (d.T @ coef @ d).transpose(2, 3).reshape(B, h, w)


def jpeg(x, quality, subsample=True):
    """JPEG compression of float images (B, C, H, W) in [0, 1] at an IJG quality (C 1: grey, C 3: YCbCr)."""
    B, C, H, W = x.shape
    m = 16 if subsample and C == 3 else 8
    x = F.pad(x, (0, -W % m, 0, -H % m), mode="replicate") * 255  # (B, C, H', W') whole blocks
    d = _dct_matrix(x.device)
    luma, chroma = jpeg_table(_JPEG_LUMA, quality).to(x.device), jpeg_table(_JPEG_CHROMA, quality).to(x.device)
    if C == 1:
        y = _jpeg_plane(x[:, 0] - 128, luma, d) + 128
        return (y[:, None] / 255)[..., :H, :W]
    r, g_, b = x.unbind(1)  # JFIF RGB -> YCbCr
    y = 0.299 * r + 0.587 * g_ + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g_ + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g_ - 0.081312 * b + 128
    y = _jpeg_plane(y - 128, luma, d) + 128
    chans = []
    for c in (cb, cr):
        if subsample:  # 4:2:0: chroma at half resolution (2x2 means), back up by repetition
            c = F.avg_pool2d(c[:, None], 2)[:, 0]
        c = _jpeg_plane(c - 128, chroma, d) + 128
        chans.append(c.repeat_interleave(2, 1).repeat_interleave(2, 2) if subsample else c)
    cb, cr = chans
    rgb = torch.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)], dim=1)  # (B, 3, H', W')
    return (rgb / 255)[..., :H, :W]


def _jpeg(x, s, g):
    return jpeg(x.clamp(0, 1), [25, 18, 15, 10, 7][s - 1])


CORRUPTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "defocus_blur": _defocus_blur, "contrast": _contrast,
    "brightness": _brightness, "pixelate": _pixelate, "jpeg": _jpeg,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply one corruption at severity 1..5 (0: the images unchanged) to uint8 images (B, H, W, C) on any
    device; returns uint8 (B, H, W, C) on the same device. The same seed gives the same result."""
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption '{name}': choose one of {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or not 0 <= severity <= 5:
        raise DataError(f"corruption severity must be an integer 0..5, got {severity!r}")
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"corrupt() takes uint8 images (B, H, W, C), got {x.dtype} {tuple(x.shape)}")
    if severity == 0:
        return x.clone()
    g = torch.Generator(device=x.device).manual_seed(seed)
    out = torch.empty_like(x)
    for i in range(0, len(x), _CORRUPT_CHUNK):
        xf = x[i:i + _CORRUPT_CHUNK].permute(0, 3, 1, 2).float() / 255  # (b, C, H, W) in [0, 1]
        y = CORRUPTIONS[name](xf, severity, g)
        out[i:i + _CORRUPT_CHUNK] = (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return out
