"""Scenes: what an image of the world holds, and how one is drawn from an index's random stream.

The data structures (`SceneObject`, `Scene`, `WorldSample`, `WorldConfig`), the cheap per-index random
stream (`Draw`, keyed by `stream_key`), scene sampling (`sample_scene`) and the spatial facts captions read
off a scene (`relation`, `position_of`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from lit_amdet.world.vocabulary import (
    BACKGROUND_COLOUR_NAMES,
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    COLOURS,
    GRADIENT_DIRECTIONS,
    SHAPE_NAMES,
    SIZE_NAMES,
    SIZES,
    TEXTURE_NAMES,
)

# ---------------------------------------------------------------------------
# Data structures
# ---------------------------------------------------------------------------


@dataclass(eq=True)
class SceneObject:
    """One shape. Coordinates are fractions of the image side (y grows downwards),
    so one scene renders identically at any resolution."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float
    y: float
    radius: float
    group: int  # objects of one group share shape, colour, size and texture


@dataclass(eq=True)
class Scene:
    """Structured description of an image. Groups have unique (shape, colour), so
    "two red circles" means exactly two red circles are present."""

    objects: tuple[SceneObject, ...]
    background: str  # one of BACKGROUND_KINDS
    background_colour: str  # key of BACKGROUND_COLOURS
    gradient_direction: str = "horizontal"
    noise_seed: int = 0

    @property
    def groups(self) -> list[list[SceneObject]]:
        out: dict[int, list[SceneObject]] = {}
        for obj in self.objects:
            out.setdefault(obj.group, []).append(obj)
        return [out[g] for g in sorted(out)]

    def to_dict(self) -> dict:
        return {
            "objects": [obj.__dict__.copy() for obj in self.objects],
            "background": self.background,
            "background_colour": self.background_colour,
            "gradient_direction": self.gradient_direction,
            "noise_seed": self.noise_seed,
        }


@dataclass
class WorldSample:
    image: Image.Image
    caption: str
    scene: Scene
    index: int = -1
    template: str = ""  # name of the sentence template behind the caption


@dataclass
class WorldConfig:
    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    max_count: int = 4  # largest group of identical objects ("four red stars")
    num_samples: int = 1_000_000
    p_distractor: float = 0.2  # chance of an optional distractor clause
    p_background: float = 0.5  # chance an optional background mention is added
    p_no_period: float = 0.3  # web-style captions often end without a full stop

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError("need 1 <= min_objects <= max_objects <= 6")
        if not 1 <= self.max_count <= 6:
            raise ValueError("max_count must be in [1, 6]")
        if self.num_samples < 1:
            raise ValueError("num_samples must be positive")


# ---------------------------------------------------------------------------
# Random helper. Constructing a numpy Generator costs ~30 us and each scalar call a
# few us, which would make text-only caption streams too slow (10k captions must take
# < 1 s on a busy CPU). Index streams therefore use a Mersenne Twister
# (``random.Random``, whose ``random()`` output for an int seed is stable across
# Python versions) seeded with an injective packing of (seed, index, stream, extra):
# cheap to create, and any index is generated on its own.
# ---------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def stream_key(seed: int, index: int, stream: int = 0, extra: int = 0) -> int:
    """Injective packing (distinct tuples give distinct MT seeds)."""
    return ((seed & _M64) << 128) | ((index & _M64) << 64) | ((stream & 0xFFFFFFFF) << 32) | (extra & 0xFFFFFFFF)


class Draw:
    __slots__ = ("r",)

    def __init__(self, source: int | np.random.Generator) -> None:
        if isinstance(source, np.random.Generator):
            source = int(source.integers(0, 2**63))
        self.r: Callable[[], float] = random.Random(source).random

    def u(self) -> float:
        """Uniform float in [0, 1)."""
        return self.r()

    def below(self, n: int) -> int:
        return int(self.r() * n) % n  # % guards the (2**-53) rounding case u * n == n

    def pick(self, seq: Sequence):
        n = len(seq)
        return seq[int(self.r() * n) % n]

    def chance(self, p: float) -> bool:
        return self.r() < p

    def shuffled(self, seq: Sequence) -> list:
        out = list(seq)
        r = self.r
        for i in range(len(out) - 1, 0, -1):
            j = int(r() * (i + 1)) % (i + 1)
            out[i], out[j] = out[j], out[i]
        return out


# ---------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------

_EDGE = 0.02  # keep shapes this far from the border
_GAP = 0.03  # and this far from each other, so masks never overlap


def _colour_dist(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5)


@lru_cache(maxsize=None)
def _visible_colours(bg_colour: str) -> tuple[str, ...]:
    """Object colours that contrast with the background (white on white is invisible)."""
    bg = BACKGROUND_COLOURS[bg_colour][0]
    return tuple(c for c in COLOUR_NAMES if _colour_dist(COLOURS[c][0], bg) >= 110)


def sample_scene(cfg: WorldConfig, d: Draw) -> Scene:
    bg_kind = d.pick(BACKGROUND_KINDS)
    bg_colour = d.pick(BACKGROUND_COLOUR_NAMES)
    direction = d.pick(GRADIENT_DIRECTIONS)
    noise_seed = int(d.u() * 2**31)
    n_objects = cfg.min_objects + d.below(cfg.max_objects - cfg.min_objects + 1)

    # Partition the objects into groups; singletons are favoured so that relations
    # (which need single objects) are common, but counts still occur often.
    sizes: list[int] = []
    left = n_objects
    while left > 0:
        k = 1
        if left >= 2 and cfg.max_count >= 2 and d.chance(0.35):
            k = 2 + d.below(min(left, cfg.max_count) - 1)
        sizes.append(k)
        left -= k

    colours = _visible_colours(bg_colour)
    used: set[tuple[str, str]] = set()
    groups: list[list[str]] = []  # [shape, colour, size, texture]
    for _ in sizes:
        while True:  # (shape, colour) must be unique per scene for counts to be true
            key = (d.pick(SHAPE_NAMES), d.pick(colours))
            if key not in used:
                used.add(key)
                break
        groups.append([key[0], key[1], d.pick(SIZE_NAMES), d.pick(TEXTURE_NAMES)])

    positions = _place(d, sizes, groups)
    objects: list[SceneObject] = []
    idx = 0
    for g, (k, (shape, colour, size, texture)) in enumerate(zip(sizes, groups)):
        for _ in range(k):
            x, y = positions[idx]
            idx += 1
            objects.append(SceneObject(shape, colour, size, texture, x, y, SIZES[size][0], g))
    return Scene(tuple(objects), bg_kind, bg_colour, direction, noise_seed)


def _place(d: Draw, sizes: list[int], groups: list[list[str]]) -> list[tuple[float, float]]:
    """Rejection-sample non-overlapping centres. If a layout keeps failing, shrink
    the largest group (updating its size label so captions stay true)."""
    rand = d.r
    while True:
        radii = [SIZES[groups[g][2]][0] for g, k in enumerate(sizes) for _ in range(k)]
        for _restart in range(4):
            placed: list[tuple[float, float, float]] = []
            for r in radii:
                lo = r + _EDGE
                span = 1.0 - 2.0 * lo
                for _try in range(60):
                    x = lo + span * rand()
                    y = lo + span * rand()
                    for px, py, pr in placed:
                        lim = r + pr + _GAP
                        if (x - px) * (x - px) + (y - py) * (y - py) < lim * lim:
                            break
                    else:
                        placed.append((x, y, r))
                        break
                else:
                    break
            if len(placed) == len(radii):
                return [(x, y) for x, y, _ in placed]
        largest = max(range(len(groups)), key=lambda g: (SIZES[groups[g][2]][0], sizes[g]))
        order = SIZE_NAMES.index(groups[largest][2])
        if order == 0:  # everything small already; cannot happen for <= 6 objects
            raise RuntimeError("could not place objects")
        groups[largest][2] = SIZE_NAMES[order - 1]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Dominant spatial relation of ``a`` with respect to ``b``: 'left', 'right',
    'above' or 'below' (image y grows downwards). Non-overlap guarantees the
    dominant offset is at least ~0.13 of the image side, so it is visible."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def position_of(obj: SceneObject) -> tuple[str, str] | None:
    """Absolute position words, only where they are clearly true (thirds of the image)."""
    h = "left" if obj.x < 0.33 else "right" if obj.x > 0.67 else "center" if 0.42 < obj.x < 0.58 else None
    v = "top" if obj.y < 0.33 else "bottom" if obj.y > 0.67 else "middle" if 0.42 < obj.y < 0.58 else None
    lr, tb = h in ("left", "right"), v in ("top", "bottom")
    if lr and tb:
        return (v, h)  # type: ignore[return-value]
    if lr:
        return ("", h)  # type: ignore[return-value]
    if tb:
        return (v, "")  # type: ignore[return-value]
    if h == "center" and v == "middle":
        return ("middle", "center")
    return None
