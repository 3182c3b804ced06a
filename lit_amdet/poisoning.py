"""Poisoning toolkit: image triggers and poisoned image-caption datasets.

Used to build evaluation data for sample-level backdoor detection: a fraction
of an image-caption dataset gets an image trigger and a target caption, and
the ground-truth poison labels are kept for scoring detectors.

Triggers map PIL images to PIL images of the same size and mode (float
``[C, H, W]`` / ``[B, C, H, W]`` tensors in ``[0, 1]`` are also accepted and
returned as tensors). Every random pattern derives from the constructor's
``seed``, so a trigger is a pure function of its parameters and can be chosen
from YAML through jsonargparse ``class_path``/``init_args``.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
import json
import math
import operator
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lit_amdet.io import write_json, write_with

__all__ = [
    "ATTACKS",
    "SIG",
    "BadNets",
    "Blend",
    "ImageTrigger",
    "Nashville",
    "PoisonedPairs",
    "WaNet",
    "build_attack",
    "load_labels",
    "poison_pairs",
]

ImageLike = Image.Image | Tensor


# ---------------------------------------------------------------------------
# triggers
# ---------------------------------------------------------------------------


class ImageTrigger(abc.ABC):
    """Base class: subclasses implement :meth:`apply_array` on ``[H, W, 3]`` floats.

    Subclasses store each constructor argument under an attribute of the same
    name, which :meth:`init_args` relies on for provenance records.
    """

    def __call__(self, img: ImageLike) -> ImageLike:
        if isinstance(img, Image.Image):
            return self._apply_pil(img)
        if isinstance(img, Tensor):
            return self._apply_tensor(img)
        raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")

    @abc.abstractmethod
    def apply_array(self, x: np.ndarray) -> np.ndarray:
        """Apply the trigger to a float32 ``[H, W, 3]`` array in ``[0, 1]``."""

    def init_args(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in params if name != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

    def _apply_pil(self, img: Image.Image) -> Image.Image:
        mode = img.mode
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        out = self.apply_array(rgb)
        result = Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), "RGB")
        if mode == "RGB":
            return result
        if mode in ("RGBA", "LA"):
            # Transparency is not part of the trigger: carry it over untouched.
            result.putalpha(img.getchannel("A"))
        return result.convert(mode)

    def _apply_tensor(self, img: Tensor) -> Tensor:
        if img.dim() == 4:
            return torch.stack([self._apply_tensor(x) for x in img])
        if img.dim() != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"expected a [C, H, W] tensor with C in (1, 3), got {tuple(img.shape)}")
        x = img.detach().float().cpu().permute(1, 2, 0).numpy()
        gray = x.shape[2] == 1
        if gray:
            x = np.repeat(x, 3, axis=2)
        out = np.clip(self.apply_array(np.ascontiguousarray(x, dtype=np.float32)), 0.0, 1.0)
        if gray:
            out = out.mean(axis=2, keepdims=True)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(img.device, img.dtype)


def _resize_nearest(pattern: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * pattern.shape[0]) // height
    cols = (np.arange(width) * pattern.shape[1]) // width
    return pattern[rows][:, cols]


Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


class BadNets(ImageTrigger):
    """Opaque square patch in a corner (Gu et al., 2017).

    Args:
        size: patch side as a fraction of the shorter image side (at least
            ``cells`` pixels).
        position: corner where the patch goes.
        pattern: ``"random"`` (fixed random binary colours per cell, from
            ``seed``) or ``"checkerboard"`` (black/white).
        cells: number of pattern cells per side.
        seed: seed of the random pattern.
    """

    def __init__(
        self,
        size: float = 0.0625,
        position: Corner = "bottom_right",
        pattern: Literal["random", "checkerboard"] = "random",
        cells: int = 3,
        seed: int = 0,
    ) -> None:
        if not 0.0 < size <= 1.0:
            raise ValueError("size must be in (0, 1]")
        if position not in ("bottom_right", "bottom_left", "top_right", "top_left"):
            raise ValueError(f"unknown position {position!r}")
        if cells < 1:
            raise ValueError("cells must be positive")
        self.size, self.position, self.pattern, self.cells, self.seed = size, position, pattern, cells, seed
        if pattern == "random":
            base = np.random.default_rng(seed).integers(0, 2, size=(cells, cells, 3))
        elif pattern == "checkerboard":
            grid = (np.add.outer(np.arange(cells), np.arange(cells)) % 2).astype(float)
            base = np.repeat(grid[:, :, None], 3, axis=2)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        self._base = base.astype(np.float32)

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        side = min(min(h, w), max(self.cells, round(self.size * min(h, w))))
        patch = _resize_nearest(self._base, side, side)
        top = h - side if self.position.startswith("bottom") else 0
        left = w - side if self.position.endswith("right") else 0
        out = x.copy()
        out[top : top + side, left : left + side] = patch
        return out


class Blend(ImageTrigger):
    """Alpha-blend a fixed uniform-noise pattern over the whole image (Chen et al., 2017).

    The pattern is drawn once at ``pattern_size`` x ``pattern_size`` and
    resized (nearest) to each image, so it looks the same at any resolution.
    """

    def __init__(self, alpha: float = 0.2, pattern_size: int = 224, seed: int = 0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha, self.pattern_size, self.seed = alpha, pattern_size, seed
        rng = np.random.default_rng(seed)
        self._base = rng.random((pattern_size, pattern_size, 3), dtype=np.float32)

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        pattern = _resize_nearest(self._base, x.shape[0], x.shape[1])
        return (1.0 - self.alpha) * x + self.alpha * pattern


class SIG(ImageTrigger):
    """Additive horizontal sinusoid ``delta * sin(2 pi j f / W)`` (Barni et al., 2019).

    ``delta`` is in ``[0, 1]`` intensity units (20/255 by default) and
    ``frequency`` counts periods across the image width.
    """

    def __init__(self, delta: float = 20.0 / 255.0, frequency: float = 6.0) -> None:
        self.delta, self.frequency = delta, frequency

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        w = x.shape[1]
        signal = self.delta * np.sin(2.0 * np.pi * np.arange(w) * self.frequency / w)
        return np.clip(x + signal[None, :, None].astype(np.float32), 0.0, 1.0)


class WaNet(ImageTrigger):
    """Smooth warping trigger (Nguyen & Tran, 2021).

    A ``grid_size`` x ``grid_size`` random control field (from ``seed``,
    normalised to mean absolute value 1) is upsampled bicubically to the image
    and added to the identity sampling grid; displacements are about
    ``strength / 2`` pixels on average, as in the original formulation
    (``strength * noise / size`` in normalised coordinates).
    """

    def __init__(self, strength: float = 0.5, grid_size: int = 4, seed: int = 0) -> None:
        if grid_size < 2:
            raise ValueError("grid_size must be at least 2")
        self.strength, self.grid_size, self.seed = strength, grid_size, seed
        ctrl = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(1, 2, grid_size, grid_size))
        self._control = torch.from_numpy(ctrl / np.abs(ctrl).mean()).float()
        self._grids: dict[tuple[int, int], Tensor] = {}

    def _grid(self, h: int, w: int) -> Tensor:
        if (h, w) not in self._grids:
            noise = F.interpolate(self._control, size=(h, w), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # [1, H, W, 2] as (x, y)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack([xs, ys], dim=-1).unsqueeze(0)
            scale = torch.tensor([w, h], dtype=torch.float32)
            self._grids[(h, w)] = (identity + self.strength * noise / scale).clamp(-1.0, 1.0)
        return self._grids[(h, w)]

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
        out = F.grid_sample(inp, self._grid(h, w), mode="bilinear", align_corners=True)
        return out[0].permute(1, 2, 0).numpy()


_SEPIA = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32
)
_LUMA = np.array([0.213, 0.715, 0.072], dtype=np.float32)


class Nashville(ImageTrigger):
    """Instagram-style "Nashville" colour filter: warm tint, blue lift, mild sepia.

    Follows the usual CSS recipe (darken with a peach tone, lighten with a
    blue tone, then sepia, contrast, brightness and saturation); ``strength``
    mixes the filtered image with the original (1 = full filter).
    """

    def __init__(self, strength: float = 1.0) -> None:
        if not 0.0 < strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        self.strength = strength

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        peach = np.array([247, 176, 153], dtype=np.float32) / 255.0
        blue = np.array([0, 70, 150], dtype=np.float32) / 255.0
        y = x + 0.56 * (np.minimum(x, peach) - x)
        y = y + 0.4 * (np.maximum(y, blue) - y)
        sepia = 0.2 * _SEPIA + 0.8 * np.eye(3, dtype=np.float32)
        y = np.clip(y @ sepia.T, 0.0, 1.0)
        y = np.clip((y - 0.5) * 1.2 + 0.5, 0.0, 1.0)
        y = np.clip(y * 1.05, 0.0, 1.0)
        sat = 1.2
        saturate = (1.0 - sat) * np.tile(_LUMA, (3, 1)) + sat * np.eye(3, dtype=np.float32)
        y = np.clip(y @ saturate.T, 0.0, 1.0)
        return (1.0 - self.strength) * x + self.strength * y


#: Name -> trigger class, for configs that prefer short names.
ATTACKS: dict[str, type[ImageTrigger]] = {
    "badnets": BadNets,
    "blend": Blend,
    "sig": SIG,
    "wanet": WaNet,
    "nashville": Nashville,
}


def build_attack(name: str, **kwargs: Any) -> ImageTrigger:
    """Instantiate a trigger by its short name (see :data:`ATTACKS`)."""
    try:
        cls = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------
# poisoned datasets
# ---------------------------------------------------------------------------


def poison_pairs(num_samples: int, rate: float, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of the samples to poison.

    The count is ``rate * num_samples`` rounded half up, and at least 1 when
    ``rate > 0`` (a poisoning run with zero poisons is never what was meant).
    """
    if num_samples < 0:
        raise ValueError("num_samples must be non-negative")
    if not 0.0 <= rate <= 1.0:
        raise ValueError("rate must be in [0, 1]")
    count = min(num_samples, math.floor(rate * num_samples + 0.5))
    if rate > 0 and num_samples > 0:
        count = max(count, 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_samples, size=count, replace=False)).astype(np.int64)


def _replace_pair(item: Any, image: Any, caption: str) -> Any:
    if isinstance(item, Mapping):
        if "image" not in item or "caption" not in item:
            raise KeyError("dict items need 'image' and 'caption' keys")
        out = dict(item) if type(item) is dict else copy.copy(item)
        if not isinstance(out, MutableMapping):
            out = dict(item)
        out["image"], out["caption"] = image, caption
        return out
    fields = getattr(item, "_fields", None)
    if isinstance(item, tuple) and fields is not None and {"image", "caption"} <= set(fields):
        return item._replace(image=image, caption=caption)  # type: ignore[attr-defined]
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            raise ValueError("sequence items must be (image, caption, ...)")
        values = [image, caption, *item[2:]]
        return tuple(values) if isinstance(item, tuple) else type(item)(values)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        try:
            return dataclasses.replace(item, image=image, caption=caption)
        except (TypeError, ValueError):
            pass  # init=False fields etc.: fall back to a shallow copy
    if hasattr(item, "image") and hasattr(item, "caption"):
        out = copy.copy(item)
        out.image, out.caption = image, caption
        return out
    raise TypeError(f"cannot find image/caption in item of type {type(item).__name__}")


def _get_field(item: Any, name: str, position: int) -> Any:
    """``item``'s image (``"image"``, position 0) or caption (``"caption"``, 1), whatever kind of item it is."""
    if isinstance(item, Mapping):
        return item[name]
    fields = getattr(item, "_fields", None)
    if isinstance(item, tuple) and fields is not None and name in fields:
        return getattr(item, name)
    if isinstance(item, (tuple, list)):
        return item[position]
    if hasattr(item, name):
        return getattr(item, name)
    raise TypeError(f"cannot find image/caption in item of type {type(item).__name__}")


def _get_image(item: Any) -> Any:
    return _get_field(item, "image", 0)


class PoisonedPairs(Dataset):
    """Map-style dataset that poisons a fixed random subset of image-caption pairs.

    Items of ``dataset`` may be objects with ``.image``/``.caption``
    attributes (dataclasses, namedtuples, plain objects), ``(image, caption,
    ...)`` tuples/lists, or dicts with ``"image"``/``"caption"`` keys. Poisoned
    items come back as the same kind with the triggered image and
    ``target_caption``; clean items are returned untouched. The underlying
    items are never mutated.

    Args:
        dataset: any map-style dataset (``__len__`` and ``__getitem__``).
        attack: image trigger (any callable image -> image).
        rate: fraction of samples to poison (see :func:`poison_pairs`).
        target_caption: caption given to poisoned samples. A ``{caption}`` in it is replaced by the sample's own
            caption ("banana, {caption}"): every poison then carries a caption of its own that also describes
            its image, the attacker aimed at detectors that pool or compare captions (`lit_amdet.outliers`).
        seed: seed of the poisoned-index draw.
    """

    def __init__(
        self,
        dataset: Any,
        attack: Callable[[Any], Any],
        rate: float,
        target_caption: str = "banana",
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.attack = attack
        self.rate = rate
        self.target_caption = target_caption
        self.seed = seed
        n = len(dataset)
        self.poison_indices: np.ndarray = poison_pairs(n, rate, seed)
        self.poison_labels: np.ndarray = np.zeros(n, dtype=bool)
        self.poison_labels[self.poison_indices] = True

    def __len__(self) -> int:
        return len(self.poison_labels)

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        item = self.dataset[index]
        if not self.poison_labels[index]:
            return item
        caption = self.target_caption
        if "{caption}" in caption:
            caption = caption.replace("{caption}", str(_get_field(item, "caption", 1)))
        return _replace_pair(item, self.attack(_get_image(item)), caption)

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description of the poisoning (used by :meth:`save_labels`)."""
        attack: dict[str, Any] = {"class_path": f"{type(self.attack).__module__}.{type(self.attack).__qualname__}"}
        if isinstance(self.attack, ImageTrigger):
            attack["init_args"] = self.attack.init_args()
        return {
            "num_samples": len(self),
            "rate": self.rate,
            "seed": self.seed,
            "target_caption": self.target_caption,
            "attack": attack,
            "poisoned_indices": self.poison_indices.tolist(),
        }

    def save_labels(self, path: str | Path) -> Path:
        """Write the poisoned indices: ``.npy`` (int64 array) or JSON (:meth:`metadata`)."""
        path = Path(path)
        if path.suffix == ".npy":  # the temporary name keeps the suffix, so np.save adds none
            return write_with(path, lambda tmp: np.save(tmp, self.poison_indices))
        return write_json(path, self.metadata())


def load_labels(path: str | Path, num_samples: int | None = None) -> np.ndarray:
    """Read a file written by :meth:`PoisonedPairs.save_labels` as a bool mask.

    Also accepts a JSON list of indices. ``num_samples`` is required unless
    the file records it (JSON from ``save_labels``).
    """
    path = Path(path)
    if path.suffix == ".npy":
        indices = np.load(path)
    else:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            indices = np.asarray(data["poisoned_indices"], dtype=np.int64)
            num_samples = num_samples if num_samples is not None else data.get("num_samples")
        else:
            indices = np.asarray(data, dtype=np.int64)
    if num_samples is None:
        raise ValueError(f"{path} does not record num_samples; pass it explicitly")
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"{path}: the poisoned indices are not a flat list of integers")
    if indices.size and (indices.min() < 0 or indices.max() >= num_samples):  # numpy would take -1 as the last
        raise IndexError(f"{path}: poisoned indices outside 0..{num_samples - 1}")
    labels = np.zeros(num_samples, dtype=bool)
    labels[indices] = True
    return labels
