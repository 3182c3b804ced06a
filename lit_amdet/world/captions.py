"""The caption grammar: one true caption of a scene from a random stream.

22 sentence templates over noun-phrase variants, synonyms, relations, counts, background mentions and
distractor clauses; `compose` picks an eligible template and fills it in. Every caption is read off the
scene, so it is true of the image.
"""

from __future__ import annotations

from typing import Callable, Sequence

from lit_amdet.world.scenes import Draw, Scene, SceneObject, WorldConfig, position_of, relation
from lit_amdet.world.vocabulary import BACKGROUND_COLOURS, COLOURS, SHAPES, SIZES, TEXTURES

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
# Caption grammar
# ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class _Captioner:
    """Builds one caption for one scene from one random stream."""

    def __init__(self, scene: Scene, d: Draw, cfg: WorldConfig) -> None:
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
            pos = position_of(obj)
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


def compose(scene: Scene, d: Draw, cfg: WorldConfig) -> tuple[str, str]:
    c = _Captioner(scene, d, cfg)
    flags = (len(c.singles) >= 2, len(c.singles) >= 2 and len(c.groups) >= 3, bool(c.multi))
    name = d.pick(_ELIGIBLE[flags])
    text = " ".join(_TEMPLATES[name][1](c).split()).lower()
    if not d.chance(cfg.p_no_period):
        text += "."
    return text, name
