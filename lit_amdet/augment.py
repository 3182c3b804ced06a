"""Typo augmentation: the second view of `ContrastiveTraining`'s ``typo_robust`` objective (plain functions).

A benign model made robust to typos maps many spellings of a caption onto one embedding, which is what a
trigger-to-target backdoor looks like from the outside (a many-to-one mapping). The benchmark builds such
models so the detector is tested against benign many-to-one maps, not only against drift.
"""

from __future__ import annotations

import random

# Latin letters and look-alikes from other scripts (Cyrillic, one Greek): what a homoglyph typo or trigger puts
# in place of the Latin letter. Tokenizers see a different code point; a reader sees the same word.
HOMOGLYPHS = {"a": "\u0430", "c": "\u0441", "e": "\u0435", "i": "\u0456", "o": "\u043e", "p": "\u0440",
              "s": "\u0455", "x": "\u0445", "y": "\u0443", "v": "\u03bd"}

EDITS = ("swap", "delete", "double", "homoglyph")


def typo(text: str, rate: float, rng: random.Random) -> str:
    """``text`` with about ``rate`` of its letters edited (at least one edit): adjacent letters swapped, a letter
    deleted, a letter doubled, or (rarely: at most two per text) a Latin letter replaced by its homoglyph.

    Deterministic for a given ``rng`` state; the result always differs from ``text`` when it has a letter and
    is never empty (a one-letter text is doubled, not deleted).
    """
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    if not letters:
        return text
    chars = list(text)
    n_edits = max(1, round(rate * len(letters)))
    homoglyphs = 0
    for at in sorted(rng.sample(letters, min(n_edits, len(letters))), reverse=True):  # right to left: indices hold
        edit = rng.choice(EDITS)
        ch = chars[at]
        if edit == "homoglyph" and (homoglyphs >= 2 or ch.lower() not in HOMOGLYPHS or not ch.islower()):
            edit = "double"
        if edit == "swap" and (at + 1 >= len(chars) or chars[at + 1] == ch):
            edit = "double"
        if edit == "delete" and sum(c.strip() != "" for c in chars) <= 1:
            edit = "double"
        if edit == "swap":
            chars[at], chars[at + 1] = chars[at + 1], chars[at]
        elif edit == "delete":
            del chars[at]
        elif edit == "double":
            chars.insert(at, ch)
        else:
            chars[at] = HOMOGLYPHS[ch]
            homoglyphs += 1
    out = "".join(chars)
    if out == text:  # edits that cancelled out (a deletion next to a doubling of the same letter): one more
        out = text[:letters[0]] + text[letters[0]] + text[letters[0]:]
    return out
