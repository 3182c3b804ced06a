"""The world's words: shapes, colours, sizes, textures and backgrounds, each with its synonyms.

The first synonym of every entry is the canonical name; ``*_NAMES`` are the keys in a fixed order (what
scene sampling draws from).
"""

from __future__ import annotations

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
GRADIENT_DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")

SHAPE_NAMES = tuple(SHAPES)
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
TEXTURE_NAMES = tuple(TEXTURES)
BACKGROUND_COLOUR_NAMES = tuple(BACKGROUND_COLOURS)
