"""Text encoders inside bigger files: diffusers pipeline folders and single-file Stable Diffusion checkpoints.

The backdoors AMDET targets mostly live in the text encoders of text-to-image models, and those are shared
as a diffusers pipeline folder (``model_index.json`` with ``text_encoder/`` and ``tokenizer/`` beside the
UNet and VAE) or as one ``.safetensors`` file in the original Stable Diffusion layout. This module finds the
text encoders in either and gives `loading` what it needs to build each one; nothing else is read.

Single files: the key layouts and their conversion follow diffusers' single-file loader
(``diffusers/loaders/single_file_utils.py``: ``LDM_CLIP_PREFIX_TO_REMOVE``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``, ``DIFFUSERS_TO_LDM_MAPPING["openclip"]``, ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``):

- SD 1.x: ``cond_stage_model.transformer.`` holds a transformers ``CLIPTextModel`` (ViT-L/14); the prefix is
  removed.
- SD 2.x: ``cond_stage_model.model.`` holds the OpenCLIP ViT-H text tower in open_clip's layout; it becomes a
  ``CLIPTextModel`` without the last residual block and without ``text_projection`` (SD 2 conditions on the
  penultimate layer, so diffusers' text encoder has 23 of the 24 blocks).
- SDXL: ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, as SD 1.x) is ``text_encoder``;
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG, open_clip layout, every block, with ``text_projection``)
  is ``text_encoder_2``, a ``CLIPTextModelWithProjection``. The SDXL refiner keeps only bigG, under
  ``conditioner.embedders.0.model.``.

diffusers takes each model's config from the hub; offline it is read from the tensors' shapes instead. The
one number the shapes do not hold, the head count, is width / 64: every Stable Diffusion text encoder uses
64-wide heads (ViT-L 768 / 12, ViT-H 1024 / 16, bigG 1280 / 20). The activation is ViT-L's ``quick_gelu``
for the ``transformer.`` layouts and ``gelu`` for the OpenCLIP towers, as in diffusers' configs.

Only the text encoder's tensors are materialised: safetensors maps the file and copies out just the keys
asked for, so a 7 GB SDXL file costs the text encoders' memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from lit_amdet.errors import CheckpointError, ConfigError, UnsafeCheckpointError, first_line
from lit_amdet.io import read_json

PIPELINE_INDEX = "model_index.json"
#: the classes a pipeline's text encoder and tokenizer entries may name (anything else is refused)
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_MAX_INDEX_BYTES = 1 << 20
_HEAD_WIDTH = 64
_PLAIN = re.compile(r"^[A-Za-z0-9_]+$")


def inside(path: Path, root: Path, what: str) -> Path:
    """``path`` resolved, refused unless it stays inside ``root`` (a symlink must not lead out of the model, nor
    loop: a one-line `CheckpointError`, where Python 3.11 raises a RuntimeError)."""
    try:
        resolved, top = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: {what} cannot be resolved ({first_line(exc)}); refused") from None
    if not resolved.is_relative_to(top):
        raise UnsafeCheckpointError(f"{path}: {what} points outside {root} (to {resolved}); refused")
    return resolved


def read_config(path: Path, what: str = "config") -> dict:
    """A checkpoint's JSON config as a mapping; unreadable bytes, broken JSON, JSON nested past the parser's depth
    or any other shape than an object are a one-line `CheckpointError` naming the file (the file is the untrusted
    checkpoint's: a list where a mapping belongs ended loads in "unexpected AttributeError")."""
    try:
        config = read_json(path, what)
    except ConfigError as exc:  # the file is the checkpoint's: a checkpoint error, exit 2 all the same
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {what} is not a mapping")
    return config


# ----- diffusers pipeline folders ----------------------------------------------------
def is_pipeline(folder: Path) -> bool:
    return folder.is_dir() and (folder / PIPELINE_INDEX).is_file()


def _tokenizer_of(component: str) -> str:
    return "tokenizer" + component.removeprefix("text_encoder")


def pipeline_components(folder: Path, root: Path | None = None) -> list[str]:
    """The text encoders a pipeline's ``model_index.json`` lists (``text_encoder``, ``text_encoder_2``), after
    checking every text-encoder and tokenizer entry names an allowed transformers class and a folder inside
    the pipeline. Other components (UNet, VAE, scheduler) are never loaded, so only their form is checked.
    ``root`` (default: the folder) is what no file may lead out of: a hub snapshot's repository, whose
    ``blobs/`` its files link into."""
    root = root or folder
    index_file = inside(folder / PIPELINE_INDEX, root, PIPELINE_INDEX)
    if index_file.stat().st_size > _MAX_INDEX_BYTES:
        raise CheckpointError(f"{folder / PIPELINE_INDEX}: larger than 1 MiB; not a pipeline index")
    index = read_config(index_file, PIPELINE_INDEX)
    components = []
    for key, entry in index.items():
        if key.startswith("_") or entry is None:
            continue
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CheckpointError(f"{folder / PIPELINE_INDEX}: entry {key!r} is not [library, class]")
        library, cls = entry
        if library is None and cls is None:
            continue  # an optional component the pipeline does not have
        if key.startswith(("text_encoder", "tokenizer")) and not _PLAIN.match(key):
            raise UnsafeCheckpointError(f"{folder / PIPELINE_INDEX}: component {key!r} is not a plain folder name")
        if key.startswith("text_encoder"):
            allowed = TEXT_ENCODER_CLASSES
        elif key.startswith("tokenizer"):
            allowed = TOKENIZER_CLASSES
        else:
            continue
        if library != "transformers" or cls not in allowed:
            raise UnsafeCheckpointError(f"{folder / PIPELINE_INDEX}: {key} is {library}.{cls}; only transformers "
                                        f"{', '.join(allowed)} are loaded")
        sub = folder / key
        if not sub.is_dir():
            raise CheckpointError(f"{folder}: model_index.json lists {key} but there is no {key}/ folder")
        inside(sub, root, f"{key}/")
        if key.startswith("text_encoder"):
            components.append(key)
    if not components:
        raise CheckpointError(f"{folder / PIPELINE_INDEX}: the pipeline lists no text encoder")
    return sorted(components, key=lambda c: (len(c), c))


def pipeline_parts(folder: Path, component: str) -> tuple[Path, Path | None]:
    """The text encoder's folder and its tokenizer's folder (None when the pipeline has none)."""
    tokenizer = folder / _tokenizer_of(component)
    return folder / component, tokenizer if tokenizer.is_dir() else None


# ----- single-file Stable Diffusion checkpoints --------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where one text encoder sits in a single-file checkpoint, and in which form."""

    prefix: str
    component: str
    #: "transformers": HF CLIPTextModel keys; "open_clip": open_clip's text tower keys
    form: str
    model: str
    #: SD 2.x conditions on the penultimate layer: the last block is dropped
    penultimate: bool = False
    projection: bool = False

    @property
    def hidden_act(self) -> str:
        return "quick_gelu" if self.form == "transformers" else "gelu"

    @property
    def pad_token(self) -> str:
        # diffusers' tokenizers: ViT-L pads with <|endoftext|>, the OpenCLIP towers with "!" (open_clip's id 0)
        return "<|endoftext|>" if self.form == "transformers" else "!"


LAYOUTS = (
    Layout("cond_stage_model.transformer.", "text_encoder", "transformers", "SD 1.x"),
    Layout("cond_stage_model.model.", "text_encoder", "open_clip", "SD 2.x", penultimate=True),
    Layout("conditioner.embedders.0.transformer.", "text_encoder", "transformers", "SDXL"),
    Layout("conditioner.embedders.1.model.", "text_encoder_2", "open_clip", "SDXL", projection=True),
    Layout("conditioner.embedders.0.model.", "text_encoder_2", "open_clip", "SDXL refiner", projection=True),
)
KNOWN_PREFIXES = ", ".join(dict.fromkeys(lay.prefix for lay in LAYOUTS))


def single_file_layouts(keys: list[str], where: str) -> dict[str, Layout]:
    """component -> layout for the text encoders whose keys are in ``keys``."""
    found: dict[str, Layout] = {}
    for layout in LAYOUTS:
        if layout.form == "open_clip":
            present = layout.prefix + "token_embedding.weight" in keys
        else:
            present = any(k.startswith(layout.prefix) and k.endswith("token_embedding.weight") for k in keys)
        if present and layout.component not in found:
            found[layout.component] = layout
    if not found:
        raise CheckpointError(f"{where}: no text encoder in a known single-file layout (keys under "
                              f"{KNOWN_PREFIXES}); for an open_clip weights file give model_name")
    return found


def text_state(tensors, layout: Layout) -> dict[str, Tensor]:
    """The text encoder's weights under transformers' CLIP names (diffusers' conversion); ``tensors`` is a
    `lit_amdet.encoders.weights.TensorFile` (``keys()``, ``get(key)``, ``path``)."""
    raw = {k[len(layout.prefix):]: tensors.get(k) for k in tensors.keys() if k.startswith(layout.prefix)}
    if layout.form == "transformers":
        return raw
    return open_clip_to_transformers(raw, layout, str(tensors.path))


_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
_TOP_NAMES = {"positional_embedding": "embeddings.position_embedding.weight",
              "token_embedding.weight": "embeddings.token_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def open_clip_to_transformers(raw: dict[str, Tensor], layout: Layout, where: str) -> dict[str, Tensor]:
    """open_clip's text tower keys -> ``CLIPTextModel``'s: blocks renamed, the fused ``in_proj`` split into q,
    k and v, ``text_projection`` transposed (kept only with ``layout.projection``), SD 2's last block dropped."""
    blocks = sorted({int(m.group(1)) for k in raw if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where}: {layout.prefix}transformer.resblocks.N are missing or not numbered 0..N-1")
    keep = len(blocks) - 1 if layout.penultimate else len(blocks)
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key in _TOP_NAMES:
            out["text_model." + _TOP_NAMES[key]] = value
        elif key == "text_projection" and layout.projection:
            out["text_projection.weight"] = value.T.contiguous()
        elif m := _BLOCK.match(key):
            index, rest = int(m.group(1)), m.group(2)
            if index >= keep:
                continue
            base = f"text_model.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                if value.shape[0] % 3:
                    raise CheckpointError(f"{where}: {layout.prefix}{key} has {value.shape[0]} rows, not 3 x width")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                stem, _, leaf = rest.rpartition(".")
                out[base + _BLOCK_NAMES.get(stem, stem) + "." + leaf] = value
    return out


def text_config(state: dict[str, Tensor], layout: Layout, where: str):
    """A ``CLIPTextConfig`` read off the converted weights' shapes (see the module's docstring)."""
    from transformers import CLIPTextConfig

    def tensor(name: str) -> Tensor:
        for key in (name, name.removeprefix("text_model.")):
            if key in state:
                return state[key]
        raise CheckpointError(f"{where}: {layout.model} text encoder has no {name}")

    token = tensor("text_model.embeddings.token_embedding.weight")
    positions = tensor("text_model.embeddings.position_embedding.weight")
    fc1 = tensor("text_model.encoder.layers.0.mlp.fc1.weight")
    if token.ndim != 2 or positions.ndim != 2 or fc1.ndim != 2:
        raise CheckpointError(f"{where}: {layout.model} text encoder's embedding or MLP weights are not matrices")
    vocab, width = token.shape
    if width % _HEAD_WIDTH:
        raise CheckpointError(f"{where}: width {width} is not a multiple of the 64-wide heads every Stable "
                              "Diffusion text encoder uses")
    layers = len({k.split("encoder.layers.")[1].split(".")[0] for k in state if "encoder.layers." in k})
    extra = {}
    if layout.projection:
        extra["projection_dim"] = int(tensor("text_projection.weight").shape[0])
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(fc1.shape[0]),
                          num_hidden_layers=layers, num_attention_heads=int(width) // _HEAD_WIDTH,
                          max_position_embeddings=int(positions.shape[0]), hidden_act=layout.hidden_act, **extra)


__all__ = ["LAYOUTS", "Layout", "inside", "is_pipeline", "pipeline_components", "pipeline_parts", "read_config",
           "single_file_layouts", "text_config", "text_state"]
