"""Rendering: a `Scene` drawn with PIL/numpy at any resolution (coordinates are fractions of the side)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from lit_amdet.world.scenes import Scene
from lit_amdet.world.vocabulary import BACKGROUND_COLOURS, COLOURS

# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _unit_polygon(n: int, inner: float | None = None, phase: float = -np.pi / 2) -> np.ndarray:
    """Vertices of a regular polygon (or star if ``inner``) of radius 1."""
    k = 2 * n if inner else n
    ang = phase + np.arange(k) * (2 * np.pi / k)
    rad = np.ones(k)
    if inner:
        rad[1::2] = inner
    return np.stack([np.cos(ang) * rad, np.sin(ang) * rad], axis=1)


_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _unit_polygon(3) + np.array([0.0, 0.15]),  # centre the mass
    "star": _unit_polygon(5, inner=0.45),
    "diamond": np.array([[0.0, -1.0], [0.65, 0.0], [0.0, 1.0], [-0.65, 0.0]]),
    "hexagon": _unit_polygon(6, phase=0.0),
    "pentagon": _unit_polygon(5),
    "arrow": np.array([[-0.95, -0.28], [0.1, -0.28], [0.1, -0.7], [0.95, 0.0],
                       [0.1, 0.7], [0.1, 0.28], [-0.95, 0.28]]),
    "heart_tip": np.array([[-0.93, -0.12], [0.93, -0.12], [0.0, 0.92]]),
}


def _shade(rgb: np.ndarray) -> np.ndarray:
    """Second colour for textures/grid lines: darker for light colours, lighter for dark."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 110:
        return rgb * 0.5
    return rgb + (255.0 - rgb) * 0.55


@lru_cache(maxsize=None)
def _texture_colour(colour: str, bg_colour: str) -> np.ndarray:
    """Second texture colour: the usual shade unless it would melt into the
    background (white checkered on gray), then the more contrasting of two others."""
    c1 = np.asarray(COLOURS[colour][0], dtype=np.float32)
    bg = np.asarray(BACKGROUND_COLOURS[bg_colour][0], dtype=np.float32)
    first = _shade(c1)
    if float(np.linalg.norm(first - bg)) >= 70:
        return first
    options = (c1 * 0.25, c1 + (255.0 - c1) * 0.6)
    return max(options, key=lambda o: min(float(np.linalg.norm(o - bg)), float(np.linalg.norm(o - c1))))


@lru_cache(maxsize=8)
def _ramps(size: int) -> dict[str, np.ndarray]:
    lin = np.linspace(0.0, 1.0, size, dtype=np.float32)
    return {
        "horizontal": np.broadcast_to(lin[None, :, None], (size, size, 1)),
        "vertical": np.broadcast_to(lin[:, None, None], (size, size, 1)),
        "diagonal": ((lin[None, :] + lin[:, None]) / 2.0)[:, :, None],
    }


def _render_background(scene: Scene, size: int) -> np.ndarray:
    base = np.asarray(BACKGROUND_COLOURS[scene.background_colour][0], dtype=np.float32)
    kind = scene.background
    if kind == "gradient":
        dark = base * 0.55
        light = base + (255.0 - base) * 0.45
        return dark + _ramps(size)[scene.gradient_direction] * (light - dark)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = base
    if kind == "noise":
        rng = np.random.default_rng(scene.noise_seed)
        img += rng.standard_normal((size, size, 1), dtype=np.float32) * 28.0
    elif kind == "grid":
        line = _shade(base)
        step = max(4, size // 8)
        width = max(1, size // 64)
        for w in range(width):
            img[w::step, :] = line
            img[:, w::step] = line
    return img


def _draw_masks(scene: Scene, size: int) -> np.ndarray:
    """Label image: pixel value k+1 where object k is. Objects never overlap, so one
    uint8 canvas holds all masks and each costs a cheap comparison afterwards."""
    label = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label)
    for k, obj in enumerate(scene.objects, start=1):
        cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
        shape = obj.shape
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=k)
        elif shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=k)
            ri = r * 0.55
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        elif shape == "square":
            h = r * 0.75
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=k)
        elif shape == "cross":
            a, w = r * 0.95, r * 0.32
            draw.rectangle((cx - a, cy - w, cx + a, cy + w), fill=k)
            draw.rectangle((cx - w, cy - a, cx + w, cy + a), fill=k)
        elif shape == "heart":
            lr = r * 0.5
            for ox in (-0.45, 0.45):
                ex, ey = cx + ox * r, cy - 0.3 * r
                draw.ellipse((ex - lr, ey - lr, ex + lr, ey + lr), fill=k)
            pts = _POLYGONS["heart_tip"] * r + (cx, cy)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=k)
        elif shape == "crescent":
            pass  # drawn with numpy below: its cut-out circle leaves the object's disc
        else:
            pts = _POLYGONS[shape] * r + (cx, cy)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=k)
    lab = np.array(label)
    for k, obj in enumerate(scene.objects, start=1):
        if obj.shape == "crescent":
            cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
            y0, y1, x0, x1 = _bbox(cx, cy, r, size)
            ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
            xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
            outer = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            cut = (xs - (cx + 0.45 * r)) ** 2 + (ys - (cy - 0.2 * r)) ** 2 <= (0.8 * r) ** 2
            lab[y0:y1, x0:x1][outer & ~cut] = k
    return lab


def _bbox(cx: float, cy: float, r: float, size: int) -> tuple[int, int, int, int]:
    r = r * 1.15  # some outlines (triangle, square corners) reach ~1.1 r
    y0, y1 = max(0, int(cy - r) - 1), min(size, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(size, int(cx + r) + 2)
    return y0, y1, x0, x1


def _texture(texture: str, ys: np.ndarray, xs: np.ndarray, r: float) -> np.ndarray:
    """Boolean pattern (True = second colour); period scales with the object."""
    if texture == "striped":
        w = max(1, int(round(r / 3.0)))
        return ((xs + ys) // w) % 2 == 0
    if texture == "checkered":
        w = max(1, int(round(r / 2.5)))
        return ((xs // w) + (ys // w)) % 2 == 0
    cell = max(3, int(round(r * 0.6)))
    half = (cell - 1) / 2.0
    return ((xs % cell) - half) ** 2 + ((ys % cell) - half) ** 2 <= (cell * 0.3) ** 2


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render a scene as an RGB image of ``size`` x ``size`` pixels."""
    img = _render_background(scene, size)
    lab = _draw_masks(scene, size)
    for k, obj in enumerate(scene.objects, start=1):
        cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
        y0, y1, x0, x1 = _bbox(cx, cy, r, size)
        mask = lab[y0:y1, x0:x1] == k
        region = img[y0:y1, x0:x1]
        c1 = np.asarray(COLOURS[obj.colour][0], dtype=np.float32)
        if obj.texture == "solid":
            region[mask] = c1
            continue
        # Anchor the pattern at the object's corner so it looks the same wherever it sits.
        ys = np.arange(y0, y1)[:, None] - int(cy - r)
        xs = np.arange(x0, x1)[None, :] - int(cx - r)
        pat = _texture(obj.texture, ys, xs, r)
        region[mask & ~pat] = c1
        region[mask & pat] = _texture_colour(obj.colour, scene.background_colour)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
