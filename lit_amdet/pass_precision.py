"""The precision the typed-token probe computes its vocabulary passes and screens its typings in.

Plain torch, beside `lit_amdet.token_probe`, which re-exports it: one switch (`vocabulary_precision`, a context
variable so a scan's setting reaches every pass it makes without threading a dtype through each call) and the dtype
it means on a device (`pass_dtype`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal, get_args

import torch

__all__ = ["PRECISIONS", "Precision", "checked_precision", "pass_dtype", "vocabulary_precision"]

# The precision of the vocabulary passes. They only rank tokens for typing, and they are the probe's largest cost:
# on a CPU with native bfloat16 (AVX512-BF16) the MiniLM's passes ran 1.4-1.7x faster in bfloat16, and every list a
# scan makes held the same tokens (`BENCHMARKS.md`, "The vocabulary passes in bfloat16"); on a CPU without, autocast
# emulates it 5x slower. The typings are screened at it too, each one near a threshold typed again in float32
# (`lit_amdet.typed_verdict.screened_near`).
#: "auto": bfloat16 where the device computes it natively (a CUDA device that supports it, a CPU with AVX512-BF16
#: or AMX tiles), else float32
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_PRECISION: ContextVar[str] = ContextVar("vocabulary_precision", default="auto")


def checked_precision(precision: str) -> str:
    """``precision`` if it is one of `PRECISIONS`, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"vocabulary precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


@contextlib.contextmanager
def vocabulary_precision(precision: str) -> Iterator[None]:
    """Inside the block, the vocabulary passes (`alone_outputs`) run at ``precision`` (one of `PRECISIONS`)."""
    checked_precision(precision)
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def pass_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype the vocabulary passes compute in on ``device``, under the current `vocabulary_precision`."""
    precision, kind = _PRECISION.get(), torch.device(device).type
    if precision != "auto":
        return getattr(torch, precision)
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return torch.bfloat16 if any(f is not None and f() for f in native) else torch.float32
    return torch.float32
