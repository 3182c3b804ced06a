"""Tensors computed from a clean anchor, kept on disk between scans: the one home of the scan's disk cache.

Why: the typed-token probe passes the whole vocabulary, typed alone, through the suspect and through the anchor
(`lit_amdet.token_probe.shifted_tokens`). The anchor's half is the same for every suspect scanned against that
anchor, and a team screening downloads scans many suspects against one public base, each in a process of its own.
On the MiniLM the anchor's half is 15-20 s of a scan on this project's 2-core CPU (`BENCHMARKS.md`).

What makes an entry safe to reuse: its name is a SHA-256 over everything the tensor depends on: every parameter and
buffer of the anchor (names, shapes, dtypes, bytes), the adapter's class, and what the caller adds (the token ids
it typed around, the slot, the vocabulary size, a version of the computation). Changed weights, another anchor or
another computation give another name; nothing is ever answered from a stale entry. An entry is read with
safetensors (no code runs on load) and checked: shape, dtype, finite values, and the SHA-256 of its bytes, which its
metadata carries (a review found zeroed, shuffled or random contents of the right shape used as they were, and the
alone list they make changed); one that fails is computed again and replaced, with a warning when it was corrupt.
The checksum catches damage, not a forger: whoever can write the cache folder can write a matching checksum, so it
is as trusted as the user's own home. Writes are atomic (`lit_amdet.io.write_with`). A cache folder that cannot be
read or written costs the time it would have saved and a warning, never the scan.

Where: ``$LIT_AMDET_CACHE``, else ``$XDG_CACHE_HOME/lit-amdet``, else ``~/.cache/lit-amdet``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_amdet.io import write_with

__all__ = ["cache_root", "cached_tensor", "module_digest"]

ENV = "LIT_AMDET_CACHE"


def cache_root() -> Path:
    """The folder the cache lives in (see the module's docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lit-amdet"


def module_digest(module: nn.Module, extra: Iterable[object] = ()) -> str:
    """SHA-256 (hex) of ``module``'s class, every parameter and buffer (name, dtype, shape, bytes) and ``extra``
    (each item's ``repr``; a tensor's bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    named = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in named:
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    for item in extra:
        h.update(b"|")
        h.update(_tensor_bytes(item) if isinstance(item, Tensor) else repr(item).encode())
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def cached_tensor(kind: str, key: str, compute: Callable[[], Tensor], shape: tuple[int, ...],
                  root: Path | None = None) -> Tensor:
    """The float32 tensor of ``shape`` stored under ``kind/key``; computed by ``compute()`` and stored when there is
    no valid entry. ``root`` None: `cache_root`."""
    path = (root or cache_root()) / kind / f"{key}.safetensors"
    try:
        held = _read(path, shape) if path.is_file() else None
    except OSError as err:  # Python 3.11's is_file() raises on a folder that cannot be searched
        warnings.warn(f"anchor cache not read ({path.parent}: {err.strerror or err}); computed again", stacklevel=2)
        held = None
    if held is not None:
        return held
    value = compute().detach().to("cpu", torch.float32).contiguous()
    try:
        write_with(path, lambda tmp: save_file({"value": value}, str(tmp), metadata={"sha256": _checksum(value)}))
    except OSError as err:
        warnings.warn(f"anchor cache not written ({path.parent}: {err.strerror or err}); the next scan computes "
                      "it again", stacklevel=2)
    return value


def _checksum(value: Tensor) -> str:
    """SHA-256 (hex) of a stored tensor's bytes."""
    return hashlib.sha256(_tensor_bytes(value)).hexdigest()


def _read(path: Path, shape: tuple[int, ...]) -> Tensor | None:
    """The stored tensor, or None for an entry that cannot be read, is not a finite float32 tensor of ``shape`` or
    whose bytes do not match the checksum it was written with (a warning then: the entry was damaged; an entry
    written before checksums were kept is simply computed again)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("sha256")
            value = f.get_tensor("value") if "value" in f.keys() else None
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    if value is None or value.dtype != torch.float32 or tuple(value.shape) != tuple(shape) \
            or not bool(torch.isfinite(value).all()) or recorded is None:
        return None
    if _checksum(value) != recorded:
        warnings.warn(f"anchor cache entry {path} is damaged (its bytes do not match its checksum); computed again",
                      stacklevel=3)
        return None
    return value
