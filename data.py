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

Text sources (stdlib, shakespeare, PATH.txt, PATH.jsonl) come later.

Helpers for the models: `normalize` (uint8 images -> float in [-1, 1], channels first) and
`augment` (random crop with zero padding + horizontal flip, on the images' device).
"""

import functools
import hashlib
import os
import pickle
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


def load(name: str, kind: str = "images", image_size: int = 32, seed: int = 0) -> ImageData:
    """Load a data source by name (see the module docstring)."""
    if kind != "images":
        raise DataError(f"data kind '{kind}' is not available yet (only 'images': {', '.join(IMAGE_SOURCES)})")
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
        raise DataError(f"'{name}' is a text source; text data is not available yet "
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


def _download(url, dest, md5, name):
    """Fetch url to dest through a temporary file; only a file with the right MD5 is renamed into place."""
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    from tqdm import tqdm
    offline = "use --data shapes (embedded, needs no download)"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            h, total = hashlib.md5(), int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {name}", disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != md5:
            raise DataError(f"{name}: checksum mismatch for {url} (got MD5 {h.hexdigest()}, expected {md5}); "
                            f"try again later or {offline}")
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
