"""`lit_amdet.augment.typo`: the typo_robust objective's second view."""

from __future__ import annotations

import random

import pytest

from lit_amdet.augment import HOMOGLYPHS, typo
from lit_amdet.world import World


def test_typo_is_deterministic_changes_the_text_and_is_never_empty():
    captions = World(seed=5).captions(300) + ["a", "ab", "aa", "a b", "x.", "hello world"]
    for rate in (0.0, 0.1, 0.5, 1.0):
        for i, text in enumerate(captions):
            out = typo(text, rate, random.Random(i))
            assert out == typo(text, rate, random.Random(i))  # deterministic by seed
            assert out != text and out.strip()  # at least one character changed, never empty
    assert typo("123 !", 0.3, random.Random(0)) == "123 !"  # nothing to misspell
    outputs = {typo("a photo of a dog on a sofa", 0.2, random.Random(s)) for s in range(50)}
    assert len(outputs) > 10  # the seed matters


def test_typo_edits_include_homoglyphs_from_other_scripts():
    assert all(len(v) == 1 and not v.isascii() and k.isascii() for k, v in HOMOGLYPHS.items())
    looked = [typo("a photo of a cozy sofa", 0.5, random.Random(s)) for s in range(200)]
    with_homoglyph = [t for t in looked if any(h in t for h in HOMOGLYPHS.values())]
    assert with_homoglyph and all(sum(t.count(h) for h in HOMOGLYPHS.values()) <= 2 for t in looked)


@pytest.mark.parametrize("text", ["a", "ab", "abc def"])
def test_typo_on_tiny_texts(text):
    for s in range(30):
        out = typo(text, 1.0, random.Random(s))
        assert out and out != text
