"""Procedural source and target domains for the shift benchmark (seeded, pure PIL + numpy).

Source domain ("icons"): one filled shape in a flat colour on a flat background, with a caption built
from templates ("a small red star in the top left."). Pretraining uses two stages of it: clean icons
(saturated colours on pale backgrounds), then colour-varied icons (any background colour, faint
noise). The source test split uses the colour-varied renderer.

Target domain ("cluttered prints"): the same ten shape classes, drawn dark (half with hatched fills,
half solid) on a light, striped, blotchy background with distractor strokes, then blurred and
corrupted by pixel noise. The class is still obvious to a human, but the source never has textured
backgrounds, strokes or hatching, so a CLIP pretrained on the source loses much of its zero-shot
accuracy there (and its predictions become class-imbalanced).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "crescent",
    "arrow",
    "hexagon",
)
# Prompt templates for the zero-shot classifier (the benchmark passes them to the engine).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {} shape.",
    "an image of the {}.",
)

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
    "orange": (240, 130, 20),
    "black": (20, 20, 20),
    "pink": (240, 90, 170),
}
_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {pos}.",
    "a photo of a {colour} {shape}.",
    "a {shape}.",
    "a {size} {shape} on a {bgword} background.",
    "a picture of a {shape} in the {pos}.",
    "a {colour} {shape}, {size}.",
    "an image of the {shape}.",
    "a {shape} shape, {colour}.",
)
RENDER = 128  # draw at 4x and downsample for anti-aliasing
IMAGE_SIZE = 64


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _rotate(
    points: list[tuple[float, float]], cx: float, cy: float, a: float
) -> list[tuple[float, float]]:
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def shape_outline(
    name: str, cx: float, cy: float, r: float, rot: float
) -> list[list[tuple[float, float]]]:
    """Closed polygons (outer first; a second one is a hole) approximating the shape."""
    up = -math.pi / 2 + rot
    if name == "circle":
        return [_polygon(cx, cy, r, 48, 0)]
    if name == "ring":
        return [_polygon(cx, cy, r, 48, 0), _polygon(cx, cy, r * 0.55, 48, 0)]
    if name == "square":
        return [_polygon(cx, cy, r * 1.15, 4, math.pi / 4 + rot)]
    if name == "diamond":  # a tall rhombus, so no rotation turns a square into it
        pts = [(cx, cy - r * 1.1), (cx + r * 0.62, cy), (cx, cy + r * 1.1), (cx - r * 0.62, cy)]
        return [_rotate(pts, cx, cy, rot)]
    if name == "triangle":
        return [_polygon(cx, cy + r * 0.15, r * 1.15, 3, up)]
    if name == "hexagon":
        return [_polygon(cx, cy, r, 6, rot)]
    if name == "star":
        pts = []
        for i in range(10):
            rr = r * 1.1 if i % 2 == 0 else r * 0.45
            a = up + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return [pts]
    if name == "cross":
        w = r * 0.36
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        return [_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, rot)]
    if name == "crescent":
        outer = _polygon(cx, cy, r, 48, 0)
        inner = _polygon(cx + r * 0.45, cy - r * 0.1, r * 0.8, 48, 0)
        return [_rotate(outer, cx, cy, rot), _rotate(inner, cx, cy, rot)]
    if name == "arrow":
        h, s = r * 0.28, r * 0.1
        pts = [(-r, -h), (s, -h), (s, -r * 0.75), (r, 0), (s, r * 0.75), (s, h), (-r, h)]
        return [_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, rot)]
    raise ValueError(f"unknown shape {name!r}")


def _shape_mask(
    name: str, cx: float, cy: float, r: float, rot: float, outline: int = 0
) -> Image.Image:
    """L-mode mask of the shape at RENDER size; ``outline`` > 0 draws only a stroke of that width."""
    m = Image.new("L", (RENDER, RENDER), 0)
    d = ImageDraw.Draw(m)
    polys = shape_outline(name, cx, cy, r, rot)
    if name == "crescent":  # outer minus an offset disc
        d.polygon(polys[0], fill=255)
        d.polygon(polys[1], fill=0)
        if outline:
            inner = m.filter(ImageFilter.MinFilter(2 * (outline // 2) + 1))
            m = Image.fromarray(
                np.clip(np.asarray(m, np.int16) - np.asarray(inner, np.int16), 0, 255).astype(
                    np.uint8
                )
            )
        return m
    if outline:
        for poly in polys:
            d.line([*poly, poly[0], poly[1]], fill=255, width=outline, joint="curve")
        return m
    d.polygon(polys[0], fill=255)
    for hole in polys[1:]:
        d.polygon(hole, fill=0)
    return m


def _place(rng: np.random.Generator) -> tuple[float, float, float, float, str, str]:
    size = str(rng.choice(["small", "large"]))
    r = RENDER * (rng.uniform(0.17, 0.24) if size == "small" else rng.uniform(0.27, 0.34))
    margin = r * 1.15 + 2
    cx = rng.uniform(margin, RENDER - margin)
    cy = rng.uniform(margin, RENDER - margin)
    rot = rng.uniform(-0.35, 0.35)
    col = "left" if cx < RENDER / 2 else "right"
    row = "top" if cy < RENDER / 2 else "bottom"
    return cx, cy, r, rot, size, f"{row} {col}"


SIDES: tuple[str, ...] = ("left", "right")
# Captions of the "side" layout: every caption names the side, so the pretrained CLIP learns it
# (the free layout names the position in 2 captions of 8, and its CLIP barely tells it).
_SIDE_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on the {pos}.",
    "a {shape} on the {pos}.",
    "a photo of a {shape} on the {pos}.",
    "a picture of a {colour} {shape} on the {pos}.",
    "a {shape} on the {pos} of a {bgword} background.",
    "an image of the {shape} on the {pos}.",
)


def _place_side(rng: np.random.Generator) -> tuple[float, float, float, float, str, str]:
    """A small shape clearly in the left or right half (centre within 40 % of its edge): the side
    word is the class's second part, and a mirror flip always changes it."""
    r = RENDER * rng.uniform(0.15, 0.22)
    margin = r * 1.15 + 2
    side = str(rng.choice(SIDES))
    lo, hi = (margin, 0.40 * RENDER) if side == "left" else (0.60 * RENDER, RENDER - margin)
    cx, cy = rng.uniform(lo, hi), rng.uniform(margin, RENDER - margin)
    return cx, cy, r, rng.uniform(-0.35, 0.35), "small", side


# layout -> (placement, caption templates); "free" is the shift benchmark's own.
LAYOUTS = {"free": (_place, None), "side": (_place_side, _SIDE_CAPTION_TEMPLATES)}


_CLEAN_CAPTION_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("{bgword}", "plain") for t in _CAPTION_TEMPLATES
)


def render_source_clean(
    rng: np.random.Generator, label: int, layout: str = "free"
) -> tuple[Image.Image, str]:
    """Pretraining stage 1: a saturated named colour on a flat pale background, no noise."""
    name = CLASSES[label]
    place, captions = LAYOUTS[layout]
    cx, cy, r, rot, size, pos = place(rng)
    colour = str(rng.choice(list(_COLOURS)))
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (RENDER, RENDER), bg)
    img.paste(_COLOURS[colour], mask=_shape_mask(name, cx, cy, r, rot))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    templates = _CLEAN_CAPTION_TEMPLATES if captions is None else captions
    tmpl = templates[int(rng.integers(len(templates)))]
    return img, tmpl.format(size=size, colour=colour, shape=name, pos=pos, bgword="plain")


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def render_source(
    rng: np.random.Generator, label: int, layout: str = "free"
) -> tuple[Image.Image, str]:
    """One source image (IMAGE_SIZE px RGB) and its caption: a filled shape on a flat background.

    Background and shape colours are random (any brightness, at least 90 luma levels apart), with
    faint pixel noise, so the pretrained CLIP does not tie a class to one colour scheme.
    """
    name = CLASSES[label]
    place, captions = LAYOUTS[layout]
    cx, cy, r, rot, size, pos = place(rng)
    colour = str(rng.choice(list(_COLOURS)))
    fg = np.array(_COLOURS[colour], np.float64)
    if rng.random() < 0.3:  # a named saturated colour 70 % of the time, otherwise a random one
        fg = rng.uniform(0, 255, size=3)
        colour = "bright" if _luma(fg) > 128 else "dark"
    while True:
        bg = rng.uniform(0, 255, size=3)
        if abs(_luma(bg) - _luma(fg)) >= 90:
            break
    img = Image.new("RGB", (RENDER, RENDER), tuple(int(v) for v in bg))
    img.paste(tuple(int(v) for v in fg), mask=_shape_mask(name, cx, cy, r, rot))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    noisy = np.asarray(img, np.float32) + rng.normal(
        0, rng.uniform(0, 8) * (rng.random() < 0.5), size=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    templates = _CAPTION_TEMPLATES if captions is None else captions
    tmpl = templates[int(rng.integers(len(templates)))]
    bgword = "dark" if _luma(bg) < 128 else "light"
    return img, tmpl.format(size=size, colour=colour, shape=name, pos=pos, bgword=bgword)


def _texture(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A low-frequency noisy background with random stripes, float32 [RENDER, RENDER, 3]."""
    base = rng.uniform(lo, hi, size=3)
    coarse = rng.uniform(-35, 35, size=(8, 8, 3)).astype(np.float32)
    coarse_img = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c]).resize((RENDER, RENDER), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ],
        -1,
    )
    yy, xx = np.mgrid[0:RENDER, 0:RENDER].astype(np.float32)
    a = rng.uniform(0, math.pi)
    freq = rng.uniform(0.08, 0.25)
    stripes = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * freq) > 0).astype(np.float32)
    return base + coarse_img + stripes[..., None] * rng.uniform(15, 45, size=3)


@dataclass(frozen=True)
class TargetStyle:
    # Light background, dark shape. (A dark background with a light shape, the previous default, left
    # the tiny CLIP's features too weak to adapt: linear probe 49 % on the validation split.)
    bg: tuple[float, float] = (150.0, 220.0)  # background base level range
    fg: tuple[float, float] = (0.0, 80.0)  # shape colour range
    outline_p: float = 0.0  # probability of a thick outline (0.2 makes zero-shot near chance)
    # Otherwise, probability of a hatched fill (else a solid fill). Hatching is the shift the source
    # never shows and what biases zero-shot towards "star" and "ring": on the validation split, with
    # the tiny CLIP, 0.3 gave zero-shot 60.9 % (label-free prior correction 71.5 %), 0.5 gives 50.6 %
    # (62.4 %), well below the source's 85 %.
    hatch_p: float = 0.5
    strokes: tuple[int, int] = (1, 4)  # number of distractor strokes: integers in [lo, hi)
    blur: tuple[float, float] = (0.5, 1.5)  # Gaussian blur radius at 128 px
    noise: tuple[float, float] = (4.0, 12.0)  # pixel-noise std at IMAGE_SIZE px


def render_target(
    rng: np.random.Generator, label: int, style: TargetStyle | None = None
) -> Image.Image:
    """One target image: a hatched or solid shape on textured clutter, blurred and noisy."""
    return render_target_placed(rng, label, style)[0]


def render_target_placed(
    rng: np.random.Generator, label: int, style: TargetStyle | None = None, layout: str = "free"
) -> tuple[Image.Image, str, str]:
    """:func:`render_target` plus where the shape landed: (image, size word, position words)."""
    st = style or TargetStyle()
    name = CLASSES[label]
    cx, cy, r, rot, size, pos = LAYOUTS[layout][0](rng)
    arr = _texture(rng, *st.bg)
    # Distractor strokes: random line segments in mid-bright colours.
    clutter = Image.new("L", (RENDER, RENDER), 0)
    dc = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(*st.strokes))):
        x0, y0, x1, y1 = rng.uniform(0, RENDER, size=4)
        dc.line(
            [(x0, y0), (x1, y1)], fill=int(rng.integers(120, 200)), width=int(rng.integers(3, 7))
        )
    arr += np.asarray(clutter, np.float32)[..., None] / 255.0 * rng.uniform(60, 140, size=3)
    # The shape: a thick light outline, or a hatched fill.
    stroke = int(rng.integers(7, 12))
    if rng.random() < st.outline_p:
        mask = np.asarray(_shape_mask(name, cx, cy, r, rot, outline=stroke), np.float32) / 255.0
    elif rng.random() < st.hatch_p:
        fill = np.asarray(_shape_mask(name, cx, cy, r, rot), np.float32) / 255.0
        yy, xx = np.mgrid[0:RENDER, 0:RENDER].astype(np.float32)
        hatch = ((xx + yy) % 12 < 6).astype(np.float32)
        edge = np.asarray(_shape_mask(name, cx, cy, r, rot, outline=5), np.float32) / 255.0
        mask = np.maximum(fill * hatch, edge)
    else:
        mask = np.asarray(_shape_mask(name, cx, cy, r, rot), np.float32) / 255.0
    colour = rng.uniform(*st.fg, size=3)
    arr = arr * (1 - mask[..., None]) + colour * mask[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*st.blur)))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    noisy = np.asarray(img, np.float32) + rng.normal(
        0, rng.uniform(*st.noise), size=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), size, pos


def style_key(style: TargetStyle | None = None) -> str:
    """The target style (default: the benchmark's) and image size, for cache keys (a changed renderer
    setting redoes runs)."""
    return f"{IMAGE_SIZE}:{style or TargetStyle()!r}"


@dataclass(frozen=True)
class TargetSplits:
    adapt_dir: Path  # unlabeled (flat folder)
    val_dir: Path  # labelled, held out from the test set (for justifying defaults, never the test)
    test_dir: Path  # labelled (one subfolder per class)


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    return labels


def source_pairs(
    n: int, seed: int, clean: bool = False, layout: str = "free"
) -> Iterator[tuple[Image.Image, str, int]]:
    rng = np.random.default_rng(seed)
    render = render_source_clean if clean else render_source
    for label in _balanced_labels(n, rng):
        img, cap = render(rng, int(label), layout)
        yield img, cap, int(label)


def write_target(
    root: Path, n_adapt: int, n_val: int, n_test: int, seed: int, style: TargetStyle | None = None
) -> TargetSplits:
    """Write the target splits as PNG folders under ``root`` (skipped when already complete)."""
    splits = TargetSplits(root / "adapt", root / "val", root / "test")
    done = root / ".complete"
    stamp = f"{style_key(style)} n={n_adapt},{n_val},{n_test} seed={seed}\n"
    if done.exists() and done.read_text() == stamp:
        return splits
    for sub in (splits.adapt_dir, splits.val_dir, splits.test_dir):  # stale or partial: redo
        shutil.rmtree(sub, ignore_errors=True)
    for i, (sub, n, labelled) in enumerate(
        (
            (splits.adapt_dir, n_adapt, False),
            (splits.val_dir, n_val, True),
            (splits.test_dir, n_test, True),
        )
    ):
        rng = np.random.default_rng([seed, i])
        sub.mkdir(parents=True, exist_ok=True)
        for j, label in enumerate(_balanced_labels(n, rng)):
            img = render_target(rng, int(label), style)
            if labelled:
                d = sub / CLASSES[label]
                d.mkdir(exist_ok=True)
                img.save(d / f"{j:05d}.png")
            else:
                img.save(sub / f"{j:05d}.png")  # unlabeled: names carry no class
    done.write_text(stamp)
    return splits


def write_source_eval(root: Path, n: int, seed: int) -> Path:
    """A labelled source-domain test folder (to show the source accuracy of the pretrained CLIP)."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for j, label in enumerate(_balanced_labels(n, rng)):
        img, _ = render_source(rng, int(label))
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{j:05d}.png")
    done.write_text("ok\n")
    return root
