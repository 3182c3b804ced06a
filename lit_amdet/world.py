"""An offline miniature vision-language world: a streamed image-caption generator.

We must pretrain small CLIP-family models without a model hub or a downloaded data
set, yet their text encoders have to learn something close to language rather than
one fixed template. :class:`World` therefore produces, for every integer index, a
scene of 1-``max_objects`` coloured, textured shapes on a background, renders it
with PIL/numpy and describes it with a compositional grammar (22 sentence templates,
noun-phrase variants, synonyms, relations, counts, background mentions and
distractor clauses). Every caption is *true* of its image: colours, shapes, counts,
spatial relations and the background are all read off the sampled scene.

Determinism: ``sample(i)`` depends only on ``(config.seed, i)``. The scene is drawn
from a random stream keyed by ``(seed, i)`` (see ``_Draw``: like
``default_rng([seed, i])`` but cheaper to create) and the caption continues that
stream, so captions can be produced without rendering (``World.captions``) and
still match ``World.sample(i).caption`` exactly.

Size of the world (why >= 100k distinct pairs is guaranteed): a single object alone
has 12 shapes x 12 colours x 3 sizes x 4 textures = 1,728 attribute combinations,
and the background 4 kinds x 7 colours = 28 (gradients add 3 directions), so
single-object scenes alone give ~48,000 discrete variants before positions (which
are continuous) are counted; two-object scenes give 1,728^2 / 2 x 28 ~ 4e7.
Each scene is then described by one of up to 22 templates x ~20 intros x ~3 synonyms
per shape, colour, size and texture word x ~5 noun-phrase forms x ~18 distractors, so
the caption space alone exceeds 1e9 and the image space is effectively unbounded;
the test suite checks that 20,000 indices give >= 19,000 distinct captions.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "TEMPLATE_NAMES",
    "TEXTURES",
    "Scene",
    "SceneObject",
    "World",
    "WorldConfig",
    "WorldSample",
    "relation",
]

# ---------------------------------------------------------------------------
# Vocabulary. Each entry lists synonyms; the first one is the canonical name.
# ---------------------------------------------------------------------------

#: shape -> list of (singular, plural) synonyms.
SHAPES: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("square tile", "square tiles"), ("square shape", "square shapes")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes"),
                 ("three-sided shape", "three-sided shapes")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars"), ("star shape", "star shapes")),
    "ring": (("ring", "rings"), ("hoop", "hoops"), ("donut", "donuts"), ("annulus", "annuli")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus symbol", "plus symbols")),
    "heart": (("heart", "hearts"), ("heart shape", "heart shapes"), ("love heart", "love hearts")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    "hexagon": (("hexagon", "hexagons"), ("six-sided polygon", "six-sided polygons"),
                ("hexagonal shape", "hexagonal shapes")),
    "pentagon": (("pentagon", "pentagons"), ("five-sided polygon", "five-sided polygons"),
                 ("pentagonal shape", "pentagonal shapes")),
    "crescent": (("crescent", "crescents"), ("crescent moon", "crescent moons"), ("moon shape", "moon shapes")),
    "arrow": (("arrow", "arrows"), ("arrow shape", "arrow shapes"), ("pointer", "pointers")),
}

#: colour -> (RGB, synonyms).
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((220, 30, 30), ("red", "crimson", "scarlet")),
    "green": ((30, 170, 50), ("green", "emerald")),
    "blue": ((30, 70, 220), ("blue", "cobalt", "royal blue")),
    "yellow": ((245, 215, 30), ("yellow", "gold", "lemon")),
    "orange": ((245, 140, 20), ("orange", "tangerine")),
    "purple": ((140, 50, 180), ("purple", "violet")),
    "pink": ((245, 120, 190), ("pink", "rose")),
    "brown": ((130, 80, 40), ("brown", "chocolate")),
    "cyan": ((30, 200, 210), ("cyan", "turquoise", "aqua")),
    "white": ((250, 250, 250), ("white", "snow-white")),
    "black": ((15, 15, 15), ("black", "jet-black")),
    "gray": ((128, 128, 128), ("gray", "grey")),
}

#: size -> (radius as a fraction of the image side, synonyms).
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.09, ("small", "little", "tiny")),
    "medium": (0.13, ("medium-sized", "mid-sized", "average-sized")),
    "large": (0.18, ("large", "big", "huge")),
}

#: texture -> (adjectives, "with ..." noun phrases).
TEXTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "solid": (("solid", "plain", "filled"), ("a solid fill", "no pattern", "a uniform fill")),
    "striped": (("striped", "stripy", "lined"), ("stripes", "a striped pattern", "diagonal stripes")),
    "dotted": (("dotted", "spotted", "polka-dot"), ("dots", "polka dots", "a dotted pattern")),
    "checkered": (("checkered", "checked", "chequered"), ("a checkered pattern", "a checkerboard pattern")),
}

#: background colour -> (RGB, synonyms). Kept apart from object colours so that a
#: caption's background words never name an object's colour by accident.
BACKGROUND_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "white": ((240, 240, 240), ("white", "off-white")),
    "black": ((20, 20, 20), ("black", "dark")),
    "gray": ((120, 120, 120), ("gray", "grey")),
    "beige": ((225, 210, 170), ("beige", "cream", "sand-coloured")),
    "navy": ((20, 30, 90), ("navy", "navy blue", "dark blue")),
    "skyblue": ((150, 200, 240), ("light blue", "sky blue", "pale blue")),
    "darkgreen": ((20, 70, 35), ("dark green", "forest green")),
}

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise", "grid")
_GRADIENT_DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")

_SHAPE_NAMES = tuple(SHAPES)
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)
_TEXTURE_NAMES = tuple(TEXTURES)
_BG_COLOUR_NAMES = tuple(BACKGROUND_COLOURS)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_COUNT_PHRASES: dict[int, tuple[str, ...]] = {
    2: ("two", "two", "a pair of", "a couple of"),
    3: ("three", "three", "a trio of", "a group of three"),
    4: ("four", "four", "a group of four", "a set of four"),
    5: ("five", "a group of five"),
    6: ("six", "a group of six"),
}

_INTROS: tuple[str, ...] = (
    "a photo of", "a picture of", "an image showing", "an image of", "a drawing of",
    "a rendering of", "a simple illustration of", "a sketch of", "a synthetic image of",
    "this image contains", "the picture shows", "we can see", "you can see", "a scene with",
    "a cartoon of", "a small graphic of", "an illustration showing", "a diagram with",
    "THERE", "HERE", "", "",
)
# Intros that read naturally after a leading background clause ("on a gray grid, ...").
_CLAUSE_INTROS: tuple[str, ...] = ("THERE", "we see", "you can see", "one can see", "")

_DISTRACTORS: tuple[str, ...] = (
    "on a sunny day", "drawn by a child", "in the style of a poster", "in a minimalist style",
    "as clip art", "from a children's book", "in low resolution", "as digital art",
    "for a geometry lesson", "shown on a screen", "in flat design", "with a retro look",
    "made with a computer", "as a quick doodle", "from an old textbook", "as part of a puzzle",
    "for a logo design", "in a simple vector style",
)

_OBJECT_NOUNS: tuple[tuple[str, str], ...] = (
    ("shape", "shapes"), ("object", "objects"), ("figure", "figures"), ("item", "items"),
)

_REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of", "on the left side of"),
    "right": ("to the right of", "right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "higher up than", "placed above"),
    "below": ("below", "under", "beneath", "underneath", "lower than"),
    "near": ("next to", "beside", "alongside"),
}
_REL_ITS: dict[str, tuple[str, ...]] = {
    "left": ("to its left", "on its left"),
    "right": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it", "beneath it"),
    "near": ("next to it", "beside it"),
}

_POSITION_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("top", "left"): ("in the top left corner", "in the upper left", "at the top left"),
    ("top", "right"): ("in the top right corner", "in the upper right", "at the top right"),
    ("bottom", "left"): ("in the bottom left corner", "in the lower left", "at the bottom left"),
    ("bottom", "right"): ("in the bottom right corner", "in the lower right", "at the bottom right"),
    ("top", ""): ("at the top", "near the top", "in the upper part"),
    ("bottom", ""): ("at the bottom", "near the bottom", "in the lower part"),
    ("", "left"): ("on the left", "on the left side", "towards the left"),
    ("", "right"): ("on the right", "on the right side", "towards the right"),
    ("middle", "center"): ("in the center", "in the middle", "in the centre"),
}


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


def _stream_key(seed: int, index: int, stream: int = 0, extra: int = 0) -> int:
    """Injective packing (distinct tuples give distinct MT seeds)."""
    return ((seed & _M64) << 128) | ((index & _M64) << 64) | ((stream & 0xFFFFFFFF) << 32) | (extra & 0xFFFFFFFF)


class _Draw:
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
    return tuple(c for c in _COLOUR_NAMES if _colour_dist(COLOURS[c][0], bg) >= 110)


def _sample_scene(cfg: WorldConfig, d: _Draw) -> Scene:
    bg_kind = d.pick(BACKGROUND_KINDS)
    bg_colour = d.pick(_BG_COLOUR_NAMES)
    direction = d.pick(_GRADIENT_DIRECTIONS)
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
            key = (d.pick(_SHAPE_NAMES), d.pick(colours))
            if key not in used:
                used.add(key)
                break
        groups.append([key[0], key[1], d.pick(_SIZE_NAMES), d.pick(_TEXTURE_NAMES)])

    positions = _place(d, sizes, groups)
    objects: list[SceneObject] = []
    idx = 0
    for g, (k, (shape, colour, size, texture)) in enumerate(zip(sizes, groups)):
        for _ in range(k):
            x, y = positions[idx]
            idx += 1
            objects.append(SceneObject(shape, colour, size, texture, x, y, SIZES[size][0], g))
    return Scene(tuple(objects), bg_kind, bg_colour, direction, noise_seed)


def _place(d: _Draw, sizes: list[int], groups: list[list[str]]) -> list[tuple[float, float]]:
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
        order = _SIZE_NAMES.index(groups[largest][2])
        if order == 0:  # everything small already; cannot happen for <= 6 objects
            raise RuntimeError("could not place objects")
        groups[largest][2] = _SIZE_NAMES[order - 1]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Dominant spatial relation of ``a`` with respect to ``b``: 'left', 'right',
    'above' or 'below' (image y grows downwards). Non-overlap guarantees the
    dominant offset is at least ~0.13 of the image side, so it is visible."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _position_of(obj: SceneObject) -> tuple[str, str] | None:
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


# ---------------------------------------------------------------------------
# Caption grammar
# ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class _Captioner:
    """Builds one caption for one scene from one random stream."""

    def __init__(self, scene: Scene, d: _Draw, cfg: WorldConfig) -> None:
        self.scene = scene
        self.d = d
        self.cfg = cfg
        self.groups = scene.groups
        self.singles = [g[0] for g in self.groups if len(g) == 1]
        self.multi = [g for g in self.groups if len(g) > 1]

    # -- words ---------------------------------------------------------------
    def shape_word(self, shape: str, plural: bool) -> str:
        return self.d.pick(SHAPES[shape])[1 if plural else 0]

    def colour_word(self, colour: str) -> str:
        return self.d.pick(COLOURS[colour][1])

    def intro(self, plural_first: bool, pool: Sequence[str] = _INTROS) -> str:
        w = self.d.pick(pool)
        if w == "THERE":
            return "there are" if plural_first else "there is"
        if w == "HERE":
            return "here are" if plural_first else "here is"
        return w

    def count_phrase(self, k: int) -> str:
        return self.d.pick(_COUNT_PHRASES[k])

    # -- noun phrases --------------------------------------------------------
    def np(self, group: list[SceneObject], allow_position: bool = True) -> str:
        """Noun phrase for a group. Colour and shape are always named; size and
        texture are optional; adjective order and phrasing vary."""
        d = self.d
        obj = group[0]
        k = len(group)
        plural = k > 1
        shape = self.shape_word(obj.shape, plural)
        colour = self.colour_word(obj.colour)
        size = d.pick(SIZES[obj.size][1]) if d.chance(0.45) else ""
        p_tex = 0.15 if obj.texture == "solid" else 0.55
        tex_adj = d.pick(TEXTURES[obj.texture][0]) if d.chance(p_tex) else ""
        tex_noun = d.pick(TEXTURES[obj.texture][1]) if tex_adj else ""
        form = d.below(6 if plural else 5)
        if form == 0:  # size texture colour shape
            core = " ".join(w for w in (size, tex_adj, colour, shape) if w)
        elif form == 1:  # size colour texture shape
            core = " ".join(w for w in (size, colour, tex_adj, shape) if w)
        elif form == 2:  # size shape in colour (with texture)
            core = " ".join(w for w in (size, shape) if w) + f" in {colour}"
            if tex_noun:
                core += f" with {tex_noun}"
        elif form == 3:  # shape that is colour (and size)
            verb = "are" if plural else "is"
            core = " ".join(w for w in (tex_adj, shape) if w) + f" that {verb} {colour}"
            if size:
                core += f" and {size}"
        elif form == 4:  # colour shape with texture
            core = " ".join(w for w in (size, colour, shape) if w)
            if tex_noun:
                core += f" with {tex_noun}"
        else:  # plural only: "three stars, all yellow"
            det = self.count_phrase(k)
            body = " ".join(w for w in (size, tex_adj, shape) if w)
            return f"{det} {body}, {'both' if k == 2 else 'all'} {colour}"
        if plural:
            det = self.count_phrase(k)
        else:
            det = d.pick((_article(core), _article(core), "one", "a single"))
        out = f"{det} {core}"
        if allow_position and not plural and d.chance(0.15):
            pos = _position_of(obj)
            if pos is not None:
                out += " " + d.pick(_POSITION_PHRASES[pos])
        return out

    def np_list(self, groups: Sequence[list[SceneObject]]) -> str:
        nps = [self.np(g) for g in groups]
        if len(nps) == 1:
            return nps[0]
        if len(nps) == 2:
            return nps[0] + " " + self.d.pick(("and", "and", "as well as", "together with", "alongside")) + " " + nps[1]
        style = self.d.below(3)
        if style == 0:
            return ", ".join(nps[:-1]) + " and " + nps[-1]
        if style == 1:
            return ", ".join(nps[:-1]) + ", and " + nps[-1]
        return ", ".join(nps[:-1]) + " as well as " + nps[-1]

    def ordered_groups(self) -> list[list[SceneObject]]:
        return self.d.shuffled(self.groups)

    def definite(self, obj: SceneObject) -> str:
        """'the circle' when the shape is unique in the scene, else 'the red circle'."""
        same_shape = sum(1 for g in self.groups if g[0].shape == obj.shape)
        shape = self.shape_word(obj.shape, False)
        if same_shape == 1 and self.d.chance(0.6):
            return f"the {shape}"
        return f"the {self.colour_word(obj.colour)} {shape}"

    # -- background ----------------------------------------------------------
    def bg_colour_word(self) -> str:
        return self.d.pick(BACKGROUND_COLOURS[self.scene.background_colour][1])

    def bg_phrase(self) -> str:
        """Prepositional phrase: 'on a gray grid'."""
        c = self.bg_colour_word()
        kind = self.scene.background
        if kind == "plain":
            opts = (f"on a {c} background", f"against a {c} backdrop", f"on a plain {c} background",
                    f"set against solid {c}", f"on a uniform {c} background")
        elif kind == "gradient":
            dirn = self.scene.gradient_direction
            opts = (f"on a {c} gradient background", f"against a {c} gradient",
                    f"on a {dirn} {c} gradient", f"over a background shading from dark to light {c}")
        elif kind == "noise":
            opts = (f"on a noisy {c} background", f"against grainy {c} static",
                    f"on a speckled {c} background", f"over {c} noise")
        else:
            opts = (f"on a {c} grid", f"on {c} grid paper", f"against a {c} background with grid lines",
                    f"over a {c} lattice background")
        phrase = self.d.pick(opts)
        return phrase.replace("a off-white", "an off-white")

    def bg_sentence(self) -> str:
        c = self.bg_colour_word()
        noun = self.d.pick(("the background", "the backdrop"))
        kind = self.scene.background
        if kind == "plain":
            rest = self.d.pick((f"plain {c}", c, f"a solid {c}"))
        elif kind == "gradient":
            rest = self.d.pick((f"a {c} gradient", f"a {self.scene.gradient_direction} {c} gradient"))
        elif kind == "noise":
            rest = self.d.pick((f"noisy {c}", f"grainy {c}", f"{c} with noise"))
        else:
            rest = self.d.pick((f"a {c} grid", f"{c} with grid lines"))
        return f"{noun} is {rest}".replace("a off-white", "an off-white")

    def bg_subject(self) -> str:
        c = self.bg_colour_word()
        kind = self.scene.background
        if kind == "plain":
            out = self.d.pick((f"a plain {c} background", f"a {c} background", f"an empty {c} canvas"))
        elif kind == "gradient":
            out = self.d.pick((f"a {c} gradient", f"a {c} gradient background"))
        elif kind == "noise":
            out = self.d.pick((f"a noisy {c} background", f"a grainy {c} surface"))
        else:
            out = self.d.pick((f"a {c} grid", f"a sheet of {c} grid paper"))
        return out.replace("a off-white", "an off-white")

    def bg_opt(self) -> str:
        return " " + self.bg_phrase() if self.d.chance(self.cfg.p_background) else ""

    def dist_opt(self) -> str:
        if self.d.chance(self.cfg.p_distractor):
            return self.d.pick((", ", " ")) + self.d.pick(_DISTRACTORS)
        return ""

    # -- relations -----------------------------------------------------------
    def pick_pair(self) -> tuple[SceneObject, SceneObject, str]:
        a, b = self.d.shuffled(self.singles)[:2]
        rel = relation(a, b)
        dx, dy = a.x - b.x, a.y - b.y
        if rel in ("left", "right"):
            if abs(dy) >= 0.15 and self.d.chance(0.3):  # the secondary axis is clear too
                rel = "above" if dy < 0 else "below"
            elif abs(dy) < 0.2 and self.d.chance(0.25):
                rel = "near"
        elif abs(dx) >= 0.15 and self.d.chance(0.3):
            rel = "left" if dx < 0 else "right"
        return a, b, rel

    def rest_groups(self, used: Sequence[SceneObject]) -> list[list[SceneObject]]:
        return [g for g in self.ordered_groups() if g[0] not in used]


# Templates: name -> (eligibility, builder). A builder returns the caption body.
_Template = tuple[Callable[[_Captioner], bool], Callable[[_Captioner], str]]


def _any(c: _Captioner) -> bool:
    return True


def _has_pair(c: _Captioner) -> bool:
    return len(c.singles) >= 2


def _has_triple(c: _Captioner) -> bool:
    return len(c.singles) >= 2 and len(c.groups) >= 3


def _has_count(c: _Captioner) -> bool:
    return bool(c.multi)


def _first_plural(groups: list[list[SceneObject]]) -> bool:
    return len(groups[0]) > 1


def _g_intro(c: _Captioner) -> str:
    gs = c.ordered_groups()
    return f"{c.intro(_first_plural(gs))} {c.np_list(gs)}{c.bg_opt()}{c.dist_opt()}"


def _g_bare_bg(c: _Captioner) -> str:
    return f"{c.np_list(c.ordered_groups())} {c.bg_phrase()}{c.dist_opt()}"


def _g_bg_lead(c: _Captioner) -> str:
    gs = c.ordered_groups()
    return f"{c.bg_phrase()}, {c.intro(_first_plural(gs), _CLAUSE_INTROS)} {c.np_list(gs)}"


def _g_bg_subject(c: _Captioner) -> str:
    return f"{c.bg_subject()} with {c.np_list(c.ordered_groups())} on it{c.dist_opt()}"


def _g_total(c: _Captioner) -> str:
    n = len(c.scene.objects)
    sing, plur = c.d.pick(_OBJECT_NOUNS)
    head = c.d.pick(("a single", "one")) + f" {sing}" if n == 1 else f"{_NUMBER_WORDS[n]} {plur}"
    return f"{head} {c.bg_phrase()}: {c.np_list(c.ordered_groups())}"


def _g_two_sentences(c: _Captioner) -> str:
    gs = c.ordered_groups()
    return f"{c.intro(_first_plural(gs))} {c.np_list(gs)}. {c.bg_sentence()}"


def _g_can_be_seen(c: _Captioner) -> str:
    gs = c.ordered_groups()
    n = len(c.scene.objects)
    verb = "can be seen" if c.d.chance(0.5) else ("are visible" if n > 1 else "is visible")
    return f"{c.np_list(gs)} {verb} {c.bg_phrase()}"


def _g_distractor(c: _Captioner) -> str:
    gs = c.ordered_groups()
    return f"{c.intro(_first_plural(gs))} {c.np_list(gs)}, {c.d.pick(_DISTRACTORS)}{c.bg_opt()}"


def _g_following(c: _Captioner) -> str:
    _, plur = c.d.pick(_OBJECT_NOUNS)
    lead = c.d.pick((f"a scene with the following {plur}", f"the following {plur} appear",
                     f"{plur} in this image"))
    return f"{lead}{c.bg_opt()}: {c.np_list(c.ordered_groups())}"


def _g_bg_first_sentence(c: _Captioner) -> str:
    gs = c.ordered_groups()
    there = "there are" if _first_plural(gs) else "there is"
    return f"{c.bg_sentence()}, and {there} {c.np_list(gs)} on it"


def _g_placed(c: _Captioner) -> str:
    verb = c.d.pick(("placed", "drawn", "arranged", "floating", "sitting", "painted"))
    return f"{c.np_list(c.ordered_groups())} {verb} {c.bg_phrase()}{c.dist_opt()}"


def _g_distractor_lead(c: _Captioner) -> str:
    gs = c.ordered_groups()
    return f"{c.d.pick(_DISTRACTORS)}: {c.np_list(gs)}{c.bg_opt()}"


def _r_intro(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    out = f"{c.intro(False)} {c.np([a], False)} {c.d.pick(_REL_PHRASES[rel])} {c.np([b], False)}"
    rest = c.rest_groups((a, b))
    if rest and c.d.chance(0.5):
        out += f", {c.d.pick(('and also', 'plus', 'along with'))} {c.np_list(rest)}"
    return out + c.bg_opt() + c.dist_opt()


def _r_is(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    return f"{c.np([a], False)} is {c.d.pick(_REL_PHRASES[rel])} {c.np([b], False)}{c.bg_opt()}"


def _r_inverted(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    verb = c.d.pick(("there is", "sits", "is", "lies", "we see", "you can find"))
    return f"{c.d.pick(_REL_PHRASES[rel])} {c.np([b], False)} {verb} {c.np([a], False)}{c.bg_opt()}"


def _r_with_its(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    link = c.d.pick(("with", "that has"))
    return f"{c.np([b], False)} {link} {c.np([a], False)} {c.d.pick(_REL_ITS[rel])}{c.bg_opt()}{c.dist_opt()}"


def _r_definite(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    pair = c.d.shuffled([a, b])
    return (f"{c.intro(False)} {c.np([pair[0]], False)} and {c.np([pair[1]], False)}; "
            f"{c.definite(a)} is {c.d.pick(_REL_PHRASES[rel])} {c.definite(b)}")


def _r_plus_rest(c: _Captioner) -> str:
    a, b, rel = c.pick_pair()
    rest = c.rest_groups((a, b))
    return (f"{c.np([a], False)} {c.d.pick(_REL_PHRASES[rel])} {c.np([b], False)}, "
            f"{c.d.pick(('with', 'and', 'together with'))} {c.np_list(rest)} nearby{c.bg_opt()}")


def _counted(c: _Captioner) -> tuple[list[SceneObject], str]:
    g = c.d.pick(c.multi)
    words = " ".join(w for w in (c.colour_word(g[0].colour), c.shape_word(g[0].shape, True)))
    return g, words


def _c_exactly(c: _Captioner) -> str:
    g, words = _counted(c)
    return f"{c.intro(True)} exactly {_NUMBER_WORDS[len(g)]} {words}{c.bg_opt()}"


def _c_there_are(c: _Captioner) -> str:
    g, words = _counted(c)
    where = c.d.pick(("", " in this image", " in the picture", " here"))
    out = f"there are {c.count_phrase(len(g))} {words}{where}"
    rest = [h for h in c.ordered_groups() if h is not g]
    if rest and c.d.chance(0.6):
        out += f", {c.d.pick(('along with', 'and', 'plus'))} {c.np_list(rest)}"
    return out + c.bg_opt()


def _c_question(c: _Captioner) -> str:
    g, words = _counted(c)
    q = c.d.pick(("how many", "count the"))
    if q == "how many":
        return f"how many {words} are there? {_NUMBER_WORDS[len(g)]}"
    return f"count the {words}: there are {_NUMBER_WORDS[len(g)]}"


def _c_group_of(c: _Captioner) -> str:
    g, words = _counted(c)
    head = c.d.pick(("a group of", "a set of", "a cluster of", "a collection of"))
    return f"{head} {_NUMBER_WORDS[len(g)]} {words}{c.bg_opt()}{c.dist_opt()}"


_TEMPLATES: dict[str, _Template] = {
    "intro_list": (_any, _g_intro),
    "list_bg": (_any, _g_bare_bg),
    "bg_lead": (_any, _g_bg_lead),
    "bg_subject": (_any, _g_bg_subject),
    "total_count": (_any, _g_total),
    "two_sentences": (_any, _g_two_sentences),
    "can_be_seen": (_any, _g_can_be_seen),
    "distractor": (_any, _g_distractor),
    "following": (_any, _g_following),
    "bg_first": (_any, _g_bg_first_sentence),
    "placed": (_any, _g_placed),
    "distractor_lead": (_any, _g_distractor_lead),
    "rel_intro": (_has_pair, _r_intro),
    "rel_is": (_has_pair, _r_is),
    "rel_inverted": (_has_pair, _r_inverted),
    "rel_with_its": (_has_pair, _r_with_its),
    "rel_definite": (_has_pair, _r_definite),
    "rel_plus_rest": (_has_triple, _r_plus_rest),
    "count_exactly": (_has_count, _c_exactly),
    "count_there_are": (_has_count, _c_there_are),
    "count_question": (_has_count, _c_question),
    "count_group_of": (_has_count, _c_group_of),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


# Eligible template names per (has_pair, has_triple, has_count), precomputed because
# testing 22 predicates per caption is a measurable share of text-only generation.
_ELIGIBLE: dict[tuple[bool, bool, bool], tuple[str, ...]] = {}
for _flags in [(p, t, c) for p in (False, True) for t in (False, True) for c in (False, True)]:
    _pred = {_any: True, _has_pair: _flags[0], _has_triple: _flags[1], _has_count: _flags[2]}
    _ELIGIBLE[_flags] = tuple(n for n, (ok, _) in _TEMPLATES.items() if _pred[ok])
del _flags, _pred


def _compose(scene: Scene, d: _Draw, cfg: WorldConfig) -> tuple[str, str]:
    c = _Captioner(scene, d, cfg)
    flags = (len(c.singles) >= 2, len(c.singles) >= 2 and len(c.groups) >= 3, bool(c.multi))
    name = d.pick(_ELIGIBLE[flags])
    text = " ".join(_TEMPLATES[name][1](c).split()).lower()
    if not d.chance(cfg.p_no_period):
        text += "."
    return text, name


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


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------


class World:
    """Deterministic, streamed image-caption data set (torch ``Dataset`` compatible).

    ``world[i]`` / ``world.sample(i)`` renders on demand; nothing is stored.
    """

    def __init__(self, config: WorldConfig | None = None, **overrides) -> None:
        if config is None:
            config = WorldConfig(**overrides)
        elif overrides:
            config = WorldConfig(**{**config.__dict__, **overrides})
        self.config = config

    # -- streams -------------------------------------------------------------
    def _stream(self, index: int, stream: int = 0, extra: int = 0) -> _Draw:
        return _Draw(_stream_key(self.config.seed, index, stream, extra))

    def _check(self, index: int) -> int:
        index = operator.index(index)
        n = self.config.num_samples
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for World of {n} samples")
        return index

    # -- public API ----------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.config.num_samples

    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int) -> WorldSample:
        return self.sample(index)

    def _scene_and_draw(self, index: int) -> tuple[Scene, _Draw]:
        # One stream per index: the scene is drawn first and the caption continues
        # the same stream, so a text-only caption costs one generator, not two.
        d = self._stream(self._check(index))
        return _sample_scene(self.config, d), d

    def scene(self, index: int) -> Scene:
        """The scene behind ``index`` (no rendering)."""
        return self._scene_and_draw(index)[0]

    def render(self, scene: Scene, size: int | None = None) -> Image.Image:
        return render_scene(scene, size or self.config.image_size)

    def caption_for_scene(self, scene: Scene, rng: np.random.Generator) -> str:
        """One (random) true caption of ``scene``; call repeatedly for paraphrases."""
        return _compose(scene, _Draw(rng), self.config)[0]

    def caption(self, index: int) -> str:
        """``sample(index).caption`` without rendering."""
        scene, d = self._scene_and_draw(index)
        return _compose(scene, d, self.config)[0]

    def sample(self, index: int) -> WorldSample:
        index = self._check(index)
        scene, d = self._scene_and_draw(index)
        caption, template = _compose(scene, d, self.config)
        return WorldSample(self.render(scene), caption, scene, index, template)

    def captions(self, n: int, start: int = 0) -> list[str]:
        """Captions of indices ``start .. start+n-1`` (text only, identical to
        ``sample(i).caption``), e.g. a corpus of probe prompts."""
        return [self.caption(i) for i in range(start, start + n)]

    def caption_views(self, index: int, n_views: int = 2) -> list[str]:
        """``n_views`` distinct paraphrases of the scene at ``index``; view 0 is the
        sample's own caption. Useful for text-only contrastive objectives."""
        index = self._check(index)
        scene, d = self._scene_and_draw(index)
        views = [_compose(scene, d, self.config)[0]]
        for v in range(1, n_views):
            text = ""
            for attempt in range(16):  # redraw duplicates (rare: the grammar is large)
                text = _compose(scene, self._stream(index, v, attempt), self.config)[0]
                if text not in views:
                    break
            views.append(text)
        return views[:n_views]

    def __repr__(self) -> str:
        c = self.config
        return f"World(seed={c.seed}, image_size={c.image_size}, num_samples={c.num_samples})"
