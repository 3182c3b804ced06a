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
from a random stream keyed by ``(seed, i)`` (see ``Draw``: like
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

The package's parts: `vocabulary` (the words), `scenes` (data structures, the per-index random stream, scene
sampling), `captions` (the grammar), `rendering` (PIL/numpy) and `core` (`World`).
"""

from lit_amdet.world.captions import TEMPLATE_NAMES
from lit_amdet.world.core import World
from lit_amdet.world.rendering import render_scene
from lit_amdet.world.scenes import Scene, SceneObject, WorldConfig, WorldSample, relation
from lit_amdet.world.vocabulary import BACKGROUND_COLOURS, BACKGROUND_KINDS, COLOURS, SHAPES, SIZES, TEXTURES

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
    "render_scene",
]
