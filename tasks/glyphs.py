"""The embedded image suite ``glyphs:<target>``: rendered glyphs in several domains.

It mirrors the structure of ImageNet-to-Sketch: one large *source* task to pretrain
a backbone on, and several small *target* tasks with real domain shift to transfer
to. Everything is rendered offline from the fonts that ship inside matplotlib
(DejaVu, STIX, Computer Modern), so no data is ever downloaded.

========== ========== ================================ ===============================
task       style      classes                          mirrors; look
========== ========== ================================ ===============================
source     photo      26 Latin capitals                ImageNet: coloured glyphs on
                                                       gradients, blobs, noise, clutter
sketch     sketch     26 Latin lower-case              Sketch: jittery pencil outlines
                                                       on white paper
painting   painting   digits and 6 symbols (16)        WikiArt: posterised palette
                                                       blotches, brush streaks
greek      photo      24 Greek lower-case              Flowers: same style, new classes
cyrillic   photo      20 Cyrillic capitals (confusable CUBS: same style, new classes
                      Ш/Щ, Ь/Ъ/Ы, И/Й)                 with fine distinctions
fine       print      12 font faces (the class is the  Cars: fine-grained; ink on
                      typeface, the letter varies)     paper
greek-     sketch     24 Greek lower-case              new classes and a new style at
sketch                                                 once: pencil outlines
========== ========== ================================ ===============================

Each task has ``train``/``val``/``test`` splits rendered with its *train fonts*,
and a ``shift_test`` split rendered with *unseen* fonts (obliques, italics,
Computer Modern) at 1.6x the geometric and photometric distortion; for ``fine``,
whose classes are fonts, ``shift_test`` uses unseen letters instead. Images per
class (train/val/test/shift_test): 160/20/40/40 for the source, 30/10/20/20 for
each target; ``glyphs:<target>?images=T,V,E[,S]`` renders other counts (for example
larger validation and test splits, which rank and measure with less noise), cached
apart from the default-size task.

Images are RGB float tensors ``(3, S, S)`` normalised with the fixed
:data:`MEAN`/:data:`STD` (per channel, measured on the source training split and
rounded; used for every task, as ImageNet's statistics are for its targets).

Rendering is deterministic: every sample draws from its own
``numpy.random.Generator`` seeded by ``(seed, task, split, index)``. Results are
cached per task under ``<root>/<target>-seed<seed>-<S>px/`` as a ``manifest.json``
plus one safetensors file per split (``x`` uint8 ``(N, 3, S, S)``, ``y`` int64); the
root is ``root=``, else ``$SWR_CACHE/glyphs``, else ``~/.cache/swr/glyphs``. A cache
whose config hash differs (other version, counts, fonts...) is regenerated, and
generation writes into a temporary folder that is renamed into place only when
complete, so an interrupted run never leaves half a cache.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from swr.progress import progress_bar

from swr.errors import SwrError
from swr.io import cache_dir

from .base import Task, tensor_split
from .options import SpecOption, parse_options

#: Bump when rendering code changes so that old caches are regenerated.
GLYPHS_VERSION = 1

SOURCE = "source"
TARGETS = ("sketch", "painting", "greek", "cyrillic", "fine", "greek-sketch")
SPLITS = ("train", "val", "test", "shift_test")
STYLES = ("photo", "sketch", "painting", "print")

#: Per-channel normalisation of every glyph task: ``x = (pixel / 255 - MEAN) / STD``.
MEAN = (0.5, 0.5, 0.5)
STD = (0.23, 0.23, 0.23)

#: Distortion multiplier of the ``shift_test`` split (1.0 for the others).
SHIFT_STRENGTH = 1.6

# Fonts are named by their file stem in matplotlib's bundled font folder.
_LATIN_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Bold",
                "DejaVuSansMono", "DejaVuSansMono-Bold", "STIXGeneral", "STIXGeneralBol")
_LATIN_SHIFT_FONTS = ("DejaVuSans-Oblique", "DejaVuSerif-Italic", "DejaVuSansMono-BoldOblique",
                      "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmtt10",
                      "cmb10", "cmti10")
# Computer Modern has neither Greek nor Cyrillic.
_INTL_FONTS = _LATIN_FONTS
_INTL_SHIFT_FONTS = ("DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSerif-Italic",
                     "DejaVuSerif-BoldItalic", "DejaVuSansMono-Oblique", "STIXGeneralItalic",
                     "STIXGeneralBolIta")
_FINE_FONTS = {  # class name -> font
    "DejaVu Sans": "DejaVuSans", "DejaVu Sans Bold": "DejaVuSans-Bold",
    "DejaVu Sans Oblique": "DejaVuSans-Oblique", "DejaVu Serif": "DejaVuSerif",
    "DejaVu Serif Bold": "DejaVuSerif-Bold", "DejaVu Serif Italic": "DejaVuSerif-Italic",
    "DejaVu Sans Mono": "DejaVuSansMono", "STIX General": "STIXGeneral",
    "STIX General Bold": "STIXGeneralBol", "STIX General Italic": "STIXGeneralItalic",
    "CM Roman": "cmr10", "CM Typewriter": "cmtt10",
}


@dataclass(frozen=True)
class GlyphSpec:
    """How one glyph task is rendered.

    ``kind == "char"``: class ``i`` is the glyph ``classes[i]`` in a random font
    (``fonts``; ``shift_fonts`` for ``shift_test``). ``kind == "font"``: class ``i``
    is the font ``fonts[i]`` showing a random glyph from ``glyphs`` (``shift_glyphs``
    for ``shift_test``). ``per_class`` gives the images per class of each split.
    """

    style: str
    kind: str
    classes: tuple[str, ...]
    fonts: tuple[str, ...]
    shift_fonts: tuple[str, ...] = ()
    glyphs: tuple[str, ...] = ()
    shift_glyphs: tuple[str, ...] = ()
    per_class: tuple[tuple[str, int], ...] = (("train", 30), ("val", 10), ("test", 20),
                                              ("shift_test", 20))
    description: str = ""


SPECS: dict[str, GlyphSpec] = {
    SOURCE: GlyphSpec(
        "photo", "char", tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), _LATIN_FONTS, _LATIN_SHIFT_FONTS,
        per_class=(("train", 160), ("val", 20), ("test", 40), ("shift_test", 40)),
        description="Latin capitals, coloured, on textured photo-like backgrounds"),
    "sketch": GlyphSpec(
        "sketch", "char", tuple("abcdefghijklmnopqrstuvwxyz"), _LATIN_FONTS, _LATIN_SHIFT_FONTS,
        description="Latin lower-case as jittery pencil outlines on white paper"),
    "painting": GlyphSpec(
        "painting", "char", tuple("0123456789&@#$%?"), _LATIN_FONTS,
        # cmti10 draws "$" as a pound sign.
        tuple(f for f in _LATIN_SHIFT_FONTS if f != "cmti10"),
        description="digits and symbols painted in posterised palette blotches"),
    "greek": GlyphSpec(
        "photo", "char", tuple("αβγδεζηθικλμνξοπρστυφχψω"), _INTL_FONTS, _INTL_SHIFT_FONTS,
        description="Greek lower-case in the source's photo style (new classes)"),
    "cyrillic": GlyphSpec(
        "photo", "char", tuple("БГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯ"), _INTL_FONTS, _INTL_SHIFT_FONTS,
        description="Cyrillic capitals with confusable pairs, photo style (new classes)"),
    "greek-sketch": GlyphSpec(
        "sketch", "char", tuple("αβγδεζηθικλμνξοπρστυφχψω"), _INTL_FONTS, _INTL_SHIFT_FONTS,
        description="Greek lower-case as pencil outlines on white paper (new classes and "
                    "a new style at once)"),
    "fine": GlyphSpec(
        "print", "font", tuple(_FINE_FONTS), tuple(_FINE_FONTS.values()),
        glyphs=tuple("aegkQRfy"), shift_glyphs=tuple("bdhsGM"),
        description="typeface identification (fine-grained): ink-on-paper letters"),
}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def font_path(font: str) -> Path:
    """The file of a matplotlib-bundled font given its stem (``"DejaVuSans"``)."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{font}.ttf"
    if not path.is_file():
        raise SwrError(f"font {font!r} not found at {path}; use a font stem from that folder")
    return path


@cache
def _font_pixel_size(font: str, canvas: int) -> int:
    """Font size giving every font the same capital height (0.55 of the canvas)."""
    probe = ImageFont.truetype(str(font_path(font)), 100)
    _, top, _, bottom = probe.getbbox("H")
    return max(4, round(100 * 0.55 * canvas / (bottom - top)))


@lru_cache(maxsize=4096)
def _glyph_mask(font: str, glyph: str, canvas: int) -> np.ndarray:
    """Coverage (uint8, 255 = ink) of ``glyph`` centred on a ``canvas``-square.

    Glyphs keep their size relative to the capitals (so ``o`` stays smaller than
    ``O``) but are shrunk to fit 90% of the canvas when larger.
    """
    pt = ImageFont.truetype(str(font_path(font)), _font_pixel_size(font, canvas))
    big = Image.new("L", (3 * canvas, 3 * canvas), 0)
    ImageDraw.Draw(big).text((canvas, canvas), glyph, font=pt, fill=255)
    box = big.getbbox()
    if box is None:
        raise SwrError(f"font {font!r} draws nothing for glyph {glyph!r}")
    ink = big.crop(box)
    fit = 0.9 * canvas / max(ink.size)
    if fit < 1.0:
        ink = ink.resize((max(1, round(ink.width * fit)), max(1, round(ink.height * fit))),
                         Image.Resampling.LANCZOS)
    out = Image.new("L", (canvas, canvas), 0)
    out.paste(ink, ((canvas - ink.width) // 2, (canvas - ink.height) // 2))
    return np.asarray(out)  # uint8 keeps the cache of a few thousand masks small


@lru_cache(maxsize=64)
def _interp_matrix(n: int, k: int) -> np.ndarray:
    """(n, k) linear-interpolation weights that stretch k grid points over n pixels."""
    u = np.linspace(0.0, k - 1.0, n)
    i0 = np.minimum(np.floor(u).astype(int), k - 2)
    frac = u - i0
    w = np.zeros((n, k), dtype=np.float32)
    w[np.arange(n), i0] = 1.0 - frac
    w[np.arange(n), i0 + 1] = frac
    return w


def _smooth_noise(rng: np.random.Generator, size: int, cells: int | tuple[int, int],
                  channels: int = 0) -> np.ndarray:
    """Band-limited noise, about unit variance: a random grid upsampled bilinearly.

    Fewer cells give larger structures; unequal ``(rows, cols)`` give streaks.
    Returns ``(size, size)`` or, with ``channels``, ``(size, size, channels)``.
    """
    ky, kx = (cells, cells) if isinstance(cells, int) else cells
    grid = rng.standard_normal((ky, kx, max(channels, 1))).astype(np.float32)
    rows = (_interp_matrix(size, ky) @ grid.reshape(ky, -1)).reshape(size, kx, -1)
    out = _interp_matrix(size, kx) @ rows  # (size, kx) @ (size, kx, c): broadcast over rows
    return out if channels else out[..., 0]


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample a 2-D array at float pixel coordinates; zero outside it."""
    h, w = img.shape
    padded = np.pad(img, 1)
    x0, y0 = np.floor(xs), np.floor(ys)
    fx, fy = xs - x0, ys - y0
    # +1 for the zero border; clipping sends far-away points onto that border.
    xa = np.clip(x0.astype(int) + 1, 0, w + 1)
    xb = np.clip(x0.astype(int) + 2, 0, w + 1)
    ya = np.clip(y0.astype(int) + 1, 0, h + 1)
    yb = np.clip(y0.astype(int) + 2, 0, h + 1)
    top = padded[ya, xa] * (1 - fx) + padded[ya, xb] * fx
    bottom = padded[yb, xa] * (1 - fx) + padded[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


@dataclass(frozen=True)
class _Pose:
    """A random similarity-plus-shear placement of the glyph on the canvas."""

    angle: float
    scale: float
    aspect: float
    shear: float
    dx: float
    dy: float

    @staticmethod
    def draw(rng: np.random.Generator, strength: float, rotate: float, scale: tuple[float, float],
             shift: float, shear: float = 0.12, stretch: float = 0.1) -> _Pose:
        """Rotation (degrees), scale range, shift (canvas fraction), shear and log
        aspect bounds, all but the upper scale widened by ``strength``."""
        lo, hi = scale
        return _Pose(angle=np.deg2rad(rng.uniform(-rotate, rotate) * strength),
                     scale=rng.uniform(lo - 0.1 * (strength - 1), hi),
                     aspect=float(np.exp(rng.uniform(-stretch, stretch) * strength)),
                     shear=rng.uniform(-shear, shear) * strength,
                     dx=rng.uniform(-shift, shift) * strength, dy=rng.uniform(-shift, shift) * strength)


def _warp(mask: np.ndarray, pose: _Pose, rng: np.random.Generator | None = None,
          wobble: float = 0.0) -> np.ndarray:
    """Place ``mask`` with ``pose``; ``wobble`` adds a smooth random displacement (px)."""
    n = mask.shape[0]
    c = (n - 1) / 2
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    # Inverse map: output pixel -> glyph pixel, so every output pixel gets a value.
    px, py = xs - c - pose.dx * n, ys - c - pose.dy * n
    cos, sin = np.cos(-pose.angle), np.sin(-pose.angle)
    rx, ry = cos * px - sin * py, sin * px + cos * py
    sy = pose.scale / pose.aspect
    sx = pose.scale * pose.aspect
    gy = ry / sy
    gx = (rx - pose.shear * ry) / sx
    if wobble and rng is not None:
        cells = int(rng.integers(3, 6))
        gx = gx + wobble * _smooth_noise(rng, n, cells)
        gy = gy + wobble * _smooth_noise(rng, n, cells)
    return _bilinear(mask, gx + c, gy + c)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [0, 1]."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    return xs, ys


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _contrasting(rng: np.random.Generator, behind: np.ndarray, min_gap: float) -> np.ndarray:
    """A random colour whose luma differs from ``behind`` by at least ``min_gap``."""
    base = float(_luma(behind))
    for _ in range(20):
        colour = rng.random(3).astype(np.float32)
        if abs(float(_luma(colour)) - base) >= min_gap:
            return colour
    return np.full(3, 0.0 if base > 0.5 else 1.0, dtype=np.float32)


def _masked_mean(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (img * mask[..., None]).sum((0, 1)) / max(float(mask.sum()), 1e-6)


def _max_filter(a: np.ndarray, r: int) -> np.ndarray:
    """Separable (2r+1)-square maximum filter (a dilation)."""
    n = a.shape[0]
    p = np.pad(a, r)
    rows = np.max([p[:, i:i + n] for i in range(2 * r + 1)], axis=0)
    return np.max([rows[i:i + n] for i in range(2 * r + 1)], axis=0)


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur over the first two axes, edges replicated."""
    n = img.shape[0]
    p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
    return sum(p[i:i + n, j:j + n] for i in range(3) for j in range(3)) / 9.0


def _segment_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random straight stroke across the canvas (clutter), antialiased, in [0, 1]."""
    xs, ys = _grid(n)
    a, b = rng.random(2), rng.random(2)
    d = b - a
    t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    dist = np.hypot(xs - a[0] - t * d[0], ys - a[1] - t * d[1]) * n
    width = rng.uniform(0.6, 2.0)
    return np.clip(width - dist + 0.5, 0, 1)


def _photo(mask: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A coloured glyph on a gradient / blob / noise background with clutter and lighting."""
    n = mask.shape[0]
    xs, ys = _grid(n)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.clip((xs - 0.5) * np.cos(theta) + (ys - 0.5) * np.sin(theta) + 0.5, 0, 1)
    c0, c1 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    img = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(int(rng.integers(0, 5))):
        cx, cy = rng.random(2)
        sigma = rng.uniform(0.08, 0.3)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2)) * rng.uniform(0.4, 1)
        img = img * (1 - blob[..., None]) + rng.random(3).astype(np.float32) * blob[..., None]
    if rng.random() < 0.7:
        img = img + rng.uniform(0.03, 0.15) * _smooth_noise(rng, n, int(rng.integers(4, 16)), 3)
    if rng.random() < 0.3:  # drop shadow
        shadow = np.roll(mask, tuple(int(v) for v in rng.integers(1, 4, 2)), axis=(0, 1))
        img = img * (1 - 0.5 * _box_blur(shadow)[..., None])
    if rng.random() < 0.4:  # clutter behind the glyph
        line = _segment_mask(rng, n)[..., None]
        img = img * (1 - line) + rng.random(3).astype(np.float32) * line
    ink = _contrasting(rng, _masked_mean(np.clip(img, 0, 1), mask), 0.3 / strength)
    fill = ink + (rng.random(3).astype(np.float32) - 0.5) * 0.2 * ramp[..., None]
    if rng.random() < 0.2:  # outlined glyph
        rim = (_max_filter(mask, 1) - mask)[..., None]
        img = img * (1 - rim) + (1 - ink) * rim
    img = img * (1 - mask[..., None]) + fill * mask[..., None]
    if rng.random() < 0.3:  # clutter in front of the glyph
        line = _segment_mask(rng, n)[..., None]
        img = img * (1 - line) + rng.random(3).astype(np.float32) * line
    img = img * (1 + 0.15 * strength * _smooth_noise(rng, n, 3))[..., None]
    if rng.random() < 0.25 * strength:
        img = _box_blur(img)
    return img + rng.normal(0, rng.uniform(0.01, 0.05) * strength, img.shape).astype(np.float32)


def _sketch(mask_fn: Callable[[float], np.ndarray], rng: np.random.Generator,
            strength: float) -> np.ndarray:
    """Pencil outlines of the glyph, drawn twice with hand jitter, on white paper.

    ``mask_fn(wobble)`` returns the placed glyph with that much random displacement,
    so both strokes share a pose but wobble independently.
    """
    first = mask_fn(rng.uniform(1.0, 2.5) * strength)
    n = first.shape[0]
    darkness = rng.uniform(1.2, 2.0)

    def outline(m: np.ndarray) -> np.ndarray:
        # Dilation minus erosion with a 3x3 square: a 2-3 px band on the contour that
        # stays hollow inside strokes (wider kernels fill thin strokes completely).
        return np.clip((_max_filter(m, 1) + _max_filter(1 - m, 1) - 1) * darkness, 0, 1)

    pressure = np.clip(0.75 + 0.35 * _smooth_noise(rng, n, int(rng.integers(4, 9))), 0.15, 1)
    ink = outline(first) * pressure
    if rng.random() < 0.7:
        second = mask_fn(rng.uniform(1.0, 2.5) * strength)
        ink = np.maximum(ink, outline(second) * rng.uniform(0.4, 0.9))
    if rng.random() < 0.35:  # hatching inside the shape
        xs, ys = _grid(n)
        phi = rng.uniform(0, np.pi)
        hatch = (np.sin((xs * np.cos(phi) + ys * np.sin(phi)) * n * rng.uniform(0.6, 1.0)) > 0.6)
        ink = np.maximum(ink, hatch * first * rng.uniform(0.3, 0.6))
    paper = np.float32(rng.uniform(0.9, 1.0)) - rng.uniform(0, 0.05, 3).astype(np.float32)
    img = paper + 0.015 * strength * _smooth_noise(rng, n, 24, 3)
    lead = np.float32(rng.uniform(0.05, 0.35))
    pen = np.array([lead, lead, lead + rng.uniform(0, 0.25)], dtype=np.float32)
    return img * (1 - ink[..., None]) + pen * ink[..., None]


def _palette(rng: np.random.Generator, k: int = 5) -> np.ndarray:
    """k colours around a random hue plus its complement, as a painter might mix."""
    h0 = rng.random()
    hues = h0 + rng.choice([0.0, 0.06, -0.06, 0.12, 0.5, 0.45], size=k)
    return np.array([colorsys.hsv_to_rgb(h % 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.3, 1.0))
                     for h in hues], dtype=np.float32)


def _streaks(rng: np.random.Generator, n: int) -> np.ndarray:
    """Directional brush-stroke texture at a random angle."""
    long = _smooth_noise(rng, 2 * n, (int(rng.integers(2, 5)), n // 2))
    pose = _Pose(angle=rng.uniform(0, np.pi), scale=1.0, aspect=1.0, shear=0.0, dx=0.0, dy=0.0)
    # Rotate the oversized field, then keep its centre so that no corner is empty.
    return _warp(long, pose)[n // 2:n // 2 + n, n // 2:n // 2 + n]


def _painting(mask: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Glyph and background as blotches of a limited palette, brush-streaked, posterised."""
    n = mask.shape[0]
    pal = _palette(rng)
    fields = np.stack([_smooth_noise(rng, n, int(rng.integers(2, 6))) for _ in pal], -1)
    weights = np.exp(4.0 * fields)
    img = (weights / weights.sum(-1, keepdims=True)) @ pal
    behind = float(_luma(_masked_mean(img, mask)))
    lumas = _luma(pal)
    ink = pal[int(np.argmax(np.abs(lumas - behind)))]
    if abs(float(_luma(ink)) - behind) < 0.3 / strength:
        ink = np.clip(ink + (0.45 if behind < 0.5 else -0.45), 0, 1)
    rough = np.clip((mask - 0.5 + 0.3 * _streaks(rng, n)) * 3 + 0.5, 0, 1)
    img = img * (1 - rough[..., None]) + ink * rough[..., None]
    img = img * (1 + 0.12 * strength * _streaks(rng, n))[..., None]
    img = img * (1 + rng.uniform(-0.15, 0.15, 3).astype(np.float32) * strength)
    levels = int(rng.integers(3, 6))
    img = np.round(np.clip(img, 0, 1) * (levels - 1)) / (levels - 1)
    return img + rng.normal(0, 0.01 * strength, img.shape).astype(np.float32)


def _print(mask: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Dark ink on slightly stained, tinted paper; a little ink spread and grain."""
    n = mask.shape[0]
    xs, ys = _grid(n)
    paper = np.array([1.0, rng.uniform(0.93, 1.0), rng.uniform(0.8, 1.0)], dtype=np.float32)
    img = np.ones((n, n, 3), dtype=np.float32) * paper * rng.uniform(0.85, 1.0)
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.random(2)
        stain = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * rng.uniform(0.1, 0.3) ** 2))
        img = img * (1 - 0.12 * stain[..., None] * np.array([0.6, 0.9, 1.0], dtype=np.float32))
    if rng.random() < 0.3 * strength:
        mask = _box_blur(mask)
    ink = np.array([[0.05, 0.05, 0.05], [0.05, 0.08, 0.3], [0.25, 0.12, 0.05]],
                   dtype=np.float32)[int(rng.integers(0, 3))]
    alpha = (mask * rng.uniform(0.8, 1.0))[..., None]
    img = img * (1 - alpha) + ink * alpha
    return img + rng.normal(0, rng.uniform(0.01, 0.03) * strength, img.shape).astype(np.float32)


def render_sample(glyph: str, font: str, style: str, rng: np.random.Generator,
                  image_size: int = 32, strength: float = 1.0) -> np.ndarray:
    """Render one image: ``glyph`` in ``font`` (a matplotlib font stem) in ``style``.

    ``style`` is one of :data:`STYLES`; ``strength`` scales the random geometric and
    photometric distortion (``shift_test`` uses :data:`SHIFT_STRENGTH`). Drawing is
    done at twice ``image_size`` and box-downsampled, which antialiases thin strokes.
    Returns uint8 ``(image_size, image_size, 3)``; the same ``rng`` state gives the
    same image.
    """
    if style not in STYLES:
        raise SwrError(f"unknown glyph style {style!r}; known: {', '.join(STYLES)}")
    n = 2 * image_size
    base = _glyph_mask(font, glyph, n).astype(np.float32) / 255.0
    if style == "sketch":
        pose = _Pose.draw(rng, strength, rotate=15, scale=(1.1, 1.45), shift=0.06)
        img = _sketch(lambda wobble: _warp(base, pose, rng, wobble), rng, strength)
    elif style == "print":
        # Larger glyphs with little rotation, shear or stretch: slant and width tell
        # the typefaces apart (an oblique is a sheared regular).
        pose = _Pose.draw(rng, strength, rotate=3, scale=(1.05, 1.25), shift=0.04,
                          shear=0.03, stretch=0.03)
        img = _print(_warp(base, pose), rng, strength)
    else:
        pose = _Pose.draw(rng, strength, rotate=12, scale=(0.75, 1.1), shift=0.1)
        mask = _warp(base, pose)
        img = (_photo if style == "photo" else _painting)(mask, rng, strength)
    small = img.reshape(image_size, 2, image_size, 2, 3).mean((1, 3))
    return (np.clip(small, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------
# Generation and cache
# ---------------------------------------------------------------------------

def _spec(target: str, per_class: tuple[int, ...] | None = None) -> GlyphSpec:
    """``SPECS[target]``, with ``per_class`` = (train, val, test, shift_test) images per
    class in place of its own counts when given."""
    spec = SPECS[target]
    if per_class is None:
        return spec
    return dataclasses.replace(spec, per_class=tuple(zip(SPLITS, per_class)))


def _config(spec: GlyphSpec, target: str, seed: int, image_size: int) -> dict:
    """Everything that determines a task's pixels; its hash names the cache's validity."""
    spec = asdict(spec)
    spec["per_class"] = dict(spec["per_class"])
    return {"version": GLYPHS_VERSION, "target": target, "seed": seed,
            "image_size": image_size, "shift_strength": SHIFT_STRENGTH, "spec": spec}


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _render_split(spec: GlyphSpec, target: str, split: str, seed: int, image_size: int,
                  bar) -> tuple[torch.Tensor, torch.Tensor]:
    per_class = dict(spec.per_class)[split]
    shifted = split == "shift_test"
    strength = SHIFT_STRENGTH if shifted else 1.0
    task_key = zlib.crc32(target.encode())  # stable across runs, unlike hash()
    n_classes = len(spec.classes)
    x = np.empty((per_class * n_classes, 3, image_size, image_size), dtype=np.uint8)
    y = np.arange(per_class * n_classes, dtype=np.int64) % n_classes
    for i, label in enumerate(y):
        rng = np.random.default_rng([seed, task_key, SPLITS.index(split), i])
        if spec.kind == "char":
            glyph = spec.classes[label]
            font = str(rng.choice(spec.shift_fonts if shifted else spec.fonts))
        else:
            font = spec.fonts[label]
            glyph = str(rng.choice(spec.shift_glyphs if shifted else spec.glyphs))
        x[i] = render_sample(glyph, font, spec.style, rng, image_size, strength).transpose(2, 0, 1)
        bar.update(1)
    return torch.from_numpy(x), torch.from_numpy(y)


def _generate(spec: GlyphSpec, target: str, seed: int, image_size: int, folder: Path,
              config: dict, progress: bool) -> None:
    """Render every split of ``target`` (as ``spec`` says) into ``folder`` atomically."""
    total = sum(count for _, count in spec.per_class) * len(spec.classes)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        counts = {}
        with progress_bar(total, f"rendering glyphs:{target}", "img", leave=False,
                          disable=not progress) as bar:
            for split in SPLITS:
                x, y = _render_split(spec, target, split, seed, image_size, bar)
                save_file({"x": x, "y": y}, str(tmp / f"{split}.safetensors"))
                counts[split] = len(y)
        manifest = {"config_hash": _config_hash(config), "config": config,
                    "class_names": list(spec.classes), "counts": counts,
                    "generation_seconds": round(time.perf_counter() - start, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        _install(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"glyphs:{target}: rendered {total} images in {manifest['generation_seconds']} s "
              f"into {folder}", file=sys.stderr)


def _install(tmp: Path, folder: Path) -> None:
    """Move a complete ``tmp`` onto ``folder``, replacing a stale cache there.

    A directory cannot be renamed onto a non-empty one, so the old cache is first
    renamed aside; if another process installed the same task meanwhile, theirs wins.
    """
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
        os.replace(folder, old / "cache")
    try:
        os.replace(tmp, folder)
    except OSError:
        if _read_manifest(folder) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(folder: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders left by generations killed long ago."""
    now = time.time()
    for prefix in (".tmp-", ".old-"):
        for path in folder.parent.glob(f"{prefix}{folder.name}-*"):
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _load_cache(folder: Path, config: dict) -> tuple[dict, dict] | None:
    """``(manifest, {split: (x, y)})`` if ``folder`` holds a valid cache for ``config``."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("config_hash") != _config_hash(config):
        return None
    splits = {}
    for split in SPLITS:
        try:
            tensors = load_file(str(folder / f"{split}.safetensors"))
        except (OSError, SafetensorError):
            return None
        try:
            if set(tensors) != {"x", "y"} or len(tensors["y"]) != manifest["counts"][split]:
                return None
        except (KeyError, TypeError):  # a damaged manifest: regenerate
            return None
        splits[split] = (tensors["x"], tensors["y"])
    names = manifest.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return manifest, splits


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Where glyph caches live: ``root``, else ``$SWR_CACHE/glyphs``, else ``~/.cache/swr/glyphs``."""
    if root is not None:
        return Path(root).expanduser()
    return cache_dir("glyphs")


def normalize(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` -> float32 normalised with ``mean``/``std``
    (default :data:`MEAN`/:data:`STD`)."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, as float images in [0, 1] (for plots)."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


class RandomTranslate:
    """Batch augmentation: shift each image by up to ``max_shift`` pixels.

    Pads by reflection and crops at a random offset per image. There is no flip:
    mirrored glyphs are other glyphs (b/d, Я/R) and mirrored italics another face.
    Uses ``generator`` if given, else torch's global RNG (seed it for repeatability).
    """

    def __init__(self, max_shift: int, generator: torch.Generator | None = None):
        self.max_shift = max_shift
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_shift <= 0:
            return x
        b, _, h, w = x.shape
        s = self.max_shift
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="reflect")
        off = torch.randint(0, 2 * s + 1, (2, b), generator=self.generator, device=x.device)
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomTranslate(max_shift={self.max_shift})"


def load_glyphs(target: str, root: str | os.PathLike | None = None, seed: int = 0,
                image_size: int = 32, progress: bool = True,
                data_config: dict | None = None,
                per_class: Sequence[int] | None = None) -> Task:
    """The glyph task ``glyphs:<target>`` (``target`` is :data:`SOURCE` or one of :data:`TARGETS`).

    Renders the task on first use (seconds) and caches it under :func:`cache_root`;
    later calls with the same ``seed``/``image_size`` load the cache. Splits are
    in-memory float32 tensors ``(3, image_size, image_size)``, normalised with
    :data:`MEAN`/:data:`STD`; ``train_transform`` shifts images by up to
    ``image_size // 16`` pixels.

    ``data_config`` (a backbone's timm data config) replaces :data:`MEAN`/:data:`STD`
    with its ``mean``/``std``, the statistics its weights were trained with. Its input
    size is not used: the suite is rendered at ``image_size`` (convolutional backbones
    take any size; rendering at 224 px would cost ~50x the compute for no detail).

    ``per_class`` = (train, val, test[, shift_test]) images per class replaces the
    task's counts (shift_test defaults to test's); such a task is cached in a folder of
    its own. Every image is seeded by its index, so a larger split starts with the
    default split's images.
    """
    data_config = data_config or {}
    mean = tuple(float(v) for v in data_config.get("mean") or MEAN)
    std = tuple(float(v) for v in data_config.get("std") or STD)
    if target not in SPECS:
        raise SwrError(f"unknown glyphs target {target!r}; known: {', '.join(SPECS)}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise SwrError(f"glyphs image_size must be an integer >= 8, got {image_size!r}")
    image_size = int(image_size)
    suffix = ""
    if per_class is not None:
        per_class = tuple(int(n) if isinstance(n, np.integer) else n for n in per_class)
        # bounded before any image is rendered (a Python caller's counts as a spec's)
        images = dataclasses.replace(IMAGES, estimate=lambda t, v: _estimate(t, v, image_size))
        per_class = images.check(per_class, f"glyphs:{target}", target)
        if len(per_class) == 3:
            per_class += (per_class[2],)
        suffix = "-images-" + "-".join(map(str, per_class))
    spec = _spec(target, per_class)
    config = _config(spec, target, int(seed), image_size)
    folder = cache_root(root) / f"{target}-seed{int(seed)}-{image_size}px{suffix}"
    cached = _load_cache(folder, config)
    if cached is None:
        _generate(spec, target, int(seed), image_size, folder, config, progress)
        cached = _load_cache(folder, config)
        if cached is None:
            raise SwrError(f"glyph cache {folder} is unreadable right after writing it; "
                           f"check the disk, or set SWR_CACHE to another folder")
    manifest, splits = cached
    data = {split: tensor_split(normalize(x, mean, std), y) for split, (x, y) in splits.items()}
    return Task(
        id=f"glyphs:{target}", modality="image", class_names=list(manifest["class_names"]),
        train=data["train"], val=data["val"], test=data["test"], shift_test=data["shift_test"],
        input_shape=(3, image_size, image_size),
        train_transform=RandomTranslate(max(1, image_size // 16)),
        info={"style": spec.style, "description": spec.description, "seed": int(seed),
              "image_size": image_size, "mean": list(mean), "std": list(std),
              "preprocess": {"image_size": image_size, "crop_pct": None,
                             "interpolation": "bilinear", "mean": list(mean), "std": list(std)},
              "counts": manifest["counts"], "config_hash": manifest["config_hash"],
              "version": GLYPHS_VERSION, "cache_dir": str(folder),
              "fonts": list(spec.fonts), "shift_fonts": list(spec.shift_fonts),
              "shift": ("unseen letters" if spec.kind == "font" else "unseen fonts")
              + f", {SHIFT_STRENGTH}x distortion"},
    )


def _estimate(target: str, per_class: tuple[int, ...], image_size: int = 32
              ) -> tuple[float, str]:
    """Bytes the task of ``per_class`` images holds (float32 RGB) and its image count."""
    n_classes = len(SPECS[target].classes) if target in SPECS else len(SPECS[SOURCE].classes)
    per_class = tuple(per_class) + ((per_class[2],) if len(per_class) == 3 else ())
    images = sum(per_class) * n_classes
    return images * 3 * image_size * image_size * 4, f"{images} images"


#: ``glyphs:<target>?images=T,V,E[,S]``; 5000 a class and split is 170x the default.
IMAGES = SpecOption("images", (3, 4), 5000, "images per class and split",
                    "images per class of train, val, test[, shift_test]", "30,60,100",
                    _estimate)


def load_glyphs_spec(rest: str, seed: int = 0, **kwargs) -> Task:
    """The task of a ``glyphs:<rest>`` spec: ``<target>`` or ``<target>?images=T,V,E[,S]``.

    The second form renders T/V/E (and S, else E) images per class for train, val, test
    (and shift_test), cached apart from the default-size task; its task id keeps the
    modifier (``glyphs:fine?images=30,60,100``)."""
    target, options = parse_options(f"glyphs:{rest}", rest, {"images": IMAGES})
    if "images" not in options:
        return load_glyphs(target, seed=seed, **kwargs)
    parts = [str(n) for n in options["images"]]
    task = load_glyphs(target, seed=seed, per_class=options["images"], **kwargs)
    return dataclasses.replace(task, id=f"glyphs:{target}?images={','.join(parts)}")
