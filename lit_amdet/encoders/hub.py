"""Hub ids: ``org/name``, ``org/name@revision`` and open_clip's ``hf-hub:org/name``, resolved to a snapshot folder.

Only data is fetched: JSON configs, tokenizer files and ``.safetensors`` weights (never pickles or code), and of
a diffusers pipeline only its index, text encoders and tokenizers (not the UNet or VAE). A snapshot already in
the local cache (``HF_HUB_CACHE``) is used without the network; otherwise it is downloaded unless
``HF_HUB_OFFLINE=1``. The commit the id resolved to is kept as the model's ``origin`` (report.json records it),
so a scan names exactly what it scanned. Files of a cached snapshot are symlinks into the repository's
``blobs/``: the repository's cache folder is the root nothing may lead out of.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lit_amdet.errors import CheckpointError, first_line

_ID = re.compile(r"^(hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(@[\w./-]+)?$")
#: what is fetched of a plain model repository, and of a diffusers pipeline (model_index.json at its root)
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer/*"]
PIPELINE_FILES = ["model_index.json", "text_encoder*/*.json", "text_encoder*/*.safetensors", "tokenizer*/*"]


def is_hub_id(raw: str) -> bool:
    """``org/name`` (one slash, no such local path), ``org/name@rev`` or ``hf-hub:org/name``."""
    return bool(_ID.match(raw)) and not raw.startswith((".", "/", "~"))


def parse(raw: str) -> tuple[str, str | None]:
    """(repo id, revision or None)."""
    m = _ID.match(raw)
    if m is None:
        raise CheckpointError(f"{raw}: not a hub id (org/name, org/name@revision or hf-hub:org/name)")
    return m.group(2), (m.group(3) or "")[1:] or None


def display_name(raw: str) -> str:
    return parse(raw)[0]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _download(repo_id: str, revision: str | None, patterns: list[str], local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))


def snapshot(raw: str) -> tuple[Path, Path, dict]:
    """The snapshot folder of hub id ``raw``, the repository's cache folder (the root), and its origin record."""
    repo_id, revision = parse(raw)
    folder = None
    try:
        folder = _download(repo_id, revision, MODEL_FILES, local_only=True)
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub raises several types): try the network
        if _offline():
            raise CheckpointError(f"{raw}: not a local path, and hub id {repo_id} is not in the local hub cache "
                                  "(HF_HUB_OFFLINE=1; download it where the hub is reachable, or give a folder)"
                                  ) from None
    if folder is None:
        try:
            index = _download(repo_id, revision, ["model_index.json", "*.json"], local_only=False)
            patterns = PIPELINE_FILES if (index / "model_index.json").is_file() else MODEL_FILES
            folder = _download(repo_id, revision, patterns, local_only=False)
        except Exception as exc:  # noqa: BLE001 - network, auth and not-found errors all end the same way
            raise CheckpointError(f"{raw}: not a local path, and hub id {repo_id} could not be fetched "
                                  f"({type(exc).__name__}: {first_line(exc)[:200]})") from None
    return folder, folder.parent.parent, {"hub_id": repo_id, "revision": folder.name, "requested": revision}


__all__ = ["display_name", "is_hub_id", "parse", "snapshot"]
