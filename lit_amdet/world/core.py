"""`World`: the streamed image-caption data set over scenes, captions and rendering."""

from __future__ import annotations

import operator

import numpy as np
from PIL import Image

from lit_amdet.world.captions import compose
from lit_amdet.world.rendering import render_scene
from lit_amdet.world.scenes import Draw, Scene, WorldConfig, WorldSample, sample_scene, stream_key

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
    def _stream(self, index: int, stream: int = 0, extra: int = 0) -> Draw:
        return Draw(stream_key(self.config.seed, index, stream, extra))

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

    def _scene_and_draw(self, index: int) -> tuple[Scene, Draw]:
        # One stream per index: the scene is drawn first and the caption continues
        # the same stream, so a text-only caption costs one generator, not two.
        d = self._stream(self._check(index))
        return sample_scene(self.config, d), d

    def scene(self, index: int) -> Scene:
        """The scene behind ``index`` (no rendering)."""
        return self._scene_and_draw(index)[0]

    def render(self, scene: Scene, size: int | None = None) -> Image.Image:
        return render_scene(scene, size or self.config.image_size)

    def caption_for_scene(self, scene: Scene, rng: np.random.Generator) -> str:
        """One (random) true caption of ``scene``; call repeatedly for paraphrases."""
        return compose(scene, Draw(rng), self.config)[0]

    def caption(self, index: int) -> str:
        """``sample(index).caption`` without rendering."""
        scene, d = self._scene_and_draw(index)
        return compose(scene, d, self.config)[0]

    def sample(self, index: int) -> WorldSample:
        index = self._check(index)
        scene, d = self._scene_and_draw(index)
        caption, template = compose(scene, d, self.config)
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
        views = [compose(scene, d, self.config)[0]]
        for v in range(1, n_views):
            text = ""
            for attempt in range(16):  # redraw duplicates (rare: the grammar is large)
                text = compose(scene, self._stream(index, v, attempt), self.config)[0]
                if text not in views:
                    break
            views.append(text)
        return views[:n_views]

    def __repr__(self) -> str:
        c = self.config
        return f"World(seed={c.seed}, image_size={c.image_size}, num_samples={c.num_samples})"
