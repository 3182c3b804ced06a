"""Tests for lit_amdet.poisoning."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from lit_amdet.poisoning import (
    SIG,
    BadNets,
    Blend,
    ImageTrigger,
    Nashville,
    PoisonedPairs,
    WaNet,
    build_attack,
    load_labels,
    poison_pairs,
)

ATTACK_FACTORIES = {
    "badnets": lambda: BadNets(),
    "badnets_checker": lambda: BadNets(pattern="checkerboard", position="top_left", size=0.2),
    "blend": lambda: Blend(),
    "sig": lambda: SIG(),
    "wanet": lambda: WaNet(strength=1.0),
    "nashville": lambda: Nashville(),
}


def random_image(seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img.putalpha(Image.fromarray(arr[:, :, 0]))
        return img
    return img.convert(mode)


# ---------------------------------------------------------------------------
# triggers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACK_FACTORIES))
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_attack_changes_image_keeps_size_and_mode(name, mode):
    img = random_image(1, mode=mode)
    before = np.asarray(img).copy()
    out = ATTACK_FACTORIES[name]()(img)
    assert isinstance(out, Image.Image)
    assert out.size == img.size and out.mode == img.mode
    assert not np.array_equal(np.asarray(out), before)
    np.testing.assert_array_equal(np.asarray(img), before)  # input untouched
    if mode == "RGBA":
        np.testing.assert_array_equal(np.asarray(out)[..., 3], before[..., 3])


@pytest.mark.parametrize("name", sorted(ATTACK_FACTORIES))
def test_attack_is_deterministic(name):
    img = random_image(2)
    a = ATTACK_FACTORIES[name]()(img)
    b = ATTACK_FACTORIES[name]()(img)  # fresh instance, same parameters
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("cls", [BadNets, Blend, WaNet])
def test_seed_changes_pattern(cls):
    img = random_image(3)
    a, b = cls(seed=0)(img), cls(seed=1)(img)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_badnets_patch_location_and_size():
    img = Image.new("RGB", (100, 80), (128, 128, 128))
    out = np.asarray(BadNets(size=0.1, pattern="checkerboard", position="bottom_right")(img)).astype(int)
    changed = np.argwhere((out != 128).any(axis=2))
    # 0.1 * min(100, 80) = 8 px patch in the bottom-right corner.
    assert changed[:, 0].min() >= 72 and changed[:, 1].min() >= 92
    assert set(np.unique(out[72:, 92:])) <= {0, 255}


def test_tensor_input():
    x = torch.rand(3, 32, 24, generator=torch.Generator().manual_seed(0))
    for name, make in ATTACK_FACTORIES.items():
        y = make()(x)
        assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype, name
        assert not torch.equal(y, x), name
        assert y.min() >= 0 and y.max() <= 1, name
    batch = Blend()(torch.stack([x, x]))
    assert batch.shape == (2, 3, 32, 24) and torch.equal(batch[0], batch[1])
    gray = SIG()(x[:1])
    assert gray.shape == (1, 32, 24)


def test_build_attack_and_repr():
    attack = build_attack("blend", alpha=0.3, seed=5)
    assert isinstance(attack, Blend) and isinstance(attack, ImageTrigger)
    assert attack.init_args() == {"alpha": 0.3, "pattern_size": 224, "seed": 5}
    assert "alpha=0.3" in repr(attack)
    with pytest.raises(ValueError):
        build_attack("nope")


# ---------------------------------------------------------------------------
# index selection
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,rate,expected",
    [(100, 0.1, 10), (10, 0.01, 1), (10, 0.0, 0), (7, 0.5, 4), (1000, 0.0015, 2), (5, 1.0, 5), (0, 0.5, 0)],
)
def test_poison_pairs_count(n, rate, expected):
    idx = poison_pairs(n, rate, seed=0)
    assert len(idx) == expected
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < n)


def test_poison_pairs_seeded():
    np.testing.assert_array_equal(poison_pairs(500, 0.1, 3), poison_pairs(500, 0.1, 3))
    assert not np.array_equal(poison_pairs(500, 0.1, 3), poison_pairs(500, 0.1, 4))
    with pytest.raises(ValueError):
        poison_pairs(10, 1.5)
    with pytest.raises(ValueError):
        poison_pairs(10, -0.1)


# ---------------------------------------------------------------------------
# PoisonedPairs
# ---------------------------------------------------------------------------


@dataclass
class Pair:
    image: Image.Image
    caption: str
    uid: int


class AttrPair:
    def __init__(self, image, caption):
        self.image, self.caption = image, caption


NTPair = namedtuple("NTPair", ["image", "caption", "uid"])

N = 20


def make_items(kind: str) -> list:
    items = []
    for i in range(N):
        img, cap = random_image(100 + i, size=(24, 20)), f"caption {i}"
        items.append(
            {
                "dataclass": lambda: Pair(img, cap, i),
                "attr": lambda: AttrPair(img, cap),
                "namedtuple": lambda: NTPair(img, cap, i),
                "tuple": lambda: (img, cap, i),
                "list": lambda: [img, cap],
                "dict": lambda: {"image": img, "caption": cap, "uid": i},
            }[kind]()
        )
    return items


def unpack(item):
    if isinstance(item, dict):
        return item["image"], item["caption"]
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        return item[0], item[1]
    return item.image, item.caption


@pytest.mark.parametrize("kind", ["dataclass", "attr", "namedtuple", "tuple", "list", "dict"])
def test_poisoned_pairs(kind):
    items = make_items(kind)
    originals = [(np.asarray(unpack(it)[0]).copy(), unpack(it)[1]) for it in items]
    ds = PoisonedPairs(items, BadNets(size=0.25), rate=0.25, target_caption="banana", seed=1)
    assert len(ds) == N
    assert ds.poison_labels.dtype == bool and ds.poison_labels.sum() == 5
    changed, captions = [], []
    for i in range(N):
        out = ds[i]
        assert type(out) is type(items[i])
        img, cap = unpack(out)
        changed.append(not np.array_equal(np.asarray(img), originals[i][0]))
        captions.append(cap)
        assert img.size == (24, 20)
        if kind in ("dataclass", "namedtuple", "dict", "tuple"):
            uid = out["uid"] if kind == "dict" else (out[2] if kind == "tuple" else out.uid)
            assert uid == i  # extra fields preserved
    np.testing.assert_array_equal(np.array(changed), ds.poison_labels)
    for i, cap in enumerate(captions):
        assert cap == ("banana" if ds.poison_labels[i] else f"caption {i}")
    # The wrapped dataset is never mutated.
    for it, (img, cap) in zip(items, originals):
        assert unpack(it)[1] == cap
        np.testing.assert_array_equal(np.asarray(unpack(it)[0]), img)
    # Negative indexing agrees with positive.
    assert unpack(ds[-1])[1] == captions[-1]


@pytest.mark.parametrize("kind", ["dataclass", "attr", "namedtuple", "tuple", "list", "dict"])
def test_poisoned_pairs_can_keep_each_poisons_own_caption(kind):
    ds = PoisonedPairs(make_items(kind), BadNets(size=0.25), rate=0.25, target_caption="banana, {caption}", seed=1)
    for i in range(N):
        assert unpack(ds[i])[1] == (f"banana, caption {i}" if ds.poison_labels[i] else f"caption {i}")


def test_poisoned_pairs_rejects_unknown_items():
    ds = PoisonedPairs([object()] * 4, Blend(), rate=1.0)
    with pytest.raises(TypeError):
        ds[0]


def test_save_and_load_labels(tmp_path):
    ds = PoisonedPairs(make_items("tuple"), SIG(), rate=0.2, seed=2)
    json_path = ds.save_labels(tmp_path / "labels.json")
    data = json.loads(json_path.read_text())
    assert data["poisoned_indices"] == ds.poison_indices.tolist()
    assert data["num_samples"] == N and data["target_caption"] == "banana"
    assert data["attack"]["class_path"] == "lit_amdet.poisoning.SIG"
    np.testing.assert_array_equal(load_labels(json_path), ds.poison_labels)

    npy_path = ds.save_labels(tmp_path / "sub" / "labels.npy")
    np.testing.assert_array_equal(np.load(npy_path), ds.poison_indices)
    np.testing.assert_array_equal(load_labels(npy_path, num_samples=N), ds.poison_labels)
    with pytest.raises(ValueError):
        load_labels(npy_path)
    # written atomically through a temporary sibling that keeps the suffix (np.save appends none)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["labels.json", "labels.npy"]
