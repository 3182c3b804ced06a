"""Weights files, read without running anything from them: which file of a folder holds the weights, its SHA-256,
and its tensors, all at once (`read_state_dict`) or key by key (`TensorFile`, so a loader reads only the tensors
it needs: one text tower of a single Stable Diffusion file, the text tower of a whole CLIP or SigLIP model).

Safetensors files are mapped and copied out tensor by tensor; a checkpoint in safetensors shards (transformers'
``model.safetensors.index.json`` beside ``model-0000i-of-n.safetensors``) reads the shards its index names;
pickled files only with ``allow_pickle``, and then through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_amdet.encoders.formats import inside, read_config
from lit_amdet.errors import CheckpointError, UnsafeCheckpointError, first_line

SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "model.fp16.safetensors")  # the last: diffusers' half-precision variant of a pipeline component
#: transformers' index of a checkpoint saved in safetensors shards
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth",
                  "model.pt", "model.bin")


def file_sha256(path: Path) -> str:
    """SHA-256 of the weights a load reads: a weights file, or a shard index and the shards it names (in name
    order); a folder stands for its `weights_file`. Only those files: hashing every weights file under a folder
    followed a link in a subfolder out of it, and made the recorded hash depend on files never loaded."""
    h = hashlib.sha256()
    path = weights_file(path) if path.is_dir() else path
    files = [path]
    if path.name == SHARD_INDEX:
        files += [path.parent / shard for shard in sorted(set(_shard_map(path).values()))]
    for f in files:
        if not f.is_file():  # a shard gone since the load, or a FIFO, which would block the read for ever
            raise CheckpointError(f"{f}: not a regular file; its checkpoint cannot be hashed")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_weight_file(p: Path) -> bool:
    return p.suffix in (".safetensors", ".bin", ".pt", ".pth")


def weights_file(folder: Path, root: Path | None = None) -> Path:
    """The file of ``folder`` that holds its weights (a shard index for a checkpoint in shards); it may not lead
    out of ``root`` (default: the folder)."""
    for name in SAFE_WEIGHTS:
        if (folder / name).is_file():
            inside(folder / name, root or folder, "weights file")
            return folder / name
    if (folder / SHARD_INDEX).is_file():
        inside(folder / SHARD_INDEX, root or folder, "shard index")
        return folder / SHARD_INDEX
    for name in PICKLE_WEIGHTS:
        if (folder / name).is_file():
            inside(folder / name, root or folder, "weights file")
            return folder / name
    raise CheckpointError(f"{folder}: no weights file found (expected one of {', '.join(SAFE_WEIGHTS)}, or "
                          f"{SHARD_INDEX} and its shards)")


def read_state_dict(file: Path, allow_pickle: bool = False, mmap: bool = False,
                    root: Path | None = None) -> dict[str, Tensor]:
    """Every tensor of a weights file (``mmap``: map a pickled file's storage instead of reading it, so only the
    tensors used are paged in). A shard index reads its shards (`TensorFile`), none of which may lead out of
    ``root`` (default: the index's folder)."""
    if file.name == SHARD_INDEX:
        return TensorFile(file, allow_pickle, root).state()
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from exc
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{file}: pickled checkpoint refused (unpickling can run code); convert it to safetensors, "
            "or pass --allow_pickle / allow_pickle=True to load it with torch.load(weights_only=True)"
        )
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap or None)
    except Exception as exc:  # pickle raises many types; all mean "refused or unreadable"
        raise CheckpointError(f"{file}: refused by torch.load(weights_only=True): {first_line(exc)}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return obj


def _shard_map(index: Path) -> dict[str, str]:
    """key -> shard file name, from a shard index; a name that is not a plain safetensors file name in the index's
    folder is refused (the index is the untrusted checkpoint's too)."""
    weight_map = read_config(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: unreadable shard index (no 'weight_map' mapping)")
    items = list(weight_map.items())
    for _, shard in items:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise UnsafeCheckpointError(f"{index}: shard {shard!r} is not a safetensors file name in its folder; "
                                        "refused")
    return dict(items)


def _safe_open(path: Path, what: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors {what} ({first_line(exc)})") from None


class TensorFile:
    """The tensors of one weights file or shard index, read key by key: safetensors maps a file and copies out
    only what is asked for. Every shard of an index is opened and checked at once (its header only), those whose
    keys are never read included: each must hold exactly the keys the index maps to it (a key missing from its
    shard, read from another or left out of the index is a one-line error), and may be a link (a hub snapshot's
    files link into its ``blobs/``) but not out of ``root`` (default: the index's folder). Pickled files (only
    with ``allow_pickle``) go through ``torch.load(weights_only=True, mmap=True)``, which runs no code and maps
    the storage instead of reading it."""

    def __init__(self, path: Path, allow_pickle: bool, root: Path | None = None) -> None:
        self.path, self._root = path, root or path.parent
        self._state: dict[str, Tensor] | None = None
        self._handles: dict[str, Any] = {}
        if path.name == SHARD_INDEX:
            self._shard_of = _shard_map(path)
            for shard in sorted(set(self._shard_of.values())):  # every shard checked now, those a load of one
                self._handle(shard)  # tower never reads included (their headers only: the data stays unread)
        elif path.suffix == ".safetensors":
            self._handles[path.name] = _safe_open(path, "file")
            self._shard_of = dict.fromkeys(self._handles[path.name].keys(), path.name)
        else:
            self._state = read_state_dict(path, allow_pickle, mmap=True)
            self._shard_of = dict.fromkeys(self._state, path.name)

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def state(self) -> dict[str, Tensor]:
        """Every tensor, by key."""
        return {key: self.get(key) for key in self._shard_of}

    def get(self, key: str) -> Tensor:
        if self._state is not None:
            return self._state[key]
        shard = self._shard_of[key]
        try:
            return self._handle(shard).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad offsets and dtypes
            raise CheckpointError(f"{self.path.parent / shard}: tensor {key} unreadable ({first_line(exc)})") from None

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = inside(self.path.parent / shard, self._root, "shard")
            if not path.is_file():
                raise CheckpointError(f"{self.path}: shard {shard} is missing (or not a regular file)")
            handle = _safe_open(path, "shard")
            mapped = {k for k, s in self._shard_of.items() if s == shard}
            if set(handle.keys()) != mapped:
                odd = sorted(set(handle.keys()) ^ mapped)
                raise CheckpointError(f"{self.path}: shard {shard} does not hold the keys the index maps to it "
                                      f"({len(odd)} differ, e.g. {odd[0]})")
            self._handles[shard] = handle
        return self._handles[shard]


__all__ = ["PICKLE_WEIGHTS", "SAFE_WEIGHTS", "SHARD_INDEX", "TensorFile", "file_sha256", "is_weight_file",
           "read_state_dict", "weights_file"]
