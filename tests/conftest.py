"""Shared fixtures: tiny models of every family, built once per test session in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on this project's 2 cores: one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # set before torch is imported (two threads each oversubscribe)

SHARED = Path(__file__).resolve().parents[2] / "shared"

# name -> (builder, kwargs); every supported architecture the adapters claim
TINY_MODELS = {
    "clip": ("build_hf_clip", {"arch": "CLIPModel"}),
    "clip_text": ("build_hf_clip", {"arch": "CLIPTextModel"}),
    "clip_text_proj": ("build_hf_clip", {"arch": "CLIPTextModelWithProjection"}),
    "longclip": ("build_hf_clip", {"arch": "CLIPModel", "context": 248}),
    "siglip": ("build_hf_siglip", {"arch": "SiglipModel"}),
    "siglip_text": ("build_hf_siglip", {"arch": "SiglipTextModel"}),
    "openclip": ("build_openclip", {}),
    "openclip_custom": ("build_openclip", {"custom_text": True, "causal": False, "pool_type": "last"}),
    "bert": ("build_hf_bert", {}),
}


@pytest.fixture(autouse=True)
def _anchor_cache(tmp_path, monkeypatch):
    """Each test its own empty disk cache (`lit_amdet.anchor_cache`): none reads another's entries or the user's."""
    monkeypatch.setenv("LIT_AMDET_CACHE", str(tmp_path / "lit-amdet-cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from lit_amdet import tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: getattr(tiny, fn)(root / name, **kw) for name, (fn, kw) in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def shared_prompts() -> list[str]:
    path = SHARED / "data" / "prompts.txt"
    if not path.is_file():
        pytest.skip("../shared/data/prompts.txt not present")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
