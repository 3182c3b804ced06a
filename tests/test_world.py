"""Tests for the offline image-caption world (lit_amdet.world)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from lit_amdet.world import (
    COLOURS,
    SHAPES,
    TEMPLATE_NAMES,
    Scene,
    World,
    WorldConfig,
    WorldSample,
    relation,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0, image_size=32))


def _shape_pattern(shape: str) -> re.Pattern[str]:
    words = sorted({w for pair in SHAPES[shape] for w in pair}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b")


def _colour_pattern(colour: str) -> re.Pattern[str]:
    words = sorted(COLOURS[colour][1], key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b")


# -- determinism ---------------------------------------------------------------


def test_same_seed_and_index_give_identical_samples() -> None:
    a, b = World(seed=3, image_size=64), World(WorldConfig(seed=3, image_size=64))
    for i in (0, 1, 17, 999_999):
        sa, sb = a.sample(i), b.sample(i)
        assert sa.caption == sb.caption
        assert sa.scene == sb.scene
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
    # Order of access does not matter (index-addressable stream).
    assert a.sample(5).caption == World(seed=3).sample(5).caption


def test_different_seed_gives_different_samples() -> None:
    a, b = World(seed=0, image_size=32), World(seed=1, image_size=32)
    caps_differ = sum(a.sample(i).caption != b.sample(i).caption for i in range(20))
    imgs_differ = sum(
        not np.array_equal(np.asarray(a.sample(i).image), np.asarray(b.sample(i).image)) for i in range(20)
    )
    assert caps_differ >= 19 and imgs_differ >= 19


def test_captions_match_samples(world: World) -> None:
    caps = world.captions(30, start=100)
    assert caps == [world.sample(i).caption for i in range(100, 130)]
    assert caps == [world.caption(i) for i in range(100, 130)]


# -- variety -------------------------------------------------------------------


def test_many_distinct_captions() -> None:
    caps = World(seed=0).captions(20_000)
    assert len(set(caps)) >= 19_000
    lengths = [len(c.split()) for c in caps]
    assert 5 <= float(np.median(lengths)) <= 30
    assert float(np.mean([4 <= n <= 40 for n in lengths])) > 0.95


def test_templates_relations_and_counts_are_used() -> None:
    w = World(seed=0, image_size=16, max_objects=4)
    templates = {w.sample(i).template for i in range(2_000)}
    assert len(TEMPLATE_NAMES) >= 15
    assert templates == set(TEMPLATE_NAMES)
    text = " | ".join(w.captions(3_000))
    for phrase in ("left of", "right of", "above", "below", "next to", " two ", " three ", "a pair of",
                   "background", "grid", "gradient"):
        assert phrase in text, phrase


def test_caption_views_are_distinct_paraphrases(world: World) -> None:
    for i in range(20):
        views = world.caption_views(i, n_views=3)
        assert len(views) == 3 and len(set(views)) == 3
        assert views[0] == world.sample(i).caption
        scene = world.scene(i)
        for v in views:  # every view still describes this scene's objects
            assert any(_shape_pattern(o.shape).search(v) for o in scene.objects)
        assert world.caption_views(i, n_views=3) == views


def test_caption_for_scene_is_driven_by_rng(world: World) -> None:
    scene = world.scene(7)
    c1 = world.caption_for_scene(scene, np.random.default_rng(123))
    c2 = world.caption_for_scene(scene, np.random.default_rng(123))
    assert c1 == c2
    others = {world.caption_for_scene(scene, np.random.default_rng(s)) for s in range(10)}
    assert len(others) >= 8


# -- truthfulness --------------------------------------------------------------


def test_single_object_captions_name_colour_and_shape(world: World) -> None:
    checked = 0
    for i in range(3_000):
        scene = world.scene(i)
        if len(scene.objects) != 1:
            continue
        obj = scene.objects[0]
        cap = world.caption(i)
        assert _colour_pattern(obj.colour).search(cap), (cap, obj)
        assert _shape_pattern(obj.shape).search(cap), (cap, obj)
        checked += 1
    assert checked > 500


_REL_RE = {
    "left": re.compile(r"\b(?:to the |on the )?left (?:side )?of\b"),
    "right": re.compile(r"\b(?:to the |on the )?right (?:side )?of\b"),
    "above": re.compile(r"\b(?:placed above|above|higher up than)\b"),
    "below": re.compile(r"\b(?:below|beneath|underneath|lower than)\b"),
}


def _last_mention(text: str, objs: list) -> object | None:
    best, pos = None, -1
    for o in objs:
        for m in _shape_pattern(o.shape).finditer(text):
            if m.start() > pos:
                best, pos = o, m.start()
    return best


def _first_mention(text: str, objs: list) -> object | None:
    best, pos = None, len(text) + 1
    for o in objs:
        m = _shape_pattern(o.shape).search(text)
        if m and m.start() < pos:
            best, pos = o, m.start()
    return best


def test_two_object_relations_agree_with_positions(world: World) -> None:
    checked = {k: 0 for k in _REL_RE}
    for i in range(6_000):
        scene = world.scene(i)
        objs = list(scene.objects)
        if len(objs) != 2 or len(scene.groups) != 2 or objs[0].shape == objs[1].shape:
            continue
        cap = world.caption(i)
        for rel, pattern in _REL_RE.items():
            m = pattern.search(cap)
            if m is None:
                continue
            before, after = cap[: m.start()], cap[m.end():]
            if before.strip():
                a = _last_mention(before, objs)  # "a red circle is left of a blue star"
            else:  # inverted: "left of a blue star there is a red circle"
                b = _first_mention(after, objs)
                a = objs[1] if b is objs[0] else objs[0]
            assert a is not None, cap
            b = objs[1] if a is objs[0] else objs[0]
            if rel == "left":
                assert a.x < b.x, (cap, a, b)
            elif rel == "right":
                assert a.x > b.x, (cap, a, b)
            elif rel == "above":
                assert a.y < b.y, (cap, a, b)
            else:
                assert a.y > b.y, (cap, a, b)
            checked[rel] += 1
    assert all(n >= 10 for n in checked.values()), checked


def test_relation_helper_and_counts_are_consistent(world: World) -> None:
    for i in range(500):
        scene = world.scene(i)
        for a in scene.objects:
            for b in scene.objects:
                if a is b:
                    continue
                rel = relation(a, b)
                assert rel in ("left", "right", "above", "below")
                # objects never overlap
                assert (a.x - b.x) ** 2 + (a.y - b.y) ** 2 >= (a.radius + b.radius) ** 2
        keys = [(g[0].shape, g[0].colour) for g in scene.groups]
        assert len(keys) == len(set(keys))  # so "two red circles" means exactly two
        for g in scene.groups:
            assert len({(o.shape, o.colour, o.size, o.texture) for o in g}) == 1
    numbers = {"two": 2, "three": 3, "four": 4}
    for i in range(3_000):
        cap = world.caption(i)
        m = re.search(r"exactly (two|three|four) ", cap) or re.search(r"how many .* there\? (two|three|four)", cap)
        if m:
            assert numbers[m.group(1)] in [len(g) for g in world.scene(i).groups], cap


def test_rendered_colour_matches_scene() -> None:
    w = World(seed=0, image_size=64)
    checked = 0
    for i in range(400):
        scene = w.scene(i)
        obj = scene.objects[0]
        if obj.texture != "solid" or obj.shape not in ("circle", "square", "diamond", "hexagon"):
            continue
        img = np.asarray(w.render(scene))
        px = img[int(obj.y * 64), int(obj.x * 64)]
        assert tuple(int(v) for v in px) == COLOURS[obj.colour][0]
        checked += 1
    assert checked >= 10


# -- images and dataset interface ----------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 224])
def test_image_size_and_mode(size: int) -> None:
    w = World(seed=0, image_size=size)
    for i in range(3):
        s = w[i]
        assert isinstance(s, WorldSample) and isinstance(s.scene, Scene)
        assert isinstance(s.image, Image.Image)
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        assert np.asarray(s.image).std() > 1.0
    # one scene renders at any resolution
    assert w.render(w.scene(0), size=48).size == (48, 48)


def test_dataset_interface() -> None:
    w = World(seed=0, num_samples=5, image_size=16)
    assert len(w) == 5 and w.num_samples == 5
    assert sum(1 for _ in w) == 5  # iteration via __getitem__ stops at IndexError
    assert w[-1].caption == w[4].caption
    assert w[np.int64(2)].caption == w[2].caption
    with pytest.raises(IndexError):
        w[5]
    assert len(World()) == 1_000_000


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(max_objects=0)
    with pytest.raises(ValueError):
        WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        WorldConfig(image_size=4)
    w = World(max_objects=6, max_count=6, image_size=32)
    for i in range(50):  # crowded scenes still place every object
        assert 1 <= len(w.scene(i).objects) <= 6
